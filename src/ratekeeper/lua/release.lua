-- Release: a request ends without a usage report (the local limiter's release rules).
--
-- KEYS: org, pool, res, lease, notes, uncounted log
-- ARGV: seq, mode ('unsent': it never left, everything comes back; 'error': the server
--       refused it, it keeps only its request; 'kept': it succeeded, the reservation
--       stands), charged (the caller's record, used if the lease already expired),
--       key_ttl (ms: the uncounted log's TTL)
-- Returns {status, now}.
local seq, mode = ARGV[1], ARGV[2]
local now = clock()
local stored = redis.call('HGET', KEYS[3], seq)
redis.call('HDEL', KEYS[3], seq)
redis.call('ZREM', KEYS[4], seq)
redis.call('HDEL', KEYS[5], seq)
local p = load_pool(KEYS[2])
if not p then
  return {'NOPOOL', fmt(now)}
end
local charged = parse_draws(stored or ARGV[3])
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
if next(refund) then
  advance(p, now)
  apply_diff(p, refund)
  add_uncounted(p, refund, KEYS[6], seq, now, tonumber(ARGV[4]) or 86400000) -- never counted
  save_pool(p)
end
return {'OK', fmt(now)}
