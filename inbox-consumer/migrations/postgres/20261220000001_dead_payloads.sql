-- Runs with search_path = inbox_consumer.

-- A failing message keeps its payload and headers with its attempts, so
-- that once it is dead an operator can replay it through the inbox
-- (messaging-admin) without the broker, whose queue may have no
-- dead-letter exchange. `replay_at`: an operator asked for a replay; the
-- consumer's Inbox::run_replays processes the message from then on.
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS payload BYTEA;
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS headers JSONB;
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS replay_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS attempts_replays ON attempts (consumer, replay_at)
    WHERE replay_at IS NOT NULL;
