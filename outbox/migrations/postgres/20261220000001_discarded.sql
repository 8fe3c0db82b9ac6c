-- Runs with search_path = outbox.

-- An operator's "discard" of a dead event (messaging-admin): the event
-- stays dead, kept for inspection, and leaves the lists of dead events; an
-- operator's purge deletes discarded events (never below a retention hold).
-- A relay never looks at it: a dead event is never claimed.
ALTER TABLE events ADD COLUMN IF NOT EXISTS discarded_at TIMESTAMPTZ;

-- Dead events, newest first: what an operator lists.
CREATE INDEX IF NOT EXISTS events_dead ON events (dead_at)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;
