-- Reserve: admit a process's waiters, in its local order, as far as they fit.
--
-- KEYS: org, pool, res, lease, q, qd, notes (seq -> the pool right after its grant, for resync),
--       then optionally the op's id key: what it granted is recorded there ("seq,seq,...",
--       for lease seconds) so that release.lua can cancel it by id if its reply never came;
--       if the key exists (a cancel came first), this reserve is a no-op (status DUP)
-- ARGV: me (this participant's id), lease (s), ticket_ttl (s), key_ttl (ms),
--       scopes (comma list of organization-wide holds that apply: 'all,opus'; '' none),
--       queue ('1': keep a place in line if not everything fits; '0': nowait),
--       n, then n candidates as pairs: arrival (Redis time, '' = now), draws ("dim=amount,..."),
--       then prefetch (k: take up to k times the last candidate's cost ahead; '0' none),
--       share (a prefetch holds at most this fraction of any bucket), floor (and leaves
--       every bucket it draws on at least this fraction full)
-- Returns {status, now, wait, reason, prefetch, seq...}: the seqs of the candidates granted (a prefix);
-- prefetch is '' or "seq;dim=amount,...": capacity reserved for this process's next requests;
-- wait is the estimated time until the next candidate fits. status: OK, NOPOOL (the pool
-- must be initialized first), SPEND (reason: resets-at), TOOBIG (reason: "dim amount limit"
-- of the first candidate not granted: it can never be admitted).
--
-- Fairness across processes: every participant with waiters holds one ticket per pool,
-- scored by the arrival time of its oldest waiter and carrying that waiter's needs. A
-- candidate is granted only if the buckets hold its cost on top of the needs of every
-- older live ticket, so the oldest waiter anywhere is never delayed by a younger one.
-- Tickets expire after ticket_ttl unless refreshed: a dead process's place vanishes.
--
-- The common case (nobody in line, nothing paused, no lease due) costs seven calls:
-- TIME, one read of the organization, one of the pool, the line, the reservations
-- with their leases and the pool's new levels; the keys' TTLs are refreshed every
-- tenth of key_ttl, not on every call.
local org, pkey, rkey, lkey, qkey, qdkey, nkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local me = ARGV[1]
local lease, ticket_ttl, key_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local scopes, queue, n = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local now = clock()
local opkey = KEYS[8]
if opkey and redis.call('EXISTS', opkey) == 1 then
  return {'DUP', fmt(now), '0', '', ''}
end

-- everything this call needs from the organization hash, in one read
local fields = {'spend_until', 'seq'}
local held = {}
for scope in string.gmatch(scopes, '[^,]+') do
  held[#held + 1] = scope
  fields[#fields + 1] = 'hold:' .. scope
end
local o = redis.call('HMGET', org, unpack(fields))
local spend = tonumber(o[1] or '0')
if spend > now then
  return {'SPEND', fmt(now), fmt(spend - now), redis.call('HGET', org, 'spend_resets') or '', ''}
end
local p = load_pool(pkey)
if not p then
  return {'NOPOOL', fmt(now), '0', '', ''}
end
purge_leases(p, rkey, lkey, now, nkey)
local dirty = p.lx_changed or false
advance(p, now)

local paused, hold = p.paused, nil
for i, scope in ipairs(held) do
  local u = tonumber(o[2 + i] or '0')
  if u > paused then
    paused, hold = u, scope
  end
end

-- live tickets of the others (a bounded look at the head of the line)
local others = {}
local line = redis.call('ZRANGE', qkey, 0, 63, 'WITHSCORES')
local in_line = #line >= 128 -- a full look may have missed this participant's ticket
for i = 1, #line, 2 do
  local who = line[i]
  if who == me then
    in_line = true
  else
    local data = redis.call('HGET', qdkey, who)
    local expiry, needs
    if data then
      local e, rest = string.match(data, '^([^|]*)|(.*)$')
      expiry, needs = tonumber(e), rest
    end
    if not expiry or expiry <= now then
      redis.call('ZREM', qkey, who)
      redis.call('HDEL', qdkey, who)
    else
      others[#others + 1] = {score = tonumber(line[i + 1]), needs = parse_draws(needs)}
    end
  end
end

local status, wait, why = 'OK', 0, ''
local left_arrival, left_draws = nil, nil
-- the reservation counter starts from the clock so seqs never repeat after Redis lost its data
local seq = tonumber(o[2]) or math.floor(now * 1000000)
local records, leases, notes = {}, {}, {}
for c = 1, n do
  local arrival = tonumber(ARGV[6 + 2 * c]) or now
  if arrival > now then
    arrival = now
  end
  local draws_s = ARGV[7 + 2 * c]
  local draws = parse_draws(draws_s)
  for d, amount in pairs(draws) do
    local b = p.b[d]
    if b and amount > b.lim then
      status, why = 'TOOBIG', d .. ' ' .. fmt(amount) .. ' ' .. fmt(b.lim)
      break
    end
  end
  if status ~= 'OK' then
    break
  end
  local w = 0
  if paused > now then
    w = paused - now
    if hold then
      why = redis.call('HGET', org, 'hold_reason:' .. hold) or 'subscription limit'
    else
      why = pause_reason(p)
    end
  else
    local older = {}
    for _, other in ipairs(others) do
      if other.score < arrival then
        for d, amount in pairs(other.needs) do
          local b = p.b[d]
          if b and amount > 0 then
            older[d] = (older[d] or 0) + math.min(amount, b.cap)
          end
        end
      end
    end
    for d, amount in pairs(draws) do
      local b = p.b[d]
      if b and amount > 0 then
        local want = math.min(amount, b.cap) + (older[d] or 0)
        if b.lvl < want - EPS * math.max(1, want) then
          local t = math.huge
          if b.rate > 0 then
            t = (want - b.lvl) / b.rate
          end
          if t > w then
            w = t
          end
        end
      end
    end
  end
  if w > 0 then
    wait, left_arrival, left_draws = w, arrival, draws_s
    break
  end
  for d, amount in pairs(draws) do
    local b = p.b[d]
    if b and amount > 0 then
      charge(b, amount)
    end
  end
  seq = seq + 1
  local s = string.format('%d', seq) -- %d: a plain number would be written with 14 digits
  records[#records + 1], records[#records + 2] = s, draws_s
  leases[#leases + 1], leases[#leases + 2] = fmt(now + lease), s
  notes[#notes + 1], notes[#notes + 2] = s, grant_note(p)
end

-- Prefetch: when everything asked for fit, nobody else is in line and the pool has
-- plenty left, reserve k more requests like the last one under one seq; the process
-- admits its next requests from it without a round trip and returns what it did not use.
local prefetch = ''
local k = tonumber(ARGV[8 + 2 * n] or '0') or 0
if k >= 2 and n > 0 and status == 'OK' and not left_arrival and #others == 0 and paused <= now then
  local share, floor = tonumber(ARGV[9 + 2 * n]), tonumber(ARGV[10 + 2 * n])
  local unit = parse_draws(ARGV[7 + 2 * n])
  for d, a in pairs(unit) do
    local b = p.b[d]
    if b and a > 0 then
      local room = math.min(b.lvl - floor * b.cap, share * b.cap)
      local m = math.floor(room / a)
      if m < k then
        k = m
      end
    end
  end
  if k >= 2 then
    local t = {}
    for _, d in ipairs(p.dims) do
      local a = unit[d] or 0
      if a > 0 then
        charge(p.b[d], a * k)
      end
      t[d] = a * k
    end
    seq = seq + 1
    local s = string.format('%d', seq)
    local draws_s = encode_draws(t)
    records[#records + 1], records[#records + 2] = s, draws_s
    leases[#leases + 1], leases[#leases + 2] = fmt(now + lease), s
    notes[#notes + 1], notes[#notes + 2] = s, grant_note(p) -- its requests' resyncs use it
    prefetch = s .. ';' .. draws_s
  end
end

if #records > 0 then
  -- the id's record of what was granted is written first: should a later write fail (a key
  -- of the wrong type), the cancel its caller then sends finds the records that were made
  if opkey then
    local granted = {}
    for i = 1, #records, 2 do
      granted[#granted + 1] = records[i]
    end
    redis.call('SET', opkey, table.concat(granted, ','), 'PX', math.ceil(lease * 1000))
  end
  redis.call('HSET', rkey, unpack(records))
  redis.call('ZADD', lkey, unpack(leases))
  -- these empty out and come back with traffic: their TTL is set whenever they are written
  redis.call('PEXPIRE', rkey, key_ttl)
  redis.call('PEXPIRE', lkey, key_ttl)
  if #notes > 0 then
    redis.call('HSET', nkey, unpack(notes))
    redis.call('PEXPIRE', nkey, key_ttl)
  end
  redis.call('HSET', org, 'seq', string.format('%d', seq))
  if now + lease < p.lx then
    p.lx = now + lease
  end
  dirty = true
end

if status == 'OK' then
  if left_arrival and queue then
    redis.call('ZADD', qkey, fmt(left_arrival), me)
    redis.call('HSET', qdkey, me, fmt(now + ticket_ttl) .. '|' .. left_draws)
    redis.call('PEXPIRE', qkey, key_ttl)
    redis.call('PEXPIRE', qdkey, key_ttl)
  elseif not left_arrival and in_line then
    redis.call('ZREM', qkey, me)
    redis.call('HDEL', qdkey, me)
  end
end
if now >= p.renew then
  -- the keys that persist while the pool is in use: an idle pool expires 90-100% of
  -- key_ttl after its last use
  for _, k in ipairs({pkey, qkey, qdkey}) do
    redis.call('PEXPIRE', k, key_ttl)
  end
  if redis.call('PTTL', org) < key_ttl then
    redis.call('PEXPIRE', org, key_ttl)
  end
  p.renew = now + key_ttl / 10000
  dirty = true
end
if dirty then
  save_pool(p)
end
local out = {status, fmt(now), fmt(wait), why, prefetch}
local granted = #records / 2
if prefetch ~= '' then
  granted = granted - 1 -- the prefetch is the last record
end
for i = 1, granted do
  out[#out + 1] = records[2 * i - 1]
end
return out
