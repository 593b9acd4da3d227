-- Admit and enqueue one job atomically on its model's slot: one round trip, so the model's queue depth bound is exact
-- however many gateways admit at once (a job with an API key was reserved on its key's slot first:
-- gateway.key_admission). The queue backend's lane functions (depth_of, enqueue, wake: gateway.arq_queue,
-- gateway.streams_queue) are prepended, so this runs unchanged on both.
-- KEYS: 1 live-workers zset, 2 model card, 3 the backend's lane, 4 its job key, 5 the model's wake-up channel, 6 the
--       model's scale-to-zero marker (a model with no worker that has it waits for one: contract.scale_to_zero_key)
-- ARGV: 1 now (unix s), 2 max depth, 3 capability needed, 4 the backend's job data, 5 expiry ms, 6 job id, 7-10 its
--       tenant, weight, priority and deadline (conveyor.fair_share.fair_args)
-- Returns {code, queue depth before this job}. Codes: 1 enqueued, 0 no live worker, 2 queue full, 3 capability
-- missing, 4 duplicate job id, 11 the model's workers take jobs from another queue backend than BACKEND (this
-- script's, set by its lane functions).
local depth = depth_of(KEYS[3])
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
if depth >= tonumber(ARGV[2]) then
  return {2, depth}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {4, depth}
end
enqueue(KEYS[3], KEYS[4], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
wake(KEYS[5])
return {1, depth}
