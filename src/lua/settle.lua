-- Settles 'committing' holds once PostgreSQL has answered.
--
-- KEYS[1] P committing   KEYS[2..] P h:<hold> (revert: exactly one)
-- ARGV[1] P   ARGV[2] 'finalize' | 'revert'   ARGV[3] tombstone ttl ms
-- ARGV[4] '1' to revert only when the deadline has passed (the reaper)
--
-- finalize: the usage events are durable; each hold still committing
-- becomes 'committed' (one call settles a whole group commit's holds of a
-- tenant).
-- revert: no usage event exists and none can appear any more; the charge is
-- undone (credits and cap usage return), the hold becomes 'reverted' and
-- the commit's idempotency record is deleted so a retry cannot replay it.
-- Replies: finalize {'ok', holds finalized}; revert {'ok'} | {'skip', state}
-- (nothing to do) | {'early'} (deadline not reached: a retry of the commit
-- is under way).
local prefix = ARGV[1]
local ttl = tonumber(ARGV[3])
local plen = string.len(prefix) + 3

if ARGV[2] == 'finalize' then
  local done = 0
  for i = 2, #KEYS do
    if redis.call('HGET', KEYS[i], 'st') == 'committing' then
      redis.call('HSET', KEYS[i], 'st', 'committed')
      redis.call('ZREM', KEYS[1], string.sub(KEYS[i], plen))
      redis.call('PEXPIRE', KEYS[i], ttl)
      done = done + 1
    end
  end
  return { 'ok', fmt(done) }
end

local f = redis.call('HMGET', KEYS[2], 'st', 'dc', 'ch', 'cc', 'x', 'ck')
if f[1] ~= 'committing' then return { 'skip', f[1] or 'none' } end
local hold_id = string.sub(KEYS[2], plen)
if ARGV[4] == '1' then
  local deadline = redis.call('ZSCORE', KEYS[1], hold_id)
  if deadline and tonumber(deadline) > now_ms() then return { 'early' } end
end
local dc, ch = split(f[2]), split(f[3])
for i = 1, #dc do
  local amt = tonumber(ch[i])
  if amt ~= 0 then redis.call('HINCRBY', prefix .. 'a:' .. dc[i], 'b', amt) end
end
local cost = tonumber(f[5])
local cc = split(f[4])
for i = 1, #cc do
  if cost ~= 0 then redis.call('HINCRBY', prefix .. 'a:' .. cc[i], 'u', -cost) end
end
if f[6] then redis.call('DEL', f[6]) end
redis.call('HSET', KEYS[2], 'st', 'reverted')
redis.call('ZREM', KEYS[1], hold_id)
redis.call('PEXPIRE', KEYS[2], ttl)
return { 'ok' }
