-- ARGV[3] job id. Removes the job whatever its state; returns 1 if anything was removed.
local id = ARGV[3]
local removed = redis.call('DEL', job_key(id))
for _, set in ipairs({READY, LEASED, DELAYED, DEAD}) do
  removed = removed + redis.call('ZREM', set, id)
end
if removed > 0 then
  return 1
end
return 0
