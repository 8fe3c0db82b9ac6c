-- Runs with search_path = saga, so these tables (and this migrator's own
-- _sqlx_migrations) live apart from the application's.

-- One row per saga instance. `due_at` is its durable timer: a call to make,
-- a retry to run, or the deadline of a reply it waits for; NULL when
-- nothing is due (it waits for a reply with no deadline, or it has ended).
CREATE TABLE IF NOT EXISTS instances (
    id              TEXT        PRIMARY KEY,
    name            TEXT        NOT NULL,
    version         INTEGER     NOT NULL,
    state           TEXT        NOT NULL,
    step            INTEGER     NOT NULL,
    waiting         BOOLEAN     NOT NULL DEFAULT false,
    attempt         INTEGER     NOT NULL DEFAULT 0,
    due_at          TIMESTAMPTZ,
    step_started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    data            JSONB       NOT NULL,
    failure         TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS instances_due ON instances (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS instances_state ON instances (name, state);

-- What happened to each instance, in order: written in the transaction of
-- the transition it describes.
CREATE TABLE IF NOT EXISTS history (
    instance_id TEXT        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    seq         BIGSERIAL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    event       TEXT        NOT NULL,
    step        TEXT,
    detail      TEXT,
    PRIMARY KEY (instance_id, seq)
);
