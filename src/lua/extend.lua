-- Extend: grows an active hold and pushes its expiry, or says stop.
--
-- KEYS[1] P fence   KEYS[2] P h:<hold>   KEYS[3] P holds   KEYS[4] P i:x:<key>
-- ARGV[1] P   ARGV[2] more (micro, >= 0)   ARGV[3] ttl ms   ARGV[4] payload hash
-- ARGV[5] idempotency ttl ms   ARGV[6] max depth
-- The extra amount is checked against the hold's own chains (its draw
-- chain for credits, its cap chain for caps and suspension), so a hold
-- keeps drawing from where it started.
-- Replies: {'granted', replayed, total amount, expires ms, available after}
--   | {'denied', replayed, reason, account, available, retry_after ms,
--      total amount, expires ms}
--   | {'state', st} | {'no_hold'} | {'mismatch'} | {'not_loaded'} | {'unverified'} | {'broken'}
local prefix = ARGV[1]
local more = tonumber(ARGV[2])
local max_depth = tonumber(ARGV[6])
local _, refused = fence_check(KEYS[1])
if refused then return refused end
local prior = idem_get(KEYS[4], ARGV[4])
if prior then return prior end

local hold = load_hold(KEYS[2])
if not hold then return { 'no_hold' } end
local now = now_ms()
if hold.st == 'active' and hold.exp <= now then return { 'state', 'expired' } end
if hold.st ~= 'active' then return { 'state', hold.st } end

-- The hold's cap chain, as accounts; its draw chain is a prefix of it.
local cc = split(hold.cc)
local chain = {}
for i = 1, #cc do
  local a = load_account(prefix, cc[i])
  if not a then return { 'broken' } end
  chain[i] = a
end
local dc, d = split(hold.dc), split(hold.d)
-- Evaluate with the draw chain fixed to the hold's.
local ev = evaluate(chain)
local credits = 0
for i = 1, #dc do
  local free = chain[i].b - chain[i].h
  if free > 0 then credits = credits + free end
end
ev.credits = credits
ev.k = #dc
ev.avail = credits
if ev.cap_left ~= nil and ev.cap_left < ev.avail then ev.avail = ev.cap_left end
if ev.suspended then ev.avail = 0 end

local reply
local deny = denial(chain, ev, more)
if deny then
  reply = { 'denied', '0', deny[1], deny[2], fmt(ev.avail), fmt(deny[3]), fmt(hold.amt), fmt(hold.exp) }
else
  local left = more
  for i = 1, #dc do
    local free = chain[i].b - chain[i].h
    if free > 0 and left > 0 then
      local take = math.min(free, left)
      left = left - take
      d[i] = fmt(tonumber(d[i]) + take)
      redis.call('HINCRBY', chain[i].key, 'h', take)
      alerts_after(prefix, chain[i].id, false)
    end
  end
  if more > 0 then
    for i = 1, #cc do redis.call('HINCRBY', chain[i].key, 'uh', more) end
  end
  local exp = now + tonumber(ARGV[3])
  local total = hold.amt + more
  redis.call('HSET', KEYS[2], 'amt', fmt(total), 'd', table.concat(d, ','), 'exp', fmt(exp))
  redis.call('ZADD', KEYS[3], exp, string.sub(KEYS[2], string.len(prefix) + 3))
  reply = { 'granted', '0', fmt(total), fmt(exp), fmt(ev.avail - more) }
end
idem_put(KEYS[4], ARGV[4], reply, tonumber(ARGV[5]))
return reply
