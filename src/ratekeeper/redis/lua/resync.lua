-- Resync: correct the shared buckets from one response's rate-limit headers.
--
-- KEYS: org, pool, res, lease, notes, uncounted log, sent log, then the op's id key (optional)
-- ARGV: since (seq of the observed request: reservations admitted after it, by any
--       process, were not seen by the server when it answered; -1: all in flight),
--       learn ('1': adopt the -limit headers), op_ttl (ms: how long the op's id is
--       kept), moment ('response', 'admission', 'either' or 'unknown': what the caller's
--       reports have shown of the moment they are taken at, see below; '': only lower,
--       a refusal's report), cutoff (the
--       earliest that answer's moment can be, in Redis time, less a request's way to the
--       server), since_sent and admitted_by (the observed request's send less, and plus,
--       that way: the span its admission lies in), own ('all': the observed reservation is
--       the observed request alone; 'one': a prefetch's, one of its requests unmarked),
--       lifts (the token buckets the response rule may set, comma separated: see below), then
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
-- is still to come to Redis. The observed request itself is in the report (it was answered).
-- With moment 'admission', the requests bucket goes (down or up) to the report read as of
-- the admission, and with 'either' (the reports are of both moments) or 'unknown' (not
-- shown yet; the earlier answers bound it too, see keep_answers) to the lower of the two
-- readings; as of the admission it is the larger of two bounds: the admission rule's, and
-- the report with the refill from the latest the admission can have been (clamped at the
-- capacity, before any draw: the safe order), less every request not sent and every send
-- heard of after since_sent. Under each reading, a report of a moment older than the latest
-- one a level was read from only lowers (others may have drawn since: 'rcut' and 'acut' in
-- the pool's hash), and one older than the log of sends reads nothing.
--
-- The token buckets named in 'lifts' follow the same rules as the requests bucket, in
-- tokens: what the shared model has charged and the server may not have counted is each
-- record's tokens not sent (sent.lua's '~dim') and the tokens of every send heard of after
-- the cutoff (or since_sent). Unlike a request, a reservation's tokens come back in part
-- when it settles, and the server makes that refund itself when it answers: a report, of
-- either moment, may already hold the refund of a request whose settlement has not reached
-- Redis yet, which would then give it back a second time. So once a token bucket's level
-- was read from a report, the refunds of every reservation granted before then ('wm' in
-- the pool's hash: the last seq handed out, per bucket) do not go back to that bucket
-- (settle.lua, release.lua): the model stays that much lower until the next report sets
-- the level again, the safe side. The caller names only the buckets whose traffic still
-- to come no report shows is within what the records hold: input, and output reserved as
-- max_tokens (output counted as it is produced may each draw more than a report shows).
local since, learn = tonumber(ARGV[1]), ARGV[2] == '1'
local FIRST = 10 -- the first quadruple's
local lifts = {}
for d in string.gmatch(ARGV[9] or '', '[^,]+') do
  lifts[d] = true
end
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
  for i = FIRST, #ARGV, 4 do
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
local mode, cutoff, since_sent, admitted_by = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local own = ARGV[8]
local horizon = now - SENT_LOG_SECONDS + 1
local unknown = mode == 'unknown' -- both readings, and the earlier answers bound them (below)
local either = mode == 'either' or unknown
local response = (mode == 'response' or either) and cutoff ~= nil and cutoff <= now and cutoff > horizon
local admission = (mode == 'admission' or either) and since_sent ~= nil and admitted_by ~= nil
  and since_sent > horizon and since_sent <= now
if either and not (response and admission) then
  response, admission = false, false
end
-- the latest moment a report set the level from, under each reading: an older one only lowers
local held = redis.call('HMGET', KEYS[2], 'rcut', 'acut', 'alast')
local latest, latest_adm = tonumber(held[1] or '') or -math.huge, tonumber(held[2] or '') or -math.huge
-- the latest instant a report so far can have been taken at its admission (this one's too)
local alast = tonumber(held[3] or '') or -math.huge
if admitted_by and since >= 0 and admitted_by <= now + SENT_LOG_SECONDS and admitted_by > alast then
  alast = admitted_by
end

-- While the moment is unknown (core._feedback._below_answers, _answers): the answers of
-- earlier reports no earlier than ``alast`` may be the latest moment of all (take every
-- other report as of its admission), so each one's value bounds the level. Kept per
-- bucket in 'ans:DIM' as "at:offset;..." (offset: its value less the level, which moves
-- with the server's under every draw), at most eight, each lower than every later one.
local function answers_of(d)
  local out = {}
  for at, off in string.gmatch(redis.call('HGET', KEYS[2], 'ans:' .. d) or '', '([^:;]+):([^;]+)') do
    out[#out + 1] = {tonumber(at), tonumber(off)}
  end
  return out
end
local answer_fields = {} -- (written once, after every bucket: 'ans:DIM', value, ...)
local function keep_answers(d, list, old_lvl, new_lvl, cap, new_value)
  local values = {}
  for _, a in ipairs(list) do
    if a[1] >= alast then
      values[#values + 1] = {a[1], math.min(cap, old_lvl + a[2])}
    end
  end
  if new_value then -- (its answer left no later than this script runs: now is the latest it can be)
    values[#values + 1] = {now, math.min(cap, new_value)}
  end
  table.sort(values, function(x, y)
    if x[1] ~= y[1] then
      return x[1] < y[1]
    end
    return x[2] > y[2]
  end)
  local kept, lowest = {}, math.huge
  for j = #values, 1, -1 do
    if values[j][2] < lowest then
      lowest = values[j][2]
      table.insert(kept, 1, {values[j][1], values[j][2] - new_lvl})
    end
  end
  while #kept > 8 do -- two merge into one that is lower and lasts longer: it bounds where either did
    kept[2] = {kept[2][1], kept[1][2]}
    table.remove(kept, 1)
  end
  local parts = {}
  for _, a in ipairs(kept) do
    parts[#parts + 1] = fmt(a[1]) .. ':' .. fmt(a[2])
  end
  answer_fields[#answer_fields + 1] = 'ans:' .. d
  answer_fields[#answer_fields + 1] = table.concat(parts, ';')
end

-- The response rule's: the requests the shared model holds that the server had not
-- counted by then (not sent; sent, as Redis heard, after ``after``), less the observed one.
-- (and, for a token bucket d, the same in tokens: a record's d less its '~d' sent, and each
-- send's own d; the observed request's part of a prefetch is counted, the safe side)
local unsent, late = nil, nil
local function not_counted(after, d)
  if not unsent then
    unsent = {}
    local flat = redis.call('HGETALL', KEYS[3])
    for j = 1, #flat, 2 do
      if not (own == 'all' and flat[j] == ARGV[1]) then
        local t = parse_draws(flat[j + 1])
        local u = (t['requests'] or 0) - (t[SENT] or 0)
        if own == 'one' and flat[j] == ARGV[1] then
          u = u - 1
        end
        if u > 0 then
          unsent['requests'] = (unsent['requests'] or 0) + u
        end
        for dd in pairs(lifts) do
          local ut = (t[dd] or 0) - (t['~' .. dd] or 0)
          if ut > 0 then
            unsent[dd] = (unsent[dd] or 0) + ut
          end
        end
      end
    end
  end
  if not late or late.after ~= after then
    late = {after = after, n = {}}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '(' .. fmt(after), '+inf')) do
      if not (own == 'all' and string.match(m, '^([^:]*):') == ARGV[1]) then
        local count, tokens = string.match(m, '|([^|]*)|([^|]*)$')
        if not count then -- (a send logged before the log held tokens)
          count, tokens = string.match(m, '|([^|]*)$'), ''
        end
        late.n['requests'] = (late.n['requests'] or 0) + (tonumber(count) or 0)
        for dd, a in pairs(parse_draws(tokens)) do
          late.n[dd] = (late.n[dd] or 0) + a
        end
      end
    end
  end
  return (unsent[d] or 0) + (late.n[d] or 0)
end

local read = {} -- the token buckets the response rule set
local younger = note and uncounted_after(KEYS[6], ARGV[1]) or {} -- (ARGV: all the digits)

-- The admission rule's level for bucket b: a bound on the server's under that reading
-- (the model's own level where the model was not ahead of the server at the grant).
local unseen_at = nil
local function admission_rule(d, b, at, target, extra)
  if at then
    local given = b.unc - at[2] - (younger[d] or 0)
    local ahead = at[1] + extra + given - target - (b.low - at[3])
    return ahead > 0 and b.lvl - ahead or b.lvl
  end
  if not unseen_at then
    unseen_at = {}
    local flat = redis.call('HGETALL', KEYS[3])
    for j = 1, #flat, 2 do
      if tonumber(flat[j]) > since then
        for dd, a in pairs(parse_draws(flat[j + 1])) do
          unseen_at[dd] = (unseen_at[dd] or 0) + a
        end
      end
    end
  end
  return target - (unseen_at[d] or 0)
end
for i = FIRST, #ARGV, 4 do
  local d, target, extra = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]) or 0
  local b = p.b[d]
  if b and target then
    local at = note and note[d]
    local t
    local moves = false
    local answers, answer_value = nil, nil
    if (d == 'requests' or lifts[d]) and (response or admission) then
      -- (read: the level comes from the report itself, not from the model's own change)
      t = math.huge
      local read_here = false
      if response then
        t = target - not_counted(cutoff, d)
        answer_value = t
        read_here = true
        if cutoff < latest and t > b.lvl then
          t, read_here = b.lvl, false
        end
      end
      if admission then
        local refilled = math.min(b.cap, target + b.rate * math.max(0, now - admitted_by))
        local absolute, relative = refilled - not_counted(since_sent, d), admission_rule(d, b, at, target, extra)
        local adm, adm_read = math.max(absolute, relative), absolute > relative
        if since_sent < latest_adm and adm > b.lvl then
          adm, adm_read = b.lvl, false
        end
        if adm < t then
          t, read_here = adm, adm_read
        end
      end
      if unknown then
        answers = answers_of(d)
        for _, a in ipairs(answers) do
          if a[1] >= alast and b.lvl + a[2] < t then
            t, read_here = b.lvl + a[2], true -- (an earlier report's value: its refunds stay out too)
          end
        end
      end
      moves = true
      if read_here and d ~= 'requests' then
        read[#read + 1] = d
      end
    else
      t = admission_rule(d, b, at, target, extra)
    end
    if t < -b.debt then
      t = -b.debt
    end
    if t > b.cap then
      t = b.cap
    end
    if answers then
      keep_answers(d, answers, b.lvl, t, b.cap, answer_value)
    end
    if t < b.lvl or (moves and t > b.lvl) then
      out[#out + 1] = 'level:' .. d .. ':' .. fmt(t - b.lvl)
      b.low = b.low + (b.lvl - t) -- (a lift too: the admission rule reads it as a change of the model)
      b.lvl = t
      dirty = true
    end
  end
end
-- the token buckets the report set: refunds of what was granted before do not go back to them
if #read > 0 then
  local held_marks = parse_draws(redis.call('HGET', KEYS[2], 'wm'))
  local last = last_seq(KEYS[1])
  for _, d in ipairs(read) do
    held_marks[d] = last
  end
  redis.call('HSET', KEYS[2], 'wm', encode_draws(held_marks))
end
-- every report moves the latest moments on (the core's: a report of unknown age is of
-- now at the latest, and so no report of before it lifts)
local seen, seen_adm = latest, latest_adm
if since < 0 then
  seen, seen_adm = math.max(latest, now), math.max(latest_adm, now)
else
  if cutoff and cutoff <= now and cutoff > seen then
    seen = cutoff
  end
  if since_sent and since_sent <= now and since_sent > seen_adm then
    seen_adm = since_sent
  end
end
if seen > latest or seen_adm > latest_adm then
  redis.call('HSET', KEYS[2], 'rcut', fmt(seen), 'acut', fmt(seen_adm))
end
if alast > (tonumber(held[3] or '') or -math.huge) then
  answer_fields[#answer_fields + 1] = 'alast'
  answer_fields[#answer_fields + 1] = fmt(alast)
end
if #answer_fields > 0 then
  redis.call('HSET', KEYS[2], unpack(answer_fields))
end
if dirty or p.lx_changed then
  save_pool(p)
end
return out
