-- Cancel one job atomically (arq's lane; conveyor.fair_share's Lua is prepended). Not running (no lease): remove it
-- and its fair-share place, so no worker ever starts it. Running: leave a marker that expires with the job, and wake
-- the model's workers naming the job, so the one holding it stops it now.
-- KEYS: 1 queue, 2 job data, 3 try count, 4 lease, 5 abort marker, 6 the model's wake-up channel
-- ARGV: 1 job id, 2 marker expiry ms. Returns 0 removed (or already gone), 1 running: asked to stop.
if redis.call('EXISTS', KEYS[4]) == 0 then
  fair_leave(KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[3])
  return 0
end
redis.call('PSETEX', KEYS[5], ARGV[2], '1')
publish(KEYS[6], 'abort:' .. ARGV[1])  -- contract.WAKE_ABORT
return 1
