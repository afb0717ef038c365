-- ARGV[3] job id, [4] lease token, [5] last error (JSON), [6] backoff cap (ms).
-- Spends an attempt. Returns {0} token lost | {1, attempts, max_attempts, retry_at} retry later |
-- {2, attempts, max_attempts} no attempt left: the job is removed, the caller writes the DLQ row.
local id = ARGV[3]
local key = job_key(id)
if not holds_lease(key, ARGV[4]) then
  return {0}
end
clear_lease(key, id)
local attempts = redis.call('HINCRBY', key, 'attempts', 1)
local max_attempts = tonumber(redis.call('HGET', key, 'max_attempts'))
if attempts >= max_attempts then
  redis.call('DEL', key)
  return {2, attempts, max_attempts}
end
-- 2^attempts seconds: attempt 1 waits 2 s, attempt 2 waits 4 s, attempt 3 waits 8 s, ...
local retry_at = NOW + math.min(2 ^ attempts * 1000, tonumber(ARGV[6]))
redis.call('HSET', key, 'last_error', ARGV[5])
make_delayed(key, id, retry_at)
return {1, attempts, max_attempts, retry_at}
