-- No own arguments. Returns {{priority, ready count, ...}, leased, expired leases, delayed, dead,
-- oldest head-of-line ready_at (ms, or -1), paused (0/1), leases expired ever} from one
-- consistent snapshot.
local per_priority = {}
local oldest = -1
for p = 0, 100 do
  -- Scores of priority p lie in [p * 10^13, (p + 1) * 10^13), written out as exact decimals.
  local low = p .. '0000000000000'
  local high = '(' .. (p + 1) .. '0000000000000'
  local count = redis.call('ZCOUNT', READY, low, high)
  if count > 0 then
    table.insert(per_priority, p)
    table.insert(per_priority, count)
    local head = redis.call('ZRANGEBYSCORE', READY, low, high, 'LIMIT', 0, 1)[1]
    local since = tonumber(redis.call('HGET', job_key(head), 'ready_at'))
    if since and (oldest < 0 or since < oldest) then
      oldest = since
    end
  end
end
return {
  per_priority,
  redis.call('ZCARD', LEASED),
  redis.call('ZCOUNT', LEASED, '-inf', NOW),
  redis.call('ZCARD', DELAYED),
  redis.call('ZCARD', DEAD),
  oldest,
  redis.call('EXISTS', PAUSED),
  tonumber(redis.call('GET', LEASE_EXPIRATIONS)) or 0,
}
