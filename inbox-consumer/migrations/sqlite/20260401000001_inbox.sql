-- Times are Unix milliseconds from SQLite's own clock.
CREATE TABLE IF NOT EXISTS inbox_consumer_messages (
    consumer     TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS inbox_consumer_messages_by_age
    ON inbox_consumer_messages (consumer, processed_at);

CREATE TABLE IF NOT EXISTS inbox_consumer_attempts (
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    failures   INTEGER NOT NULL,
    dead       INTEGER NOT NULL DEFAULT 0,
    last_error TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS inbox_consumer_attempts_by_age
    ON inbox_consumer_attempts (consumer, updated_at);
