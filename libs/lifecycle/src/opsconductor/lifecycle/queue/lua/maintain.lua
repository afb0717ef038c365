-- ARGV[3] batch. The housekeeping half of dequeue, for the reaper.
-- Returns {promoted, reclaimed, dead}.
local batch = tonumber(ARGV[3])
local promoted = promote_due(batch)
local result = reclaim_expired(batch)
return {promoted, result[1], result[2]}
