-- ARGV[3] job id, [4] lease token, [5] lease duration (ms).
-- Returns {1, deadline, renewals} | {0} token lost | {-1, renewals} renewal limit reached.
local id = ARGV[3]
local key = job_key(id)
if not holds_lease(key, ARGV[4]) then
  return {0}
end
local renewals = tonumber(redis.call('HGET', key, 'lease_renewals'))
if renewals >= tonumber(redis.call('HGET', key, 'max_lease_renewals')) then
  return {-1, renewals}
end
local deadline = NOW + tonumber(ARGV[5])
redis.call('ZADD', LEASED, deadline, id)
redis.call('HSET', key, 'lease_deadline', deadline, 'lease_renewals', renewals + 1)
return {1, deadline, renewals + 1}
