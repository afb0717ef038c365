-- ARGV[3] job id, [4] execution id, [5] tenant id, [6] priority (0..100, canonical integer),
-- [7] max attempts, [8] max lease renewals, [9] available at (ms), [10] attempts already spent,
-- [11] request id and [12] W3C traceparent of the queuing request ('' = none; checked by the
-- caller, stored only when present).
-- Returns 1 when queued, 0 when the job was already there (enqueue is idempotent per job id).
local id = ARGV[3]
local key = job_key(id)
if redis.call('EXISTS', key) == 1 then
  return 0
end
local seq = redis.call('INCR', SEQ)
redis.call('HSET', key,
  'job_id', id, 'execution_id', ARGV[4], 'tenant_id', ARGV[5], 'priority', ARGV[6],
  -- The score as a decimal string ("50" .. 13-digit sequence): exact, no float formatting.
  'score', ARGV[6] .. string.format('%013d', seq),
  'attempts', ARGV[10], 'max_attempts', ARGV[7],
  'lease_renewals', 0, 'max_lease_renewals', ARGV[8],
  'lease_expirations', 0, 'deliveries', 0, 'enqueued_at', NOW)
if ARGV[11] ~= '' then
  redis.call('HSET', key, 'request_id', ARGV[11])
end
if ARGV[12] ~= '' then
  redis.call('HSET', key, 'traceparent', ARGV[12])
end
local at = tonumber(ARGV[9])
if at > NOW then
  make_delayed(key, id, at)
else
  make_ready(key, id, NOW)
end
return 1
