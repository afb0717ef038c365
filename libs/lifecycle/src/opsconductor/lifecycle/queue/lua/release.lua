-- ARGV[3] job id, [4] lease token, [5] delay (ms; 0 = ready now, at its original place).
-- Ends the lease without spending an attempt. Returns 1, or 0 when the token is stale.
local id = ARGV[3]
local key = job_key(id)
if not holds_lease(key, ARGV[4]) then
  return 0
end
clear_lease(key, id)
local delay = tonumber(ARGV[5])
if delay > 0 then
  make_delayed(key, id, NOW + delay)
else
  make_ready(key, id, NOW)
end
return 1
