//! The relay, written once for both databases: claim a batch, publish it
//! pipelined, mark it; wait for work; measure the lag; purge.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use sql_foundation::{millis, Statement};
use sqlx::Pool;
use tracing::Instrument;

use crate::config::RelayConfig;
use crate::database::{Claimed, OutboxDatabase};
use crate::error::OutboxError;
use crate::metrics::{Counters, RelayMetrics};
use crate::publisher::Publisher;
use crate::settle::{self, BatchReport};

/// Moves events from the outbox to a broker through a [`Publisher`]:
/// [`PostgresRelay`] or [`SqliteRelay`].
///
/// Cheap to clone (the clones share the pool, the publisher and the
/// counters).
pub struct Relay<DB: OutboxDatabase, P> {
    inner: Arc<Inner<DB, P>>,
}

/// The relay on PostgreSQL. Any number of relays, in one process or many,
/// may run on one database at once: keyless events are shared by `FOR
/// UPDATE SKIP LOCKED`, keyed events by an advisory lock per key, held (in
/// the claiming transaction) while the batch is published. An idle relay
/// waits on `LISTEN outbox`, with the poll interval as a fallback.
#[cfg(feature = "postgres")]
pub type PostgresRelay<P> = Relay<sqlx::Postgres, P>;

/// The relay on SQLite ([`migrate_sqlite`](crate::migrate_sqlite)). **One
/// relay per database file**: SQLite has no row locks to share the work,
/// so two relays would publish the same events (at least once still holds,
/// per-key order does not).
///
/// The claim is a plain read; the publish runs outside any transaction, so
/// producers are never blocked by a slow broker; the marking is one short
/// write transaction afterwards. A key's events are taken from its head
/// only, so a key whose oldest waiting event is in backoff waits with it.
/// There is no notification on SQLite: [`run`](Relay::run) polls every poll
/// interval when idle, and takes batches back to back while there is work.
#[cfg(feature = "sqlite")]
pub type SqliteRelay<P> = Relay<sqlx::Sqlite, P>;

impl<DB: OutboxDatabase, P> Clone for Relay<DB, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: OutboxDatabase, P> std::fmt::Debug for Relay<DB, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.inner.name)
            .field("database", &DB::BACKEND)
            .field("config", &self.inner.config)
            .field("metrics", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

struct Inner<DB: OutboxDatabase, P> {
    name: String,
    pool: Pool<DB>,
    publisher: P,
    config: RelayConfig,
    counters: Counters,
}

impl<DB: OutboxDatabase, P: Publisher> Relay<DB, P> {
    /// A relay over the outbox in `pool` (created by
    /// [`migrate_postgres`](crate::migrate_postgres) or
    /// [`migrate_sqlite`](crate::migrate_sqlite)), publishing through
    /// `publisher`. Its metrics are labelled `relay="default"`
    /// ([`DEFAULT_RELAY`](crate::metrics::DEFAULT_RELAY)); see
    /// [`named`](Self::named).
    pub fn new(pool: Pool<DB>, publisher: P, config: RelayConfig) -> Self {
        Self::named(pool, publisher, config, crate::metrics::DEFAULT_RELAY)
    }

    /// [`new`](Self::new), with a name: the `relay` label of its metrics
    /// (see [`metrics`](crate::metrics)) and a field of its logs. Relays of
    /// one process that relay different outboxes need different names;
    /// relays of one outbox may share one (their counts add up).
    ///
    /// The relay's counters are registered, at 0, with the `metrics`
    /// recorder installed now: install it first.
    pub fn named(
        pool: Pool<DB>,
        publisher: P,
        config: RelayConfig,
        name: impl Into<String>,
    ) -> Self {
        let name = name.into();
        Self {
            inner: Arc::new(Inner {
                counters: Counters::new(&name),
                name,
                pool,
                publisher,
                config,
            }),
        }
    }

    /// The name: the `relay` label of its metrics.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The config.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.inner.publisher
    }

    /// The counts so far, and the last lag measured (the same counts go to
    /// the [`metrics`](crate::metrics) facade).
    pub fn metrics(&self) -> RelayMetrics {
        self.inner.counters.snapshot()
    }

    /// Claims one batch (up to the batch size of due events, oldest first,
    /// each key from its head), publishes it, marks the outcome: one round
    /// of [`run`](Self::run). On PostgreSQL the claim, the marking and the
    /// commit are one transaction, held while the batch is published; on
    /// SQLite the claim is a read and the marking one write transaction
    /// after the publish.
    ///
    /// # Errors
    /// [`OutboxError::Database`]: nothing is marked (on PostgreSQL the
    /// transaction rolls back) and the claimed events wait for a later
    /// round; some may have reached the broker: they are published again,
    /// with the same id. Counted in
    /// [`RelayMetrics::database_errors`].
    pub async fn run_once(&self) -> Result<BatchReport, OutboxError> {
        let round = self.round().await;
        if round.is_err() {
            self.inner.counters.database_error();
        }
        round
    }

    /// [`run_once`](Self::run_once), but for counting its error.
    async fn round(&self) -> Result<BatchReport, OutboxError> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let Claimed {
            claim,
            batch,
            corrupt,
        } = DB::claim(&inner.pool, cfg).await?;
        if batch.is_empty() {
            // Only the rows that are not events, if any, to mark dead.
            DB::mark(&inner.pool, claim, &[], &corrupt).await?;
            inner.counters.round(&BatchReport::default(), corrupt.len());
            return Ok(BatchReport::default());
        }
        // The relay's hop in each event's trace: ended once the batch is
        // marked (when this is dropped).
        #[cfg(feature = "trace")]
        let mut batch = batch;
        #[cfg(feature = "trace")]
        let _publishing = crate::trace::publish_spans(&inner.name, &mut batch);
        let span = tracing::debug_span!(
            "outbox.batch",
            relay = %inner.name,
            database = DB::BACKEND,
            claimed = batch.len(),
            first_seq = batch[0].seq
        );
        async {
            let mut settled = settle::publish(&inner.publisher, &batch, cfg).await;
            let unreadable = corrupt.len();
            settled.failures.extend(corrupt);
            DB::mark(&inner.pool, claim, &settled.published, &settled.failures).await?;
            inner.counters.round(&settled.report, unreadable);
            Ok(settled.report)
        }
        .instrument(span)
        .await
    }

    /// Runs until `shutdown` resolves: claims and publishes batches back to
    /// back while there is work, then waits for work (PostgreSQL: a
    /// notification, `LISTEN outbox`, or the poll interval; SQLite: the
    /// poll interval). When `shutdown` resolves, the batch in hand is
    /// finished (published, marked, committed) and `run` returns. Database
    /// errors and broker outages are logged and retried after the outage
    /// delay; they do not end the loop. Measures the lag when idle and at
    /// least every poll interval while busy; purges published events past
    /// the retention every purge interval. Everything it does is counted in
    /// [`metrics`](Self::metrics) and through the
    /// [`metrics`](crate::metrics) facade.
    ///
    /// # Errors
    /// [`OutboxError::Database`] only when the listener cannot start
    /// (PostgreSQL); never on SQLite.
    pub async fn run<F>(&self, shutdown: F) -> Result<(), OutboxError>
    where
        F: Future<Output = ()>,
    {
        let cfg = &self.inner.config;
        let mut wake = DB::listen(&self.inner.pool).await?;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_purge = Instant::now();
        let mut last_lag: Option<Instant> = None;
        tracing::info!(
            relay = %self.inner.name,
            database = DB::BACKEND,
            batch_size = cfg.batch_size,
            "outbox relay running"
        );
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            let round = self.run_once().await;
            let idle = matches!(&round, Ok(r) if r.claimed == 0);
            if idle || last_lag.is_none_or(|t| t.elapsed() >= cfg.poll_interval) {
                last_lag = Some(Instant::now());
                // `lag` records the measure (and counts its failure).
                if let Err(e) = self.lag().await {
                    tracing::warn!(error = %settle::error_chain(&e), "measuring the lag failed");
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
            let waiting = async {
                match pause {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => DB::wait(&mut wake, cfg.poll_interval).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = waiting => {}
            }
        }
        tracing::info!(relay = %self.inner.name, metrics = ?self.metrics(), "outbox relay stopped");
        Ok(())
    }

    /// Deletes published events older than the retention, in batches of the
    /// purge batch; returns how many. Dead events and events waiting are
    /// never deleted. On PostgreSQL, safe from several relays at once, and
    /// never at or above the lowest retention hold
    /// ([`place_hold`](crate::place_hold)).
    ///
    /// # Errors
    /// [`OutboxError::Database`].
    pub async fn purge(&self) -> Result<u64, OutboxError> {
        self.purge_older_than(self.inner.config.retention).await
    }

    /// [`purge`](Self::purge) with another window than the retention.
    ///
    /// # Errors
    /// [`OutboxError::Database`]; the batches deleted before it stay deleted
    /// (and counted in [`RelayMetrics::purged`]).
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, OutboxError> {
        let batch = i64::from(self.inner.config.purge_batch);
        let counters = &self.inner.counters;
        let mut total = 0;
        let result = loop {
            let deleted = Statement::<DB>::new(DB::SQL.purge)
                .bind(millis(age))
                .bind(batch)
                .execute(&self.inner.pool)
                .await;
            match deleted {
                Ok(n) => {
                    total += n;
                    if n < batch.unsigned_abs() {
                        break Ok(total);
                    }
                }
                Err(e) => {
                    counters.database_error();
                    break Err(e.into());
                }
            }
        };
        if total > 0 {
            counters.purged(total);
            tracing::info!(relay = %self.inner.name, purged = total, "purged published events");
        }
        result
    }

    /// The relay lag now: the age of the oldest event neither published nor
    /// dead (including events waiting for a retry); zero when none waits.
    /// Recorded as the lag of [`metrics`](Self::metrics) and the
    /// `outbox_lag_seconds` gauge.
    ///
    /// # Errors
    /// [`OutboxError::Database`], counted in
    /// [`RelayMetrics::database_errors`]; the recorded lag keeps its value.
    pub async fn lag(&self) -> Result<Option<Duration>, OutboxError> {
        let measured = self.measure_lag().await;
        match measured {
            Ok(lag) => self.inner.counters.set_lag(lag),
            Err(_) => self.inner.counters.database_error(),
        }
        measured.map(Some)
    }

    async fn measure_lag(&self) -> Result<Duration, OutboxError> {
        let oldest = Statement::<DB>::new(DB::SQL.lag)
            .fetch_optional(&self.inner.pool)
            .await?;
        let age: Option<f64> = oldest.map(|row| DB::get(&row, "age")).transpose()?;
        Ok(age.map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.max(0.0))))
    }
}
