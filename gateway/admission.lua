-- Admit and enqueue one job atomically: one round trip, and the queue-depth bound is exact.
-- KEYS: 1 live-workers zset, 2 model card, 3 arq queue zset, 4 arq job key, 5 the model's wake-up channel
-- ARGV: 1 now (unix s), 2 max depth, 3 capability needed, 4 serialised arq job, 5 expiry ms, 6 score (enqueue ms),
--       7 job id
-- Returns {code, queue depth}: 1 enqueued, 0 no live worker, 2 queue full, 3 capability missing,
-- 4 duplicate job id.
local live = redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
local card = redis.call('GET', KEYS[2])
local depth = redis.call('ZCARD', KEYS[3])
if live == 0 or not card then
  return {0, depth}
end
local capable = false
for _, capability in ipairs(cjson.decode(card)['capabilities']) do
  if capability == ARGV[3] then capable = true end
end
if not capable then
  return {3, depth}
end
if depth >= tonumber(ARGV[2]) then
  return {2, depth}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {4, depth}
end
redis.call('PSETEX', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
redis.call('PUBLISH', KEYS[5], 'job')  -- contract.WAKE_JOB
return {1, depth + 1}
