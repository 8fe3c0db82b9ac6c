//! The runtime: instances in PostgreSQL, one transaction per transition,
//! workers that run what is due.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use inbox_consumer::{HandlerError, InboxMessage, Outcome, PostgresInbox};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row as _};
use tracing::Instrument;

use crate::definition::{Action, Phase, Reply, Saga, SagaData};
use crate::machine::{Effects, Event, Ignored, Instance, Machine, State, Timer};
use crate::metrics::Metrics;
use crate::trace::Trace;

/// The headers a command carries and its reply must carry back
/// ([`reply_headers`]).
pub mod header {
    /// The instance id.
    pub const ID: &str = "saga-id";
    /// The saga's name.
    pub const NAME: &str = "saga-name";
    /// The action that sent the command.
    pub const ACTION: &str = "saga-action";
    /// `forward` or `compensate`.
    pub const PHASE: &str = "saga-phase";
    /// The attempt that sent it.
    pub const ATTEMPT: &str = "saga-attempt";
}

/// The headers of `command` (a saga's command, as the service's inbox
/// received it) that its reply must carry so the saga can correlate it to
/// the instance and the step: add them to the reply's outbox event.
pub fn reply_headers(command: &InboxMessage) -> Vec<(String, String)> {
    [header::ID, header::NAME, header::ACTION, header::PHASE]
        .into_iter()
        .filter_map(|h| command.header(h).map(|v| (h.to_owned(), v.to_owned())))
        .collect()
}

/// Why the runtime failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The database failed.
    #[error("the saga database failed")]
    Database(#[from] sqlx::Error),
    /// The outbox refused a command.
    #[error("the saga's command could not be enqueued")]
    Outbox(#[from] outbox::OutboxError),
    /// No definition of this name (or of this name and version) is registered.
    #[error("no saga definition `{name}`{}", .version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownSaga {
        /// The name.
        name: String,
        /// The version, when it is the version that is missing.
        version: Option<u32>,
    },
    /// The saga's data cannot be stored.
    #[error("the saga's data cannot be serialized")]
    Data(#[from] serde_json::Error),
    /// An instance with this id exists already.
    #[error("a saga instance `{0}` exists already")]
    Duplicate(String),
}

/// How the workers run.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// How many due instances a worker takes per round (default 16).
    pub batch: u32,
    /// How long an idle worker sleeps between rounds (default 200 ms).
    pub poll_interval: Duration,
    /// How long a claimed call holds its instance before another worker
    /// may make it again (default 30 s; the call's own timeout should be
    /// well below it).
    pub call_lease: Duration,
    /// How often a worker refreshes the `saga_instances` gauges (default 10 s).
    pub gauge_interval: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            batch: 16,
            poll_interval: Duration::from_millis(200),
            call_lease: Duration::from_secs(30),
            gauge_interval: Duration::from_secs(10),
        }
    }
}

/// An instance as it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    /// Its id.
    pub id: String,
    /// The saga's name.
    pub name: String,
    /// The definition version it runs with.
    pub version: u32,
    /// Where it is.
    pub state: State,
    /// The name of the step (or compensation) it is on; `None` once ended.
    pub step: Option<String>,
    /// Whether a command is out and its reply awaited.
    pub waiting: bool,
    /// Its data, as stored (JSON).
    pub data: serde_json::Value,
    /// Why it compensates, or why it failed.
    pub failure: Option<String>,
}

/// One line of an instance's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// What happened: `started`, `sent`, `done`, `failed`, `timed out`,
    /// `calling`, `uncertain`, `compensating`, `completed`, `compensated`.
    pub event: String,
    /// The action it happened to.
    pub step: Option<String>,
    /// More: a reason, an attempt.
    pub detail: Option<String>,
}

/// The runtime of the sagas of a process: their definitions, and the
/// PostgreSQL pool their instances live in. Cheap to clone.
#[derive(Clone)]
pub struct Sagas {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    definitions: HashMap<(&'static str, u32), Arc<dyn Definition>>,
    latest: HashMap<&'static str, u32>,
    config: SagaConfig,
    /// (name, version) pairs already reported as unknown.
    unknown: Mutex<std::collections::HashSet<(String, i32)>>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut known: Vec<_> = self.inner.definitions.keys().collect();
        known.sort();
        f.debug_struct("Sagas")
            .field("definitions", &known)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Creates or updates the saga tables in schema `saga`. Safe from several
/// instances at once.
///
/// # Errors
/// [`SagaError::Database`].
pub async fn migrate(pool: &PgPool) -> Result<(), SagaError> {
    sql_foundation::migrate_postgres(pool, "saga", &MIGRATOR).await?;
    Ok(())
}

/// The builder of [`Sagas`].
pub struct SagasBuilder {
    pool: PgPool,
    definitions: HashMap<(&'static str, u32), Arc<dyn Definition>>,
    config: SagaConfig,
}

impl std::fmt::Debug for SagasBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagasBuilder").finish_non_exhaustive()
    }
}

impl SagasBuilder {
    /// Registers a definition. Register every version that may still have
    /// running instances: an instance runs with the version it started
    /// with; new instances start with the highest.
    #[must_use]
    pub fn register<D: SagaData>(mut self, saga: Saga<D>) -> Self {
        self.definitions
            .insert((saga.name, saga.version), Arc::new(Typed(saga)));
        self
    }

    /// The workers' config.
    #[must_use]
    pub fn config(mut self, config: SagaConfig) -> Self {
        self.config = config;
        self
    }

    /// The runtime.
    pub fn build(self) -> Sagas {
        let mut latest = HashMap::new();
        for (name, version) in self.definitions.keys() {
            let v = latest.entry(*name).or_insert(*version);
            *v = (*v).max(*version);
        }
        Sagas {
            inner: Arc::new(Inner {
                pool: self.pool,
                definitions: self.definitions,
                latest,
                config: self.config,
                unknown: Mutex::default(),
            }),
        }
    }
}

/// What a worker round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Instances it took and moved on: not those another worker held, nor
    /// those whose transition failed (rolled back, still due).
    pub claimed: usize,
    /// Calls it made.
    pub calls: usize,
}

impl Sagas {
    /// A runtime over `pool` (whose schema [`migrate`] created).
    pub fn builder(pool: PgPool) -> SagasBuilder {
        SagasBuilder {
            pool,
            definitions: HashMap::new(),
            config: SagaConfig::default(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Starts saga `name` (its highest registered version) as instance `id`
    /// with `data`, inside `conn`, the caller's transaction: the instance,
    /// its first command (through the outbox) or its first local step, and
    /// its timer commit with the caller's own writes, or not at all.
    ///
    /// # Errors
    /// [`SagaError::UnknownSaga`], [`SagaError::Duplicate`] when `id` is
    /// taken, [`SagaError::Data`], [`SagaError::Database`],
    /// [`SagaError::Outbox`]. After a database error the transaction is
    /// aborted: roll it back.
    pub async fn start<D: SagaData>(
        &self,
        conn: &mut PgConnection,
        name: &str,
        id: &str,
        data: &D,
    ) -> Result<(), SagaError> {
        let (&name, &version) =
            self.inner
                .latest
                .get_key_value(name)
                .ok_or_else(|| SagaError::UnknownSaga {
                    name: name.to_owned(),
                    version: None,
                })?;
        let definition = &self.inner.definitions[&(name, version)];
        let json = serde_json::to_string(data)?;
        #[cfg(not(feature = "trace"))]
        let insert = sqlx::query(
            "INSERT INTO saga.instances (id, name, version, state, step, data) \
             VALUES ($1, $2, $3, 'running', 0, $4::jsonb) ON CONFLICT (id) DO NOTHING",
        );
        // The trace its steps continue: the starter's.
        #[cfg(feature = "trace")]
        let insert = sqlx::query(
            "INSERT INTO saga.instances (id, name, version, state, step, data, traceparent) \
             VALUES ($1, $2, $3, 'running', 0, $4::jsonb, $5) ON CONFLICT (id) DO NOTHING",
        );
        let insert = insert
            .bind(id)
            .bind(name)
            .bind(i32::try_from(version).unwrap_or(i32::MAX))
            .bind(&json);
        #[cfg(feature = "trace")]
        let traceparent = outbox::trace::Traceparent::current();
        #[cfg(feature = "trace")]
        let insert = insert.bind(traceparent.as_ref().map(outbox::trace::Traceparent::as_str));
        let inserted = insert.execute(&mut *conn).await?.rows_affected();
        if inserted == 0 {
            return Err(SagaError::Duplicate(id.to_owned()));
        }
        let row = load(conn, id)
            .await?
            .ok_or_else(|| SagaError::Duplicate(id.to_owned()))?;
        definition.start(conn, row).await
    }

    /// Handles `message`, a reply to one of this process's sagas, inside
    /// `conn`, the inbox's transaction (see [`process_reply`](Self::process_reply)):
    /// the instance is locked, the reply applied, the next commands
    /// enqueued and the timer set or cleared, all in that transaction.
    ///
    /// A reply for an unknown instance, or for a step the instance is not
    /// waiting for (a duplicate, a late reply after a timeout), changes
    /// nothing and is acknowledged (logged at `info`). A message that is no
    /// saga reply, or a reply the step cannot read, is a permanent failure:
    /// the inbox dead-letters it.
    ///
    /// # Errors
    /// [`HandlerError::permanent`] as above; [`HandlerError::transient`]
    /// when the database fails or the instance's definition version is not
    /// registered here (another process may know it).
    pub async fn handle_reply(
        &self,
        conn: &mut PgConnection,
        message: &InboxMessage,
    ) -> Result<(), HandlerError> {
        let (id, action, phase) = correlation(message).map_err(HandlerError::permanent)?;
        let Some(row) = load(conn, id).await.map_err(HandlerError::transient)? else {
            tracing::info!(
                saga.instance = id,
                action,
                "saga: a reply for an unknown instance; acknowledged, nothing changes"
            );
            return Ok(());
        };
        let definition = self.definition(&row).map_err(HandlerError::transient)?;
        let reply = Reply::new(message.payload().clone());
        definition.reply(conn, row, action, phase, &reply).await
    }

    /// [`handle_reply`](Self::handle_reply) through `inbox` (the transactional
    /// inbox of the saga's reply queue): the inbox mark and the transition
    /// commit together. Ack the message as the outcome says.
    pub async fn process_reply(&self, inbox: &PostgresInbox, message: &InboxMessage) -> Outcome {
        let sagas = self.clone();
        inbox
            .process(message, move |tx, message| {
                Box::pin(async move { sagas.handle_reply(tx, message).await })
            })
            .await
    }

    /// One worker round: takes up to `batch` due instances (skipping those
    /// another worker holds, and those of a definition version this process
    /// does not know), times out waits, retries, runs local steps, and makes
    /// the calls that are due (outside any transaction, each under its
    /// stable idempotency key), each instance in transactions of its own.
    ///
    /// # Errors
    /// [`SagaError::Database`] when the due instances cannot be read.
    pub async fn run_due(&self) -> Result<Round, SagaError> {
        let inner = &*self.inner;
        let (names, versions): (Vec<&str>, Vec<i32>) = inner
            .definitions
            .keys()
            .map(|(n, v)| (*n, i32::try_from(*v).unwrap_or(i32::MAX)))
            .unzip();
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT i.id FROM saga.instances i \
             JOIN unnest($1::text[], $2::int4[]) AS k(name, version) \
               ON i.name = k.name AND i.version = k.version \
             WHERE i.due_at <= now() AND i.state IN ('running', 'compensating') \
             ORDER BY i.due_at LIMIT $3",
        )
        .bind(&names)
        .bind(&versions)
        .bind(i64::from(inner.config.batch.max(1)))
        .fetch_all(&inner.pool)
        .await?;
        self.report_unknown_versions(&names, &versions).await;
        let mut round = Round::default();
        let mut calls = Vec::new();
        for id in &due {
            match self.due_one(id).await {
                Ok(Taken::Moved(call)) => {
                    round.claimed += 1;
                    calls.extend(call);
                }
                Ok(Taken::No) => {}
                // Not counted: a round that moved nothing on is followed by
                // a pause, so an instance whose transition keeps failing is
                // tried once per poll interval, not in a loop.
                Err(e) => {
                    tracing::warn!(saga.instance = %id, error = %error_chain(&e), "saga: a due transition failed; retried on a later round")
                }
            }
        }
        round.calls = calls.len();
        // The calls of this round run side by side.
        for result in futures_util::future::join_all(calls).await {
            if let Err(e) = result {
                tracing::warn!(error = %error_chain(&e), "saga: recording a call's outcome failed; the call is made again after its lease");
            }
        }
        Ok(round)
    }

    /// Runs worker rounds until `shutdown` resolves: back to back while
    /// rounds move instances on, every poll interval when one moves none
    /// (nothing due, all of it held by other workers, or failing). A round in hand is
    /// finished first. Database errors are logged and retried.
    pub async fn run<F: Future<Output = ()>>(&self, shutdown: F) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut gauges = Instant::now() - self.inner.config.gauge_interval;
        loop {
            if gauges.elapsed() >= self.inner.config.gauge_interval {
                gauges = Instant::now();
                if let Err(e) = self.refresh_gauges().await {
                    tracing::warn!(error = %error_chain(&e), "saga: counting instances failed");
                }
            }
            let pause = match self.run_due().await {
                Ok(round) if round.claimed > 0 => None,
                Ok(_) => Some(self.inner.config.poll_interval),
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "saga: a worker round failed; retrying");
                    Some(
                        self.inner
                            .config
                            .poll_interval
                            .max(Duration::from_millis(500)),
                    )
                }
            };
            let pause = pause.unwrap_or(Duration::ZERO);
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The instance `id`, if any.
    ///
    /// # Errors
    /// [`SagaError::Database`].
    pub async fn instance(&self, id: &str) -> Result<Option<InstanceView>, SagaError> {
        let mut conn = self.inner.pool.acquire().await?;
        let Some(row) = load_unlocked(&mut conn, id).await? else {
            return Ok(None);
        };
        let step = self
            .find(&row.name, row.version)
            .and_then(|d| d.action_name(row.state, row.step));
        Ok(Some(InstanceView {
            id: row.id,
            name: row.name,
            version: row.version,
            state: row.state,
            step: if row.state.is_final() {
                None
            } else {
                step.map(str::to_owned)
            },
            waiting: row.waiting,
            data: serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null),
            failure: row.failure,
        }))
    }

    /// What happened to instance `id`, in order.
    ///
    /// # Errors
    /// [`SagaError::Database`].
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, SagaError> {
        let rows = sqlx::query(
            "SELECT event, step, detail FROM saga.history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    event: r.try_get("event")?,
                    step: r.try_get("step")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(SagaError::from)
    }

    /// How many instances are in each state, per saga.
    ///
    /// # Errors
    /// [`SagaError::Database`].
    pub async fn count_by_state(&self) -> Result<Vec<(String, State, u64)>, SagaError> {
        let rows = sqlx::query(
            "SELECT name, state, count(*) AS n FROM saga.instances GROUP BY name, state",
        )
        .fetch_all(&self.inner.pool)
        .await?;
        let mut counts = Vec::new();
        for r in rows {
            let state: String = r.try_get("state")?;
            let Some(state) = State::parse(&state) else {
                continue;
            };
            let n: i64 = r.try_get("n")?;
            counts.push((r.try_get("name")?, state, u64::try_from(n).unwrap_or(0)));
        }
        Ok(counts)
    }

    async fn refresh_gauges(&self) -> Result<(), SagaError> {
        let counts = self.count_by_state().await?;
        for name in self.inner.latest.keys() {
            for state in State::ALL {
                let n = counts
                    .iter()
                    .find(|(s, st, _)| s == name && *st == state)
                    .map_or(0, |(_, _, n)| *n);
                Metrics::instances(name, state, n);
            }
        }
        Ok(())
    }

    /// The definition `name` `version`, if registered.
    fn find(&self, name: &str, version: u32) -> Option<&Arc<dyn Definition>> {
        let (&name, _) = self.inner.latest.get_key_value(name)?;
        self.inner.definitions.get(&(name, version))
    }

    fn definition(&self, row: &Row) -> Result<&Arc<dyn Definition>, SagaError> {
        self.find(&row.name, row.version)
            .ok_or_else(|| SagaError::UnknownSaga {
                name: row.name.clone(),
                version: Some(row.version),
            })
    }

    /// One due instance: its transition, in a transaction of its own. A
    /// call that is due is claimed here and returned, to be made after the
    /// commit.
    async fn due_one(&self, id: &str) -> Result<Taken, SagaError> {
        let mut tx = self.inner.pool.begin().await?;
        let row = sqlx::query(&format!(
            "{SELECT_INSTANCE} WHERE id = $1 AND due_at <= now() \
             AND state IN ('running', 'compensating') FOR UPDATE SKIP LOCKED"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row.map(|r| Row::from_pg(&r)).transpose()? else {
            // Another worker took it, or it is no longer due.
            return Ok(Taken::No);
        };
        let definition = Arc::clone(self.definition(&row)?);
        let call = definition
            .due(&mut tx, row, self.inner.config.call_lease)
            .await?;
        tx.commit().await?;
        Ok(Taken::Moved(call.map(|call| {
            let sagas = self.clone();
            Box::pin(async move {
                let (id, attempt, phase, outcome) = call.await;
                let mut tx = sagas.inner.pool.begin().await?;
                let Some(row) = load(&mut tx, &id).await? else {
                    return Ok(());
                };
                let definition = Arc::clone(sagas.definition(&row)?);
                definition
                    .called(&mut tx, row, attempt, phase, outcome)
                    .await?;
                tx.commit().await?;
                Ok(())
            }) as BoxFuture<'static, Result<(), SagaError>>
        })))
    }

    /// Logs, once per (name, version), due instances of a definition
    /// version this process does not know: it leaves them alone.
    async fn report_unknown_versions(&self, names: &[&str], versions: &[i32]) {
        let rows = sqlx::query(
            "SELECT DISTINCT i.name, i.version FROM saga.instances i \
             WHERE i.due_at <= now() AND i.state IN ('running', 'compensating') \
               AND NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::int4[]) AS k(name, version) \
                               WHERE k.name = i.name AND k.version = i.version) \
             LIMIT 16",
        )
        .bind(names)
        .bind(versions)
        .fetch_all(&self.inner.pool)
        .await;
        let Ok(rows) = rows else {
            return;
        };
        for r in rows {
            let (Ok(name), Ok(version)) = (
                r.try_get::<String, _>("name"),
                r.try_get::<i32, _>("version"),
            ) else {
                continue;
            };
            let new = self
                .inner
                .unknown
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((name.clone(), version));
            if new {
                tracing::warn!(saga = %name, version, "saga: due instances of a definition version this process does not know are left alone; run a worker that registers it");
            }
        }
    }
}

/// An error with its causes, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A reply's correlation headers: the instance, the action, the phase.
fn correlation(message: &InboxMessage) -> Result<(&str, &str, Phase), String> {
    let id = message
        .header(header::ID)
        .ok_or("not a saga reply: no saga-id header")?;
    let action = message
        .header(header::ACTION)
        .ok_or("not a saga reply: no saga-action header")?;
    let phase = message
        .header(header::PHASE)
        .and_then(Phase::parse)
        .ok_or("not a saga reply: no valid saga-phase header")?;
    Ok((id, action, phase))
}

const SELECT_INSTANCE: &str = concat!(
    "SELECT id, name, version, state, step, waiting, attempt, data::text AS data, \
     failure, EXTRACT(EPOCH FROM (now() - step_started_at))::float8 AS on_step",
    crate::trace::trace_column!(),
    " FROM saga.instances"
);

/// An instance's row.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    id: String,
    name: String,
    version: u32,
    state: State,
    step: usize,
    waiting: bool,
    attempt: u32,
    data: String,
    failure: Option<String>,
    /// Seconds since its current step started.
    on_step: f64,
    /// The trace its steps continue.
    trace: Trace,
}

impl Row {
    fn from_pg(r: &PgRow) -> Result<Self, sqlx::Error> {
        let state: String = r.try_get("state")?;
        let step: i32 = r.try_get("step")?;
        let attempt: i32 = r.try_get("attempt")?;
        let version: i32 = r.try_get("version")?;
        Ok(Self {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            version: u32::try_from(version).unwrap_or(0),
            // An unknown state is handled as failed: nothing runs it.
            state: State::parse(&state).unwrap_or(State::Failed),
            step: usize::try_from(step).unwrap_or(0),
            waiting: r.try_get("waiting")?,
            attempt: u32::try_from(attempt).unwrap_or(0),
            data: r.try_get("data")?,
            failure: r.try_get("failure")?,
            on_step: r.try_get::<Option<f64>, _>("on_step")?.unwrap_or(0.0),
            trace: Trace::of_row(r)?,
        })
    }
}

/// Loads and locks instance `id`.
async fn load(conn: &mut PgConnection, id: &str) -> Result<Option<Row>, sqlx::Error> {
    let row = sqlx::query(&format!("{SELECT_INSTANCE} WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| Row::from_pg(&r)).transpose()
}

async fn load_unlocked(conn: &mut PgConnection, id: &str) -> Result<Option<Row>, sqlx::Error> {
    let row = sqlx::query(&format!("{SELECT_INSTANCE} WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| Row::from_pg(&r)).transpose()
}

/// What became of a due instance in a round.
enum Taken {
    /// Another worker held it, or it was no longer due.
    No,
    /// Its transition committed; with the call it claimed, if any, to make
    /// now.
    Moved(Option<BoxFuture<'static, Result<(), SagaError>>>),
}

/// A call's result, as it travels from the call to its transition.
type Called = (String, u32, Phase, serde_json::Result<CalledOutcome>);

/// A call's outcome with the data as JSON (the definition's type erased).
pub(crate) enum CalledOutcome {
    Done(String),
    Failed(String),
    Uncertain(String),
}

/// A saga definition with its data type erased, so one runtime holds many.
trait Definition: Send + Sync {
    fn action_name(&self, state: State, step: usize) -> Option<&'static str>;

    fn start<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
    ) -> BoxFuture<'a, Result<(), SagaError>>;

    fn reply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
        action: &'a str,
        phase: Phase,
        reply: &'a Reply,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    fn due<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<BoxFuture<'static, Called>>, SagaError>>;

    fn called<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
        attempt: u32,
        phase: Phase,
        outcome: serde_json::Result<CalledOutcome>,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
}

struct Typed<D>(Saga<D>);

impl<D: SagaData> Typed<D> {
    /// The instance of `row`, or `Err` when its data does not decode: the
    /// instance is then marked failed with the reason.
    async fn instance(
        &self,
        conn: &mut PgConnection,
        row: Row,
    ) -> Result<Option<Instance<D>>, SagaError> {
        match serde_json::from_str::<D>(&row.data) {
            Ok(data) => Ok(Some(Instance {
                id: row.id,
                state: row.state,
                step: row.step,
                waiting: row.waiting,
                attempt: row.attempt,
                data,
                failure: row.failure,
            })),
            Err(e) => {
                let reason = format!("its data does not decode as this definition's: {e}");
                tracing::error!(saga = self.0.name, saga.instance = %row.id, reason, "saga: instance failed");
                sqlx::query(
                    "UPDATE saga.instances SET state = 'failed', failure = $2, due_at = NULL, \
                     waiting = false, updated_at = now() WHERE id = $1",
                )
                .bind(&row.id)
                .bind(&reason)
                .execute(&mut *conn)
                .await?;
                history(conn, &row.id, &[("failed", None, Some(reason))]).await?;
                Metrics::ended(self.0.name, State::Failed);
                Ok(None)
            }
        }
    }

    /// Runs the local actions the effects ask for (each in a savepoint, so
    /// a failing one leaves no writes behind), feeding their results back.
    async fn run_locals(
        &self,
        conn: &mut PgConnection,
        inst: &mut Instance<D>,
        fx: &mut Effects,
        trace: &Trace,
    ) -> Result<(), SagaError> {
        let machine = Machine::new(&self.0);
        while let Some(ctx) = fx.local.take() {
            let Some(Action::Local(run)) = machine.current(inst).map(|s| &s.action) else {
                break;
            };
            let span = trace.continued(tracing::info_span!("saga.step", saga = self.0.name, saga.instance = %inst.id, action = ctx.action, phase = ctx.phase.as_str(), attempt = ctx.attempt));
            sqlx::query("SAVEPOINT saga_local")
                .execute(&mut *conn)
                .await?;
            let mut data = inst.data.clone();
            let result = run(&mut data, conn, ctx).instrument(span).await;
            if result.is_ok() {
                sqlx::query("RELEASE SAVEPOINT saga_local")
                    .execute(&mut *conn)
                    .await?;
                inst.data = data;
            } else {
                sqlx::query("ROLLBACK TO SAVEPOINT saga_local")
                    .execute(&mut *conn)
                    .await?;
            }
            let _ = machine.handle(inst, Event::Local(result), fx);
        }
        Ok(())
    }

    /// Writes what a transition did, in its transaction.
    async fn write(
        &self,
        conn: &mut PgConnection,
        inst: &Instance<D>,
        fx: &Effects,
        on_step: f64,
        trace: &Trace,
    ) -> Result<(), SagaError> {
        let (timer, millis) = match fx.timer {
            Timer::Keep => (0_i16, 0_i64),
            Timer::Clear => (1, 0),
            Timer::After(d) => (2, sql_foundation::millis(d)),
        };
        let data = serde_json::to_string(&inst.data)?;
        sqlx::query(
            "UPDATE saga.instances SET \
               step_started_at = CASE WHEN step <> $3 OR state <> $2 THEN now() ELSE step_started_at END, \
               state = $2, step = $3, waiting = $4, attempt = $5, \
               due_at = CASE $6 WHEN 0 THEN due_at WHEN 1 THEN NULL ELSE now() + $7 * interval '1 millisecond' END, \
               data = $8::jsonb, failure = $9, updated_at = now() \
             WHERE id = $1",
        )
        .bind(&inst.id)
        .bind(inst.state.as_str())
        .bind(i32::try_from(inst.step).unwrap_or(i32::MAX))
        .bind(inst.waiting)
        .bind(i32::try_from(inst.attempt).unwrap_or(i32::MAX))
        .bind(timer)
        .bind(millis)
        .bind(&data)
        .bind(&inst.failure)
        .execute(&mut *conn)
        .await?;
        for (command, ctx) in &fx.commands {
            let mut event =
                outbox::Event::new(command.destination.clone(), command.payload.clone())
                    // One instance's commands reach the broker in order.
                    .with_ordering_key(inst.id.clone())
                    .with_header(header::ID, inst.id.clone())
                    .with_header(header::NAME, self.0.name)
                    .with_header(header::ACTION, ctx.action)
                    .with_header(header::PHASE, ctx.phase.as_str())
                    .with_header(header::ATTEMPT, ctx.attempt.to_string());
            for (name, value) in &command.headers {
                event = event.with_header(name.clone(), value.clone());
            }
            let enqueue = outbox::enqueue(&mut *conn, &event);
            // The command's step span (feature `trace`): the outbox stores
            // its context with the command, so the participant continues it.
            #[cfg(feature = "trace")]
            let enqueue = enqueue.instrument(trace.continued(tracing::info_span!("saga.step", saga = self.0.name, saga.instance = %inst.id, action = ctx.action, phase = ctx.phase.as_str(), attempt = ctx.attempt)));
            #[cfg(not(feature = "trace"))]
            let _ = trace;
            enqueue.await?;
        }
        let entries: Vec<_> = fx
            .history
            .iter()
            .map(|e| (e.event, e.action, e.detail.clone()))
            .collect();
        history(conn, &inst.id, &entries).await?;
        for (action, outcome) in &fx.ended {
            Metrics::step(self.0.name, action, outcome, on_step);
        }
        if inst.state.is_final() {
            Metrics::ended(self.0.name, inst.state);
        }
        if fx.history.iter().any(|e| e.event == "compensating") {
            Metrics::compensation(self.0.name);
        }
        Ok(())
    }

    /// Applies `event` to `row`'s instance and writes the effects; `Err`
    /// when the machine ignored it (nothing written).
    async fn apply(
        &self,
        conn: &mut PgConnection,
        mut row: Row,
        event: Event<'_, D>,
    ) -> Result<Result<(), Ignored>, SagaError> {
        let on_step = row.on_step;
        let trace = std::mem::take(&mut row.trace);
        let Some(mut inst) = self.instance(conn, row).await? else {
            return Ok(Ok(()));
        };
        let mut fx = Effects::default();
        if let Err(ignored) = Machine::new(&self.0).handle(&mut inst, event, &mut fx) {
            return Ok(Err(ignored));
        }
        self.run_locals(conn, &mut inst, &mut fx, &trace).await?;
        self.write(conn, &inst, &fx, on_step, &trace).await?;
        Ok(Ok(()))
    }
}

impl<D: SagaData> Definition for Typed<D> {
    fn action_name(&self, state: State, step: usize) -> Option<&'static str> {
        let step = self.0.steps.get(step)?;
        match state {
            State::Compensating => step.compensation.as_ref().map(|c| c.name),
            _ => Some(step.name),
        }
    }

    fn start<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(async move {
            self.apply(conn, row, Event::Start).await?.ok();
            Ok(())
        })
    }

    fn reply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
        action: &'a str,
        phase: Phase,
        reply: &'a Reply,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let id = row.id.clone();
            let event = Event::Reply {
                action,
                phase,
                reply,
            };
            match self.apply(conn, row, event).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(Ignored::NotWaiting(why))) => {
                    tracing::info!(saga = self.0.name, saga.instance = %id, action, why, "saga: a reply changes nothing; acknowledged");
                    Ok(())
                }
                Ok(Err(Ignored::Undecodable(why))) => Err(HandlerError::permanent(format!(
                    "saga `{}` instance `{id}`: the reply to `{action}` cannot be read: {why}",
                    self.0.name
                ))),
                Err(e) => Err(HandlerError::transient(e)),
            }
        })
    }

    fn due<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        mut row: Row,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<BoxFuture<'static, Called>>, SagaError>> {
        Box::pin(async move {
            let on_step = row.on_step;
            let trace = std::mem::take(&mut row.trace);
            let Some(mut inst) = self.instance(conn, row).await? else {
                return Ok(None);
            };
            let machine = Machine::new(&self.0);
            let mut fx = Effects::default();
            if let Some(ctx) = machine.claim_call(&mut inst, lease, &mut fx) {
                self.write(conn, &inst, &fx, on_step, &trace).await?;
                let Some(Action::Call(call)) = machine.current(&inst).map(|s| s.action.clone())
                else {
                    return Ok(None);
                };
                let (data, id, attempt) = (inst.data.clone(), inst.id.clone(), inst.attempt);
                let span = trace.continued(tracing::info_span!("saga.step", saga = self.0.name, saga.instance = %id, action = ctx.action, phase = ctx.phase.as_str(), attempt));
                let started = Instant::now();
                let (saga, action, phase) = (self.0.name, ctx.action, ctx.phase);
                let call = async move {
                    let outcome = call(data, ctx).await;
                    Metrics::call(saga, action, &outcome, started.elapsed());
                    let outcome = match outcome {
                        crate::CallOutcome::Done(d) => {
                            serde_json::to_string(&d).map(CalledOutcome::Done)
                        }
                        crate::CallOutcome::Failed(r) => Ok(CalledOutcome::Failed(r)),
                        crate::CallOutcome::Uncertain(r) => Ok(CalledOutcome::Uncertain(r)),
                    };
                    (id, attempt, phase, outcome)
                }
                .instrument(span);
                return Ok(Some(Box::pin(call) as BoxFuture<'static, Called>));
            }
            match machine.handle(&mut inst, Event::Due, &mut fx) {
                Ok(()) => {
                    if fx.history.iter().any(|e| e.event == "timed out") {
                        if let Some(step) = machine.current(&inst) {
                            Metrics::timeout(self.0.name, step.name);
                        }
                    }
                    self.run_locals(conn, &mut inst, &mut fx, &trace).await?;
                    self.write(conn, &inst, &fx, on_step, &trace).await?;
                }
                Err(ignored) => {
                    // Nothing to do at this timer (a stale one): clear it.
                    tracing::debug!(saga.instance = %inst.id, ?ignored, "saga: a due timer with nothing to do");
                    let fx = Effects {
                        timer: Timer::Clear,
                        ..Effects::default()
                    };
                    self.write(conn, &inst, &fx, on_step, &trace).await?;
                }
            }
            Ok(None)
        })
    }

    fn called<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        row: Row,
        attempt: u32,
        phase: Phase,
        outcome: serde_json::Result<CalledOutcome>,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(async move {
            let outcome = match outcome? {
                CalledOutcome::Done(json) => {
                    crate::CallOutcome::Done(serde_json::from_str::<D>(&json)?)
                }
                CalledOutcome::Failed(r) => crate::CallOutcome::Failed(r),
                CalledOutcome::Uncertain(r) => crate::CallOutcome::Uncertain(r),
            };
            let id = row.id.clone();
            if let Err(ignored) = self
                .apply(
                    conn,
                    row,
                    Event::Called {
                        attempt,
                        phase,
                        outcome,
                    },
                )
                .await?
            {
                tracing::info!(saga = self.0.name, saga.instance = %id, ?ignored, "saga: a call's outcome changes nothing (fenced)");
            }
            Ok(())
        })
    }
}

/// Appends `entries` to the history of instance `id`.
async fn history(
    conn: &mut PgConnection,
    id: &str,
    entries: &[(&str, Option<&str>, Option<String>)],
) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let events: Vec<&str> = entries.iter().map(|e| e.0).collect();
    let steps: Vec<Option<&str>> = entries.iter().map(|e| e.1).collect();
    let details: Vec<Option<String>> = entries.iter().map(|e| e.2.clone()).collect();
    sqlx::query(
        "INSERT INTO saga.history (instance_id, event, step, detail) \
         SELECT $1, e, s, d FROM unnest($2::text[], $3::text[], $4::text[]) AS h(e, s, d)",
    )
    .bind(id)
    .bind(&events)
    .bind(&steps)
    .bind(&details)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
