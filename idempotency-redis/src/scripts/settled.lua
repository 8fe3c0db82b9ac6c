
if b == 119 then redis.call('PUBLISH', string.sub(KEYS[1], 1, -67) .. 'settled', KEYS[1]) end
