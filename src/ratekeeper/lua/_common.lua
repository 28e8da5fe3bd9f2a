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

-- A pool hash: dims (comma list), t (time of the levels), burst, paused (until),
-- reason, clean (last burst shrink), shrink (the reservation counter at the last burst
-- shrink: 429s of requests admitted before it are old news), and per dimension
-- b:<dim> = "limit capacity rate debt level".
local function load_pool(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local f = {}
  for i = 1, #flat, 2 do
    f[flat[i]] = flat[i + 1]
  end
  local p = {
    key = key, dims = {}, b = {}, t = tonumber(f.t), burst = tonumber(f.burst),
    paused = tonumber(f.paused or '0'), reason = f.reason or '', clean = tonumber(f.clean or f.t),
    shrink = tonumber(f.shrink or '-1'),
  }
  for d in string.gmatch(f.dims or '', '[^,]+') do
    local lim, cap, rate, debt, lvl = string.match(f['b:' .. d] or '', '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    if lvl then
      p.dims[#p.dims + 1] = d
      p.b[d] = {lim = tonumber(lim), cap = tonumber(cap), rate = tonumber(rate), debt = tonumber(debt), lvl = tonumber(lvl)}
    end
  end
  return p
end

local function save_pool(p)
  local args = {
    'dims', table.concat(p.dims, ','), 't', fmt(p.t), 'burst', fmt(p.burst),
    'paused', fmt(p.paused), 'reason', p.reason, 'clean', fmt(p.clean),
    'shrink', string.format('%d', p.shrink or -1),
  }
  for _, d in ipairs(p.dims) do
    local b = p.b[d]
    args[#args + 1] = 'b:' .. d
    args[#args + 1] = fmt(b.lim) .. ' ' .. fmt(b.cap) .. ' ' .. fmt(b.rate) .. ' ' .. fmt(b.debt) .. ' ' .. fmt(b.lvl)
  end
  redis.call('HSET', p.key, unpack(args))
end

-- Only what admission and settlement change: the time and the levels.
local function save_levels(p)
  local args = {'t', fmt(p.t)}
  for _, d in ipairs(p.dims) do
    local b = p.b[d]
    args[#args + 1] = 'b:' .. d
    args[#args + 1] = fmt(b.lim) .. ' ' .. fmt(b.cap) .. ' ' .. fmt(b.rate) .. ' ' .. fmt(b.debt) .. ' ' .. fmt(b.lvl)
  end
  redis.call('HSET', p.key, unpack(args))
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
    p.b[d] = {lim = lim, cap = cap, rate = lim / 60, debt = lim, lvl = cap}
    p.dims[#p.dims + 1] = d
    return true
  end
  if b.lim == lim then
    return false
  end
  b.lim = lim
  if b.rate > 0 then
    b.rate = lim / 60
    set_cap(b, cap_for(d, lim, p.burst), true)
  else
    set_cap(b, lim, true)
  end
  return true
end

-- The last reservation seq handed out (-1: none yet).
local function last_seq(org)
  return tonumber(redis.call('HGET', org, 'seq') or '-1')
end

-- Expired leases: the holder is presumed dead. Its reservation stands (a sent
-- request keeps what the server charged); it only leaves the in-flight set, so
-- resyncs stop counting it as unseen by the server.
local function purge_leases(res_key, lease_key, now)
  local dead = redis.call('ZRANGEBYSCORE', lease_key, '-inf', fmt(now), 'LIMIT', 0, 64)
  if #dead > 0 then
    redis.call('ZREM', lease_key, unpack(dead))
    redis.call('HDEL', res_key, unpack(dead))
  end
  return #dead
end
