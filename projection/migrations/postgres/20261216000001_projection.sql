-- Runs with search_path = projection, so these tables (and this migrator's
-- own _sqlx_migrations) live apart from the application's. A version's own
-- tables live in a schema of their own, `<name>_v<version>`.

-- A version of a projection.
CREATE TABLE IF NOT EXISTS versions (
    id         SERIAL      PRIMARY KEY,
    name       TEXT        NOT NULL,
    version    INTEGER     NOT NULL,
    -- 'outbox' (the tail of outbox.events) or 'inbox' (a broker).
    source     TEXT        NOT NULL,
    partitions INTEGER     NOT NULL,
    -- Outbox source: the first seq it applies.
    start_seq  BIGINT      NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    served_at  TIMESTAMPTZ,
    UNIQUE (name, version)
);

-- The version each projection serves. It only goes up, in one transaction
-- (the switch).
CREATE TABLE IF NOT EXISTS served (
    name        TEXT        PRIMARY KEY,
    version     INTEGER     NOT NULL,
    switched_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The outbox source: one row per partition of a version. Every event of the
-- partition with seq <= watermark is applied (or parked), or will never
-- exist; above it, `applied` lists what is. `candidate_seq` becomes the
-- watermark once every transaction with an xid below `candidate_fence` (an
-- xid assigned after candidate_seq was seen committed) has ended.
CREATE TABLE IF NOT EXISTS partitions (
    id              SERIAL      PRIMARY KEY,
    version_id      INTEGER     NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    partition       INTEGER     NOT NULL,
    watermark       BIGINT      NOT NULL,
    candidate_seq   BIGINT,
    candidate_fence BIGINT,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (version_id, partition)
);

-- Events applied above their partition's watermark, written in the apply's
-- transaction; forgotten once the watermark passes them.
CREATE TABLE IF NOT EXISTS applied (
    partition_id INTEGER NOT NULL,
    seq          BIGINT  NOT NULL,
    PRIMARY KEY (partition_id, seq)
);

-- Failed attempts, counted in their own statement after the apply's
-- transaction rolled back.
CREATE TABLE IF NOT EXISTS attempts (
    partition_id INTEGER     NOT NULL,
    seq          BIGINT      NOT NULL,
    failures     INTEGER     NOT NULL,
    permanent    BOOLEAN     NOT NULL DEFAULT false,
    last_error   TEXT        NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (partition_id, seq)
);

-- Parked events, with their reason: what an operator reads. Both sources.
CREATE TABLE IF NOT EXISTS parked (
    name         TEXT        NOT NULL,
    version      INTEGER     NOT NULL,
    event_id     TEXT        NOT NULL,
    seq          BIGINT,
    ordering_key TEXT,
    attempts     INTEGER     NOT NULL,
    reason       TEXT        NOT NULL,
    parked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version, event_id)
);
