-- Init: create a pool's buckets (full) unless they exist.
--
-- KEYS: pool
-- ARGV: burst, key_ttl (ms), then per dimension: dim, limit, capacity, rate, debt
-- Returns {'OK' | 'EXISTS', now}. Every process sends its configured limits; the
-- first one wins and the headers (resync) correct them from then on.
local now = clock()
if redis.call('HEXISTS', KEYS[1], 'v2') == 1 then
  return {'EXISTS', fmt(now)}
end
-- a pool in the layout before 'v2' (no unc, low, ver) starts again, full
redis.call('HDEL', KEYS[1], 'v')
-- lx = 0: leases of an earlier life of the pool may remain, the first call looks;
-- renew = now: the first reserve sets every key's TTL
local p = {
  key = KEYS[1], dims = {}, b = {}, t = now, burst = tonumber(ARGV[1]), paused = 0, reason = '',
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
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return {'OK', fmt(now)}
