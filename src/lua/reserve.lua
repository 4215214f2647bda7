-- Reserve (or Authorize): one atomic decision over the subject's chain.
--
-- KEYS[1] P epoch   KEYS[2] P a:<subject>   KEYS[3] P holds
-- KEYS[4] P h:<hold id>: the hold id is derived from the idempotency key
--   (the service hashes the key), so the hold hash is also the Reserve's
--   idempotency record; Authorize passes any key of the tenant (unused).
-- ARGV[1] P   ARGV[2] amount (micro, > 0)   ARGV[3] ttl ms
-- ARGV[4] payload hash   ARGV[5] hold id   ARGV[6] idempotency ttl ms
-- ARGV[7] 'reserve' | 'authorize'   ARGV[8] labels (JSON, opaque, '' = none)
-- ARGV[9] max tree depth   ARGV[10] price version pinned for the commit ('' = none)
--
-- Replies (every number a decimal string):
--   {'granted', replayed, hold id, amount, expires ms, available after}
--   {'denied', replayed, reason, limiting account, available, retry_after ms|'0'}
--   {'mismatch'} | {'not_loaded'} | {'not_found'} | {'too_deep'} | {'broken'}
-- The hold hash: sub subject, amt amount, dc draw-chain ids (csv), d amount
-- drawn from each (csv, aligned), cc ids of every account from the subject
-- to the root (each got uh += amt), exp expiry ms, st state
-- (active|committing|committed|released|expired), ep epoch, ph the
-- Reserve's payload hash, r the first reply's amount, expiry and available
-- ("amt,exp,avail": Extend changes amt and exp, a replay must not), and
-- only when not empty: lab labels, pv price version. The hold lives at
-- least as long as an idempotency record (active, then a 24 h tombstone).
-- A denied Reserve leaves, under the same key and for the idempotency ttl,
-- only ph and its denial: dn reason, dl limiting account, dv available,
-- dt retry_after (no sub: every other script sees no hold).
local prefix = ARGV[1]
local amount = tonumber(ARGV[2])
local authorize = ARGV[7] == 'authorize'

local epoch = redis.call('GET', KEYS[1])
if not epoch then return { 'not_loaded' } end

if not authorize then
  local p = redis.call('HMGET', KEYS[4], 'ph', 'r', 'dn', 'dl', 'dv', 'dt')
  if p[1] then
    if p[1] ~= ARGV[4] then return { 'mismatch' } end
    if p[3] then return { 'denied', '1', p[3], p[4], p[5], p[6] } end
    local r = split(p[2])
    return { 'granted', '1', ARGV[5], r[1], r[2], r[3] }
  end
end

local subject = string.sub(KEYS[2], string.len(prefix) + 3)
local chain, why = load_chain(prefix, subject, tonumber(ARGV[9]))
if not chain then return { why } end

local ev = evaluate(chain)
local deny = denial(chain, ev, amount)
if deny then
  local reply = { 'denied', '0', deny[1], deny[2], fmt(ev.avail), fmt(deny[3]) }
  if not authorize then
    redis.call('HSET', KEYS[4], 'ph', ARGV[4], 'dn', reply[3], 'dl', reply[4], 'dv', reply[5], 'dt', reply[6])
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
  end
  return reply
end
if authorize then
  return { 'granted', '0', '', fmt(amount), '0', fmt(ev.avail - amount) }
end

local now = now_ms()
local exp = now + tonumber(ARGV[3])
local ids, draws = {}, {}
local left = amount
local k = ev.k
-- Each account is written once: its new h (draw chain) and uh (every
-- account to the root), computed from the values read above (the script is
-- atomic, so this equals HINCRBY).
for i = 1, #chain do
  local a = chain[i]
  ids[i] = a.id
  if i <= k then
    local free = a.b - a.h
    local take = 0
    if free > 0 and left > 0 then
      take = math.min(free, left)
      left = left - take
    end
    draws[i] = fmt(take)
    if take ~= 0 then
      redis.call('HSET', a.key, 'h', fmt(a.h + take), 'uh', fmt(a.uh + amount))
    else
      redis.call('HSET', a.key, 'uh', fmt(a.uh + amount))
    end
  else
    redis.call('HSET', a.key, 'uh', fmt(a.uh + amount))
  end
end
local cc = table.concat(ids, ',')
local dc = cc
if k < #chain then dc = table.concat(ids, ',', 1, k) end
local exp_txt, amt_txt, avail_txt = fmt(exp), fmt(amount), fmt(ev.avail - amount)
if ARGV[8] == '' and ARGV[10] == '' then
  redis.call('HSET', KEYS[4], 'sub', subject, 'amt', amt_txt, 'dc', dc, 'd', table.concat(draws, ','),
    'cc', cc, 'exp', exp_txt, 'st', 'active', 'ep', epoch, 'ph', ARGV[4],
    'r', amt_txt .. ',' .. exp_txt .. ',' .. avail_txt)
else
  redis.call('HSET', KEYS[4], 'sub', subject, 'amt', amt_txt, 'dc', dc, 'd', table.concat(draws, ','),
    'cc', cc, 'exp', exp_txt, 'st', 'active', 'ep', epoch, 'ph', ARGV[4],
    'r', amt_txt .. ',' .. exp_txt .. ',' .. avail_txt, 'lab', ARGV[8], 'pv', ARGV[10])
end
redis.call('ZADD', KEYS[3], exp_txt, ARGV[5])
for i = 1, k do
  if chain[i].alerts and draws[i] ~= '0' then alerts_after(prefix, chain[i].id, false) end
end
return { 'granted', '0', ARGV[5], amt_txt, exp_txt, avail_txt }
