-- Reaper pass for one tenant: expires active holds past their TTL (their
-- credits return, exactly once) and lists committing holds whose
-- PostgreSQL deadline passed, for the service to finalize or revert.
--
-- KEYS[1] P holds   KEYS[2] P committing
-- ARGV[1] P   ARGV[2] at most this many holds   ARGV[3] tombstone ttl ms
-- Reply: {expired count, overdue committing hold id...}
local prefix = ARGV[1]
local now = now_ms()
local limit = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local expired = 0
for _, id in ipairs(due) do
  local key = prefix .. 'h:' .. id
  local hold = load_hold(key)
  if hold and hold.st == 'active' and hold.exp <= now then
    unhold(prefix, hold)
    redis.call('HSET', key, 'st', 'expired')
    redis.call('PEXPIRE', key, tonumber(ARGV[3]))
    expired = expired + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
local reply = { fmt(expired) }
local overdue = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(overdue) do reply[#reply + 1] = id end
return reply
