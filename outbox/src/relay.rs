//! The relay on PostgreSQL: claim a batch, publish it pipelined, mark it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgConnection, PgPool, Row};
use tracing::Instrument;

use crate::config::RelayConfig;
use crate::enqueue::{CHANNEL, RELAY_LOCK_CLASS};
use crate::error::OutboxError;
use crate::event::Event;
use crate::metrics::{Counters, RelayMetrics};
use crate::publisher::{Outgoing, Publisher};
use crate::settle::{self, BatchReport, Failure};

const COLUMNS: &str = "seq, id::text AS id, destination, ordering_key, headers::text AS headers, \
                       payload, attempts, available_at <= now() AS ready";

/// Moves events from the outbox to a broker through a [`Publisher`].
///
/// Cheap to clone (the clones share the pool, the publisher and the
/// counters). Any number of relays, in one process or many, may run on one
/// database at once.
pub struct Relay<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for Relay<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<P> std::fmt::Debug for Relay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.inner.config)
            .field("metrics", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

struct Inner<P> {
    pool: PgPool,
    publisher: P,
    config: RelayConfig,
    counters: Counters,
}

impl<P: Publisher> Relay<P> {
    /// A relay over the outbox in `pool` (created by
    /// [`migrate_postgres`](crate::migrate_postgres)), publishing through
    /// `publisher`.
    pub fn new(pool: PgPool, publisher: P, config: RelayConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                publisher,
                config,
                counters: Counters::default(),
            }),
        }
    }

    /// The config.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.inner.publisher
    }

    /// The counters so far.
    pub fn metrics(&self) -> RelayMetrics {
        self.inner.counters.snapshot()
    }

    /// Claims one batch, publishes it, marks the outcome and commits: one
    /// round of [`run`](Self::run).
    ///
    /// # Errors
    /// [`OutboxError::Database`]: the transaction rolls back and the claimed
    /// events wait for the next round (some may have reached the broker:
    /// they are published again, with the same id).
    pub async fn run_once(&self) -> Result<BatchReport, OutboxError> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let mut tx = inner.pool.begin().await?;
        let mut batch = claim_keyed(&mut tx, cfg).await?;
        batch.extend(claim_unkeyed(&mut tx, cfg).await?);
        batch.sort_by_key(|o| o.seq);
        if batch.is_empty() {
            tx.commit().await?;
            return Ok(BatchReport::default());
        }
        let span = tracing::debug_span!(
            "outbox.batch",
            claimed = batch.len(),
            first_seq = batch[0].seq
        );
        async {
            let settled = settle::publish(&inner.publisher, &batch, cfg).await;
            if !settled.published.is_empty() {
                sqlx::query("UPDATE outbox.events SET published_at = now() WHERE seq = ANY($1)")
                    .bind(&settled.published)
                    .execute(&mut *tx)
                    .await?;
            }
            if !settled.failures.is_empty() {
                record_failures(&mut tx, &settled.failures).await?;
            }
            tx.commit().await?;
            settle::count(&inner.counters, &settled.report);
            Ok(settled.report)
        }
        .instrument(span)
        .await
    }

    /// Runs until `shutdown` resolves: claims and publishes batches back to
    /// back while there is work, then waits for a notification (`LISTEN
    /// outbox`) or the poll interval. When `shutdown` resolves, the batch in
    /// hand is finished (published, marked, committed) and `run` returns.
    /// Database errors and broker outages are logged and retried; they do
    /// not end the loop. Purges published events past the retention every
    /// purge interval.
    ///
    /// # Errors
    /// [`OutboxError::Database`] only when the listener cannot start.
    pub async fn run<F>(&self, shutdown: F) -> Result<(), OutboxError>
    where
        F: Future<Output = ()>,
    {
        let cfg = &self.inner.config;
        let mut listener = PgListener::connect_with(&self.inner.pool).await?;
        listener.listen(CHANNEL).await?;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_purge = Instant::now();
        let mut last_lag: Option<Instant> = None;
        tracing::info!(batch_size = cfg.batch_size, "outbox relay running");
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            let round = self.run_once().await;
            let idle = matches!(&round, Ok(r) if r.claimed == 0);
            if idle || last_lag.is_none_or(|t| t.elapsed() >= cfg.poll_interval) {
                last_lag = Some(Instant::now());
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
                    Some(cfg.outage_delay)
                }
                Ok(r) if r.unavailable > 0 => Some(cfg.outage_delay),
                // More may be waiting: no sleep between batches.
                Ok(r) if r.claimed > 0 => continue,
                Ok(_) => None,
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                n = listener.recv() => if let Err(e) = n {
                    tracing::warn!(error = %e, "the outbox listener failed; polling");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(cfg.poll_interval) => {}
                    }
                },
                () = tokio::time::sleep(cfg.poll_interval) => {}
            }
        }
        tracing::info!(metrics = ?self.metrics(), "outbox relay stopped");
        Ok(())
    }

    /// Deletes published events older than the retention, in batches of the
    /// purge batch; returns how many. Safe from several relays at once. Dead
    /// events and events waiting are never deleted.
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
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "WITH doomed AS (SELECT seq FROM outbox.events \
                 WHERE published_at < now() - ($1::float8 * interval '1 second') \
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 DELETE FROM outbox.events e USING doomed d WHERE e.seq = d.seq",
            )
            .bind(age.as_secs_f64())
            .bind(batch)
            .execute(&self.inner.pool)
            .await?
            .rows_affected();
            total += n;
            if n < batch as u64 {
                break;
            }
        }
        if total > 0 {
            Counters::add(&self.inner.counters.purged, total);
            tracing::info!(purged = total, "purged published events");
        }
        Ok(total)
    }

    /// The relay lag now: the age of the oldest event neither published nor
    /// dead (including events waiting for a retry); zero when none waits.
    ///
    /// # Errors
    /// [`OutboxError::Database`].
    pub async fn lag(&self) -> Result<Option<Duration>, OutboxError> {
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM (clock_timestamp() - created_at))::float8 \
             FROM outbox.events WHERE published_at IS NULL AND dead_at IS NULL \
             ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&self.inner.pool)
        .await?;
        Ok(Some(age.map_or(Duration::ZERO, |s| {
            Duration::from_secs_f64(s.max(0.0))
        })))
    }
}

fn outgoing(row: &PgRow) -> Result<(Outgoing, bool), OutboxError> {
    let id: String = row.try_get("id")?;
    let event = Event::from_row(
        &id,
        row.try_get("destination")?,
        row.try_get("ordering_key")?,
        &row.try_get::<String, _>("headers")?,
        row.try_get("payload")?,
    )
    .map_err(OutboxError::Corrupt)?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok((
        Outgoing {
            seq: row.try_get("seq")?,
            attempt: u32::try_from(attempts).unwrap_or(0).saturating_add(1),
            event,
        },
        row.try_get("ready")?,
    ))
}

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
) -> Result<Vec<Outgoing>, OutboxError> {
    let limit = i64::from(cfg.batch_size);
    let mut keys = lock_keys(conn, HEADS_IN_WINDOW, limit * 10, limit).await?;
    if keys.is_empty() {
        keys = lock_keys(conn, HEADS_ALL, 1, limit).await?;
    }
    if keys.is_empty() {
        return Ok(Vec::new());
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
    let (candidates, corrupt) = settle::decode_rows(&rows, outgoing, seq_of)?;
    if !corrupt.is_empty() {
        record_failures(conn, &corrupt).await?;
    }
    Ok(settle::take_heads(candidates, cfg.max_per_key))
}

/// Keyless events: the oldest due ones no other relay holds.
async fn claim_unkeyed(
    conn: &mut PgConnection,
    cfg: &RelayConfig,
) -> Result<Vec<Outgoing>, OutboxError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM outbox.events \
         WHERE ordering_key IS NULL AND published_at IS NULL AND dead_at IS NULL \
           AND available_at <= now() \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(i64::from(cfg.batch_size))
    .fetch_all(&mut *conn)
    .await?;
    let (claimed, corrupt) = settle::decode_rows(&rows, |r| outgoing(r).map(|(o, _)| o), seq_of)?;
    if !corrupt.is_empty() {
        record_failures(conn, &corrupt).await?;
    }
    Ok(claimed)
}

fn seq_of(row: &PgRow) -> Result<i64, OutboxError> {
    Ok(row.try_get("seq")?)
}

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
