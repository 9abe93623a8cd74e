-- MatrixInfer token buckets in Redis: the algorithm of extproc.ratelimit.Buckets, atomically.
-- One call settles N requests' usage, then (optionally) admits one request: a replica carries the
-- settlements it has received on its next admission, so a request costs one round trip.
-- KEYS: the bucket hashes (fields r, i, o: levels; t: last update, seconds from Redis TIME) of
--       the N settlements, then the admission's (if any), then the B batch-id keys.
-- ARGV[1]: N; ARGV[2]: after settling, 1 to admit, 2 only to read the levels of the last key
--       (a replica's view of it), 0 neither. ARGV[3]: B, the batches the N settlements come in
--       (in order); ARGV[4]: how long (s) a batch id is remembered; then B counts (settlements
--       per batch). Then per settlement 7 values: requests cap, input
--       cap, output cap (0 = unlimited), period (s), input correction (estimate - prompt; a
--       request admitted ahead: -estimate), output debit (completion - reservation: negative is
--       a refund; admitted ahead: the reservation), requests to debit (admitted ahead: 1); then
--       for the admission (or the read) 6 values: the caps, period, estimate, output reservation
--       (admitted only if the output level covers it, and is at least 1).
-- Exactly once: a batch's id key is set (SET NX, with that expiry) when the batch is applied; a
-- batch whose id key exists was applied by an earlier call (the same batch sent again after a
-- call that was given up, which Redis may still run) and is skipped. Without settlements there
-- is no batch and no check.
-- Returns {admitted (1/0), requests level, input level, output level, skipped, now, repeated} of
-- the admission (levels and now, the Redis TIME of the call, as strings), or {N, skipped,
-- repeated} when there is none. repeated: settlements left out as already applied. skipped:
-- settlements whose key Redis
-- refused (not a hash: something else wrote into mi:rl:*) — left out so that one bad key cannot
-- fail the calls that carry it. An admission's own key that is not a hash fails the call before
-- anything is written: Redis keeps a script's writes made before an error, and the caller queues
-- a failed call's settlements again.
local settlements = tonumber(ARGV[1])
if ARGV[2] ~= '0' then
  local kind = redis.call('TYPE', KEYS[settlements + 1]).ok
  if kind ~= 'hash' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[settlements + 1] .. ' is a ' .. kind ..
      ', not a bucket hash (something else wrote into mi:rl:*)')
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- the levels of a key's buckets refilled up to now, and its caps and period (from ARGV at i);
-- nil when the key is not a hash and `soft` (a settlement's key)
local function load(key, i, soft)
  local caps = {tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
  local period = tonumber(ARGV[i + 3])
  local cur
  if soft then
    cur = redis.pcall('HMGET', key, 'r', 'i', 'o', 't')
    if cur.err then return nil end
  else
    cur = redis.call('HMGET', key, 'r', 'i', 'o', 't')
  end
  local last = tonumber(cur[4])
  local levels = {}
  for n = 1, 3 do
    local cap = caps[n]
    local level = tonumber(cur[n])
    if level == nil or last == nil then
      level = cap
    elseif cap > 0 then
      local dt = now - last
      if dt > 0 then level = math.min(cap, level + dt * cap / period) end
    end
    levels[n] = level
  end
  return levels, caps, period
end

local function store(key, levels, caps, period)
  redis.call('HSET', key, 'r', tostring(levels[1]), 'i', tostring(levels[2]),
    'o', tostring(levels[3]), 't', tostring(now))
  -- expire once every bucket would be full again, plus one period
  local longest = period
  for n = 1, 3 do
    if caps[n] > 0 and levels[n] < caps[n] then
      longest = math.max(longest, (caps[n] - levels[n]) * period / caps[n] + period)
    end
  end
  redis.call('EXPIRE', key, math.ceil(longest))
end

-- the settlements of batches applied before (their id key exists): left out
local batches = tonumber(ARGV[3])
local again = {}
local repeated = 0
local first = settlements
if ARGV[2] ~= '0' then first = first + 1 end
local k = 0
for b = 1, batches do
  local n = tonumber(ARGV[4 + b])
  if not redis.call('SET', KEYS[first + b], '1', 'NX', 'EX', ARGV[4]) then
    for j = k + 1, k + n do again[j] = true end
    repeated = repeated + n
  end
  k = k + n
end

local skipped = 0
local i = 5 + batches
for k = 1, settlements do
  if not again[k] then
    local key = KEYS[k]
    local levels, caps, period = load(key, i, true)
    if levels == nil then
      skipped = skipped + 1
    else
      if caps[2] > 0 then levels[2] = math.min(caps[2], levels[2] + tonumber(ARGV[i + 4])) end
      if caps[3] > 0 then levels[3] = math.min(caps[3], levels[3] - tonumber(ARGV[i + 5])) end
      if caps[1] > 0 then levels[1] = levels[1] - tonumber(ARGV[i + 6]) end
      store(key, levels, caps, period)
    end
  end
  i = i + 7
end
if ARGV[2] == '0' then
  return {settlements, skipped, repeated}
end

local key = KEYS[settlements + 1]
local levels, caps, period = load(key, i)
local admitted = 1
if ARGV[2] == '1' then
  if caps[1] > 0 and levels[1] < 1 then admitted = 0 end
  if caps[2] > 0 and levels[2] <= 0 then admitted = 0 end
  local reserve = tonumber(ARGV[i + 5])
  if caps[3] > 0 and levels[3] < math.max(reserve, 1) then admitted = 0 end
  if admitted == 1 then
    if caps[1] > 0 then levels[1] = levels[1] - 1 end
    if caps[2] > 0 then levels[2] = levels[2] - tonumber(ARGV[i + 4]) end
    if caps[3] > 0 then levels[3] = levels[3] - reserve end
  end
  store(key, levels, caps, period)
end
return {admitted, tostring(levels[1]), tostring(levels[2]), tostring(levels[3]), skipped,
  tostring(now), repeated}
