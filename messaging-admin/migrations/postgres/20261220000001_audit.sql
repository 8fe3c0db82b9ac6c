-- Runs with search_path = messaging_admin.

-- Every action an operator takes (messaging-admin's CLI and console),
-- written in the transaction that performs it: an action on many items
-- runs in batches, one row per batch, sharing `action_id`.
CREATE TABLE IF NOT EXISTS audit (
    id        BIGSERIAL   PRIMARY KEY,
    action_id UUID        NOT NULL,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Who: the console token's name, or the CLI's --as (default cli:$USER).
    actor     TEXT        NOT NULL,
    via       TEXT        NOT NULL,
    area      TEXT        NOT NULL,
    action    TEXT        NOT NULL,
    -- The filter of an action by filter (NULL for one by ids).
    filter    JSONB,
    -- The items this batch changed (event ids, consumer/message ids,
    -- instance ids, record ids in hex).
    items     TEXT[]      NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_items ON audit USING gin (items);
