
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local b = string.byte(v, 1)
if (b ~= 105 and b ~= 119) or string.sub(v, 34, 49) ~= ARGV[1] then return 0 end
