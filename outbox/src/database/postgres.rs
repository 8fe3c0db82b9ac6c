//! The outbox on PostgreSQL: table `outbox.events` in schema `outbox`; a
//! relay claims in a transaction it holds while publishing (keyless events
//! by `FOR UPDATE SKIP LOCKED`, keyed events by an advisory lock per key),
//! and waits on `LISTEN outbox`.

use std::time::Duration;

use sql_foundation::Dialect;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::{outgoing, seq_of, Claimed, OutboxDatabase, Statements};
use crate::config::RelayConfig;
use crate::enqueue::CHANNEL;
use crate::error::OutboxError;
use crate::publisher::Outgoing;
use crate::settle::{self, Failure};

/// The PostgreSQL advisory lock class producers of one ordering key take.
const PRODUCER_LOCK_CLASS: i32 = 0x6f75_7401;
// The producer's SQL spells the class out.
const _: () = assert!(PRODUCER_LOCK_CLASS == 1_869_968_385);
/// The PostgreSQL advisory lock class a relay holds while publishing a key.
const RELAY_LOCK_CLASS: i32 = 0x6f75_7402;
/// The PostgreSQL advisory lock class (with key 0) of the purge: taken by
/// `outbox.purge_floor()` in each purge, and by [`place_hold`].
const PURGE_LOCK_CLASS: i32 = 0x6f75_7403;
// The migration's `purge_floor()` spells the class out.
const _: () = assert!(PURGE_LOCK_CLASS == 1_869_968_387);

/// The schema of the outbox's table and of its migration history.
const SCHEMA: &str = "outbox";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// An insert whose row comes from the CTE `gate`: what the CTE does (the
/// notification, for a keyed event the key's lock, and the transaction's
/// id, `txid`) happens before `seq` is drawn: the CTE holds volatile
/// functions, so it is never inlined, and `seq`'s default is computed in
/// the scan above it. A transaction that holds a drawn `seq` therefore
/// always has an xid, older than any xid assigned after the `seq` was
/// drawn (what the projection crate's tail of the table relies on).
macro_rules! insert_through {
    ($gate:literal) => {
        concat!(
            "WITH gate AS (SELECT ",
            $gate,
            "pg_current_xact_id() AS txid, pg_notify('outbox', '')) \
             INSERT INTO outbox.events (id, destination, ordering_key, headers, payload, txid",
            traceparent!(column),
            ") SELECT $1::uuid, $2, $3, $4::jsonb, $5, gate.txid",
            traceparent!(value),
            " FROM gate"
        )
    };
}

impl super::sealed::Sealed for Postgres {}

impl OutboxDatabase for Postgres {
    const SQL: &'static Statements = &Statements {
        insert: insert_through!(""),
        // 1869968385 = PRODUCER_LOCK_CLASS (checked above).
        insert_keyed: insert_through!("pg_advisory_xact_lock(1869968385, hashtext($3)), "),
        // Only below the lowest hold (read under the purge lock, see
        // `place_hold`), recording the highest seq deleted in `purged`.
        // SKIP LOCKED: relays purging at once take disjoint batches.
        purge: "WITH doomed AS (SELECT seq FROM outbox.events \
                WHERE published_at < now() - ($1::int8 * interval '1 millisecond') \
                  AND seq < (SELECT outbox.purge_floor()) \
                ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
                noted AS (UPDATE outbox.purged \
                  SET max_seq = GREATEST(max_seq, (SELECT max(seq) FROM doomed)) \
                  WHERE EXISTS (SELECT 1 FROM doomed)) \
                DELETE FROM outbox.events e USING doomed d WHERE e.seq = d.seq",
        lag: "SELECT EXTRACT(EPOCH FROM (clock_timestamp() - created_at))::float8 AS age \
              FROM outbox.events WHERE published_at IS NULL AND dead_at IS NULL \
              ORDER BY seq LIMIT 1",
    };

    type Claim = Transaction<'static, Postgres>;
    type Wake = PgListener;

    async fn claim(pool: &PgPool, cfg: &RelayConfig) -> Result<Claimed<Self::Claim>, OutboxError> {
        let mut tx = pool.begin().await?;
        let (mut batch, mut corrupt) = claim_keyed(&mut tx, cfg).await?;
        let (unkeyed, unreadable) = claim_unkeyed(&mut tx, cfg).await?;
        batch.extend(unkeyed);
        corrupt.extend(unreadable);
        batch.sort_by_key(|o| o.seq);
        Ok(Claimed {
            claim: tx,
            batch,
            corrupt,
        })
    }

    async fn mark(
        _: &PgPool,
        mut tx: Self::Claim,
        published: &[i64],
        failures: &[Failure],
    ) -> Result<(), OutboxError> {
        if !published.is_empty() {
            sqlx::query("UPDATE outbox.events SET published_at = now() WHERE seq = ANY($1)")
                .bind(published)
                .execute(&mut *tx)
                .await?;
        }
        if !failures.is_empty() {
            record_failures(&mut tx, failures).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn listen(pool: &PgPool) -> Result<PgListener, OutboxError> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    async fn wait(listener: &mut PgListener, poll_interval: Duration) {
        tokio::select! {
            n = listener.recv() => if let Err(e) = n {
                tracing::warn!(error = %e, "the outbox listener failed; polling");
                tokio::time::sleep(poll_interval).await;
            },
            () = tokio::time::sleep(poll_interval) => {}
        }
    }
}

/// Creates or updates the outbox table, `outbox.events`, in its own
/// schema `outbox`, with its own migration history
/// (`outbox._sqlx_migrations`), so it never mixes with the application's
/// migrations. Safe to call from several instances at once.
///
/// # Errors
/// [`OutboxError::Database`] or [`OutboxError::Migrate`].
pub async fn migrate_postgres(pool: &PgPool) -> Result<(), OutboxError> {
    sql_foundation::migrate_postgres(pool, SCHEMA, &MIGRATOR)
        .await
        .map_err(OutboxError::from_migration)
}

/// Places the retention hold `name` at `from_seq`, through `conn` (a
/// transaction: the hold exists from its commit): from then on the purge
/// keeps every event with a `seq` of `from_seq` or more, published or not
/// (the lowest of all holds counts). A hold of that name is replaced.
///
/// It takes the purge lock until the transaction ends, then checks that the
/// history from `from_seq` is complete: a purge that ran before has
/// recorded the highest `seq` it deleted, and one that runs after sees the
/// hold. Meant for readers of the table that need its history, such as a
/// projection building from the events (the `projection` crate places one
/// per partition and raises it as it applies them).
///
/// # Errors
/// [`OutboxError::HistoryPurged`] when an event at or above `from_seq` may
/// have been purged already (nothing is placed); [`OutboxError::Database`].
pub async fn place_hold(
    conn: &mut PgConnection,
    name: &str,
    from_seq: i64,
) -> Result<(), OutboxError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
        .bind(PURGE_LOCK_CLASS)
        .execute(&mut *conn)
        .await?;
    // A new statement after the lock: it sees what any purge committed.
    let purged = purged_through(conn).await?;
    if purged >= from_seq {
        return Err(OutboxError::HistoryPurged {
            hold: name.to_owned(),
            from_seq,
            purged_through: purged,
        });
    }
    sqlx::query(
        "INSERT INTO outbox.holds (name, seq) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = now()",
    )
    .bind(name)
    .bind(from_seq)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Raises the hold `name` to `seq` (never lowers it: events below the hold
/// may be gone); returns whether the hold exists.
///
/// # Errors
/// [`OutboxError::Database`].
pub async fn raise_hold(
    conn: &mut PgConnection,
    name: &str,
    seq: i64,
) -> Result<bool, OutboxError> {
    let found = sqlx::query(
        "UPDATE outbox.holds SET seq = GREATEST(seq, $2), updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(seq)
    .execute(&mut *conn)
    .await?;
    Ok(found.rows_affected() > 0)
}

/// Removes the hold `name`; returns whether it existed.
///
/// # Errors
/// [`OutboxError::Database`].
pub async fn release_hold(conn: &mut PgConnection, name: &str) -> Result<bool, OutboxError> {
    let gone = sqlx::query("DELETE FROM outbox.holds WHERE name = $1")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(gone.rows_affected() > 0)
}

/// The holds, `(name, seq)`, lowest `seq` first.
///
/// # Errors
/// [`OutboxError::Database`].
pub async fn holds(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, OutboxError> {
    Ok(
        sqlx::query_as("SELECT name, seq FROM outbox.holds ORDER BY seq, name")
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// An upper bound of the `seq`s the purge has deleted so far (0 when
/// none): every committed event with a higher `seq` is still in the table.
/// The migration that added it started it from what was missing then below
/// the highest `seq` drawn (conservatively: a gap left by a rollback counts).
///
/// # Errors
/// [`OutboxError::Database`].
pub async fn purged_through(conn: &mut PgConnection) -> Result<i64, OutboxError> {
    Ok(sqlx::query_scalar("SELECT max_seq FROM outbox.purged")
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0))
}

/// The columns of a claimed row, with whether it is due (`ready`).
const COLUMNS: &str = "seq, id::text AS id, destination, ordering_key, headers::text AS headers, \
                       payload, attempts::int8 AS attempts, traceparent, \
                       available_at <= now() AS ready";

/// The heads (oldest waiting event) of the keys among the oldest `$1`
/// waiting keyed events: within that window, a key's first event is its
/// head, so the scan costs the window, not the backlog.
const HEADS_IN_WINDOW: &str = "SELECT DISTINCT ON (ordering_key) ordering_key, seq, available_at \
     FROM (SELECT ordering_key, seq, available_at FROM outbox.events \
           WHERE published_at IS NULL AND dead_at IS NULL AND ordering_key IS NOT NULL \
           ORDER BY seq LIMIT $1) w \
     ORDER BY ordering_key, seq";

/// The head of every key, by a loose index scan (one probe per key): the
/// fallback when the window held no key this relay could take (all in
/// backoff, or held by other relays).
const HEADS_ALL: &str = "WITH RECURSIVE heads AS ( \
       (SELECT ordering_key, seq, available_at FROM outbox.events \
        WHERE published_at IS NULL AND dead_at IS NULL AND ordering_key IS NOT NULL \
        ORDER BY ordering_key, seq LIMIT 1) \
       UNION ALL \
       SELECT n.ordering_key, n.seq, n.available_at FROM heads k CROSS JOIN LATERAL ( \
         SELECT ordering_key, seq, available_at FROM outbox.events \
         WHERE published_at IS NULL AND dead_at IS NULL AND ordering_key IS NOT NULL \
           AND ordering_key > k.ordering_key \
         ORDER BY ordering_key, seq LIMIT 1) n \
       WHERE $1::int8 > 0) \
     SELECT ordering_key, seq, available_at FROM heads";

/// Locks (class R) up to `$2` keys whose head is due, oldest head first,
/// skipping keys another relay holds. The lock is tried in the outer query
/// only: a qual with a volatile function is never pushed below the LIMIT.
async fn lock_keys(
    conn: &mut PgConnection,
    heads: &str,
    window: i64,
    limit: i64,
) -> Result<Vec<String>, OutboxError> {
    Ok(sqlx::query_scalar(&format!(
        "WITH heads AS ({heads}) \
         SELECT h.ordering_key FROM ( \
           SELECT ordering_key, seq FROM heads WHERE available_at <= now() ORDER BY seq LIMIT $2 \
         ) h WHERE pg_try_advisory_xact_lock($3, hashtext(h.ordering_key))"
    ))
    .bind(window)
    .bind(limit)
    .bind(RELAY_LOCK_CLASS)
    .fetch_all(&mut *conn)
    .await?)
}

/// Keyed events: lock up to `batch_size` keys whose oldest waiting event is
/// due (lock class R, skipping keys another relay holds), then take their
/// events in `seq` order, stopping each key at its first event not due.
async fn claim_keyed(
    conn: &mut PgConnection,
    cfg: &RelayConfig,
) -> Result<(Vec<Outgoing>, Vec<Failure>), OutboxError> {
    let limit = i64::from(cfg.batch_size);
    let mut keys = lock_keys(conn, HEADS_IN_WINDOW, limit * 10, limit).await?;
    if keys.is_empty() {
        keys = lock_keys(conn, HEADS_ALL, 1, limit).await?;
    }
    if keys.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // A new statement, so a new snapshot: it sees what a relay that held a
    // key before us committed.
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox.events \
         WHERE ordering_key = ANY($1) AND published_at IS NULL AND dead_at IS NULL \
         ORDER BY seq LIMIT $2"
    ))
    .bind(&keys)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let (candidates, corrupt) = settle::decode_rows(
        &rows,
        |r| Ok((outgoing::<Postgres>(r)?, Postgres::get::<bool>(r, "ready")?)),
        seq_of::<Postgres>,
    )?;
    Ok((settle::take_heads(candidates, cfg.max_per_key), corrupt))
}

/// Keyless events: the oldest due ones no other relay holds.
async fn claim_unkeyed(
    conn: &mut PgConnection,
    cfg: &RelayConfig,
) -> Result<(Vec<Outgoing>, Vec<Failure>), OutboxError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox.events \
         WHERE ordering_key IS NULL AND published_at IS NULL AND dead_at IS NULL \
           AND available_at <= now() \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(i64::from(cfg.batch_size))
    .fetch_all(&mut *conn)
    .await?;
    settle::decode_rows(&rows, outgoing::<Postgres>, seq_of::<Postgres>)
}

/// Counts a failed attempt of each of `failures`: retried after its delay,
/// or dead, with its error kept. One statement for the lot.
async fn record_failures(conn: &mut PgConnection, failures: &[Failure]) -> Result<(), OutboxError> {
    let seqs: Vec<i64> = failures.iter().map(|f| f.seq).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let delays: Vec<f64> = failures.iter().map(|f| f.delay.as_secs_f64()).collect();
    let dead: Vec<bool> = failures.iter().map(|f| f.dead).collect();
    sqlx::query(
        "UPDATE outbox.events AS e SET attempts = e.attempts + 1, last_error = f.error, \
           available_at = now() + (f.delay * interval '1 second'), \
           dead_at = CASE WHEN f.dead THEN now() END \
         FROM UNNEST($1::int8[], $2::text[], $3::float8[], $4::bool[]) AS f(seq, error, delay, dead) \
         WHERE e.seq = f.seq",
    )
    .bind(&seqs)
    .bind(&errors)
    .bind(&delays)
    .bind(&dead)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
