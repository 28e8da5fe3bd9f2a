-- Resync: correct the shared buckets from one response's rate-limit headers.
--
-- KEYS: org, pool, res, lease
-- ARGV: since (seq of the observed request: reservations admitted after it, by any
--       process, were not seen by the server when it answered; -1: all in flight),
--       learn ('1': adopt the -limit headers), then triples: dim, limit ('' if absent),
--       target (-remaining minus the rounding margin, '' if absent)
-- Returns {status, now, change...}: "limit:dim:value" and "level:dim:delta" (delta < 0).
-- Levels only go down: a stale report must never let anyone admit more than the server.
local since, learn = tonumber(ARGV[1]), ARGV[2] == '1'
local now = clock()
local p = load_pool(KEYS[2])
if not p then
  return {'NOPOOL', fmt(now)}
end
purge_leases(p, KEYS[3], KEYS[4], now)
advance(p, now)
local out = {'OK', fmt(now)}
local dirty = false
if learn then
  for i = 3, #ARGV, 3 do
    local d, lim = ARGV[i], tonumber(ARGV[i + 1])
    if lim and lim > 0 then
      local ok
      if d == 'tokens' then
        local li, lo = p.b['input_tokens'], p.b['output_tokens']
        ok = p.b[d] ~= nil or lim < ((li and li.lim or 0) + (lo and lo.lim or 0))
      elseif string.sub(d, 1, 9) == 'priority_' then
        ok = true
      else
        ok = p.b[d] ~= nil
      end
      if ok and set_limit(p, d, lim) then
        dirty = true
        out[#out + 1] = 'limit:' .. d .. ':' .. fmt(lim)
      end
    end
  end
end
local unseen = {}
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  if tonumber(flat[i]) > since then
    for d, a in pairs(parse_draws(flat[i + 1])) do
      unseen[d] = (unseen[d] or 0) + a
    end
  end
end
for i = 3, #ARGV, 3 do
  local d, target = ARGV[i], tonumber(ARGV[i + 2])
  local b = p.b[d]
  if b and target then
    local t = target - (unseen[d] or 0)
    if t < -b.debt then
      t = -b.debt
    end
    if t > b.cap then
      t = b.cap
    end
    if t < b.lvl then
      out[#out + 1] = 'level:' .. d .. ':' .. fmt(t - b.lvl)
      b.lvl = t
      dirty = true
    end
  end
end
if dirty or p.lx_changed then
  save_pool(p)
end
return out
