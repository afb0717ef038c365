-- ARGV[3] lease duration (ms), [4] worker id, [5] the new lease tokens, comma-separated: one
-- job is leased per token, at most (a batch), [6] maintenance batch, [7] default running limit
-- per tenant (0 = none), [8] JSON {tenant: limit} overrides.
-- Housekeeping first (due retries become ready, expired leases are reclaimed), then a job is
-- leased: the tenants of the ring take turns (round-robin), each tenant's own line is priority
-- then FIFO, and a tenant holding as many leases as its limit is passed over.
-- A batch of n is exactly n dequeues in a row (each one's choice sees the leases before it: the
-- ring has turned, running counts have grown), in one script.
-- Returns the leased jobs' hashes as one JSON array of objects, in the order they were leased
-- (one bulk reply parses far faster than 40 per job), or nil when nothing is available or
-- dispatch is paused.
local batch = tonumber(ARGV[6])
promote_due(batch)
reclaim_expired(batch)
if redis.call('EXISTS', PAUSED) == 1 then
  return false
end
local default_limit = tonumber(ARGV[7])
local limits = cjson.decode(ARGV[8])

local function under_limit(tenant)
  local limit = tonumber(limits[tenant]) or default_limit
  if limit <= 0 then
    return true
  end
  return (tonumber(redis.call('HGET', RUNNING, tenant)) or 0) < limit
end

-- The tenant's best job still ready, or nil. Only a member of the global ready set with its
-- hash is ready; anything else is debris (a half-cleaned key space) and is dropped; a line
-- that held nothing but debris leaves the ring at once.
local function pop_ready(tenant, tkey)
  while true do
    local popped = redis.call('ZPOPMIN', tkey)
    if #popped == 0 then
      redis.call('LREM', RING, 0, tenant)
      return nil
    end
    local id = popped[1]
    if redis.call('ZREM', READY, id) == 1 and redis.call('EXISTS', job_key(id)) == 1 then
      return id
    end
  end
end

-- Each tenant of the ring is looked at once at most per job. A tenant whose turn comes with an
-- empty line leaves the ring; any other moves from the head to the tail (its turn is used
-- whether it gives a job or is passed over at its limit), so the next dequeue starts with the
-- next one.
local function lease_one(token)
  for _ = 1, redis.call('LLEN', RING) do
    local tenant = redis.call('LINDEX', RING, 0)
    if not tenant then
      return nil
    end
    local tkey = tenant_ready_key(tenant)
    if redis.call('EXISTS', tkey) == 0 then
      redis.call('LPOP', RING)
    else
      redis.call('LMOVE', RING, RING, 'LEFT', 'RIGHT')
      if under_limit(tenant) then
        local id = pop_ready(tenant, tkey)
        if id then
          local key = job_key(id)
          local deadline = NOW + tonumber(ARGV[3])
          redis.call('ZADD', LEASED, deadline, id)
          count_lease(tenant, 1)
          redis.call('HSET', key, 'state', 'leased', 'lease_token', token, 'worker_id', ARGV[4],
            'lease_deadline', deadline, 'lease_renewals', 0, 'leased_at', NOW)
          redis.call('HINCRBY', key, 'deliveries', 1)
          local fields = redis.call('HGETALL', key)
          local job = {}
          for i = 1, #fields, 2 do
            job[fields[i]] = fields[i + 1]
          end
          return job
        end
      end
    end
  end
  return nil
end

local leased = {}
for token in string.gmatch(ARGV[5], '[^,]+') do
  local job = lease_one(token)
  if not job then
    break
  end
  leased[#leased + 1] = job
end
if #leased == 0 then
  return false
end
return cjson.encode(leased)
