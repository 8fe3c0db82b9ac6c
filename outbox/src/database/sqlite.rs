//! The outbox on SQLite: table `outbox_events`, times in Unix milliseconds
//! of SQLite's clock. One relay per file: its claim is a plain read, the
//! publish runs outside any transaction (a slow broker never blocks
//! producers), the marking is one short write transaction; an idle relay
//! polls.

use std::time::Duration;

use sql_foundation::{millis, Statement};
use sqlx::migrate::Migrator;
use sqlx::{Sqlite, SqlitePool};

use super::{outgoing, seq_of, Claimed, OutboxDatabase, Statements};
use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::settle::{self, Failure};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Now, in Unix milliseconds, by SQLite's clock: the same for every use in
/// one statement. `julianday('now')` counts whole milliseconds; `ROUND`
/// (not a bare `CAST`, which truncates) gives back exactly that count.
macro_rules! now_ms {
    () => {
        "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"
    };
}

/// The insert, for events with and without a key alike.
const INSERT: &str = concat!(
    "INSERT INTO outbox_events \
     (id, destination, ordering_key, headers, payload, created_at, available_at",
    traceparent!(column),
    ") SELECT $1, $2, $3, $4, $5, now, now",
    traceparent!(value),
    " FROM (SELECT ",
    now_ms!(),
    " AS now)"
);

impl super::sealed::Sealed for Sqlite {}

impl OutboxDatabase for Sqlite {
    const SQL: &'static Statements = &Statements {
        insert: INSERT,
        insert_keyed: INSERT,
        purge: concat!(
            "DELETE FROM outbox_events WHERE seq IN (SELECT seq FROM outbox_events \
             WHERE published_at IS NOT NULL AND published_at <= ",
            now_ms!(),
            " - $1 ORDER BY published_at LIMIT $2)"
        ),
        lag: concat!(
            "SELECT (",
            now_ms!(),
            " - created_at) / 1000.0 AS age FROM outbox_events \
             WHERE published_at IS NULL AND dead_at IS NULL ORDER BY seq LIMIT 1"
        ),
    };

    type Claim = ();
    type Wake = ();

    /// Up to `batch_size` due events, oldest first, each key from its head
    /// (a key whose head is in backoff waits with it): a plain read.
    async fn claim(pool: &SqlitePool, cfg: &RelayConfig) -> Result<Claimed<()>, OutboxError> {
        let rows = Statement::<Sqlite>::new(concat!(
            "SELECT seq, id, destination, ordering_key, headers, payload, attempts, traceparent \
             FROM outbox_events AS e \
             WHERE published_at IS NULL AND dead_at IS NULL AND available_at <= ",
            now_ms!(),
            " AND (ordering_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM outbox_events AS p \
                 WHERE p.ordering_key = e.ordering_key AND p.seq < e.seq \
                   AND p.published_at IS NULL AND p.dead_at IS NULL AND p.available_at > ",
            now_ms!(),
            ")) ORDER BY seq LIMIT $1"
        ))
        .bind(i64::from(cfg.batch_size))
        .fetch_all(pool)
        .await?;
        let (candidates, corrupt) = settle::decode_rows(
            &rows,
            |r| outgoing::<Sqlite>(r).map(|o| (o, true)),
            seq_of::<Sqlite>,
        )?;
        Ok(Claimed {
            claim: (),
            batch: settle::take_heads(candidates, cfg.max_per_key),
            corrupt,
        })
    }

    /// One short write transaction, none when there is nothing to mark.
    async fn mark(
        pool: &SqlitePool,
        _: (),
        published: &[i64],
        failures: &[Failure],
    ) -> Result<(), OutboxError> {
        if published.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let mut tx = pool.begin().await?;
        if !published.is_empty() {
            let seqs = serde_json::to_string(published).unwrap_or_default();
            Statement::<Sqlite>::new(concat!(
                "UPDATE outbox_events SET published_at = ",
                now_ms!(),
                " WHERE seq IN (SELECT value FROM json_each($1))"
            ))
            .bind(seqs)
            .execute(&mut tx)
            .await?;
        }
        for f in failures {
            Statement::<Sqlite>::new(concat!(
                "UPDATE outbox_events SET attempts = attempts + 1, last_error = $1, \
                 available_at = ",
                now_ms!(),
                " + $2, dead_at = CASE WHEN $3 THEN ",
                now_ms!(),
                " END WHERE seq = $4"
            ))
            .bind(f.error.as_str())
            .bind(millis(f.delay))
            .bind(f.dead)
            .bind(f.seq)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn listen(_: &SqlitePool) -> Result<(), OutboxError> {
        Ok(())
    }

    /// No notifications on SQLite: the poll interval.
    async fn wait(_: &mut (), poll_interval: Duration) {
        tokio::time::sleep(poll_interval).await;
    }
}

/// Creates or updates the SQLite outbox table `outbox_events`. Its
/// migration versions are dated far from a hand-numbered sequence and it
/// ignores versions it does not know, so it shares `_sqlx_migrations`
/// with the application's own migrator. Retries while another process
/// holds the file's lock.
///
/// # Errors
/// [`OutboxError::Database`] or [`OutboxError::Migrate`].
pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), OutboxError> {
    sql_foundation::migrate_sqlite(pool, &MIGRATOR)
        .await
        .map_err(OutboxError::from_migration)
}
