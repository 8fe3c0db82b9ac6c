
local v = redis.call('GET', KEYS[1])
if v then
  local b = string.byte(v, 1)
  if b ~= 105 and b ~= 119 then return v end
  local x = tonumber(string.sub(v, 50))
  if #v < 50 or not x then return v end
  -- Redis 3.2 to 4 replicate scripts verbatim unless told otherwise, and
  -- PTTL is not deterministic. A no-op from Redis 7.
  if redis.replicate_commands then redis.replicate_commands() end
  local remaining = redis.call('PTTL', KEYS[1]) - x
  local fingerprint = string.sub(v, 2, 33)
  if remaining > 0 or fingerprint ~= ARGV[1] then
    return {fingerprint, math.max(0, remaining)}
  end
end
redis.call('SET', KEYS[1], 'i' .. ARGV[1] .. ARGV[2] .. ARGV[4], 'PX', tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
