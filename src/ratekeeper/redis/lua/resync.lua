-- Resync: correct the shared buckets from one response's rate-limit headers.
--
-- KEYS: org, pool, res, lease, notes, uncounted log, sent log, then the op's id key (optional)
-- ARGV: since (seq of the observed request: reservations admitted after it, by any
--       process, were not seen by the server when it answered; -1: all in flight),
--       learn ('1': adopt the -limit headers), op_ttl (ms: how long the op's id is
--       kept), moment ('response': the caller's reports have shown they are taken as the
--       answer leaves, see below; '' otherwise), cutoff (with 'response': the earliest that
--       moment can be, in Redis time, less a request's way to the server), then
--       quadruples: dim, limit ('' if absent),
--       target (-remaining minus the rounding margin, '' if absent), extra (what the
--       caller knows the server had not counted though the pool had at the grant: the
--       refused request's own tokens, its process's earlier requests not sent yet)
-- Returns {status, now, change...}: "limit:dim:value" and "level:dim:delta"; {DUP, now} if
-- the op's id is recorded (sent again after a reply that never came: a second run would
-- take the same report off twice).
--
-- The admission rule (every bucket, unless below): the report is of the server's buckets
-- just after the observed request's grant; the note reserve.lua kept of the pool right
-- then says by how much the shared model was ahead of the server at that moment:
--   ahead = level at grant + extra + (unc now - unc then - of younger ones) - target
--           - (low now - low then)
-- (unc: given back since without the server ever counting it, less what of that belonged
-- to reservations granted after the observed one, which the note never had charged; low:
-- what resyncs took off since, other reports having shown the same). The level comes down by that now. Lowering
-- to the report itself, less what was admitted since, would also throw away the refill
-- since the grant, which the model counted like the server: seconds of it for a long
-- request. Without a note (a prefetched request, a lease purged, a capacity changed since:
-- 'ver'), it does exactly that, which is safe. It only ever lowers: read at the answer,
-- the report already holds what was admitted during it, which this rule takes off again.
--
-- The response rule (requests only, with moment 'response'): the report is of the server
-- when the answer left, after every request that reached it by then. What the shared model
-- has charged and the server may not have counted then is every request not sent (a
-- record's requests less its count of sends, sent.lua) and every send Redis heard of after
-- the cutoff (it may have reached the server after the report's moment); the level goes to
-- the report less those, down or up. A request is one request: no refund the server made
-- is still to come to Redis. A report whose cutoff is older than the latest such one only
-- lowers (others may have drawn since), and one older than the log of sends reads nothing.
local since, learn = tonumber(ARGV[1]), ARGV[2] == '1'
local now = clock()
if KEYS[8] and not redis.call('SET', KEYS[8], '1', 'PX', tonumber(ARGV[3]), 'NX') then
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
  for i = 6, #ARGV, 4 do
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
local cutoff = tonumber(ARGV[5])
local response = ARGV[4] == 'response' and cutoff ~= nil and cutoff <= now
  and cutoff > now - SENT_LOG_SECONDS + 1
local latest = tonumber(redis.call('HGET', KEYS[2], 'rcut') or '') or -math.huge

-- The response rule's: the requests the shared model holds that the server may not have
-- counted at the report's moment.
local function not_counted()
  local n = 0
  local flat = redis.call('HGETALL', KEYS[3])
  for j = 2, #flat, 2 do
    local t = parse_draws(flat[j])
    local unsent = (t['requests'] or 0) - (t[SENT] or 0)
    if unsent > 0 then
      n = n + unsent
    end
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '(' .. fmt(cutoff), '+inf')) do
    n = n + (tonumber(string.match(m, '|([^|]*)$')) or 0)
  end
  return n
end

local unseen = nil -- the fallback's: what reservations after the observed one hold
local younger = note and uncounted_after(KEYS[6], ARGV[1]) or {} -- (ARGV: all the digits)
for i = 6, #ARGV, 4 do
  local d, target, extra = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]) or 0
  local b = p.b[d]
  if b and target then
    local at = note and note[d]
    local t = math.huge
    local lifts = false
    if d == 'requests' and response then
      t = target - not_counted()
      lifts = cutoff >= latest
      if lifts then
        redis.call('HSET', KEYS[2], 'rcut', fmt(cutoff))
      end
    elseif at then
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
    if t < b.lvl or (lifts and t > b.lvl) then
      out[#out + 1] = 'level:' .. d .. ':' .. fmt(t - b.lvl)
      b.low = b.low + (b.lvl - t) -- (a lift too: the admission rule reads it as a change of the model)
      b.lvl = t
      dirty = true
    end
  end
end
if dirty or p.lx_changed then
  save_pool(p)
end
return out
