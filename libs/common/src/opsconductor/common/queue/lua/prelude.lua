-- Shared head of every queue script; redis_queue.py prepends it to each script body.
--
-- KEYS (the same six for every script, so each script declares every key it may touch):
--   1 ready    zset job_id -> priority * 10^13 + enqueue sequence (ZPOPMIN = priority, then FIFO)
--   2 leased   zset job_id -> lease deadline (ms)
--   3 delayed  zset job_id -> available-at (ms): retries in backoff, deferred jobs
--   4 dead     zset job_id -> time (ms) its last lease expired with no attempt left
--   5 seq      counter behind the FIFO part of the ready score
--   6 paused   flag: when set, dequeue hands out nothing (drain)
-- ARGV[1] prefix of the per-job hash keys, ARGV[2] "now" in ms from the caller's clock;
-- each script's own arguments start at ARGV[3].
local READY, LEASED, DELAYED, DEAD, SEQ, PAUSED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local JOB_PREFIX = ARGV[1]
local NOW = tonumber(ARGV[2])

local function job_key(id)
  return JOB_PREFIX .. id
end

-- The lease token is the only proof of ownership: it changes on every lease and is cleared when
-- the lease ends (ack, fail, release, expiry), so a stale holder never matches.
local function holds_lease(key, token)
  return redis.call('HGET', key, 'lease_token') == token
end

local function clear_lease(key, id)
  redis.call('ZREM', LEASED, id)
  redis.call('HDEL', key, 'lease_token', 'worker_id', 'lease_deadline')
end

-- Back in line at the job's original place: its score never changes after enqueue.
local function make_ready(key, id, since)
  redis.call('ZADD', READY, redis.call('HGET', key, 'score'), id)
  redis.call('HSET', key, 'state', 'ready', 'ready_at', since)
  redis.call('HDEL', key, 'available_at')
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
  return {reclaimed, dead}
end
