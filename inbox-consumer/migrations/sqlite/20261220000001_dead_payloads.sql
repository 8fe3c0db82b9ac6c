-- A failing message keeps its payload and headers (a JSON array of
-- [name, value] pairs) with its attempts, so that an operator can replay a
-- dead one through the inbox; `replay_at` (Unix ms): a replay was asked for.
ALTER TABLE inbox_consumer_attempts ADD COLUMN payload BLOB;
ALTER TABLE inbox_consumer_attempts ADD COLUMN headers TEXT;
ALTER TABLE inbox_consumer_attempts ADD COLUMN replay_at INTEGER;
CREATE INDEX IF NOT EXISTS inbox_consumer_attempts_replays
    ON inbox_consumer_attempts (consumer, replay_at) WHERE replay_at IS NOT NULL;
