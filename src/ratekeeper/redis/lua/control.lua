-- Control: pauses, holds, the spend cap, limits set by hand, give-backs.
--
-- KEYS: org, then pool hashes, then the op's id key
-- ARGV[1] is the operation, ARGV[2] how long the op's id is kept (ms), then its own:
--   pause seconds reason shrink [seq]
--                                 hold every pool in KEYS[2..] until now + seconds (a 429,
--                                 a 529); shrink = '1' halves the burst (an unpredicted 429)
--                                 unless the refused request (reservation seq; -1 or absent:
--                                 unknown) was admitted before the pool's last shrink
--   fit burst                     the headers bound the server's bucket: shrink the burst of
--                                 KEYS[2] to burst if that is clearly smaller (< 0.95x);
--                                 levels are clamped. Returns {status, now, burst, '1' | '0'}
--   widen burst                   the headers show the server's bucket holds at least burst:
--                                 grow the burst of KEYS[2] to it if that is clearly larger
--                                 (> 1.05x; a pool opened small). Levels do not jump, they
--                                 refill. Returns {status, now, burst, '1' | '0'}
--   hold seconds reason scope     an organization-wide subscription hold ('all' or a family)
--   spend seconds resets_at       the monthly spend cap: every reserve fails until then
--   limits dim value ...          set per-minute limits of KEYS[2] by hand
--   giveback draws                return amounts to KEYS[2] (a batch left the queue)
-- Returns {status, now, burst...}. An op sent again after a reply that never came finds its
-- id recorded and returns {DUP, now}, changing nothing (a pause run again later would
-- last longer, a burst halved without a seq would be halved twice).
local op = ARGV[1]
local now = clock()
local opkey = KEYS[#KEYS]
if not redis.call('SET', opkey, '1', 'PX', tonumber(ARGV[2]), 'NX') then
  return {'DUP', fmt(now)}
end
local last_pool = #KEYS - 1
local out = {'OK', fmt(now)}

local function keep_org(seconds)
  local ms = math.ceil(seconds * 1000) + 60000
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and ttl < ms then
    redis.call('PEXPIRE', KEYS[1], ms)
  elseif ttl == -1 then
    redis.call('PEXPIRE', KEYS[1], math.max(ms, 86400000))
  end
end

if op == 'pause' then
  local till = now + tonumber(ARGV[3])
  for i = 2, last_pool do
    local p = load_pool(KEYS[i])
    if p then
      advance(p, now)
      if till > p.paused then
        p.paused, p.reason = till, ARGV[4]
      end
      local seq = tonumber(ARGV[6] or '-1')
      if ARGV[5] == '1' and (seq < 0 or seq > p.shrink) then
        set_burst(p, math.max(MIN_BURST, p.burst * 0.5))
        p.clean, p.shrink = now, last_seq(KEYS[1])
      end
      save_pool(p)
      out[#out + 1] = fmt(p.burst)
    end
  end
elseif op == 'hold' then
  local till, scope = now + tonumber(ARGV[3]), ARGV[5]
  local cur = tonumber(redis.call('HGET', KEYS[1], 'hold:' .. scope) or '0')
  if till > cur then
    redis.call('HSET', KEYS[1], 'hold:' .. scope, fmt(till), 'hold_reason:' .. scope, ARGV[4])
    keep_org(tonumber(ARGV[3]))
  end
elseif op == 'spend' then
  redis.call('HSET', KEYS[1], 'spend_until', fmt(now + tonumber(ARGV[3])), 'spend_resets', ARGV[4])
  keep_org(tonumber(ARGV[3]))
else
  local p = load_pool(KEYS[2])
  if not p then
    return {'NOPOOL', fmt(now)}
  end
  advance(p, now)
  if op == 'limits' then
    for i = 3, #ARGV, 2 do
      set_limit(p, ARGV[i], tonumber(ARGV[i + 1]))
    end
  elseif op == 'giveback' then
    apply_diff(p, parse_draws(ARGV[3]))
  elseif op == 'fit' then
    local burst = math.max(MIN_BURST, math.min(1, tonumber(ARGV[3])))
    local fitted = burst < p.burst * 0.95
    if fitted then
      set_burst(p, burst)
      p.clean, p.shrink = now, last_seq(KEYS[1])
    end
    save_pool(p)
    return {'OK', fmt(now), fmt(p.burst), fitted and '1' or '0'}
  elseif op == 'widen' then
    local burst = math.min(1, tonumber(ARGV[3]))
    local widened = burst > p.burst * 1.05
    if widened then
      set_burst(p, burst)
    end
    save_pool(p)
    return {'OK', fmt(now), fmt(p.burst), widened and '1' or '0'}
  else
    return redis.error_reply('ratekeeper control: unknown operation ' .. op)
  end
  save_pool(p)
end
return out
