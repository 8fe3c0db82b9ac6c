-- One row per record; times are milliseconds since the Unix epoch on
-- SQLite's clock. In flight: outcome IS NULL, token holds the claim until
-- lease_until. Completed: outcome holds the encoded response.
CREATE TABLE IF NOT EXISTS idempotency_records (
    id          BLOB    PRIMARY KEY NOT NULL,
    fingerprint BLOB    NOT NULL,
    token       BLOB    NOT NULL,
    lease_until INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    outcome     BLOB
);

CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
    ON idempotency_records (expires_at);
