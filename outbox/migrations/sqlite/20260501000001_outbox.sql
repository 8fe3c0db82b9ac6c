-- Times are Unix milliseconds. AUTOINCREMENT: a seq is never reused, even
-- after the retention purge deleted the newest rows.
CREATE TABLE IF NOT EXISTS outbox_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    destination  TEXT    NOT NULL,
    ordering_key TEXT,
    headers      TEXT    NOT NULL DEFAULT '[]',
    payload      BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL,
    published_at INTEGER,
    dead_at      INTEGER,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS outbox_events_pending ON outbox_events (ordering_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_events_published ON outbox_events (published_at)
    WHERE published_at IS NOT NULL;
