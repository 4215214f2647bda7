-- Release: returns an active hold's credits untouched.
--
-- KEYS[1] P fence   KEYS[2] P h:<hold>   KEYS[3] P holds   KEYS[4] P i:l:<key>
-- ARGV[1] P   ARGV[2] payload hash   ARGV[3] idempotency ttl ms
-- ARGV[4] tombstone ttl ms   ARGV[5] max depth
-- Replies: {'released', replayed, amount, available after}
--   | {'state', st} | {'no_hold'} | {'mismatch'} | {'not_loaded'} | {'unverified'}
local prefix = ARGV[1]
local _, refused = fence_check(KEYS[1])
if refused then return refused end
local prior = idem_get(KEYS[4], ARGV[2])
if prior then return prior end

local hold = load_hold(KEYS[2])
if not hold then return { 'no_hold' } end
if hold.st == 'active' and hold.exp <= now_ms() then return { 'state', 'expired' } end
if hold.st ~= 'active' then return { 'state', hold.st } end

unhold(prefix, hold)
redis.call('HSET', KEYS[2], 'st', 'released')
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('ZREM', KEYS[3], string.sub(KEYS[2], string.len(prefix) + 3))
local reply = { 'released', '0', fmt(hold.amt), fmt(available_of(prefix, hold.sub, tonumber(ARGV[5]))) }
idem_put(KEYS[4], ARGV[2], reply, tonumber(ARGV[3]))
return reply
