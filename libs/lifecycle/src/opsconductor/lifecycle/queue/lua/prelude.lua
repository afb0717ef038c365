-- Shared head of every queue script; redis_queue.py prepends it to each script body.
--
-- KEYS (the same eight for every script, so each script declares every fixed key it may touch):
--   1 ready    zset job_id -> priority * 10^13 + enqueue sequence: every ready job, all tenants
--   2 leased   zset job_id -> lease deadline (ms)
--   3 delayed  zset job_id -> available-at (ms): retries in backoff, deferred jobs
--   4 dead     zset job_id -> time (ms) its last lease expired with no attempt left
--   5 seq      counter behind the FIFO part of the ready score
--   6 paused   flag: when set, dequeue hands out nothing (drain)
--   7 ring     list of tenants, each once: every tenant with ready jobs (and, until their next
--              turn, tenants whose line just emptied); dequeue serves it round-robin
--   8 running  hash tenant -> how many of its jobs are leased (field gone at 0)
-- Per tenant (names built here from the key base, like the job hashes):
--   tready:{tenant}  zset, the tenant's ready jobs with their ``ready`` score (its dispatch order)
-- ARGV[1] the key base ("{prefix}q:v2:"), ARGV[2] "now" in ms from the caller's clock;
-- each script's own arguments start at ARGV[3].
local READY, LEASED, DELAYED, DEAD, SEQ, PAUSED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local RING, RUNNING = KEYS[7], KEYS[8]
local JOB_PREFIX = ARGV[1] .. 'job:'
local TENANT_READY_PREFIX = ARGV[1] .. 'tready:'
-- Every lease that ever expired, whoever reclaimed it (a worker's dequeue or the reaper): the
-- api exports it as opsc_lease_expirations_total (gone with the rest if Redis restarts empty:
-- Prometheus reads that as a counter reset).
local LEASE_EXPIRATIONS = ARGV[1] .. 'lease_expirations'
local NOW = tonumber(ARGV[2])

local function job_key(id)
  return JOB_PREFIX .. id
end

local function tenant_ready_key(tenant)
  return TENANT_READY_PREFIX .. tenant
end

-- The lease token is the only proof of ownership: it changes on every lease and is cleared when
-- the lease ends (ack, fail, release, expiry), so a stale holder never matches.
local function holds_lease(key, token)
  return redis.call('HGET', key, 'lease_token') == token
end

-- The running count of a tenant follows its leases: +1 when one is granted, -1 when one ends
-- (ack, fail, release, expiry, removal), so a dead worker's slot comes back with its lease.
local function count_lease(tenant, delta)
  if not tenant then
    return
  end
  if redis.call('HINCRBY', RUNNING, tenant, delta) <= 0 then
    redis.call('HDEL', RUNNING, tenant)
  end
end

-- Ends the lease of a job (a no-op on the running count when it held none).
local function clear_lease(key, id)
  if redis.call('ZREM', LEASED, id) == 1 then
    count_lease(redis.call('HGET', key, 'tenant_id'), -1)
  end
  redis.call('HDEL', key, 'lease_token', 'worker_id', 'lease_deadline')
end

-- A tenant with no ready job and no place in the ring joins it at the HEAD: it has not been
-- served for at least a whole round, so it goes first (like the new flows of fq_codel; a
-- light tenant's job never waits behind a heavy one's backlog). A tenant whose line emptied
-- keeps its place until its next turn, so emptying and refilling at once gains nothing.
local function activate_tenant(tenant, tkey)
  if redis.call('EXISTS', tkey) == 0 and not redis.call('LPOS', RING, tenant) then
    redis.call('LPUSH', RING, tenant)
  end
end

-- Back in line at the job's original place: its score never changes after enqueue.
local function make_ready(key, id, since)
  local score = redis.call('HGET', key, 'score')
  local tenant = redis.call('HGET', key, 'tenant_id')
  local tkey = tenant_ready_key(tenant)
  activate_tenant(tenant, tkey)
  redis.call('ZADD', tkey, score, id)
  redis.call('ZADD', READY, score, id)
  redis.call('HSET', key, 'state', 'ready', 'ready_at', since)
  redis.call('HDEL', key, 'available_at')
end

-- Takes a removed job out of its tenant's line; the tenant leaves the ring when its line is
-- empty.
local function unlist_ready(tenant, id)
  if not tenant then
    return
  end
  local tkey = tenant_ready_key(tenant)
  redis.call('ZREM', tkey, id)
  if redis.call('EXISTS', tkey) == 0 then
    redis.call('LREM', RING, 0, tenant)
  end
end

local function make_delayed(key, id, at)
  redis.call('ZADD', DELAYED, at, id)
  redis.call('HSET', key, 'state', 'delayed', 'available_at', at)
end

-- Delayed jobs whose time has come become ready (at most `limit` per call).
local function promote_due(limit)
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    local id = due[i]
    local key = job_key(id)
    redis.call('ZREM', DELAYED, id)
    if redis.call('EXISTS', key) == 1 then
      make_ready(key, id, due[i + 1])
    end
  end
  return #due / 2
end

-- Leases whose deadline has passed end: the holder is presumed dead. The expiry spends an attempt
-- (a job that kills every worker must not loop for ever); with none left the job goes to the dead
-- set, where the reaper moves it to the Postgres DLQ.
local function reclaim_expired(limit)
  local expired = redis.call('ZRANGEBYSCORE', LEASED, '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, limit)
  local reclaimed, dead = 0, 0
  for i = 1, #expired, 2 do
    local id, deadline = expired[i], expired[i + 1]
    local key = job_key(id)
    local holder = redis.call('HGET', key, 'worker_id')
    clear_lease(key, id)
    if redis.call('EXISTS', key) == 1 then
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HINCRBY', key, 'lease_expirations', 1)
      if attempts >= tonumber(redis.call('HGET', key, 'max_attempts')) then
        redis.call('ZADD', DEAD, NOW, id)
        redis.call('HSET', key, 'state', 'dead', 'last_error', cjson.encode({
          error_class = 'LeaseExpired',
          message = 'the lease of worker ' .. tostring(holder) .. ' expired on the last attempt',
        }))
        dead = dead + 1
      else
        make_ready(key, id, deadline)
        reclaimed = reclaimed + 1
      end
    end
  end
  if reclaimed + dead > 0 then
    redis.call('INCRBY', LEASE_EXPIRATIONS, reclaimed + dead)
  end
  return {reclaimed, dead}
end
