
__HELD__
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
__SETTLED__
return 1
