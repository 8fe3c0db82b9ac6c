-- Runs with search_path = outbox.

-- The id of the transaction that wrote each event. Enqueue takes it
-- (pg_current_xact_id()) in its CTE before the row's seq is drawn, so a
-- transaction that holds a drawn seq always has an xid: what lets a reader
-- of the table in commit order (the projection crate) know when every seq
-- below a visible one has committed or rolled back. NULL on rows written
-- before this migration.
ALTER TABLE events ADD COLUMN IF NOT EXISTS txid xid8;

-- Retention holds: the purge deletes published events only below the
-- lowest hold's seq, so a reader that has not read them yet (a projection
-- building from the history) keeps them.
CREATE TABLE IF NOT EXISTS holds (
    name       TEXT        PRIMARY KEY,
    seq        BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row: every seq the purge ever deleted is at most max_seq, so a reader
-- that needs the history from a seq knows whether it is still complete.
-- Started conservatively: whatever is missing below the highest seq drawn
-- (a gap, or drawn seqs above the highest row) may have been purged.
CREATE TABLE IF NOT EXISTS purged (
    one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    max_seq BIGINT  NOT NULL
);
INSERT INTO purged (max_seq)
SELECT GREATEST(
    (SELECT COALESCE(max(seq) - 1, 0)
     FROM (SELECT seq, lag(seq, 1, 0::int8) OVER (ORDER BY seq) AS prev FROM events) g
     WHERE seq - prev > 1),
    (SELECT CASE WHEN is_called AND last_value > (SELECT COALESCE(max(seq), 0) FROM events)
            THEN last_value ELSE 0 END
     FROM events_seq_seq))
ON CONFLICT DO NOTHING;

-- The lowest seq a hold keeps (the largest bigint when none), read under the
-- purge lock (advisory lock 1869968387, 0) with a snapshot taken after it:
-- a VOLATILE function's statements each take a new snapshot. Placing a hold
-- takes the same lock, so a purge either sees the hold or has recorded in
-- `purged` what it deleted before the hold's placement reads it.
CREATE OR REPLACE FUNCTION purge_floor() RETURNS BIGINT
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(1869968387, 0);
    SELECT COALESCE(min(seq), 9223372036854775807) FROM outbox.holds;
$$;
