-- Admit and enqueue one job atomically: one round trip, so every bound (the model's queue depth, an API key's limits)
-- is exact however many gateways admit at once. conveyor/rate_window.lua is prepended, and the queue backend's lane
-- functions (depth_of, enqueue, wake: gateway.arq_queue, gateway.streams_queue), so this runs unchanged on both.
-- KEYS: 1 live-workers zset, 2 model card, 3 the backend's lane, 4 its job key, 5 the model's wake-up channel, 6 the
--       model's scale-to-zero marker (a model with no worker that has it waits for one: contract.scale_to_zero_key);
--       with an API key: 7 its record, 8 its requests window, 9 its tokens window, 10 its unfinished jobs
-- ARGV: 1 now (unix s), 2 max depth, 3 capability needed, 4 the backend's job data, 5 expiry ms, 6 score (enqueue ms),
--       7 job id; with an API key: 8 model, 9 tokens charged, 10 bucket second, 11 deadline (unix s)
-- Returns {code, queue depth, then with a key: for requests and for tokens each limit, used, retry ms, reset ms (all
-- -1 when the key sets no such limit)}, used before this job. Codes: 1 enqueued, 0 no live worker, 2 queue full,
-- 3 capability missing, 4 duplicate job id, 5 key revoked, 6 model not allowed for the key, 7 over the requests per
-- minute, 8 over the tokens per minute, 9 larger than the tokens per minute, 10 over the key's queued jobs, 11 the
-- model's workers take jobs from another queue backend than BACKEND (this script's, set by its lane functions).
local now = tonumber(ARGV[1])
local depth = depth_of(KEYS[3])
local keyed = #KEYS > 6
local none = {-1, -1, -1, -1}
local requests, tokens = none, none
local record
if keyed then
  record = redis.call('HMGET', KEYS[7], 'name', 'revoked_at', 'rpm', 'tpm', 'max_queued', 'models')
  if not record[1] or record[2] then return {5, depth} end
  if record[6] then
    local allowed = false
    for _, model in ipairs(cjson.decode(record[6])) do
      if model == ARGV[8] then allowed = true end
    end
    if not allowed then return {6, depth} end
  end
end
local function result(code)  -- the code, the depth and the key's windows
  local out = {code, depth}
  for _, v in ipairs(requests) do out[#out + 1] = v end
  for _, v in ipairs(tokens) do out[#out + 1] = v end
  return out
end
local live = redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
local card = redis.call('GET', KEYS[2])
local capabilities
if live > 0 and card then
  local info = cjson.decode(card)
  if (info['queue_backend'] or 'arq') ~= BACKEND then return {11, depth} end
  capabilities = info['capabilities']
else
  local zero = redis.call('GET', KEYS[6])  -- no worker now: it waits for one if the model may be at zero
  if not zero then return {0, depth} end
  capabilities = card and cjson.decode(card)['capabilities'] or cjson.decode(zero)
end
if #capabilities > 0 then
  local capable = false
  for _, capability in ipairs(capabilities) do
    if capability == ARGV[3] then capable = true end
  end
  if not capable then
    return {3, depth}
  end
end
if keyed then
  if record[3] then requests = window(KEYS[8], tonumber(record[3]), 1, now) end
  if record[4] then tokens = window(KEYS[9], tonumber(record[4]), tonumber(ARGV[9]), now) end
  if requests[3] ~= 0 and requests ~= none then return result(7) end
  if tokens[3] == -1 and tokens ~= none then return result(9) end
  if tokens[3] ~= 0 and tokens ~= none then return result(8) end
  if record[5] then
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
    if redis.call('ZCARD', KEYS[10]) >= tonumber(record[5]) then return result(10) end
  end
end
if depth >= tonumber(ARGV[2]) then
  return result(2)
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {4, depth}
end
enqueue(KEYS[3], KEYS[4], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
wake(KEYS[5])
if keyed then
  if requests ~= none then charge(KEYS[8], ARGV[10], 1) end
  if tokens ~= none then charge(KEYS[9], ARGV[10], ARGV[9]) end
  if record[5] then
    redis.call('ZADD', KEYS[10], ARGV[11], ARGV[7])
    local ttl = math.ceil(tonumber(ARGV[11]) - now) + 1
    if redis.call('TTL', KEYS[10]) < ttl then redis.call('EXPIRE', KEYS[10], ttl) end
  end
end
return result(1)
