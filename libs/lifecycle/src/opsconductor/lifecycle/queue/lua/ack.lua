-- ARGV[3] job id, [4] lease token. Returns 1 when the job was removed, 0 when the token is stale.
local id = ARGV[3]
local key = job_key(id)
if not holds_lease(key, ARGV[4]) then
  return 0
end
clear_lease(key, id)
redis.call('DEL', key)
return 1
