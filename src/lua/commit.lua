-- Commit (prepare step) and Charge: charges the actual cost to the
-- accounts and marks the hold 'committing' until its usage event is durable
-- in PostgreSQL (the service then finalizes; the reaper finalizes or
-- reverts holds whose deadline passed).
--
-- KEYS[1] P epoch   KEYS[2] P h:<hold>   KEYS[3] P holds
-- KEYS[4] P i:c:<key> (or i:g:<key> for Charge)   KEYS[5] P committing
-- ARGV[1] P   ARGV[2] actual cost (micro, >= 0)   ARGV[3] payload hash
-- ARGV[4] idempotency ttl ms   ARGV[5] deadline ms from now
-- ARGV[6] event id   ARGV[7] idempotency key (kept on the hold for revert)
-- ARGV[8] max depth
-- For Charge (no prior hold): ARGV[9] = 'charge', ARGV[10] subject,
-- ARGV[11] labels; the hold is created here already committing.
--
-- Replies:
--   {'prepared', replayed, hold id, event id, subject, cost, released,
--    overdraft, draw-chain ids csv, charged per account csv, labels,
--    recorded ms, available after, hold amount, epoch}
--   {'state', st} when the hold is not active (st: committing, committed,
--    released, expired) | {'no_hold'} | {'mismatch'} | {'not_loaded'}
--   | {'not_found'} | {'too_deep'} | {'broken'}
local prefix = ARGV[1]
local cost = tonumber(ARGV[2])
local charge = ARGV[9] == 'charge'
local max_depth = tonumber(ARGV[8])

local epoch = redis.call('GET', KEYS[1])
if not epoch then return { 'not_loaded' } end

local prior = idem_get(KEYS[4], ARGV[3])
if prior then
  -- A replay of a commit whose event may not be durable yet: give its
  -- PostgreSQL write a fresh deadline before the service retries it.
  if prior[1] == 'prepared' then
    local st = redis.call('HGET', prefix .. 'h:' .. prior[3], 'st')
    if st == 'committing' then
      redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[5]), prior[3])
    end
  end
  return prior
end

local now = now_ms()
local hold
local hold_id = string.sub(KEYS[2], string.len(prefix) + 3)
if charge then
  local subject = ARGV[10]
  local chain, why = load_chain(prefix, subject, max_depth)
  if not chain then return { why } end
  local ids, zeros, cc = {}, {}, {}
  for i = 1, draw_len(chain) do ids[#ids + 1] = chain[i].id; zeros[#zeros + 1] = '0' end
  for i = 1, #chain do cc[#cc + 1] = chain[i].id end
  hold = { sub = subject, amt = 0, dc = table.concat(ids, ','), d = table.concat(zeros, ','),
           cc = table.concat(cc, ','), exp = now, st = 'active', lab = ARGV[11], ep = epoch }
else
  hold = load_hold(KEYS[2])
  if not hold then return { 'no_hold' } end
  if hold.st == 'active' and hold.exp <= now then return { 'state', 'expired' } end
  if hold.st ~= 'active' then return { 'state', hold.st } end
end

-- Charge the cost: first what the hold drew from each account, then any
-- credits still free on the draw chain, then an overdraft on its last
-- account.
local dc, d = split(hold.dc), split(hold.d)
local charged = {}
local left = cost
for i = 1, #dc do
  local take = math.min(tonumber(d[i]), left)
  charged[i] = take
  left = left - take
end
if left > 0 then
  for i = 1, #dc do
    if left == 0 then break end
    local f = redis.call('HMGET', prefix .. 'a:' .. dc[i], 'b', 'h')
    local free = num(f[1]) - num(f[2]) - (charged[i] - tonumber(d[i]))
    -- The hold's own draw (d) leaves h below, so it counts as free here
    -- only for what the hold did not already charge.
    if free > 0 then
      local take = math.min(free, left)
      charged[i] = charged[i] + take
      left = left - take
    end
  end
end
local overdraft = left
if overdraft > 0 then charged[#dc] = charged[#dc] + overdraft end

unhold(prefix, hold)
local charged_txt = {}
for i = 1, #dc do
  if charged[i] ~= 0 then redis.call('HINCRBY', prefix .. 'a:' .. dc[i], 'b', -charged[i]) end
  charged_txt[i] = fmt(charged[i])
end
for i = 1, #dc do
  if charged[i] ~= 0 then alerts_after(prefix, dc[i], false) end
end
local cc = split(hold.cc)
for i = 1, #cc do
  if cost ~= 0 then redis.call('HINCRBY', prefix .. 'a:' .. cc[i], 'u', cost) end
end

local released = hold.amt - cost
if released < 0 then released = 0 end
local deadline = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[2], 'sub', hold.sub, 'amt', fmt(hold.amt), 'dc', hold.dc, 'd', hold.d,
  'cc', hold.cc, 'exp', fmt(hold.exp), 'st', 'committing', 'lab', hold.lab, 'ep', hold.ep,
  'x', fmt(cost), 'ch', table.concat(charged_txt, ','), 'ck', KEYS[4], 'ev', ARGV[6])
redis.call('ZREM', KEYS[3], hold_id)
redis.call('ZADD', KEYS[5], deadline, hold_id)

local reply = { 'prepared', '0', hold_id, ARGV[6], hold.sub, fmt(cost), fmt(released),
  fmt(overdraft), hold.dc, table.concat(charged_txt, ','), hold.lab, fmt(now),
  fmt(available_of(prefix, hold.sub, max_depth)), fmt(hold.amt), hold.ep }
idem_put(KEYS[4], ARGV[3], reply, tonumber(ARGV[4]))
return reply
