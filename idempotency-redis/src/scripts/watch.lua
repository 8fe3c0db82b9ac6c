
local b = redis.call('GETRANGE', KEYS[1], 0, 0)
if b == 'i' then redis.call('SETRANGE', KEYS[1], 0, 'w') return 1 end
if b == 'w' then return 1 end
return 0
