-- Every request the same Idempotency-Key: after the first, each is a replay.
wrk.method = "POST"
wrk.body = '{"amount": 100, "currency": "EUR"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "e2e-replay"
