-- Applies one PostgreSQL ledger row (grant credited, void, expiry) to an
-- account's hot balance, exactly once.
--
-- KEYS[1] P epoch   KEYS[2] P a:<account>   KEYS[3] P m:<ledger row id>
-- ARGV[1] delta (micro, signed)   ARGV[2] marker ttl ms
-- Replies: {'applied', balance} | {'duplicate'} | {'not_loaded'} | {'not_found'}
if not redis.call('GET', KEYS[1]) then return { 'not_loaded' } end
if redis.call('EXISTS', KEYS[3]) == 1 then return { 'duplicate' } end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'not_found' } end
local b = redis.call('HINCRBY', KEYS[2], 'b', tonumber(ARGV[1]))
redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[2]))
return { 'applied', fmt(b) }
