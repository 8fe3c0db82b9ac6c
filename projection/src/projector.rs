//! The projector: one version of a projection, registered, fed from its
//! source, measured, and switched to when it has caught up.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::{watch, OnceCell};

use crate::config::{ConfigError, ProjectorConfig};
use crate::metrics::{Counters, ProjectorMetrics};
use crate::served::{ServedVersion, SWITCH_CHANNEL};
use crate::tail::{error_chain, Partition, Round, Tail, TailSql};
use crate::version::valid_name;
use crate::{Projection, ProjectionError, Version};

/// The advisory lock class (with `hashtext(name)`) held while a version of
/// the projection `name` is registered or dropped.
const REGISTER_LOCK_CLASS: i32 = 0x7072_6f02;

/// Where a projector's events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The outbox table of the projector's own database (`outbox.events`),
    /// tailed in commit order: [`Projector::run`]. The history is the
    /// outbox's retained events.
    Outbox,
    /// A broker, through the transactional inbox:
    /// [`Projector::apply_message`] in the application's consumer loop. The
    /// history is the broker's (a JetStream stream from its start).
    Inbox,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Outbox => "outbox",
            Source::Inbox => "inbox",
        }
    }
}

/// Where a new version of an outbox-fed projection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Start {
    /// From the first event: the whole history. Registration fails with
    /// [`ProjectionError::HistoryPurged`] when the outbox purged part of it.
    #[default]
    Beginning,
    /// After the last event committed at registration: the version applies
    /// only what commits later (and never sees what came before, nor an
    /// event with a lower `seq` still in flight then). A deliberate choice,
    /// for a projection whose history is gone.
    Now,
}

/// Why [`Projector::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finished {
    /// The shutdown future resolved; the rounds in hand committed.
    Shutdown,
    /// A newer version is served: this one stopped applying events (its
    /// tables stay until [`drop_version`]).
    Superseded {
        /// The version served.
        served: u32,
    },
}

/// Where a version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VersionState {
    /// Not served yet: it builds from the history, and is switched to
    /// once it has caught up.
    Building,
    /// The version served.
    Served,
    /// A newer version is served.
    Superseded {
        /// The version served.
        served: u32,
    },
}

/// What [`Projector::run_once`] did: one round of every partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// Events applied.
    pub applied: u64,
    /// Events parked.
    pub parked: u64,
    /// Partitions whose round failed on an event (rolled back, counted).
    pub failed: u32,
    /// Partitions another process was applying.
    pub busy: u32,
    /// Partitions with more events waiting than a batch.
    pub more: u32,
    /// Set when a newer version is served.
    pub superseded: Option<u32>,
    /// Whether this round's end made this version the served one.
    pub switched: bool,
}

/// How far behind a version is.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Lag {
    /// Events committed and not yet applied (outbox source: counted up to
    /// 100 000 per partition).
    pub events: u64,
    /// The age of the oldest of them, from its `created_at`; 0 when none.
    pub seconds: f64,
}

impl Lag {
    /// A lag of `events` events, the oldest `seconds` old: what a broker-fed
    /// projection gives [`Projector::record_lag`] (the struct is
    /// `non_exhaustive`, so this is the only way to make one outside the
    /// crate).
    pub fn new(events: u64, seconds: f64) -> Self {
        Self { events, seconds }
    }
}

/// A parked event: never applied, with its reason.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Parked {
    /// The event's id.
    pub event_id: String,
    /// Its `seq` (outbox source).
    pub seq: Option<i64>,
    /// Its ordering key (outbox source).
    pub ordering_key: Option<String>,
    /// The failed attempts counted.
    pub attempts: u32,
    /// Why it was parked: the last error.
    pub reason: String,
    /// When.
    pub parked_at: SystemTime,
}

/// One version of a projection, fed from its [`Source`]. Build it with
/// [`Projector::builder`].
///
/// Cheap to clone (clones share everything, including the metrics).
pub struct Projector<P> {
    pub(crate) inner: Arc<Inner<P>>,
}

impl<P> Clone for Projector<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P> std::fmt::Debug for Projector<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("version", &self.inner.version)
            .field("source", &self.inner.source)
            .field("partitions", &self.inner.partitions)
            .field("config", &self.inner.config)
            .field("metrics", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner<P> {
    pub(crate) pool: PgPool,
    pub(crate) projection: P,
    pub(crate) version: Version,
    pub(crate) source: Source,
    partitions: u32,
    start: Start,
    destinations: Vec<String>,
    pub(crate) config: ProjectorConfig,
    sql: TailSql,
    pub(crate) counters: Counters,
    served: ServedVersion,
    registered: OnceCell<Registration>,
}

/// A registered version: its id and partitions.
#[derive(Debug)]
pub(crate) struct Registration {
    version_id: Option<i32>,
    partitions: Vec<Partition>,
    /// Set when a newer version was served before this one registered (it
    /// was not created).
    superseded: Option<u32>,
}

/// Builds a [`Projector`].
#[derive(Debug)]
#[must_use]
pub struct ProjectorBuilder<P> {
    pool: PgPool,
    name: String,
    projection: P,
    version: u32,
    partitions: u32,
    start: Start,
    source: Source,
    destinations: Vec<String>,
    config: ProjectorConfig,
}

impl<P: Projection> ProjectorBuilder<P> {
    /// The version this projector builds and feeds (default 1). A new
    /// number is a rebuild: new tables, built from the history while the
    /// version served goes on.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Partitions applied in parallel (outbox source; default 1). An
    /// event's partition is a hash of its ordering key (of its id when it
    /// has none), so one key's events keep their order. Fixed when the
    /// version registers: another count needs another version.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Where a new version starts (outbox source; default
    /// [`Start::Beginning`]).
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// The source (default [`Source::Outbox`]).
    pub fn source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    /// Applies only the outbox events of these destinations (default: every
    /// event).
    pub fn destinations<I, S>(mut self, destinations: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.destinations = destinations.into_iter().map(Into::into).collect();
        self
    }

    /// The config (default [`ProjectorConfig::default`]).
    pub fn config(mut self, config: ProjectorConfig) -> Self {
        self.config = config;
        self
    }

    /// The projector. Registers its counters (at 0) with the `metrics`
    /// recorder installed now; touches no database (see
    /// [`Projector::register`]).
    ///
    /// # Errors
    /// [`ConfigError`] for a name that is not a plain lowercase identifier,
    /// version 0, partitions out of 1..=1024, an empty destination, or a
    /// config out of range.
    pub fn build(self) -> Result<Projector<P>, ConfigError> {
        if !valid_name(&self.name) {
            return Err(ConfigError::Name(self.name));
        }
        if self.version == 0 {
            return Err(ConfigError::Version);
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(ConfigError::Partitions(self.partitions));
        }
        if self.destinations.iter().any(String::is_empty) {
            return Err(ConfigError::Destination);
        }
        self.config.check()?;
        let version = Version::new(&self.name, self.version);
        let partitions = match self.source {
            Source::Outbox => self.partitions,
            Source::Inbox => 1,
        };
        Ok(Projector {
            inner: Arc::new(Inner {
                sql: TailSql::new(partitions, !self.destinations.is_empty()),
                counters: Counters::new(&self.name, self.version),
                served: ServedVersion::new(
                    self.pool.clone(),
                    self.name.as_str(),
                    self.config.served_ttl,
                ),
                pool: self.pool,
                projection: self.projection,
                version,
                source: self.source,
                partitions,
                start: self.start,
                destinations: self.destinations,
                config: self.config,
                registered: OnceCell::new(),
            }),
        })
    }
}

/// Creates or updates the projector's tables (schema `projection`), and
/// the outbox's and the inbox's, each in its own schema with its own
/// migration history. Safe to call from several instances at once.
///
/// # Errors
/// [`ProjectionError::Database`], [`ProjectionError::Migrate`],
/// [`ProjectionError::Outbox`] or [`ProjectionError::Inbox`].
pub async fn migrate(pool: &PgPool) -> Result<(), ProjectionError> {
    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    outbox::migrate_postgres(pool)
        .await
        .map_err(ProjectionError::Outbox)?;
    inbox_consumer::migrate_postgres(pool)
        .await
        .map_err(ProjectionError::Inbox)?;
    sql_foundation::migrate_postgres(pool, "projection", &MIGRATOR)
        .await
        .map_err(ProjectionError::from_migration)
}

/// The outbox hold of a partition.
fn hold_name(version: &Version, index: u32) -> String {
    format!("{}{index}", hold_prefix(version))
}

fn hold_prefix(version: &Version) -> String {
    format!("projection/{}/v{}/", version.name(), version.number())
}

fn number(version: u32) -> i32 {
    i32::try_from(version).unwrap_or(i32::MAX)
}

/// Makes `$2` the version of `$1` served, if it is newer than the one
/// served: the served row, the version's `served_at`, the release of the
/// older versions' outbox holds, and a notification, in one transaction.
const SWITCH: &str = "WITH switched AS ( \
       INSERT INTO projection.served AS s (name, version) VALUES ($1, $2) \
       ON CONFLICT (name) DO UPDATE SET version = excluded.version, switched_at = now() \
         WHERE s.version < excluded.version \
       RETURNING version), \
     stamped AS ( \
       UPDATE projection.versions SET served_at = now() \
       WHERE name = $1 AND version = $2 AND EXISTS (SELECT 1 FROM switched)), \
     released AS ( \
       DELETE FROM outbox.holds h USING projection.versions v \
       WHERE v.name = $1 AND v.version < $2 AND EXISTS (SELECT 1 FROM switched) \
         AND starts_with(h.name, 'projection/' || v.name || '/v' || v.version || '/')), \
     notified AS (SELECT pg_notify('projection', $1) FROM switched) \
     SELECT count(*) AS switched FROM notified";

impl<P: Projection> Projector<P> {
    /// A projector of version 1 of the projection `name` (a plain
    /// lowercase identifier of at most 48 bytes: its versions' tables live
    /// in schemas `<name>_v<n>`), applying events with `projection`, on the
    /// database of `pool` (migrated by [`migrate`]).
    pub fn builder(pool: PgPool, name: impl Into<String>, projection: P) -> ProjectorBuilder<P> {
        ProjectorBuilder {
            pool,
            name: name.into(),
            projection,
            version: 1,
            partitions: 1,
            start: Start::Beginning,
            source: Source::Outbox,
            destinations: Vec::new(),
            config: ProjectorConfig::default(),
        }
    }

    /// The version it builds and feeds.
    pub fn version(&self) -> &Version {
        &self.inner.version
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.inner.projection
    }

    /// The config.
    pub fn config(&self) -> &ProjectorConfig {
        &self.inner.config
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// What it did so far, and the last lag.
    pub fn metrics(&self) -> ProjectorMetrics {
        self.inner.counters.snapshot()
    }

    /// The version served now, at most [`served_ttl`] old (a request path
    /// reads it to pick the tables to query: [`Version::schema`] of
    /// `Projector::version_of(n)`); `None` before any version caught up.
    ///
    /// [`served_ttl`]: ProjectorConfig::served_ttl
    ///
    /// # Errors
    /// [`ProjectionError::Database`].
    pub async fn served_version(&self) -> Result<Option<u32>, ProjectionError> {
        let v = self.inner.served.get().await?;
        self.inner.counters.served(v);
        Ok(v)
    }

    /// Version `number` of the same projection (its schema and tables).
    pub fn version_of(&self, number: u32) -> Version {
        Version::new(self.inner.version.name(), number)
    }

    /// Registers the version, once per projector (later calls return what
    /// the database says now): in one transaction, under a lock per
    /// projection name, it creates the version's schema, runs
    /// [`Projection::setup`], and for the outbox source places a retention
    /// hold per partition at its start, so the outbox keeps every event the
    /// version has not applied. A version registered before is taken as it
    /// is. [`run`](Self::run) and [`inbox`](Self::inbox) register first.
    ///
    /// # Errors
    /// [`ProjectionError::HistoryPurged`] when the outbox no longer holds
    /// the history the version needs (nothing is registered);
    /// [`ProjectionError::Registered`] when the version exists with another
    /// partition count or source; [`ProjectionError::Setup`];
    /// [`ProjectionError::Database`].
    pub async fn register(&self) -> Result<VersionState, ProjectionError> {
        let reg = self.registration().await?;
        if let Some(served) = reg.superseded {
            return Ok(VersionState::Superseded { served });
        }
        self.state().await
    }

    /// Where the version stands now (read from the database).
    ///
    /// # Errors
    /// [`ProjectionError::Database`].
    pub async fn state(&self) -> Result<VersionState, ProjectionError> {
        let served = self.inner.served.refresh().await?;
        self.inner.counters.served(served);
        let mine = self.inner.version.number();
        Ok(match served {
            Some(s) if s == mine => VersionState::Served,
            Some(s) if s > mine => VersionState::Superseded { served: s },
            _ => VersionState::Building,
        })
    }

    pub(crate) async fn registration(&self) -> Result<&Registration, ProjectionError> {
        self.inner
            .registered
            .get_or_try_init(|| self.register_now())
            .await
    }

    async fn register_now(&self) -> Result<Registration, ProjectionError> {
        let inner = &*self.inner;
        let version = &inner.version;
        let name = version.name();
        let mut tx = inner.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(REGISTER_LOCK_CLASS)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let existing: Option<(i32, String, i32)> = sqlx::query_as(
            "SELECT id, source, partitions FROM projection.versions WHERE name = $1 AND version = $2",
        )
        .bind(name)
        .bind(number(version.number()))
        .fetch_optional(&mut *tx)
        .await?;
        let version_id = if let Some((id, source, partitions)) = existing {
            let registered = |what: String, configured: String| ProjectionError::Registered {
                projection: name.to_owned(),
                version: version.number(),
                registered: what,
                configured,
            };
            if source != inner.source.as_str() {
                return Err(registered(
                    format!("source {source}"),
                    format!("source {}", inner.source.as_str()),
                ));
            }
            if u32::try_from(partitions).ok() != Some(inner.partitions) {
                return Err(registered(
                    format!("{partitions} partitions"),
                    format!("{} partitions", inner.partitions),
                ));
            }
            id
        } else {
            let served: Option<i32> =
                sqlx::query_scalar("SELECT version FROM projection.served WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(served) = served.and_then(|s| u32::try_from(s).ok()) {
                if served > version.number() {
                    tx.rollback().await?;
                    tracing::warn!(projection = %version, served,
                        "projection: a newer version is served; this one is not registered");
                    return Ok(Registration {
                        version_id: None,
                        partitions: Vec::new(),
                        superseded: Some(served),
                    });
                }
            }
            self.create(&mut tx).await?
        };
        let partitions = sqlx::query(
            "SELECT id, partition FROM projection.partitions WHERE version_id = $1 ORDER BY partition",
        )
        .bind(version_id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| {
            let index: i32 = row.try_get("partition")?;
            Ok(Partition {
                id: row.try_get("id")?,
                index,
                hold: hold_name(version, u32::try_from(index).unwrap_or(0)),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        tx.commit().await?;
        Ok(Registration {
            version_id: Some(version_id),
            partitions,
            superseded: None,
        })
    }

    /// Creates the version (in the registration's transaction).
    async fn create(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    ) -> Result<i32, ProjectionError> {
        let inner = &*self.inner;
        let version = &inner.version;
        let start_seq = match (inner.source, inner.start) {
            (Source::Inbox, _) => 0,
            (Source::Outbox, Start::Beginning) => 1,
            (Source::Outbox, Start::Now) => {
                // The last event committed, or purged.
                let head: i64 = sqlx::query_scalar(
                    "SELECT GREATEST((SELECT COALESCE(max(seq), 0) FROM outbox.events), \
                                     (SELECT COALESCE(max(max_seq), 0) FROM outbox.purged))",
                )
                .fetch_one(&mut **tx)
                .await?;
                head + 1
            }
        };
        if inner.source == Source::Outbox {
            for index in 0..inner.partitions {
                outbox::place_hold(tx, &hold_name(version, index), start_seq)
                    .await
                    .map_err(|e| match e {
                        outbox::OutboxError::HistoryPurged { purged_through, .. } => {
                            ProjectionError::HistoryPurged {
                                projection: version.name().to_owned(),
                                version: version.number(),
                                needed_from: start_seq,
                                purged_through,
                            }
                        }
                        e => ProjectionError::Outbox(e),
                    })?;
            }
        }
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", version.schema()))
            .execute(&mut **tx)
            .await?;
        inner
            .projection
            .setup(tx, version)
            .await
            .map_err(|source| ProjectionError::Setup {
                version: version.to_string(),
                source,
            })?;
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO projection.versions (name, version, source, partitions, start_seq) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(version.name())
        .bind(number(version.number()))
        .bind(inner.source.as_str())
        .bind(number(inner.partitions))
        .bind(start_seq)
        .fetch_one(&mut **tx)
        .await?;
        if inner.source == Source::Outbox {
            sqlx::query(
                "INSERT INTO projection.partitions (version_id, partition, watermark) \
                 SELECT $1, g, $3 FROM generate_series(0, $2 - 1) g",
            )
            .bind(id)
            .bind(number(inner.partitions))
            .bind(start_seq - 1)
            .execute(&mut **tx)
            .await?;
        }
        tracing::info!(projection = %version, source = inner.source.as_str(),
            partitions = inner.partitions, start_seq, "projection: version registered");
        Ok(id)
    }

    fn expect(&self, source: Source, method: &'static str) -> Result<(), ProjectionError> {
        if self.inner.source == source {
            Ok(())
        } else {
            Err(ProjectionError::WrongSource {
                method,
                expected: source,
            })
        }
    }

    fn tail(&self) -> Tail<'_, P> {
        let inner = &*self.inner;
        Tail {
            pool: &inner.pool,
            projection: &inner.projection,
            version: &inner.version,
            config: &inner.config,
            sql: &inner.sql,
            destinations: &inner.destinations,
            counters: &inner.counters,
        }
    }

    /// One round of every partition, one after the other (outbox source),
    /// then a lag measure, and the switch if the version builds and has
    /// caught up: what [`run`](Self::run) does continuously, for a test or
    /// a batch job. Registers first.
    ///
    /// # Errors
    /// As [`register`](Self::register); [`ProjectionError::Database`] when
    /// a round failed on the projector's own statements (what the rounds
    /// before it committed stays).
    pub async fn run_once(&self) -> Result<RoundReport, ProjectionError> {
        self.expect(Source::Outbox, "run_once")?;
        let reg = self.registration().await?;
        let mut report = RoundReport {
            superseded: reg.superseded,
            ..RoundReport::default()
        };
        if reg.superseded.is_some() {
            return Ok(report);
        }
        let tail = self.tail();
        for part in &reg.partitions {
            match tail
                .round(part)
                .await
                .inspect_err(|_| self.inner.counters.database_error())?
            {
                Round::Busy => report.busy += 1,
                Round::Done {
                    applied,
                    parked,
                    more,
                } => {
                    report.applied += applied;
                    report.parked += parked;
                    report.more += u32::from(more);
                }
                Round::Failed { .. } => report.failed += 1,
                Round::Superseded { served } => report.superseded = Some(served),
            }
        }
        if report.superseded.is_none() {
            report.switched = self.switch_if_caught_up().await?;
        }
        Ok(report)
    }

    /// Measures how far behind the version is (outbox source) and records
    /// it in the metrics.
    ///
    /// # Errors
    /// [`ProjectionError::Database`] (counted).
    pub async fn lag(&self) -> Result<Lag, ProjectionError> {
        self.expect(Source::Outbox, "lag")?;
        let reg = self.registration().await?;
        let Some(version_id) = reg.version_id else {
            return Ok(Lag {
                events: 0,
                seconds: 0.0,
            });
        };
        let (events, seconds) = self
            .tail()
            .lag(version_id)
            .await
            .inspect_err(|_| self.inner.counters.database_error())?;
        self.inner.counters.lag(events, seconds);
        Ok(Lag { events, seconds })
    }

    /// Records the lag of a broker-fed version, as the application reads it
    /// from the broker (JetStream: the consumer's pending count).
    pub fn record_lag(&self, lag: Lag) {
        self.inner.counters.lag(lag.events, lag.seconds);
    }

    /// Makes this version the one served, if it is newer than the one
    /// served (one transaction; it releases the outbox holds of the older
    /// versions and notifies the other processes). [`run`](Self::run) calls
    /// it when the version has caught up; a broker-fed projection calls it
    /// when it decides so (JetStream: no message pending). Returns whether
    /// it switched.
    ///
    /// # Errors
    /// [`ProjectionError::Database`].
    pub async fn switch(&self) -> Result<bool, ProjectionError> {
        let reg = self.registration().await?;
        if reg.superseded.is_some() {
            return Ok(false);
        }
        let version = &self.inner.version;
        let switched: i64 = sqlx::query_scalar(SWITCH)
            .bind(version.name())
            .bind(number(version.number()))
            .fetch_one(&self.inner.pool)
            .await?;
        self.inner.served.forget();
        if switched > 0 {
            self.inner.counters.served(Some(version.number()));
            tracing::info!(projection = %version, "projection: this version is served now");
        }
        Ok(switched > 0)
    }

    /// Measures the lag; switches when the version builds and at most
    /// `switch_lag` events wait.
    async fn switch_if_caught_up(&self) -> Result<bool, ProjectionError> {
        let lag = self.lag().await?;
        if lag.events > self.inner.config.switch_lag {
            return Ok(false);
        }
        match self.state().await? {
            VersionState::Building => self.switch().await,
            _ => Ok(false),
        }
    }

    /// The events this version parked, oldest first.
    ///
    /// # Errors
    /// [`ProjectionError::Database`].
    pub async fn parked(&self) -> Result<Vec<Parked>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT event_id, seq, ordering_key, attempts, reason, \
               EXTRACT(EPOCH FROM parked_at)::float8 AS parked_at \
             FROM projection.parked WHERE name = $1 AND version = $2 \
             ORDER BY parked_at, seq",
        )
        .bind(self.inner.version.name())
        .bind(number(self.inner.version.number()))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let at: f64 = row.try_get("parked_at")?;
                Ok(Parked {
                    event_id: row.try_get("event_id")?,
                    seq: row.try_get("seq")?,
                    ordering_key: row.try_get("ordering_key")?,
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
                    reason: row.try_get("reason")?,
                    parked_at: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at.max(0.0)),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(ProjectionError::from)
    }

    /// Tails the outbox until `shutdown` resolves or a newer version is
    /// served: registers the version, then runs every partition in
    /// parallel, each applying a batch after another while events wait and
    /// waiting for a notification (`LISTEN outbox`, with the poll interval
    /// as a fallback) when none does. Every lag interval it measures the
    /// lag and, while the version builds, switches to it once it has
    /// caught up. When `shutdown` resolves the rounds in hand commit and
    /// `run` returns.
    ///
    /// Database errors and failing events do not end it: they are logged,
    /// counted, and retried after the outage delay or the event's backoff.
    /// Any number of processes may run the same version: a partition is
    /// applied by one transaction at a time (an advisory lock); the others
    /// skip it. It holds up to `partitions + 2` connections of the pool at
    /// once (a round per partition, the listener, the lag measure).
    ///
    /// # Errors
    /// As [`register`](Self::register): the version could not be
    /// registered (e.g. [`ProjectionError::HistoryPurged`]).
    pub async fn run<F>(&self, shutdown: F) -> Result<Finished, ProjectionError>
    where
        F: Future<Output = ()>,
    {
        self.expect(Source::Outbox, "run")?;
        let reg = self.registration().await?;
        if let Some(served) = reg.superseded {
            return Ok(Finished::Superseded { served });
        }
        if let VersionState::Superseded { served } = self.state().await? {
            return Ok(Finished::Superseded { served });
        }
        tracing::info!(projection = %self.inner.version, partitions = reg.partitions.len(),
            "projection: running");
        let (wake, _) = watch::channel(0u64);
        let (stop, stopped) = watch::channel(false);
        let partitions = async {
            let ends = futures_util::future::join_all(
                reg.partitions
                    .iter()
                    .map(|p| self.partition_loop(p, wake.subscribe(), stopped.clone())),
            )
            .await;
            let _ = stop.send(true);
            ends.into_iter().flatten().max()
        };
        let work = async {
            let ((), superseded, ()) = tokio::join!(
                self.listen_loop(&wake, stopped.clone()),
                partitions,
                self.lag_loop(stopped.clone())
            );
            superseded
        };
        let mut work = std::pin::pin!(work);
        let mut shutdown = std::pin::pin!(shutdown);
        let superseded = tokio::select! {
            s = &mut work => s,
            () = &mut shutdown => {
                let _ = stop.send(true);
                work.await
            }
        };
        let finished = match superseded {
            Some(served) => Finished::Superseded { served },
            None => Finished::Shutdown,
        };
        tracing::info!(projection = %self.inner.version, ?finished, metrics = ?self.metrics(),
            "projection: stopped");
        Ok(finished)
    }

    /// Rounds of one partition until stopped; `Some(served)` when a newer
    /// version is served.
    async fn partition_loop(
        &self,
        part: &Partition,
        mut wake: watch::Receiver<u64>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<u32> {
        let cfg = &self.inner.config;
        let tail = self.tail();
        loop {
            if *stop.borrow_and_update() {
                return None;
            }
            wake.borrow_and_update();
            let pause = match tail.round(part).await {
                Ok(Round::Done { more: true, .. }) => continue,
                Ok(Round::Done { .. } | Round::Busy) => None,
                Ok(Round::Failed { retry_after }) => Some(retry_after),
                Ok(Round::Superseded { served }) => {
                    tracing::info!(projection = %self.inner.version, served,
                        "projection: a newer version is served; this one stops");
                    return Some(served);
                }
                Err(e) => {
                    self.inner.counters.database_error();
                    tracing::warn!(projection = %self.inner.version, partition = part.index,
                        error = %error_chain(&e), "projection: a round failed; retrying");
                    Some(cfg.outage_delay)
                }
            };
            let waiting = async {
                match pause {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => {
                        tokio::select! {
                            _ = wake.changed() => {}
                            () = tokio::time::sleep(cfg.poll_interval) => {}
                        }
                    }
                }
            };
            tokio::select! {
                () = waiting => {}
                _ = stop.changed() => return None,
            }
        }
    }

    /// Wakes the partitions at each notification of the outbox (and at a
    /// switch of this projection, forgetting the served version read).
    async fn listen_loop(&self, wake: &watch::Sender<u64>, mut stop: watch::Receiver<bool>) {
        let poll = self.inner.config.poll_interval;
        let listener = async {
            let mut listener = PgListener::connect_with(&self.inner.pool).await?;
            listener
                .listen_all([outbox::CHANNEL, SWITCH_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(projection = %self.inner.version, error = %e,
                    "projection: cannot listen for notifications; polling");
                None
            }
        };
        loop {
            let next = async {
                match listener.as_mut() {
                    Some(l) => match l.recv().await {
                        Ok(n) => {
                            if n.channel() == SWITCH_CHANNEL {
                                if n.payload() == self.inner.version.name() {
                                    self.inner.served.forget();
                                } else {
                                    return;
                                }
                            }
                            wake.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Err(e) => {
                            tracing::warn!(projection = %self.inner.version, error = %e,
                                "projection: the listener failed; polling");
                            tokio::time::sleep(poll).await;
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = next => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Measures the lag every lag interval (the first one interval after
    /// the start, when the partitions' first rounds are done); switches
    /// once caught up.
    async fn lag_loop(&self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.inner.config.lag_interval) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.switch_if_caught_up().await {
                tracing::warn!(projection = %self.inner.version, error = %error_chain(&e),
                    "projection: measuring the lag failed");
            }
        }
    }
}

/// Drops version `version` of the projection `name`: its schema (its
/// tables), its outbox holds, its marks, attempts and parked events, and
/// its registration. Refuses the version served. Returns whether there was
/// such a version. Stop its projectors first: a tail still running on a
/// dropped version fails its rounds (logged, retried) until stopped.
///
/// # Errors
/// [`ProjectionError::Config`] for a name that is not one;
/// [`ProjectionError::Served`] for the version served;
/// [`ProjectionError::Database`].
pub async fn drop_version(
    pool: &PgPool,
    name: &str,
    version: u32,
) -> Result<bool, ProjectionError> {
    if !valid_name(name) {
        return Err(ConfigError::Name(name.to_owned()).into());
    }
    let v = Version::new(name, version);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(REGISTER_LOCK_CLASS)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let served: Option<i32> =
        sqlx::query_scalar("SELECT version FROM projection.served WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if served == Some(number(version)) {
        return Err(ProjectionError::Served {
            projection: name.to_owned(),
            version,
        });
    }
    sqlx::query("DELETE FROM outbox.holds WHERE starts_with(name, $1)")
        .bind(hold_prefix(&v))
        .execute(&mut *tx)
        .await?;
    for table in ["applied", "attempts"] {
        sqlx::query(&format!(
            "DELETE FROM projection.{table} WHERE partition_id IN ( \
               SELECT p.id FROM projection.partitions p JOIN projection.versions v \
                 ON v.id = p.version_id WHERE v.name = $1 AND v.version = $2)"
        ))
        .bind(name)
        .bind(number(version))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM projection.parked WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(number(version))
        .execute(&mut *tx)
        .await?;
    let gone = sqlx::query("DELETE FROM projection.versions WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(number(version))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", v.schema()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(gone > 0)
}
