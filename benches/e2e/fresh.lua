-- Every request a new Idempotency-Key: the handler runs each time.
wrk.method = "POST"
wrk.body = '{"amount": 100, "currency": "EUR"}'
wrk.headers["Content-Type"] = "application/json"
local n = 0
local thread_id = tostring(math.random(1, 1000000000))
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = "e2e-" .. thread_id .. "-" .. n
  return wrk.format()
end
