-- Resync: correct the shared buckets from one response's rate-limit headers.
--
-- KEYS: org, pool, res, lease, notes, uncounted log, then the op's id key (optional)
-- ARGV: since (seq of the observed request: reservations admitted after it, by any
--       process, were not seen by the server when it answered; -1: all in flight),
--       learn ('1': adopt the -limit headers), op_ttl (ms: how long the op's id is
--       kept), then quadruples: dim, limit ('' if absent),
--       target (-remaining minus the rounding margin, '' if absent), extra (what the
--       caller knows the server had not counted though the pool had at the grant: the
--       refused request's own tokens, its process's earlier requests not sent yet)
-- Returns {status, now, change...}: "limit:dim:value" and "level:dim:delta" (delta < 0);
-- {DUP, now} if the op's id is recorded (sent again after a reply that never came: a
-- second run would take the same report off twice).
-- Levels only go down: a stale report must never let anyone admit more than the server.
--
-- The rule is the in-process limiter's. The report is of the server's buckets just after
-- the observed request's grant; the note reserve.lua kept of the pool right then says by
-- how much the shared model was ahead of the server at that moment:
--   ahead = level at grant + extra + (unc now - unc then - of younger ones) - target
--           - (low now - low then)
-- (unc: given back since without the server ever counting it, less what of that belonged
-- to reservations granted after the observed one, which the note never had charged; low:
-- what resyncs took off since, other reports having shown the same). The level comes down by that now. Lowering
-- to the report itself, less what was admitted since, would also throw away the refill
-- since the grant, which the model counted like the server: seconds of it for a long
-- request. Without a note (a prefetched request, a lease purged, a capacity changed since:
-- 'ver'), it does exactly that, which is safe.
local since, learn = tonumber(ARGV[1]), ARGV[2] == '1'
local now = clock()
if KEYS[7] and not redis.call('SET', KEYS[7], '1', 'PX', tonumber(ARGV[3]), 'NX') then
  return {'DUP', fmt(now)}
end
local p = load_pool(KEYS[2])
if not p then
  return {'NOPOOL', fmt(now)}
end
purge_leases(p, KEYS[3], KEYS[4], now, KEYS[5])
advance(p, now)
local out = {'OK', fmt(now)}
local dirty = false
if learn then
  for i = 4, #ARGV, 4 do
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
local note = nil
if since >= 0 then
  local raw = redis.call('HGET', KEYS[5], ARGV[1])
  if raw then
    note = read_note(p, raw)
    if note.ver ~= p.ver then
      note = nil
    end
  end
end
local unseen = nil -- the fallback's: what reservations after the observed one hold
local younger = note and uncounted_after(KEYS[6], ARGV[1]) or {} -- (ARGV: all the digits)
for i = 4, #ARGV, 4 do
  local d, target, extra = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]) or 0
  local b = p.b[d]
  if b and target then
    local at = note and note[d]
    local t = math.huge
    if at then
      local given = b.unc - at[2] - (younger[d] or 0)
      local ahead = at[1] + extra + given - target - (b.low - at[3])
      if ahead > 0 then
        t = b.lvl - ahead
      end
    else
      if not unseen then
        unseen = {}
        local flat = redis.call('HGETALL', KEYS[3])
        for j = 1, #flat, 2 do
          if tonumber(flat[j]) > since then
            for dd, a in pairs(parse_draws(flat[j + 1])) do
              unseen[dd] = (unseen[dd] or 0) + a
            end
          end
        end
      end
      t = target - (unseen[d] or 0)
    end
    if t < -b.debt then
      t = -b.debt
    end
    if t > b.cap then
      t = b.cap
    end
    if t < b.lvl then
      out[#out + 1] = 'level:' .. d .. ':' .. fmt(t - b.lvl)
      b.low = b.low + (b.lvl - t)
      b.lvl = t
      dirty = true
    end
  end
end
if dirty or p.lx_changed then
  save_pool(p)
end
return out
