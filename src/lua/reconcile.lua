-- Reconciler read: a consistent view, at one instant, of some accounts'
-- counters, of the commits not yet known durable, and of ledger markers,
-- for comparison with PostgreSQL (service/reconcile.rs).
--
-- KEYS[1] P fence   KEYS[2] P committing
-- ARGV[1] P   ARGV[2] number of accounts N, negative to skip the
-- committing holds (H is then 0)   ARGV[3 .. 2+N] account ids
-- ARGV[3+N ..] ledger row ids whose markers to test
--
-- Reply (flat, every value a string):
--   fence generation ('' when not loaded or not verified), number of committing holds H,
--   H × (hold id, draw-chain ids csv, charged per account csv),
--   N × (b, u, pc) ('' for a field or an account that is missing),
--   one '1'/'0' per marker asked.
local prefix = ARGV[1]
local n = tonumber(ARGV[2])
local reply = { fence_check(KEYS[1]) or '' }

local holds = {}
if n < 0 then n = -n else holds = redis.call('ZRANGE', KEYS[2], 0, -1) end
reply[#reply + 1] = fmt(#holds)
for _, id in ipairs(holds) do
  local f = redis.call('HMGET', prefix .. 'h:' .. id, 'dc', 'ch')
  reply[#reply + 1] = id
  reply[#reply + 1] = f[1] or ''
  reply[#reply + 1] = f[2] or ''
end

for i = 1, n do
  local f = redis.call('HMGET', prefix .. 'a:' .. ARGV[2 + i], 'b', 'u', 'pc')
  reply[#reply + 1] = f[1] or ''
  reply[#reply + 1] = f[2] or ''
  reply[#reply + 1] = f[3] or ''
end

for i = 3 + n, #ARGV do
  reply[#reply + 1] = fmt(redis.call('EXISTS', prefix .. 'm:' .. ARGV[i]))
end
return reply
