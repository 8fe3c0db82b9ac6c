
__HELD__
redis.call('DEL', KEYS[1])
__SETTLED__
return 1
