-- Init: create a pool's buckets (full) unless they exist.
--
-- KEYS: org, pool
-- ARGV: burst, key_ttl (ms), then per dimension: dim, limit, capacity, rate, debt
-- Returns {'OK' | 'EXISTS', now}. Every process sends its configured limits; the
-- first one wins and the headers (resync) correct them from then on.
--
-- The pool notes the reservation counter at its birth ('born'): every reservation it
-- charged has a higher seq (reserve.lua starts a missing counter from the clock in
-- microseconds, so seqs keep rising across a restart that lost everything). A release
-- or settle whose record is gone refunds from its caller's copy only if its seq is
-- above that: a reservation of an earlier life of the pool (before Redis restarted
-- empty, say) was never charged to this one, and refunding it would mint capacity.
local now = clock()
if redis.call('HEXISTS', KEYS[2], 'v2') == 1 then
  return {'EXISTS', fmt(now)}
end
-- a pool in the layout before 'v2' (no unc, low, ver) starts again, full
redis.call('HDEL', KEYS[2], 'v')
local born = tonumber(redis.call('HGET', KEYS[1], 'seq') or '') or math.floor(now * 1000000)
redis.call('HSET', KEYS[2], 'born', string.format('%d', born))
-- lx = 0: leases of an earlier life of the pool may remain, the first call looks;
-- renew = now: the first reserve sets every key's TTL
local p = {
  key = KEYS[2], dims = {}, b = {}, t = now, burst = tonumber(ARGV[1]), paused = 0, reason = '',
  clean = now, shrink = -1, lx = 0, renew = now, ver = 0, new_dims = true,
}
for i = 3, #ARGV, 5 do
  local d = ARGV[i]
  local cap = tonumber(ARGV[i + 2])
  p.dims[#p.dims + 1] = d
  p.b[d] = {
    lim = tonumber(ARGV[i + 1]), cap = cap, rate = tonumber(ARGV[i + 3]), debt = tonumber(ARGV[i + 4]), lvl = cap,
    unc = 0, low = 0,
  }
end
save_pool(p)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
return {'OK', fmt(now)}
