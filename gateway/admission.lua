-- Admit and enqueue jobs of one model atomically on its slot, the jobs that arrived together in one call: the model's
-- queue depth bound is exact however many gateways admit at once (a job with an API key was reserved on its key's
-- slot first: gateway.key_admission). The queue backend's lane functions (depth_of, enqueue, wake: gateway.arq_queue,
-- gateway.streams_queue) are prepended, so this runs unchanged on both.
-- KEYS: 1 live-workers zset, 2 model card, 3 the backend's lane, 4 the model's wake-up channel, 5 the model's
--       scale-to-zero marker (a model with no worker that has it waits for one: contract.scale_to_zero_key), then each
--       job's key
-- ARGV: 1 now (unix s), 2 max depth, then per job (JOB_ARGS each): the capability it needs, the backend's job data,
--       expiry ms, job id, and its tenant, weight, priority and deadline (conveyor.fair_share.fair_args)
-- Returns per job, in order: code, queue depth before that job. Codes: 1 enqueued, 0 no live worker, 2 queue full,
-- 3 capability missing, 4 duplicate job id, 11 the model's workers take jobs from another queue backend than BACKEND
-- (this script's, set by its lane functions).
local JOB_ARGS = 8
local jobs = #KEYS - 5
local depth = depth_of(KEYS[3])
local replies = {}
local function all(code)
  for _ = 1, jobs do
    replies[#replies + 1] = code
    replies[#replies + 1] = depth
  end
  return replies
end
local live = redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
local card = redis.call('GET', KEYS[2])
local capabilities
if live > 0 and card then
  local info = cjson.decode(card)
  if (info['queue_backend'] or 'arq') ~= BACKEND then return all(11) end
  capabilities = info['capabilities']
else
  local zero = redis.call('GET', KEYS[5])  -- no worker now: it waits for one if the model may be at zero
  if not zero then return all(0) end
  capabilities = card and cjson.decode(card)['capabilities'] or cjson.decode(zero)
end
local capable = {}
for _, capability in ipairs(capabilities) do capable[capability] = true end
local enqueued = false
for i = 1, jobs do
  local a, job = 2 + (i - 1) * JOB_ARGS, KEYS[5 + i]
  local code = 1
  if #capabilities > 0 and not capable[ARGV[a + 1]] then
    code = 3
  elseif depth >= tonumber(ARGV[2]) then
    code = 2
  elseif redis.call('EXISTS', job) == 1 then
    code = 4
  else
    enqueue(KEYS[3], job, ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8])
  end
  replies[#replies + 1] = code
  replies[#replies + 1] = depth
  if code == 1 then
    depth = depth + 1
    enqueued = true
  end
end
if enqueued then wake(KEYS[4]) end
return replies
