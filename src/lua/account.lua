-- Creates an account's hot state or updates its settings. Counters
-- (b, h, u, uh) are created at zero and never overwritten here.
--
-- KEYS[1] P fence   KEYS[2] P a:<account>
-- ARGV[1] parent id ('' = root)   ARGV[2] pool access '1'/'0'
-- ARGV[3] cap (micro, '' = none)   ARGV[4] suspended '1'/'0'
-- ARGV[5] period end ms (0 = none)   ARGV[6] allowance renewal ms (0 = none)
-- ARGV[7] alert thresholds ("p25,p15,a5000000")   ARGV[8] re-arm on top-up '1'/'0'
-- Replies: {'ok', generation, position, identity} | {'not_loaded'} | {'unverified'}
local g, refused = fence_check(KEYS[1])
if not g then return refused end
redis.call('HSET', KEYS[2], 'p', ARGV[1], 'pa', ARGV[2], 'cap', ARGV[3], 's', ARGV[4], 'pe', ARGV[5], 'ra', ARGV[6],
  'th', ARGV[7], 'rt', ARGV[8])
for _, field in ipairs({ 'b', 'h', 'u', 'uh', 'pc' }) do redis.call('HSETNX', KEYS[2], field, '0') end
redis.call('HSETNX', KEYS[2], 'af', '')
return { 'ok', g, fence_advance(KEYS[1]), own_identity() }
