-- Runs with search_path = outbox, so this table (and this migrator's own
-- _sqlx_migrations) live apart from the application's.
CREATE TABLE IF NOT EXISTS events (
    seq          BIGSERIAL   PRIMARY KEY,
    id           UUID        NOT NULL UNIQUE,
    destination  TEXT        NOT NULL,
    ordering_key TEXT,
    headers      JSONB       NOT NULL DEFAULT '[]',
    payload      BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts     INTEGER     NOT NULL DEFAULT 0,
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    dead_at      TIMESTAMPTZ,
    last_error   TEXT
);
-- Keyless events waiting, oldest first.
CREATE INDEX IF NOT EXISTS events_pending_unkeyed ON events (seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND ordering_key IS NULL;
-- Keyed events waiting: the head of each key, and a key's events in order.
CREATE INDEX IF NOT EXISTS events_pending_by_key ON events (ordering_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND ordering_key IS NOT NULL;
-- The oldest event waiting (relay lag).
CREATE INDEX IF NOT EXISTS events_pending ON events (seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- Retention.
CREATE INDEX IF NOT EXISTS events_published ON events (published_at)
    WHERE published_at IS NOT NULL;
