-- Sent: a request of reservation seq is leaving for the server.
--
-- KEYS: res, sent log, then the op's id key (optional)
-- ARGV: seq, n (the requests it holds: 1), key_ttl (ms: the log's TTL), op_ttl (ms),
--       tokens ("dim=amount,...": the request's charge on each token bucket; optional)
-- Returns {status, now}: DUP if the op's id is already recorded (sent again after a
-- reply that never came: counted twice, a prefetch's unsent requests would look sent).
--
-- For resync's reading of a report as of its answer: the record counts its requests
-- sent (SENT, beside its draws: a reservation that holds more requests than were sent
-- holds some the server has not seen), and the log keeps each send by when Redis
-- heard of it, which is after it left: a send heard of after a report's moment, less
-- a request's way there, may not be in that report. A send not heard of yet (still in
-- an outbox) counts as not sent, the safe side. The tokens are counted the same way
-- (the record's '~dim', beside its draws), for the token buckets' reading of a report as
-- of its answer (resync.lua): a prefetch's record holds several requests' tokens, and only
-- the part not sent can be missing from a report of the answer.
local seq, n = ARGV[1], tonumber(ARGV[2]) or 0
local tokens = parse_draws(ARGV[5])
local now = clock()
if KEYS[3] and not redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[4]), 'NX') then
  return {'DUP', fmt(now)}
end
local cur = redis.call('HGET', KEYS[1], seq)
if cur then
  local t = parse_draws(cur)
  t[SENT] = (t[SENT] or 0) + n
  for d, a in pairs(tokens) do
    t['~' .. d] = (t['~' .. d] or 0) + a
  end
  redis.call('HSET', KEYS[1], seq, encode_draws(t))
end
-- (seq:id|n|tokens: resync leaves out the observed request's own send, which its answer
-- shows arrived)
redis.call('ZADD', KEYS[2], now, seq .. ':' .. (KEYS[3] or fmt(now)) .. '|' .. fmt(n) .. '|' .. (ARGV[5] or ''))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. fmt(now - SENT_LOG_SECONDS))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return {'OK', fmt(now)}
