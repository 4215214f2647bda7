-- GetBalance: the subject's chain, read only.
--
-- KEYS[1] P fence   KEYS[2] P a:<subject>
-- ARGV[1] P   ARGV[2] max depth
-- Reply: {'ok', available, draw length, then per account from the subject
--   up: id, b, h, pa, cap ('' = none), u, uh, s, pe}
--   | {'not_loaded'} | {'unverified'} | {'not_found'} | {'too_deep'} | {'broken'}
local prefix = ARGV[1]
local _, refused = fence_check(KEYS[1])
if refused then return refused end
local subject = string.sub(KEYS[2], string.len(prefix) + 3)
local chain, why = load_chain(prefix, subject, tonumber(ARGV[2]))
if not chain then return { why } end
local ev = evaluate(chain)
local reply = { 'ok', fmt(ev.avail), fmt(ev.k) }
for _, a in ipairs(chain) do
  local cap = ''
  if a.cap then cap = fmt(a.cap) end
  local pa, s = '0', '0'
  if a.pool then pa = '1' end
  if a.s then s = '1' end
  for _, v in ipairs({ a.id, fmt(a.b), fmt(a.h), pa, cap, fmt(a.u), fmt(a.uh), s, fmt(num(a.pe)) }) do
    reply[#reply + 1] = v
  end
end
return reply
