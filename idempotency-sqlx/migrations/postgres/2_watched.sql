-- A duplicate that waits for a record in flight (wait_for_in_flight) sets
-- watched on its row, so that the completion or release of that row, and
-- only of that row, sends a notification (pg_notify) to the waiters'
-- listeners. Stays false on the hot path: no NOTIFY without a waiter.
-- A constant default adds the column without rewriting the table.
ALTER TABLE idempotency_records
    ADD COLUMN IF NOT EXISTS watched BOOLEAN NOT NULL DEFAULT false;
