-- Reserve (or Authorize): one atomic decision over the subject's chain.
--
-- KEYS[1] P fence   KEYS[2] P a:<subject>   KEYS[3] P holds
-- KEYS[4] P i:r:<idempotency key>               KEYS[5] P h:<new hold id>
-- ARGV[1] P   ARGV[2] amount (micro, > 0)   ARGV[3] ttl ms
-- ARGV[4] payload hash   ARGV[5] new hold id   ARGV[6] idempotency ttl ms
-- ARGV[7] 'reserve' | 'authorize'   ARGV[8] labels (JSON, opaque, '' = none)
-- ARGV[9] max tree depth   ARGV[10] price version pinned for the commit ('' = none)
--
-- Replies (every number a decimal string):
--   {'granted', replayed, hold id, amount, expires ms, available after}
--   {'denied', replayed, reason, limiting account, available, retry_after ms|'0'}
--   {'mismatch'} | {'not_loaded'} | {'unverified'} | {'not_found'} | {'too_deep'} | {'broken'}
-- The idempotency record KEYS[4] is the string "<payload hash>,<reply
-- fields 1 and 3 to 6>" (ids and reasons hold no comma), e.g.
-- "3fa0..,granted,<hold id>,<amount>,<expires>,<available>".
-- The hold hash: sub subject, amt amount, dc draw-chain ids (csv), d amount
-- drawn from each (csv, aligned), cc ids of every account from the subject
-- to the root (each got uh += amt), exp expiry ms, st state
-- (active|committing|committed|released|expired), ep fence generation, and only when
-- not empty: lab labels, pv price version.
local prefix = ARGV[1]
local amount = tonumber(ARGV[2])
local authorize = ARGV[7] == 'authorize'

local epoch, refused = fence_check(KEYS[1])
if not epoch then return refused end

if not authorize then
  local rec = redis.call('GET', KEYS[4])
  if rec then
    if string.byte(rec, 1) == 123 then
      -- A record in the earlier layout ({"ph": .., "r": first reply}).
      local prior = cjson.decode(rec)
      if prior.ph ~= ARGV[4] then return { 'mismatch' } end
      prior.r[2] = '1'
      return prior.r
    end
    local r = split(rec)
    if r[1] ~= ARGV[4] then return { 'mismatch' } end
    return { r[2], '1', r[3], r[4], r[5], r[6] }
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
    redis.call('SET', KEYS[4], table.concat({ ARGV[4], 'denied', reply[3], reply[4], reply[5], reply[6] }, ','),
      'PX', ARGV[6])
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
  redis.call('HSET', KEYS[5], 'sub', subject, 'amt', amt_txt, 'dc', dc, 'd', table.concat(draws, ','),
    'cc', cc, 'exp', exp_txt, 'st', 'active', 'ep', epoch)
else
  redis.call('HSET', KEYS[5], 'sub', subject, 'amt', amt_txt, 'dc', dc, 'd', table.concat(draws, ','),
    'cc', cc, 'exp', exp_txt, 'st', 'active', 'ep', epoch, 'lab', ARGV[8], 'pv', ARGV[10])
end
redis.call('ZADD', KEYS[3], exp_txt, ARGV[5])
redis.call('SET', KEYS[4], table.concat({ ARGV[4], 'granted', ARGV[5], amt_txt, exp_txt, avail_txt }, ','),
  'PX', ARGV[6])
for i = 1, k do
  if chain[i].alerts and draws[i] ~= '0' then alerts_after(prefix, chain[i].id, false) end
end
return { 'granted', '0', ARGV[5], amt_txt, exp_txt, avail_txt }
