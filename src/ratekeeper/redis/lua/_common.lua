-- Shared by every ratekeeper script: prepended to each one when it is loaded.
--
-- Time is Redis TIME, read inside the script: one clock for every process on
-- every machine, so a caller's skewed clock can neither mint nor lose tokens.
-- Numbers are written with %.17g: Lua's own tostring keeps 14 digits, too few
-- for epoch seconds with microseconds.
local EPS = 1e-9
local MIN_BURST = 1 / 60

local function fmt(x)
  return string.format('%.17g', x)
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- "dim=amount,dim=amount" <-> {dim = amount}
local function parse_draws(s)
  local t = {}
  for d, a in string.gmatch(s or '', '([^,=]+)=([^,]+)') do
    t[d] = tonumber(a)
  end
  return t
end

local function encode_draws(t)
  local parts = {}
  for d, a in pairs(t) do
    parts[#parts + 1] = d .. '=' .. fmt(a)
  end
  return table.concat(parts, ',')
end

-- A pool hash: 'v2' holds the numbers, packed with struct as little-endian doubles
-- (exact, and read without parsing text): the header below, then per dimension
-- limit, capacity, rate, debt, level, unc (given back without the server ever counting
-- it: requests released unsent or refused, a prefetch's unused part; a running total),
-- low (what resyncs took off; a running total). 'dims' names the dimensions in that
-- order ("requests,input_tokens,..."); 'reason' says why the pool is paused (read only
-- then). Header: t (time of the levels), burst, paused (until), clean (last burst
-- shrink), shrink (the reservation counter at that shrink: 429s of requests admitted
-- before it are old news), lx (no lease expires before this: purges are skipped until
-- then), renew (when the keys' TTLs are next refreshed), ver (bumped when a capacity
-- changes: levels noted before are not comparable with later ones).
-- ('v', without unc, low and ver, was the layout before; init.lua replaces it.)
local HEAD = 8
local PER_DIM = 7

local function packing(n)
  return '<' .. string.rep('d', HEAD + PER_DIM * n)
end

local function load_pool(key)
  local f = redis.call('HMGET', key, 'v2', 'dims')
  if not f[1] then
    return nil
  end
  local dims = {}
  for d in string.gmatch(f[2] or '', '[^,]+') do
    dims[#dims + 1] = d
  end
  local x = {struct.unpack(packing(#dims), f[1])}
  local p = {
    key = key, dims = dims, b = {}, t = x[1], burst = x[2], paused = x[3], clean = x[4],
    shrink = x[5], lx = x[6], renew = x[7], ver = x[8],
  }
  for i, d in ipairs(dims) do
    local j = HEAD + PER_DIM * (i - 1)
    p.b[d] = {
      lim = x[j + 1], cap = x[j + 2], rate = x[j + 3], debt = x[j + 4], lvl = x[j + 5], unc = x[j + 6],
      low = x[j + 7],
    }
  end
  return p
end

-- Writes the numbers; the names only if a dimension was added, the reason only if set.
local function save_pool(p)
  local x = {p.t, p.burst, p.paused, p.clean, p.shrink, p.lx, p.renew, p.ver}
  for _, d in ipairs(p.dims) do
    local b = p.b[d]
    local n = #x
    x[n + 1], x[n + 2], x[n + 3], x[n + 4], x[n + 5], x[n + 6], x[n + 7] =
      b.lim, b.cap, b.rate, b.debt, b.lvl, b.unc, b.low
  end
  local args = {'v2', struct.pack(packing(#p.dims), unpack(x))}
  if p.new_dims then
    args[#args + 1], args[#args + 2] = 'dims', table.concat(p.dims, ',')
  end
  if p.reason then
    args[#args + 1], args[#args + 2] = 'reason', p.reason
  end
  redis.call('HSET', p.key, unpack(args))
end

-- Why the pool is paused (stored apart: only a paused pool needs it).
local function pause_reason(p)
  return p.reason or redis.call('HGET', p.key, 'reason') or ''
end

-- Bring every level up to now; a time earlier than the last one seen adds nothing.
local function advance(p, now)
  if now > p.t then
    local dt = now - p.t
    for _, d in ipairs(p.dims) do
      local b = p.b[d]
      local l = b.lvl + dt * b.rate
      if l > b.cap then
        l = b.cap
      end
      if l > b.lvl then
        b.lvl = l
      end
    end
    p.t = now
  end
end

local function charge(b, amount)
  local l = b.lvl - amount
  if l < -b.debt then
    l = -b.debt
  end
  b.lvl = l
end

local function give(b, amount)
  local l = b.lvl + amount
  if l > b.cap then
    l = b.cap
  end
  b.lvl = l
end

-- positive amounts are refunds, negative ones extra charges
local function apply_diff(p, diff)
  for d, a in pairs(diff) do
    local b = p.b[d]
    if b and a > 0 then
      give(b, a)
    elseif b and a < 0 then
      charge(b, -a)
    end
  end
end

-- Refunds the server never counted (requests released unsent or refused, a prefetch's
-- unused part): their running total per bucket, for resync's relative rule, and the
-- refund itself in a log scored by its reservation's seq (unc_key: a sorted set): a
-- report of an older request must not count refunds of reservations granted after it,
-- which its note never had charged. The log keeps the 256 youngest reservations'.
local UNC_LOG = 256

local function add_uncounted(p, refunds, unc_key, seq, now, key_ttl)
  local kept = {}
  for d, a in pairs(refunds) do
    local b = p.b[d]
    if b and a > 0 then
      b.unc = b.unc + a
      kept[d] = a
    end
  end
  if next(kept) then
    redis.call('ZADD', unc_key, seq, fmt(now) .. ':' .. seq .. '|' .. encode_draws(kept))
    redis.call('ZREMRANGEBYRANK', unc_key, 0, -UNC_LOG - 1)
    redis.call('PEXPIRE', unc_key, key_ttl)
  end
end

-- A record's count of its requests sent (sent.lua), beside its draws: no bucket has the name.
local SENT = '~sent'
-- How long the log of sends (sent.lua) keeps each: a report read against it is younger.
local SENT_LOG_SECONDS = 120

-- A refund of reservation seq, less what must not go back: on a token bucket whose level a
-- report of the answer set after seq was granted (resync.lua's 'wm'), that report may
-- already hold the refund the server made itself. Reads the marks only for a refund.
local function held_back(pool_key, seq, refund)
  local marks = nil
  local out = {}
  for d, a in pairs(refund) do
    if a > 0 and d ~= 'requests' then
      if not marks then
        marks = parse_draws(redis.call('HGET', pool_key, 'wm'))
      end
      local m = marks[d]
      if not (m and tonumber(seq) <= m) then
        out[d] = a
      end
    else
      out[d] = a
    end
  end
  return out
end

-- What the log holds of reservations granted after seq ``since``, per dimension.
local function uncounted_after(unc_key, since)
  local out = {}
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', unc_key, '(' .. since, '+inf')) do
    for d, a in pairs(parse_draws(string.match(m, '|(.*)$'))) do
      out[d] = (out[d] or 0) + a
    end
  end
  return out
end

-- Resize a bucket the way Pool._resize does. With keep_used (a limit learned from the
-- headers: the server's bucket was that size all along) what was used stays used;
-- without it (a burst change) the level is only clamped to the new capacity. The bucket
-- may owe up to its per-minute limit either way.
local function set_cap(b, cap, keep_used)
  b.debt = b.lim
  local l = b.lvl
  if keep_used then
    l = cap - (b.cap - b.lvl)
  end
  b.cap = cap
  if l < -b.debt then
    l = -b.debt
  end
  if l > cap then
    l = cap
  end
  b.lvl = l
end

local function cap_for(d, lim, burst)
  local c = lim * burst
  if d == 'requests' and c < 1 then
    c = 1
  end
  return c
end

local function set_burst(p, burst)
  p.burst = burst
  p.ver = p.ver + 1
  for _, d in ipairs(p.dims) do
    local b = p.b[d]
    if b.rate > 0 then -- a concurrency cap (batch queue) has no burst
      set_cap(b, cap_for(d, b.lim, burst), false)
    end
  end
end

-- Set a dimension's per-minute limit, adding the bucket (full) if it is new.
local function set_limit(p, d, lim)
  local b = p.b[d]
  if b == nil then
    local cap = cap_for(d, lim, p.burst)
    p.b[d] = {lim = lim, cap = cap, rate = lim / 60, debt = lim, lvl = cap, unc = 0, low = 0}
    p.dims[#p.dims + 1] = d
    p.new_dims = true
    p.ver = p.ver + 1
    return true
  end
  if b.lim == lim then
    return false
  end
  p.ver = p.ver + 1
  b.lim = lim
  if b.rate > 0 then
    b.rate = lim / 60
    set_cap(b, cap_for(d, lim, p.burst), true)
  else
    set_cap(b, lim, true)
  end
  return true
end

-- Whether reservation seq (its record gone) was charged to an earlier life of the pool at
-- pool_key, so that its caller's copy must not be refunded (see init.lua's 'born').
local function before_birth(pool_key, seq)
  local born = tonumber(redis.call('HGET', pool_key, 'born') or '')
  return born ~= nil and tonumber(seq) <= born
end

-- The last reservation seq handed out (-1: none yet).
local function last_seq(org)
  return tonumber(redis.call('HGET', org, 'seq') or '-1')
end

-- Expired leases: the holder is presumed dead. Its reservation stands (a sent
-- request keeps what the server charged); it only leaves the in-flight set, so
-- resyncs stop counting it as unseen by the server. p.lx (no lease expires before
-- it) lets most calls skip the look; settlements remove leases without raising it,
-- so it stays a lower bound.
local function purge_leases(p, res_key, lease_key, now, note_key)
  if now < p.lx then
    return 0
  end
  local dead = redis.call('ZRANGEBYSCORE', lease_key, '-inf', fmt(now), 'LIMIT', 0, 64)
  if #dead > 0 then
    redis.call('ZREM', lease_key, unpack(dead))
    redis.call('HDEL', res_key, unpack(dead))
    redis.call('HDEL', note_key, unpack(dead))
  end
  local first = redis.call('ZRANGE', lease_key, 0, 0, 'WITHSCORES')
  p.lx = tonumber(first[2]) or math.huge
  p.lx_changed = true
  return #dead
end

-- Resync's relative rule needs, per reservation, the pool as it was right after the grant:
-- ver, then per dimension (in p.dims order) level, unc, low. Packed like the pool.
local function grant_note(p)
  local x = {p.ver}
  for _, d in ipairs(p.dims) do
    local b = p.b[d]
    local n = #x
    x[n + 1], x[n + 2], x[n + 3] = b.lvl, b.unc, b.low
  end
  return struct.pack('<' .. string.rep('d', #x), unpack(x))
end

-- {ver = ..., [dim] = {lvl, unc, low}} from grant_note's string (dims: the pool's, in order;
-- a dimension added since the grant is absent)
local function read_note(p, raw)
  local k = (#raw / 8 - 1) / 3
  local x = {struct.unpack('<' .. string.rep('d', 1 + 3 * k), raw)}
  local note = {ver = x[1]}
  for i = 1, math.min(k, #p.dims) do
    note[p.dims[i]] = {x[3 * i - 1], x[3 * i], x[3 * i + 1]}
  end
  return note
end
