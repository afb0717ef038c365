-- ARGV[3] lease duration (ms), [4] worker id, [5] the new lease token, [6] maintenance batch.
-- Housekeeping first (due retries become ready, expired leases are reclaimed), then the best
-- ready job is leased. Returns the job hash as one JSON object (one bulk reply parses far faster
-- than 40 of them) or nil when nothing is available or dispatch is paused.
local batch = tonumber(ARGV[6])
promote_due(batch)
reclaim_expired(batch)
if redis.call('EXISTS', PAUSED) == 1 then
  return false
end
while true do
  local popped = redis.call('ZPOPMIN', READY)
  if #popped == 0 then
    return false
  end
  local id = popped[1]
  local key = job_key(id)
  -- A member without its hash is debris (e.g. a half-cleaned key space): skip it.
  if redis.call('EXISTS', key) == 1 then
    local deadline = NOW + tonumber(ARGV[3])
    redis.call('ZADD', LEASED, deadline, id)
    redis.call('HSET', key, 'state', 'leased', 'lease_token', ARGV[5], 'worker_id', ARGV[4],
      'lease_deadline', deadline, 'lease_renewals', 0, 'leased_at', NOW)
    redis.call('HINCRBY', key, 'deliveries', 1)
    local fields = redis.call('HGETALL', key)
    local job = {}
    for i = 1, #fields, 2 do
      job[fields[i]] = fields[i + 1]
    end
    return cjson.encode(job)
  end
end
