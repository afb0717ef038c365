-- ARGV[3] job id. Removes the job whatever its state; returns 1 if anything was removed.
local id = ARGV[3]
local key = job_key(id)
local tenant = redis.call('HGET', key, 'tenant_id')
local removed = 0
if redis.call('ZSCORE', LEASED, id) then
  clear_lease(key, id)
  removed = 1
end
unlist_ready(tenant, id)
removed = removed + redis.call('DEL', key)
for _, set in ipairs({READY, DELAYED, DEAD}) do
  removed = removed + redis.call('ZREM', set, id)
end
if removed > 0 then
  return 1
end
return 0
