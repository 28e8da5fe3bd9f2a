-- Release: a request ends without a usage report (the local limiter's release rules).
--
-- KEYS: org, pool, res, lease, notes, uncounted log, then the op's id key (optional)
-- ARGV: seq, mode ('unsent': it never left, everything comes back; 'error': the server
--       refused it, it keeps only its request; 'kept': it succeeded, the reservation
--       stands; 'cancel': see below), charged (the caller's record, used if the lease
--       already expired), key_ttl (ms: the uncounted log's TTL), op_ttl (ms)
-- Returns {status, now}: DUP if the op's id is already recorded (it was sent again after
-- a reply that never came; nothing changes).
--
-- 'cancel' (seq and charged unused): KEYS[7] is the id of a reserve whose reply never
-- came. What it granted (reserve.lua recorded the seqs there) comes back as unsent, and
-- the id is marked used: a reserve arriving after this grants nothing; a second cancel
-- finds nothing to do.
local seq, mode = ARGV[1], ARGV[2]
local now = clock()
local opkey, op_ttl = KEYS[7], tonumber(ARGV[5])
local key_ttl = tonumber(ARGV[4]) or 86400000

local function forget(s)
  local stored = redis.call('HGET', KEYS[3], s)
  redis.call('HDEL', KEYS[3], s)
  redis.call('ZREM', KEYS[4], s)
  redis.call('HDEL', KEYS[5], s)
  return stored
end

local function give_back(p, s, refund)
  refund = held_back(KEYS[2], s, refund) -- (see resync.lua: a report may hold it already)
  if next(refund) then
    advance(p, now)
    apply_diff(p, refund)
    add_uncounted(p, refund, KEYS[6], s, now, key_ttl) -- never counted
    return true
  end
  return false
end

if mode == 'cancel' then
  local granted = redis.call('GET', opkey)
  redis.call('SET', opkey, 'x', 'PX', op_ttl)
  if not granted or granted == 'x' then
    return {'OK', fmt(now)}
  end
  local p = load_pool(KEYS[2])
  local dirty = false
  for s in string.gmatch(granted, '[^,]+') do
    local stored = forget(s)
    -- (no record: its lease expired and was purged, its charge stands)
    if stored and p and give_back(p, s, parse_draws(stored)) then
      dirty = true
    end
  end
  if dirty then
    save_pool(p)
  end
  return {'OK', fmt(now)}
end

if opkey and not redis.call('SET', opkey, '1', 'PX', op_ttl, 'NX') then
  return {'DUP', fmt(now)}
end
local stored = forget(seq)
local p = load_pool(KEYS[2])
if not p then
  return {'NOPOOL', fmt(now)}
end
local charged = {}
if stored then
  charged = parse_draws(stored)
elseif not before_birth(KEYS[2], seq) then -- its lease expired: its charge stood
  charged = parse_draws(ARGV[3])
end
local refund = {}
if mode == 'unsent' then
  refund = charged
elseif mode == 'error' then
  for d, a in pairs(charged) do
    if d ~= 'requests' then
      refund[d] = a
    end
  end
end
if give_back(p, seq, refund) then
  save_pool(p)
end
return {'OK', fmt(now)}
