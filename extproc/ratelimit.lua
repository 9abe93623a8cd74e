-- MatrixInfer token buckets in Redis: the algorithm of extproc.ratelimit.Buckets, atomically.
-- KEYS[1]: the bucket hash (fields r, i, o: levels; t: last update, seconds from Redis TIME)
-- ARGV: op ("admit" | "settle"), requests cap, input cap, output cap (0 = unlimited), period (s),
--       then for admit: estimate; for settle: input correction (estimate - prompt), completion.
-- Returns {admitted (1/0), requests level, input level, output level} (levels as strings).
local key = KEYS[1]
local op = ARGV[1]
local caps = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local period = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local names = {'r', 'i', 'o'}
local cur = redis.call('HMGET', key, 'r', 'i', 'o', 't')
local levels = {}
local last = tonumber(cur[4])
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
local admitted = 1
if op == 'admit' then
  if caps[1] > 0 and levels[1] < 1 then admitted = 0 end
  if caps[2] > 0 and levels[2] <= 0 then admitted = 0 end
  if caps[3] > 0 and levels[3] <= 0 then admitted = 0 end
  if admitted == 1 then
    if caps[1] > 0 then levels[1] = levels[1] - 1 end
    if caps[2] > 0 then levels[2] = levels[2] - tonumber(ARGV[6]) end
  end
else
  if caps[2] > 0 then levels[2] = math.min(caps[2], levels[2] + tonumber(ARGV[6])) end
  if caps[3] > 0 then levels[3] = levels[3] - tonumber(ARGV[7]) end
end
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
return {admitted, tostring(levels[1]), tostring(levels[2]), tostring(levels[3])}
