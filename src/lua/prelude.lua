-- Shared helpers, prepended to every creditd script.
--
-- Data model (all keys of one tenant share the hash tag of KEYS[1]; the
-- prefix P ends with "{t:<tenant>}:" and is passed as ARGV[1]):
--   P fence          hash: g generation ('' or absent while the tenant's hot
--                    state is not loaded), n position (advanced by every change that
--                    PostgreSQL confirms), v identity of the Redis process
--                    that last checked it against PostgreSQL (see fence.lua)
--   P a:<account>    hash: p parent id ('' for a root), pa pool access '1'/'0',
--                    cap (micro, absent or '' = none), u usage committed this
--                    period, uh usage held, b balance, h held from b,
--                    s suspended '1'/'0', pe period end (ms since epoch, 0 =
--                    none), ra when a recurring allowance next renews (ms,
--                    0 = none)
--   P h:<hold>       hash: the hold (see reserve.lua), and what its commit
--                    decided (see commit.lua)
--   P holds          zset: active hold id -> expiry ms
--   P committing     zset: hold id -> deadline ms for its PostgreSQL write
--   P i:r:<key>      string: Reserve idempotency record (see reserve.lua)
--   P i:c:<key>, P i:g:<key>
--                    string: Commit / Charge idempotency record
--                    "<payload hash>,<hold id>" (see commit.lua)
--   P i:l:<key>, P i:x:<key>
--                    string: Release / Extend idempotency record, JSON
--                    {ph = payload hash, r = first reply}
--   P m:<ledger id>  string: marker of a ledger row applied to b
--   P alerts         stream: alerts fired, moved to PostgreSQL by a job
-- Alert fields of an account hash: pc the period's credits (balance at the
-- period start + grants credited since), th thresholds ("p25,p15,a5000000":
-- percent of pc, or micro-credits), af thresholds fired this period, rt '1'
-- to re-arm a threshold when a grant lifts the account back above it.
-- Amounts are integers of micro-credits. Never negate a zero: Lua prints
-- -0 as "-0", which Redis refuses as an integer. Lua numbers are doubles, exact to
-- 2^53; the service bounds every amount far below that. Every number
-- leaves a script as a decimal string made by fmt().

-- Every script receives, as its last ARGV, the caller's identity of the
-- Redis process it runs in ("<run_id>:<master_replid>", learned when the
-- caller's connection was opened), or '' when the caller cannot know it
-- (Redis Cluster: the script then asks INFO). It is removed here, so each
-- script's own ARGV reads as its header says.
local IDENT = table.remove(ARGV)

-- The identity of the Redis process running this script.
local function own_identity()
  if IDENT ~= '' then return IDENT end
  local function info(section, name)
    local s = redis.call('INFO', section)
    local i = string.find(s, name .. ':', 1, true)
    if not i then return '' end
    local j = string.find(s, '\r', i, true)
    return string.sub(s, i + #name + 1, (j or (#s + 1)) - 1)
  end
  IDENT = info('server', 'run_id') .. ':' .. info('replication', 'master_replid')
  return IDENT
end

-- The tenant's fence gate, before any read that decides: returns the
-- generation, or nil and the reply to give. 'not_loaded': no hot state;
-- 'unverified': this process has not been checked against PostgreSQL since
-- it started, took over, or changed its data (a restart, a failover, a
-- restore), so its state may be behind; the caller checks, then retries.
local function fence_check(key)
  local f = redis.call('HMGET', key, 'g', 'v')
  if not f[1] or f[1] == '' then return nil, { 'not_loaded' } end
  if f[2] ~= own_identity() then return nil, { 'unverified' } end
  return f[1]
end

-- Advances the fence position for a change PostgreSQL will confirm, and
-- returns the new position as text.
local function fence_advance(key)
  return string.format('%d', redis.call('HINCRBY', key, 'n', 1))
end

-- The current position as text.
local function fence_position(key)
  return redis.call('HGET', key, 'n') or '0'
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%d', n)
end

local function num(v)
  if v == false or v == nil or v == '' then return 0 end
  return tonumber(v)
end

local function split(s)
  local out = {}
  if s == false or s == nil or s == '' then return out end
  for part in string.gmatch(s, '[^,]+') do out[#out + 1] = part end
  return out
end

local function load_account(prefix, id)
  local key = prefix .. 'a:' .. id
  local f = redis.call('HMGET', key, 'p', 'pa', 'cap', 'u', 'uh', 'b', 'h', 's', 'pe', 'ra', 'th')
  if f[1] == false then return nil end
  local cap = nil
  if f[3] ~= false and f[3] ~= '' then cap = tonumber(f[3]) end
  return {
    id = id, key = key, parent = f[1], pool = (f[2] == '1'), cap = cap,
    u = num(f[4]), uh = num(f[5]), b = num(f[6]), h = num(f[7]),
    -- pe and ra stay text until a denial needs them (num()).
    s = (f[8] == '1'), pe = f[9], ra = f[10],
    -- Whether the account has alert thresholds (alerts_after has work).
    alerts = f[11] ~= false and f[11] ~= '',
  }
end

-- The accounts from the subject up to its root, or nil and why not.
local function load_chain(prefix, subject, max_depth)
  local chain = {}
  local id = subject
  while id ~= '' do
    if #chain >= max_depth then return nil, 'too_deep' end
    local acct = load_account(prefix, id)
    if not acct then
      if #chain == 0 then return nil, 'not_found' end
      return nil, 'broken'
    end
    chain[#chain + 1] = acct
    id = acct.parent
  end
  return chain
end

-- How many accounts of the chain the subject draws credits from: itself,
-- then each parent while the account below it has pool access.
local function draw_len(chain)
  local n = 1
  while n < #chain and chain[n].pool do n = n + 1 end
  return n
end

-- What the subject could reserve now, and which limit binds.
local function evaluate(chain)
  local k = draw_len(chain)
  local credits = 0
  for i = 1, k do
    local free = chain[i].b - chain[i].h
    if free > 0 then credits = credits + free end
  end
  local cap_left, cap_acct = nil, nil
  for i = 1, #chain do
    local a = chain[i]
    if a.cap then
      local left = a.cap - a.u - a.uh
      if left < 0 then left = 0 end
      if cap_left == nil or left < cap_left then cap_left = left; cap_acct = a end
    end
  end
  local suspended = nil
  for i = 1, #chain do
    if chain[i].s then suspended = chain[i]; break end
  end
  local avail = credits
  if cap_left ~= nil and cap_left < avail then avail = cap_left end
  if suspended then avail = 0 end
  return { k = k, credits = credits, cap_left = cap_left, cap_acct = cap_acct,
           suspended = suspended, avail = avail }
end

-- nil when `amount` fits, else {reason, limiting account id, retry_after ms}.
-- Order: suspension, then caps, then credits.
local function denial(chain, ev, amount)
  if ev.suspended then return { 'ACCOUNT_SUSPENDED', ev.suspended.id, 0 } end
  if ev.cap_left ~= nil and amount > ev.cap_left then
    return { 'CAP_REACHED', ev.cap_acct.id, num(ev.cap_acct.pe) }
  end
  if amount > ev.credits then
    -- When an allowance of the draw chain renews next, if any does.
    local renews = 0
    for i = 1, ev.k do
      local ra = num(chain[i].ra)
      if ra > 0 and (renews == 0 or ra < renews) then renews = ra end
    end
    return { 'INSUFFICIENT_CREDITS', chain[ev.k].id, renews }
  end
  return nil
end

local function available_of(prefix, subject, max_depth)
  local chain = load_chain(prefix, subject, max_depth)
  if not chain then return 0 end
  return evaluate(chain).avail
end

-- The stored reply for an idempotency key: nil (none), {'mismatch'}, or the
-- first reply with its 'replayed' slot (index 2) set.
local function idem_get(key, ph)
  local rec = redis.call('GET', key)
  if not rec then return nil end
  local d = cjson.decode(rec)
  if d.ph ~= ph then return { 'mismatch' } end
  local r = d.r
  r[2] = '1'
  return r
end

local function idem_put(key, ph, reply, ttl)
  redis.call('SET', key, cjson.encode({ ph = ph, r = reply }), 'PX', ttl)
end

-- Returns the credits a hold keeps aside: its draws leave h, its amount
-- leaves uh on every account of its cap chain.
local function unhold(prefix, hold)
  local dc, d = split(hold.dc), split(hold.d)
  for i = 1, #dc do
    local amt = tonumber(d[i])
    if amt ~= 0 then redis.call('HINCRBY', prefix .. 'a:' .. dc[i], 'h', -amt) end
  end
  if hold.amt == 0 then return end
  local cc = split(hold.cc)
  for i = 1, #cc do
    redis.call('HINCRBY', prefix .. 'a:' .. cc[i], 'uh', -hold.amt)
  end
end

local function has_token(csv, token)
  for part in string.gmatch(csv, '[^,]+') do
    if part == token then return true end
  end
  return false
end

-- After a change of an account's balance or holds: fires each threshold
-- the account is now at or below and has not fired this period (appending
-- it to P alerts, atomically with the change), and with `topup` re-arms
-- thresholds it is back above when the account asks for that.
local function alerts_after(prefix, id, topup)
  local key = prefix .. 'a:' .. id
  local f = redis.call('HMGET', key, 'b', 'h', 'pc', 'th', 'af', 'rt')
  local th = f[4]
  if th == false or th == '' then return end
  local left = num(f[1]) - num(f[2])
  local pc = num(f[3])
  local fired = f[5] or ''
  local kept = {}
  local changed = false
  local now = nil
  for token in string.gmatch(th, '[^,]+') do
    local kind, value = string.sub(token, 1, 1), tonumber(string.sub(token, 2))
    local crossed
    if kind == 'p' then
      crossed = pc > 0 and left * 100 <= value * pc
    else
      crossed = left <= value
    end
    local was = has_token(fired, token)
    if crossed and not was then
      now = now or now_ms()
      redis.call('XADD', prefix .. 'alerts', '*', 'account', id, 'threshold', token,
        'available', fmt(left), 'pc', fmt(pc), 'at', fmt(now))
      kept[#kept + 1] = token
      changed = true
    elseif was and not crossed and topup and f[6] == '1' then
      changed = true
    elseif was then
      kept[#kept + 1] = token
    end
  end
  if changed then redis.call('HSET', key, 'af', table.concat(kept, ',')) end
end

local function load_hold(key)
  local f = redis.call('HMGET', key, 'sub', 'amt', 'dc', 'd', 'cc', 'exp', 'st', 'lab', 'ep')
  if f[1] == false then return nil end
  return { sub = f[1], amt = tonumber(f[2]), dc = f[3], d = f[4], cc = f[5],
           exp = tonumber(f[6]), st = f[7], lab = f[8] or '', ep = f[9] }
end
