-- One row per record. In flight: outcome IS NULL, token holds the claim until
-- lease_until. Completed: outcome holds the encoded response. Either way the
-- row is gone (or claimable) once expires_at passes.
CREATE TABLE IF NOT EXISTS idempotency_records (
    id          BYTEA       PRIMARY KEY,
    fingerprint BYTEA       NOT NULL,
    token       BYTEA       NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    outcome     BYTEA
);

CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
    ON idempotency_records (expires_at);
