-- Settle: apply a request's actual cost, or charge output as a stream produces it.
--
-- KEYS: org, pool, res, lease, notes, uncounted log
-- ARGV: seq, mode ('settle': the request is done and leaves the in-flight set;
--       'progress': it stays, its recorded charge changes), diff ("dim=amount,...":
--       positive refunds, negative charges more), recovery (seconds without an
--       unpredicted 429 before the burst grows back; '' = not adaptive), uncounted
--       ("dim=amount,...": the part of the refunds the server never counted, such as
--       what a prefetch did not hand out), key_ttl (ms: the log's TTL), op_ttl (ms)
-- KEYS[7], if given, is the op's id key: a settle whose id is already recorded (it was
-- sent again after a reply that never came) changes nothing and returns {DUP, now, ''}.
-- Returns {status, now, burst}. The diff applies even when the lease already expired:
-- the reservation's charge stood, so its correction is still due.
--
-- A refund needs no clock: min(cap, level + refund) brought up to a later time is the
-- level brought up first and refunded after, so only charges and burst recovery read
-- TIME (now is then the pool's own time of its levels). A refund to a token bucket that a
-- report of the answer set since this reservation's grant stays out (see resync.lua).
local seq, mode = ARGV[1], ARGV[2]
if KEYS[7] and not redis.call('SET', KEYS[7], '1', 'PX', tonumber(ARGV[7]), 'NX') then
  return {'DUP', fmt(clock()), ''}
end
local diff = parse_draws(ARGV[3])
local uncounted = parse_draws(ARGV[5])
local recorded
if mode ~= 'progress' then
  recorded = redis.call('HDEL', KEYS[3], seq) == 1
  redis.call('ZREM', KEYS[4], seq)
  redis.call('HDEL', KEYS[5], seq)
else
  recorded = redis.call('HEXISTS', KEYS[3], seq) == 1
end
if not recorded and before_birth(KEYS[2], seq) then
  -- charged to an earlier life of the pool: its refunds would mint, its charges still count
  for d, a in pairs(diff) do
    if a > 0 then
      diff[d] = nil
    end
  end
  uncounted = {}
end
local p = load_pool(KEYS[2])
if not p then
  return {'NOPOOL', fmt(clock()), '1'}
end
local recovery = tonumber(ARGV[4])
local timed = mode == 'progress' or (recovery and p.burst < 1)
for _, a in pairs(diff) do
  if a < 0 then
    timed = true
  end
end
local now = p.t
if timed then
  now = clock()
  advance(p, now)
end
-- (the record changes by the whole diff: only the level may keep a refund, see held_back)
local applied = held_back(KEYS[2], seq, diff)
apply_diff(p, applied)
for d in pairs(uncounted) do
  if not applied[d] then
    uncounted[d] = nil
  end
end
if next(uncounted) then
  add_uncounted(p, uncounted, KEYS[6], seq, clock(), tonumber(ARGV[6]) or 86400000)
end
if mode == 'progress' then
  local cur = redis.call('HGET', KEYS[3], seq)
  if cur then
    local t = parse_draws(cur)
    for d, a in pairs(diff) do
      t[d] = (t[d] or 0) - a
    end
    redis.call('HSET', KEYS[3], seq, encode_draws(t))
  end
elseif recovery and p.burst < 1 and now - p.clean >= recovery then
  set_burst(p, math.min(1, p.burst * 1.25))
  p.clean = now
end
if next(diff) or timed then
  save_pool(p)
end
return {'OK', fmt(now), fmt(p.burst)}
