
__HELD__
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(string.sub(v, 50)))
return 1
