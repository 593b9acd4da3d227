-- An API key's sliding windows (requests admitted, tokens charged), prepended to the scripts that read or change
-- them: the key's reservation and refund and the batch release's charge (gateway), the finish and accounting scripts
-- (worker, for the reconciliation).
-- A window is a hash: unix second -> amount, plus 't' (the total of those seconds), 'o' and 'n' (the oldest and newest
-- second held). The last SPAN seconds count: a second leaves the window SPAN seconds after it began. Reading it drops
-- the seconds that left, walking from the oldest (amortised: about one second per second of traffic), so admission
-- never scans the whole window; only a refusal walks it, to say when enough will have left.
local SPAN = 60

-- drop the seconds that left the window; returns the total, and the oldest and newest seconds still in it
local function window_prune(key, now)
  local meta = redis.call('HMGET', key, 't', 'o', 'n')
  local total, oldest, newest = tonumber(meta[1]) or 0, tonumber(meta[2]), tonumber(meta[3])
  if not oldest or oldest + SPAN > now then return total, oldest, newest end
  if newest + SPAN <= now then
    redis.call('DEL', key)
    return 0, nil, nil
  end
  local second = oldest
  while second + SPAN <= now do  -- newest is in the window, so this walks at most SPAN seconds
    local amount = redis.call('HGET', key, second)
    if amount then
      total = total - tonumber(amount)
      redis.call('HDEL', key, second)
    end
    second = second + 1
  end
  while not redis.call('HGET', key, second) do second = second + 1 end  -- stops at newest at the latest
  redis.call('HSET', key, 't', total, 'o', second)
  return total, second, newest
end

-- {limit, used, retry ms, reset ms} of a window for `cost` more: retry 0 when it fits now, -1 never (cost > limit)
local function window(key, limit, cost, now)
  local used, oldest, newest = window_prune(key, now)
  local retry = 0
  if cost > limit then
    retry = -1
  elseif used + cost > limit then  -- the oldest seconds leave first: when will enough have left?
    local freed, second = 0, oldest
    while second <= newest do
      freed = freed + (tonumber(redis.call('HGET', key, second)) or 0)
      if used - freed + cost <= limit then
        retry = math.ceil((second + SPAN - now) * 1000)
        break
      end
      second = second + 1
    end
  end
  local reset = 0
  if newest then reset = math.ceil((newest + SPAN - now) * 1000) end
  return {limit, used, retry, reset}
end

-- add `amount` to second `second` (the current second: the window was read in this script)
local function charge(key, second, amount)
  second = tonumber(second)
  redis.call('HINCRBY', key, second, amount)
  redis.call('HINCRBY', key, 't', amount)
  local meta = redis.call('HMGET', key, 'o', 'n')
  if not meta[1] or second < tonumber(meta[1]) then redis.call('HSET', key, 'o', second) end
  if not meta[2] or second > tonumber(meta[2]) then redis.call('HSET', key, 'n', second) end
  redis.call('EXPIRE', key, SPAN + 2)
end

-- correct what second `second` was charged by `delta`, if that second still counts (else it left the window already)
local function recharge(key, second, delta)
  if redis.call('HEXISTS', key, second) == 1 then
    redis.call('HINCRBY', key, second, delta)
    redis.call('HINCRBY', key, 't', delta)
  end
end
