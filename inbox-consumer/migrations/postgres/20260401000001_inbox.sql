-- Runs with search_path = inbox_consumer, so these tables (and this migrator's
-- own _sqlx_migrations) live apart from the application's.
CREATE TABLE IF NOT EXISTS messages (
    consumer     TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    attempts     INTEGER     NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (consumer, processed_at);

-- Failed attempts, written in their own short transaction after the
-- handler's transaction rolled back.
CREATE TABLE IF NOT EXISTS attempts (
    consumer   TEXT        NOT NULL,
    message_id TEXT        NOT NULL,
    failures   INTEGER     NOT NULL,
    dead       BOOLEAN     NOT NULL DEFAULT false,
    last_error TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS attempts_by_age ON attempts (consumer, updated_at);
