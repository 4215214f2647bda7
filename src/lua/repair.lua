-- Reconciler repair: moves an account's hot balance by `delta`, only if
-- the tenant's epoch and the balance are still what the reconciler
-- measured (anything that moved since is left to the next pass).
--
-- KEYS[1] P fence   KEYS[2] P a:<account>
-- ARGV[1] fence generation measured   ARGV[2] balance measured (micro)   ARGV[3] delta (micro, signed)
-- Replies: {'repaired', balance, generation, position, identity} | {'moved'}
if fence_check(KEYS[1]) ~= ARGV[1] then return { 'moved' } end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'moved' } end
if fmt(num(redis.call('HGET', KEYS[2], 'b'))) ~= ARGV[2] then return { 'moved' } end
local b = redis.call('HINCRBY', KEYS[2], 'b', tonumber(ARGV[3]))
return { 'repaired', fmt(b), ARGV[1], fence_advance(KEYS[1]), own_identity() }
