-- Settles a 'committing' hold once PostgreSQL has answered.
--
-- KEYS[1] P h:<hold>   KEYS[2] P committing
-- ARGV[1] P   ARGV[2] 'finalize' | 'revert'   ARGV[3] tombstone ttl ms
-- ARGV[4] '1' to revert only when the deadline has passed (the reaper)
--
-- finalize: the usage event is durable; the hold becomes 'committed'.
-- revert: no usage event exists and none can appear any more; the charge is
-- undone (credits and cap usage return), the hold becomes 'released' and
-- the commit's idempotency record is deleted so a retry cannot replay it.
-- Replies: {'ok'} | {'skip', state} (nothing to do) | {'early'} (deadline
-- not reached: a retry of the commit is under way).
local prefix = ARGV[1]
local f = redis.call('HMGET', KEYS[1], 'st', 'dc', 'ch', 'cc', 'x', 'ck')
if f[1] ~= 'committing' then return { 'skip', f[1] or 'none' } end
local hold_id = string.sub(KEYS[1], string.len(prefix) + 3)

if ARGV[2] == 'revert' then
  if ARGV[4] == '1' then
    local deadline = redis.call('ZSCORE', KEYS[2], hold_id)
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
  redis.call('HSET', KEYS[1], 'st', 'released')
else
  redis.call('HSET', KEYS[1], 'st', 'committed')
end
redis.call('ZREM', KEYS[2], hold_id)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return { 'ok' }
