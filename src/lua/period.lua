-- A period boundary reaches Redis: cap usage restarts (at the usage already
-- recorded in the new period) and the period end moves on. Idempotent and
-- monotonic: applied only when the new period ends later than the stored
-- one (0 = a period that never ends, latest of all). The period's credits
-- restart at the balance and fired alert thresholds re-arm.
--
-- KEYS[1] P fence   KEYS[2] P a:<account>
-- ARGV[1] usage in the new period (micro)   ARGV[2] new period end ms (0 = none)
-- ARGV[3] allowance renewal ms (0 = none)
-- Replies: {'ok', generation, position, identity} | {'stale', generation, position, identity}
--   | {'not_loaded'} | {'unverified'} | {'not_found'}
local g, refused = fence_check(KEYS[1])
if not g then return refused end
local pe = redis.call('HGET', KEYS[2], 'pe')
if not pe then return { 'not_found' } end
local current, new = tonumber(pe), tonumber(ARGV[2])
local later = (new == 0 and current ~= 0) or (new ~= 0 and current ~= 0 and new > current)
if not later then return { 'stale', g, fence_position(KEYS[1]), own_identity() } end
-- The new period's credits are what the account holds now (its new
-- allowance included); thresholds re-arm.
local b = tonumber(redis.call('HGET', KEYS[2], 'b') or '0')
if b < 0 then b = 0 end
redis.call('HSET', KEYS[2], 'u', ARGV[1], 'pe', ARGV[2], 'ra', ARGV[3], 'pc', fmt(b), 'af', '')
return { 'ok', g, fence_advance(KEYS[1]), own_identity() }
