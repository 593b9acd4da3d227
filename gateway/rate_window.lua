-- An API key's sliding windows, prepended to admission.lua and to the batch release script.
-- A window is a hash: unix second -> amount (requests admitted, tokens charged); the last SPAN seconds count.
-- Buckets that left the window are deleted as they are read.
local SPAN = 60

-- {limit, used, retry ms, reset ms} of one window for `cost` more: retry 0 when it fits now, -1 never (cost > limit)
local function window(key, limit, cost, now)
  local fields = redis.call('HGETALL', key)
  local buckets, used = {}, 0
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second + SPAN <= now then
      redis.call('HDEL', key, fields[i])
    else
      used = used + tonumber(fields[i + 1])
      buckets[#buckets + 1] = {second, tonumber(fields[i + 1])}
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local retry = 0
  if cost > limit then
    retry = -1
  elseif used + cost > limit then
    local freed = 0
    for _, bucket in ipairs(buckets) do
      freed = freed + bucket[2]
      if used - freed + cost <= limit then
        retry = math.ceil((bucket[1] + SPAN - now) * 1000)
        break
      end
    end
  end
  local reset = 0
  if #buckets > 0 then reset = math.ceil((buckets[#buckets][1] + SPAN - now) * 1000) end
  return {limit, used, retry, reset}
end

-- charge `amount` to the bucket of second `second`
local function charge(key, second, amount)
  redis.call('HINCRBY', key, second, amount)
  redis.call('EXPIRE', key, SPAN + 2)
end
