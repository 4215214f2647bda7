-- Reserve (or Authorize): one atomic decision over the subject's chain.
--
-- KEYS[1] P epoch       KEYS[2] P a:<subject>   KEYS[3] P holds
-- KEYS[4] P i:r:<idempotency key>               KEYS[5] P h:<new hold id>
-- ARGV[1] P   ARGV[2] amount (micro, > 0)   ARGV[3] ttl ms
-- ARGV[4] payload hash   ARGV[5] new hold id   ARGV[6] idempotency ttl ms
-- ARGV[7] 'reserve' | 'authorize'   ARGV[8] labels (JSON, opaque)
-- ARGV[9] max tree depth   ARGV[10] price version pinned for the commit ('' = none)
--
-- Replies (every number a decimal string):
--   {'granted', replayed, hold id, amount, expires ms, available after}
--   {'denied', replayed, reason, limiting account, available, retry_after ms|'0'}
--   {'mismatch'} | {'not_loaded'} | {'not_found'} | {'too_deep'} | {'broken'}
-- The hold hash: sub subject, amt amount, dc draw-chain ids (csv), d amount
-- drawn from each (csv, aligned), cc ids of every account from the subject
-- to the root (each got uh += amt), exp expiry ms, st state
-- (active|committing|committed|released|expired), lab labels, ep epoch,
-- pv price version.
local prefix = ARGV[1]
local amount = tonumber(ARGV[2])
local authorize = ARGV[7] == 'authorize'

local epoch = redis.call('GET', KEYS[1])
if not epoch then return { 'not_loaded' } end

if not authorize then
  local prior = idem_get(KEYS[4], ARGV[4])
  if prior then return prior end
end

local subject = string.sub(KEYS[2], string.len(prefix) + 3)
local chain, why = load_chain(prefix, subject, tonumber(ARGV[9]))
if not chain then return { why } end

local ev = evaluate(chain)
local deny = denial(chain, ev, amount)
local reply
if deny then
  reply = { 'denied', '0', deny[1], deny[2], fmt(ev.avail), fmt(deny[3]) }
elseif authorize then
  reply = { 'granted', '0', '', fmt(amount), '0', fmt(ev.avail - amount) }
else
  local now = now_ms()
  local exp = now + tonumber(ARGV[3])
  local ids, draws, cc = {}, {}, {}
  local left = amount
  for i = 1, ev.k do
    local a = chain[i]
    local free = a.b - a.h
    local take = 0
    if free > 0 and left > 0 then
      take = math.min(free, left)
      left = left - take
      redis.call('HINCRBY', a.key, 'h', take)
    end
    ids[#ids + 1] = a.id
    draws[#draws + 1] = fmt(take)
  end
  for i = 1, #chain do
    cc[#cc + 1] = chain[i].id
    redis.call('HINCRBY', chain[i].key, 'uh', amount)
  end
  redis.call('HSET', KEYS[5], 'sub', subject, 'amt', fmt(amount), 'dc', table.concat(ids, ','),
    'd', table.concat(draws, ','), 'cc', table.concat(cc, ','), 'exp', fmt(exp), 'st', 'active',
    'lab', ARGV[8], 'ep', epoch, 'pv', ARGV[10])
  redis.call('ZADD', KEYS[3], exp, ARGV[5])
  for i = 1, ev.k do
    if draws[i] ~= '0' then alerts_after(prefix, chain[i].id, false) end
  end
  reply = { 'granted', '0', ARGV[5], fmt(amount), fmt(exp), fmt(ev.avail - amount) }
end

if not authorize then idem_put(KEYS[4], ARGV[4], reply, tonumber(ARGV[6])) end
return reply
