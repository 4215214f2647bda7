-- Commit (prepare step) and Charge: charges the actual cost to the
-- accounts and marks the hold 'committing' until its usage event is durable
-- in PostgreSQL (the service then finalizes; the reaper finalizes or
-- reverts holds whose deadline passed).
--
-- KEYS[1] P fence   KEYS[2] P h:<hold>   KEYS[3] P holds
-- KEYS[4] P i:c:<key> (or i:g:<key> for Charge)   KEYS[5] P committing
-- ARGV[1] P   ARGV[2] actual cost (micro, >= 0)   ARGV[3] payload hash
-- ARGV[4] idempotency ttl ms   ARGV[5] deadline ms from now
-- ARGV[6] event id   ARGV[7] idempotency key (kept on the hold for revert)
-- ARGV[8] max depth
-- ARGV[9] hold multiple   ARGV[10] allowance (micro)   ARGV[11] charge max
-- (micro, '' = none): the tenant's commit limit. A cost above
-- hold amount × multiple + allowance (Charge: above charge max) is refused
-- with {'over_limit', bound} before anything changes.
-- For Charge (no prior hold): ARGV[12] = 'charge', ARGV[13] subject,
-- ARGV[14] labels; the hold is created here already committing.
--
-- The idempotency record KEYS[4] is the string "<payload hash>,<hold id>";
-- the first reply is rebuilt from the hold, which keeps what the commit
-- decided: x cost, ch charged per draw-chain account (csv), ck the record's
-- key, ev event id, od overdraft, rc recorded ms, ca available after. The
-- hold outlives the record (it is settled after the record is written and
-- kept 24 h from then); should it be gone anyway, the call proceeds as if
-- Redis had forgotten the key (PostgreSQL then answers).
--
-- Replies:
--   {'prepared', replayed, hold id, event id, subject, cost, released,
--    overdraft, draw-chain ids csv, charged per account csv, labels,
--    recorded ms, available after, hold amount, fence generation,
--    fence position, Redis process identity}
--   The position is the fence's after this commit (a replay: now); the
--   service confirms it in PostgreSQL with the usage event (fence.lua).
--   {'state', st} when the hold is not active (st: committing, committed,
--    released, expired) | {'no_hold'} | {'mismatch'} | {'not_loaded'} | {'unverified'}
--   | {'not_found'} | {'too_deep'} | {'broken'} | {'over_limit', bound}
local prefix = ARGV[1]
local cost = tonumber(ARGV[2])
local charge = ARGV[12] == 'charge'
local max_depth = tonumber(ARGV[8])

local epoch, refused = fence_check(KEYS[1])
if not epoch then return refused end

local rec = redis.call('GET', KEYS[4])
if rec and string.byte(rec, 1) == 123 then
  -- A record in the earlier layout ({"ph": .., "r": first reply}).
  local prior = cjson.decode(rec)
  if prior.ph ~= ARGV[3] then return { 'mismatch' } end
  local r = prior.r
  r[2] = '1'
  r[16] = fence_position(KEYS[1])
  r[17] = own_identity()
  if redis.call('HGET', prefix .. 'h:' .. r[3], 'st') == 'committing' then
    redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[5]), r[3])
  end
  return r
elseif rec then
  local comma = string.find(rec, ',', 1, true)
  if string.sub(rec, 1, comma - 1) ~= ARGV[3] then return { 'mismatch' } end
  local rid = string.sub(rec, comma + 1)
  local hkey = prefix .. 'h:' .. rid
  local f = redis.call('HMGET', hkey, 'st', 'sub', 'amt', 'dc', 'lab', 'ep', 'x', 'ch', 'ev', 'od', 'rc', 'ca')
  if f[2] and f[7] then
    -- A replay of a commit whose event may not be durable yet: give its
    -- PostgreSQL write a fresh deadline before the service retries it.
    if f[1] == 'committing' then
      redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[5]), rid)
    end
    local released = tonumber(f[3]) - tonumber(f[7])
    if released < 0 then released = 0 end
    return { 'prepared', '1', rid, f[9], f[2], f[7], fmt(released), f[10], f[4], f[8], f[5] or '',
      f[11], f[12], f[3], f[6], fence_position(KEYS[1]), own_identity() }
  end
  -- The record outlived its hold: the usage was recorded (a reverted
  -- commit's record is deleted with the revert), so the service answers
  -- from PostgreSQL; running the charge again would charge twice.
  return { 'no_hold' }
end

local now = now_ms()
local hold
local hold_id = string.sub(KEYS[2], string.len(prefix) + 3)
local accts = {}
local chain
if charge then
  if ARGV[11] ~= '' and cost > tonumber(ARGV[11]) then return { 'over_limit', ARGV[11] } end
  local subject = ARGV[13]
  local why
  chain, why = load_chain(prefix, subject, max_depth)
  if not chain then return { why } end
  local ids, zeros, cc = {}, {}, {}
  for i = 1, draw_len(chain) do ids[#ids + 1] = chain[i].id; zeros[#zeros + 1] = '0' end
  for i = 1, #chain do cc[#cc + 1] = chain[i].id end
  hold = { sub = subject, amt = 0, dc = table.concat(ids, ','), d = table.concat(zeros, ','),
           cc = table.concat(cc, ','), exp = now, st = 'active', lab = ARGV[14], ep = epoch }
else
  hold = load_hold(KEYS[2])
  if not hold then return { 'no_hold' } end
  if hold.st == 'active' and hold.exp <= now then return { 'state', 'expired' } end
  if hold.st ~= 'active' then return { 'state', hold.st } end
  -- Exact while the bound is below 2^53 micro (every accepted amount is
  -- below 10^15); above that no cost can reach it anyway.
  local bound = hold.amt * tonumber(ARGV[9]) + tonumber(ARGV[10])
  if bound > 9007199254740992 then bound = 9007199254740992 end
  if cost > bound then return { 'over_limit', fmt(bound) } end
  -- The subject's chain as it is now (for the available figure), which is
  -- usually the hold's own.
  chain = load_chain(prefix, hold.sub, max_depth)
end
if chain then
  for i = 1, #chain do accts[chain[i].id] = chain[i] end
end
-- An account of the hold's chains, read once.
local function acct(id)
  local a = accts[id]
  if a == nil then
    a = load_account(prefix, id) or false
    accts[id] = a
  end
  return a
end

-- Charge the cost: first what the hold drew from each account, then any
-- credits still free on the draw chain, then an overdraft on its last
-- account.
local dc, d = split(hold.dc), split(hold.d)
local charged = {}
local left = cost
for i = 1, #dc do
  d[i] = tonumber(d[i])
  local take = math.min(d[i], left)
  charged[i] = take
  left = left - take
end
if left > 0 then
  for i = 1, #dc do
    if left == 0 then break end
    local a = acct(dc[i])
    local free = 0
    if a then free = a.b - a.h end
    -- The hold's own draw (d) leaves h below, so it counts as free here
    -- only for what the hold did not already charge.
    free = free - (charged[i] - d[i])
    if free > 0 then
      local take = math.min(free, left)
      charged[i] = charged[i] + take
      left = left - take
    end
  end
end
local overdraft = left
if overdraft > 0 then charged[#dc] = charged[#dc] + overdraft end

-- The changes, per account: h and b on the draw chain, uh and u on every
-- account to the root. Each account is then written once, with values
-- computed from those read (the script is atomic, so this equals HINCRBY).
local changed, order = {}, {}
local function change(id, field, delta)
  if delta == 0 then return end
  local c = changed[id]
  if not c then
    c = {}
    changed[id] = c
    order[#order + 1] = id
  end
  c[field] = (c[field] or 0) + delta
end
for i = 1, #dc do
  change(dc[i], 'h', -d[i])
  change(dc[i], 'b', -charged[i])
end
local cc = split(hold.cc)
for i = 1, #cc do
  change(cc[i], 'uh', -hold.amt)
  change(cc[i], 'u', cost)
end
for _, id in ipairs(order) do
  local c = changed[id]
  local a = acct(id)
  if a then
    local args = {}
    for field, delta in pairs(c) do
      a[field] = a[field] + delta
      args[#args + 1] = field
      args[#args + 1] = fmt(a[field])
    end
    redis.call('HSET', a.key, unpack(args))
  else
    -- Not readable as an account (a broken tree): change what is there.
    for field, delta in pairs(c) do redis.call('HINCRBY', prefix .. 'a:' .. id, field, delta) end
  end
end
local charged_txt = {}
for i = 1, #dc do
  charged_txt[i] = fmt(charged[i])
  local a = accts[dc[i]]
  if charged[i] ~= 0 and (a == nil or a == false or a.alerts) then alerts_after(prefix, dc[i], false) end
end
charged_txt = table.concat(charged_txt, ',')

local available = 0
if chain then available = evaluate(chain).avail end
local released = hold.amt - cost
if released < 0 then released = 0 end
local deadline = now + tonumber(ARGV[5])
local cost_txt, od_txt, now_txt, avail_txt = fmt(cost), fmt(overdraft), fmt(now), fmt(available)
if charge then
  redis.call('HSET', KEYS[2], 'sub', hold.sub, 'amt', '0', 'dc', hold.dc, 'd', hold.d, 'cc', hold.cc,
    'exp', fmt(hold.exp), 'st', 'committing', 'lab', hold.lab, 'ep', hold.ep, 'x', cost_txt,
    'ch', charged_txt, 'ck', KEYS[4], 'ev', ARGV[6], 'od', od_txt, 'rc', now_txt, 'ca', avail_txt)
else
  redis.call('HSET', KEYS[2], 'st', 'committing', 'x', cost_txt, 'ch', charged_txt, 'ck', KEYS[4],
    'ev', ARGV[6], 'od', od_txt, 'rc', now_txt, 'ca', avail_txt)
  redis.call('ZREM', KEYS[3], hold_id)
end
redis.call('ZADD', KEYS[5], deadline, hold_id)
redis.call('SET', KEYS[4], ARGV[3] .. ',' .. hold_id, 'PX', tonumber(ARGV[4]))

return { 'prepared', '0', hold_id, ARGV[6], hold.sub, cost_txt, fmt(released), od_txt, hold.dc,
  charged_txt, hold.lab, now_txt, avail_txt, fmt(hold.amt), hold.ep, fence_advance(KEYS[1]), own_identity() }
