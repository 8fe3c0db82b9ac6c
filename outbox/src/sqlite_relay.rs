//! The single relay on SQLite: claim, publish pipelined, mark.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::event::Event;
use crate::metrics::{Counters, RelayMetrics};
use crate::publisher::{Outgoing, Publisher};
use crate::settle::{self, BatchReport};

/// Moves events from a SQLite outbox ([`migrate_sqlite`](crate::migrate_sqlite))
/// to a broker. **One relay per database file**: SQLite has no row locks to
/// share the work, so two relays would publish the same events (at least
/// once still holds, per-key order does not).
///
/// The claim is a plain read; the publish runs outside any transaction, so
/// producers are never blocked by a slow broker; the marking is one short
/// write transaction afterwards. A key's events are taken from its head
/// only, so a key whose oldest waiting event is in backoff waits with it.
/// There is no notification on SQLite: [`run`](Self::run) polls every poll
/// interval when idle, and takes batches back to back while there is work.
pub struct SqliteRelay<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for SqliteRelay<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<P> std::fmt::Debug for SqliteRelay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRelay")
            .field("config", &self.inner.config)
            .field("metrics", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

struct Inner<P> {
    pool: SqlitePool,
    publisher: P,
    config: RelayConfig,
    counters: Counters,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn outgoing(row: &SqliteRow) -> Result<Outgoing, OutboxError> {
    let id: String = row.try_get("id")?;
    let event = Event::from_row(
        &id,
        row.try_get("destination")?,
        row.try_get("ordering_key")?,
        &row.try_get::<String, _>("headers")?,
        row.try_get("payload")?,
    )
    .map_err(OutboxError::Corrupt)?;
    let attempts: i64 = row.try_get("attempts")?;
    Ok(Outgoing {
        seq: row.try_get("seq")?,
        attempt: u32::try_from(attempts).unwrap_or(0).saturating_add(1),
        event,
    })
}

impl<P: Publisher> SqliteRelay<P> {
    /// A relay over the SQLite outbox in `pool`, publishing through `publisher`.
    pub fn new(pool: SqlitePool, publisher: P, config: RelayConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                publisher,
                config,
                counters: Counters::default(),
            }),
        }
    }

    /// The counters so far.
    pub fn metrics(&self) -> RelayMetrics {
        self.inner.counters.snapshot()
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.inner.publisher
    }

    /// Claims up to `batch_size` due events (oldest first, each key from its
    /// head), publishes them, and marks the outcome.
    ///
    /// # Errors
    /// [`OutboxError::Database`]: nothing is marked, and the batch is
    /// published again in a later round.
    pub async fn run_once(&self) -> Result<BatchReport, OutboxError> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let now = crate::unix_millis();
        let rows = sqlx::query(
            "SELECT seq, id, destination, ordering_key, headers, payload, attempts \
             FROM outbox_events AS e \
             WHERE published_at IS NULL AND dead_at IS NULL AND available_at <= ?1 \
               AND (ordering_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM outbox_events AS p \
                 WHERE p.ordering_key = e.ordering_key AND p.seq < e.seq \
                   AND p.published_at IS NULL AND p.dead_at IS NULL AND p.available_at > ?1)) \
             ORDER BY seq LIMIT ?2",
        )
        .bind(now)
        .bind(i64::from(cfg.batch_size))
        .fetch_all(&inner.pool)
        .await?;
        let (candidates, corrupt) = settle::decode_rows(
            &rows,
            |r| outgoing(r).map(|o| (o, true)),
            |r| Ok(r.try_get("seq")?),
        )?;
        let batch = settle::take_heads(candidates, cfg.max_per_key);
        if batch.is_empty() && corrupt.is_empty() {
            return Ok(BatchReport::default());
        }
        let mut settled = settle::publish(&inner.publisher, &batch, cfg).await;
        settled.failures.extend(corrupt);
        let now = crate::unix_millis();
        let mut tx = inner.pool.begin().await?;
        if !settled.published.is_empty() {
            let seqs = serde_json::to_string(&settled.published).unwrap_or_default();
            sqlx::query(
                "UPDATE outbox_events SET published_at = ? \
                 WHERE seq IN (SELECT value FROM json_each(?))",
            )
            .bind(now)
            .bind(seqs)
            .execute(&mut *tx)
            .await?;
        }
        for f in &settled.failures {
            sqlx::query(
                "UPDATE outbox_events SET attempts = attempts + 1, last_error = ?, \
                 available_at = ?, dead_at = ? WHERE seq = ?",
            )
            .bind(&f.error)
            .bind(now.saturating_add(millis(f.delay)))
            .bind(f.dead.then_some(now))
            .bind(f.seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        settle::count(&inner.counters, &settled.report);
        Ok(settled.report)
    }

    /// Runs until `shutdown` resolves; the batch in hand is finished first.
    /// Errors are logged and retried after the outage delay.
    ///
    /// # Errors
    /// None so far; the `Result` matches the PostgreSQL relay's `run`.
    pub async fn run<F>(&self, shutdown: F) -> Result<(), OutboxError>
    where
        F: Future<Output = ()>,
    {
        let cfg = &self.inner.config;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_purge = Instant::now();
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            let round = self.run_once().await;
            if matches!(&round, Ok(r) if r.claimed == 0) {
                match self.lag().await {
                    Ok(lag) => self.inner.counters.set_lag(lag),
                    Err(e) => {
                        tracing::warn!(error = %settle::error_chain(&e), "measuring the lag failed")
                    }
                }
            }
            if !cfg.purge_interval.is_zero() && last_purge.elapsed() >= cfg.purge_interval {
                last_purge = Instant::now();
                if let Err(e) = self.purge().await {
                    tracing::warn!(error = %settle::error_chain(&e), "the retention purge failed");
                }
            }
            let pause = match round {
                Err(e) => {
                    tracing::warn!(error = %settle::error_chain(&e), "a relay round failed; retrying");
                    cfg.outage_delay
                }
                Ok(r) if r.unavailable > 0 => cfg.outage_delay,
                Ok(r) if r.claimed > 0 => continue,
                Ok(_) => cfg.poll_interval,
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!(metrics = ?self.metrics(), "outbox relay stopped");
        Ok(())
    }

    /// Deletes published events older than the retention, in batches.
    ///
    /// # Errors
    /// [`OutboxError::Database`].
    pub async fn purge(&self) -> Result<u64, OutboxError> {
        self.purge_older_than(self.inner.config.retention).await
    }

    /// [`purge`](Self::purge) with another window than the retention.
    ///
    /// # Errors
    /// [`OutboxError::Database`].
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, OutboxError> {
        let batch = i64::from(self.inner.config.purge_batch);
        let before = crate::unix_millis().saturating_sub(millis(age));
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM outbox_events WHERE seq IN (SELECT seq FROM outbox_events \
                 WHERE published_at IS NOT NULL AND published_at <= ? ORDER BY published_at LIMIT ?)",
            )
            .bind(before)
            .bind(batch)
            .execute(&self.inner.pool)
            .await?
            .rows_affected();
            total += n;
            if n < batch as u64 {
                break;
            }
        }
        Counters::add(&self.inner.counters.purged, total);
        Ok(total)
    }

    /// The age of the oldest event neither published nor dead; zero when none.
    ///
    /// # Errors
    /// [`OutboxError::Database`].
    pub async fn lag(&self) -> Result<Option<Duration>, OutboxError> {
        let created: Option<i64> = sqlx::query_scalar(
            "SELECT created_at FROM outbox_events WHERE published_at IS NULL AND dead_at IS NULL \
             ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&self.inner.pool)
        .await?;
        Ok(Some(created.map_or(Duration::ZERO, |c| {
            Duration::from_millis(u64::try_from(crate::unix_millis() - c).unwrap_or(0))
        })))
    }
}
