-- Applies one PostgreSQL ledger row (grant credited, void, expiry) to an
-- account's hot balance, exactly once.
--
-- KEYS[1] P fence   KEYS[2] P a:<account>   KEYS[3] P m:<ledger row id>
-- ARGV[1] delta (micro, signed)   ARGV[2] marker ttl ms   ARGV[3] P
-- ARGV[4] account id
-- A positive delta (a grant credited) also adds to the period's credits.
-- Replies: {'applied', balance, generation, position, identity}
--   | {'duplicate', '', generation, position, identity}
--   | {'not_loaded'} | {'unverified'} | {'not_found'}
-- The service confirms the fence position in PostgreSQL before it marks
-- the row applied.
local g, refused = fence_check(KEYS[1])
if not g then return refused end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return { 'duplicate', '', g, fence_position(KEYS[1]), own_identity() }
end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'not_found' } end
local delta = tonumber(ARGV[1])
local b = redis.call('HINCRBY', KEYS[2], 'b', delta)
if delta > 0 then redis.call('HINCRBY', KEYS[2], 'pc', delta) end
redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[2]))
alerts_after(ARGV[3], ARGV[4], delta > 0)
return { 'applied', fmt(b), g, fence_advance(KEYS[1]), own_identity() }
