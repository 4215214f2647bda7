-- The tenant's fence: what ties its hot state to PostgreSQL.
--
-- The fence hash (KEYS[1], P fence) holds g, the generation: a random id
-- that PostgreSQL's hot_fences row names too, new at every rebuild ('' while
-- a rebuild runs); n, the
-- position: advanced by every change PostgreSQL confirms (a commit's usage
-- event, a ledger row applied, account settings, a period boundary, a
-- repair), each confirmation raising hot_fences.position to the value its
-- script returned; and v, the identity of the Redis process that last
-- checked the state against PostgreSQL. Scripts that decide refuse to run
-- ('unverified') unless v is the identity of the process they run in: a
-- restarted, restored or promoted Redis serves nothing until it is checked.
--
-- KEYS[1] P fence
-- ARGV[1] mode:
--   'whoami'                  -> {'ok', identity}
--   'verify', identity, generation, position
--       The caller read PostgreSQL's generation and position after it
--       learned `identity` ('whoami') and after it named that process in
--       hot_fences.process, so every change PostgreSQL confirmed by then
--       reached this state unless the state is behind.
--       -> {'ok'} (v set) | {'moved'} (another process answers now: start
--          over) | {'not_loaded'} | {'behind', generation, position}
--   'init', generation        -> {'ok', generation, identity}
--       A new tenant: an empty state, verified by this process. Keeps a
--       fence that exists already and answers its generation.
--   'unload'                  -> {'ok', '1' if the fence existed else '0'}
--   'load', generation, identity -> {'ok', identity} | {'moved'}
--       Last step of a rebuild: the state written is generation's, at
--       position 0, verified by this process, which must be `identity`
--       (the process PostgreSQL's fence names).
local mode = ARGV[1]
if mode == 'whoami' then
  return { 'ok', own_identity() }
elseif mode == 'verify' then
  if own_identity() ~= ARGV[2] then return { 'moved' } end
  local f = redis.call('HMGET', KEYS[1], 'g', 'n')
  if not f[1] or f[1] == '' then return { 'not_loaded' } end
  if f[1] ~= ARGV[3] or tonumber(f[2] or '0') < tonumber(ARGV[4]) then
    return { 'behind', f[1], f[2] or '0' }
  end
  redis.call('HSET', KEYS[1], 'v', ARGV[2])
  return { 'ok' }
elseif mode == 'init' then
  if redis.call('HSETNX', KEYS[1], 'g', ARGV[2]) == 1 then
    redis.call('HSET', KEYS[1], 'n', '0', 'v', own_identity())
  end
  return { 'ok', redis.call('HGET', KEYS[1], 'g'), own_identity() }
elseif mode == 'unload' then
  -- First step of a rebuild: from here on no script decides for the
  -- tenant (g = ''). The fence key itself stays until the load ends, so
  -- that its absence keeps meaning "this tenant has no key at all" (a new
  -- or emptied Redis), and a rebuild that finds it absent can skip the
  -- scan for stale keys.
  local existed = redis.call('EXISTS', KEYS[1])
  redis.call('HSET', KEYS[1], 'g', '', 'n', '0', 'v', '')
  return { 'ok', tostring(existed) }
elseif mode == 'load' then
  if own_identity() ~= ARGV[3] then return { 'moved' } end
  redis.call('HSET', KEYS[1], 'g', ARGV[2], 'n', '0', 'v', own_identity())
  return { 'ok', own_identity() }
end
return redis.error_reply('fence.lua: unknown mode ' .. tostring(mode))
