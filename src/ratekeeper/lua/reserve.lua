-- Reserve: admit a process's waiters, in its local order, as far as they fit.
--
-- KEYS: org, pool, res, lease, q, qd
-- ARGV: me (this participant's id), lease (s), ticket_ttl (s), key_ttl (ms),
--       scopes (comma list of organization-wide holds that apply: 'all,opus'; '' none),
--       queue ('1': keep a place in line if not everything fits; '0': nowait),
--       n, then n candidates as pairs: arrival (Redis time, '' = now), draws ("dim=amount,...")
-- Returns {status, now, wait, reason, seq...}: the seqs of the candidates granted (a prefix);
-- wait is the estimated time until the next candidate fits. status: OK, NOPOOL (the pool
-- must be initialized first), SPEND (reason: resets-at), TOOBIG (reason: "dim amount limit"
-- of the first candidate not granted: it can never be admitted).
--
-- Fairness across processes: every participant with waiters holds one ticket per pool,
-- scored by the arrival time of its oldest waiter and carrying that waiter's needs. A
-- candidate is granted only if the buckets hold its cost on top of the needs of every
-- older live ticket, so the oldest waiter anywhere is never delayed by a younger one.
-- Tickets expire after ticket_ttl unless refreshed: a dead process's place vanishes.
local org, pkey, rkey, lkey, qkey, qdkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local me = ARGV[1]
local lease, ticket_ttl, key_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local scopes, queue, n = ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local now = clock()

local spend = tonumber(redis.call('HGET', org, 'spend_until') or '0')
if spend > now then
  return {'SPEND', fmt(now), fmt(spend - now), redis.call('HGET', org, 'spend_resets') or ''}
end
local p = load_pool(pkey)
if not p then
  return {'NOPOOL', fmt(now), '0', ''}
end
purge_leases(rkey, lkey, now)
advance(p, now)

local paused, reason = p.paused, p.reason
for scope in string.gmatch(scopes, '[^,]+') do
  local u = tonumber(redis.call('HGET', org, 'hold:' .. scope) or '0')
  if u > paused then
    paused = u
    reason = redis.call('HGET', org, 'hold_reason:' .. scope) or 'subscription limit'
  end
end

-- live tickets of the others (a bounded look at the head of the line)
local others = {}
local line = redis.call('ZRANGE', qkey, 0, 63, 'WITHSCORES')
for i = 1, #line, 2 do
  local who = line[i]
  if who ~= me then
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
local granted = {}
local left_arrival, left_draws = nil, nil
local changed = false
if n > 0 and redis.call('HEXISTS', org, 'seq') == 0 then
  -- start from the clock so seqs never repeat after Redis lost its data
  redis.call('HSET', org, 'seq', string.format('%d', math.floor(now * 1000000)))
end
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
    w, why = paused - now, reason
  else
    local older = {}
    for _, o in ipairs(others) do
      if o.score < arrival then
        for d, amount in pairs(o.needs) do
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
  -- %d: a plain number argument would be written with 14 digits
  local seq = string.format('%d', redis.call('HINCRBY', org, 'seq', 1))
  redis.call('HSET', rkey, seq, draws_s)
  redis.call('ZADD', lkey, fmt(now + lease), seq)
  granted[#granted + 1] = seq
  changed = true
end

if status == 'OK' then
  if left_arrival and queue then
    redis.call('ZADD', qkey, fmt(left_arrival), me)
    redis.call('HSET', qdkey, me, fmt(now + ticket_ttl) .. '|' .. left_draws)
  elseif not left_arrival then
    redis.call('ZREM', qkey, me)
    redis.call('HDEL', qdkey, me)
  end
end
if changed then
  save_levels(p) -- burst, pause and limits are as loaded
end
for _, k in ipairs({pkey, rkey, lkey, qkey, qdkey}) do
  redis.call('PEXPIRE', k, key_ttl)
end
if redis.call('PTTL', org) < key_ttl then
  redis.call('PEXPIRE', org, key_ttl)
end
local out = {status, fmt(now), fmt(wait), why}
for _, s in ipairs(granted) do
  out[#out + 1] = s
end
return out
