//! The read model of the payments: per-currency totals, fed by the payment
//! events (the `projection` crate), served on `GET /totals`.
//!
//! ```text
//! cargo run --release -p examples --bin payments-projection
//! cargo run --release -p examples --bin payments-projection -- --source nats
//! cargo run --release -p examples --bin payments-projection -- --source nats --batch 100
//! cargo run --release -p examples --bin payments-projection -- --version 2 --listen 127.0.0.1:3201
//! ```
//!
//! - `--source outbox` (the default) tails the outbox table of `--database`
//!   itself, in commit order (the payments servers with `--transactional
//!   --outbox` write it; no broker, no relay).
//! - `--source rabbitmq` consumes the durable queue `--queue` (default
//!   `payments`), `--source nats` the JetStream stream `--stream` (default
//!   `PAYMENTS`, subjects `payments.>`) through a durable pull consumer from
//!   the stream's start named after the version (`payment_totals_v<N>`),
//!   both through the transactional inbox of `--database` (`outbox-relay`
//!   publishes the events there); `--batch N` applies up to N messages per
//!   transaction (`Projector::apply_batch`), one commit for all.
//!
//! Each event's change to the totals commits with its record that it was
//! applied (the tail's mark, the inbox's row), so an event counts once
//! whatever crashes. Any number of processes may run on one database; each
//! serves the version served (`Projection-Version`) and feeds it. A process
//! started with a higher `--version` builds that version into tables of
//! its own from the history (the outbox's retained events, or the stream
//! from its start) while the old one serves, then switches every process
//! to it. RabbitMQ keeps no history: `--source rabbitmq` refuses a version
//! above the one served (exit 2).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::{Parser, ValueEnum};
use examples::{
    init_tracing, redact_url, ResultExt, Shutdown, StartError, CONNECT_TIMEOUT,
    METRICS_CONTENT_TYPE, PROBLEM_JSON,
};
use inbox_consumer::{InboxMessage, Outcome};
use projection::{
    ApplyError, Event, Finished, Lag, Projection, ProjectionError, Projector, Source, Version,
    VersionState,
};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};

/// The projection's name: its versions' tables live in schemas
/// `payment_totals_v<N>`.
const NAME: &str = "payment_totals";
/// The outbox destination of the payment events.
const DESTINATION: &str = "payments";
const QUEUE: &str = "payments";
const STREAM: &str = "PAYMENTS";
const SUBJECTS: &str = "payments.>";
/// The header naming the version a response was read from.
const VERSION_HEADER: &str = "projection-version";
/// How often a broker-fed version reads its lag from the broker, and
/// whether it is caught up or superseded.
const MEASURE: Duration = Duration::from_secs(1);
/// How long JetStream waits for an ack before it redelivers (after a
/// crash, say).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Deliveries RabbitMQ sends ahead of the acks.
const PREFETCH: u16 = 32;
/// The pause before feeding again after the feed failed.
const RETRY: Duration = Duration::from_secs(1);
/// Connections: a round, the tail's listener and its lag measure, this
/// binary's listener, and the queries of `GET /totals`.
const POOL_SIZE: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceArg {
    /// The outbox table of --database, tailed in commit order.
    Outbox,
    /// The RabbitMQ queue --queue, through the inbox.
    Rabbitmq,
    /// The JetStream stream --stream, through the inbox.
    Nats,
}

/// Per-currency totals of the payments, a read model fed by their events.
#[derive(Debug, Parser)]
#[command(
    after_help = "Routes: GET /totals (200, JSON [{\"currency\", \"total\", \"count\"}] \
                  sorted by currency, header Projection-Version: the version served; 503 \
                  while no version has caught up yet), GET /healthz, GET /metrics (Prometheus \
                  text: projection_events_behind, projection_seconds_behind, \
                  projection_events_applied_total, projection_events_parked_total, ...).\n\
                  Each event counts once: its change commits with its record that it was \
                  applied. A crash (SIGKILL) rolls back the batch in hand, which any process \
                  applies again; nothing is lost nor counted twice. An event that cannot be \
                  applied (a payload that is not a payment) is parked with its reason in \
                  projection.parked, and the events behind it are applied.\n\
                  A higher --version than the one served builds into tables of its own from \
                  the history while the old one serves, then every process serves and feeds \
                  it (RabbitMQ keeps no history: refused with --source rabbitmq). Each \
                  connect is bounded by 5 s; a database or broker that cannot be reached at \
                  startup is an error (exit 1). SIGTERM or Ctrl-C: the batch in hand \
                  commits, exit 0."
)]
struct Args {
    /// Where to serve GET /totals, /healthz and /metrics.
    #[arg(long, default_value = "127.0.0.1:3200")]
    listen: SocketAddr,
    /// The PostgreSQL URL: the read model (and the inbox) live there; with
    /// --source outbox, the outbox it tails too.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    /// Where the payment events come from.
    #[arg(long, value_enum, default_value = "outbox")]
    source: SourceArg,
    /// The version to build and feed (a higher one than the one served
    /// rebuilds, then switches).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    version: u32,
    /// The RabbitMQ URL (`--source rabbitmq`; `amqps://` for TLS).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The durable queue to consume (`--source rabbitmq`; declared when missing).
    #[arg(long, default_value = QUEUE)]
    queue: String,
    /// The NATS URL (`--source nats`; `tls://` for TLS).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The JetStream stream (`--source nats`); with another than `PAYMENTS`,
    /// give `--subject` too.
    #[arg(long, default_value = STREAM)]
    stream: String,
    /// The subjects of the stream when it is created and is not `PAYMENTS`.
    #[arg(long)]
    subject: Option<String>,
    /// With a broker: apply up to N messages per transaction, those that
    /// arrived within `--batch-window` of the first, recorded in the inbox
    /// by one statement and committed once, then acked. A message that
    /// cannot apply sends its batch back through one message at a time. 1
    /// (the default): one message per transaction.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// With `--batch N`: how long a batch waits for more messages after its first.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    batch_window: Duration,
}

/// `--batch` and `--batch-window`.
#[derive(Clone, Copy)]
struct Batching {
    size: usize,
    window: Duration,
}

/// A payment event: `{"account", "amount", "currency", "reference"}`.
#[derive(Deserialize)]
struct Payment {
    amount: i64,
    currency: String,
}

/// Per-currency totals: table `totals` of each version. `total` is a
/// `NUMERIC`: a sum of `BIGINT` amounts may not fit one.
struct Totals;

impl Projection for Totals {
    async fn setup(&self, conn: &mut PgConnection, version: &Version) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "CREATE TABLE {} (currency TEXT PRIMARY KEY, total NUMERIC NOT NULL, \
             count BIGINT NOT NULL)",
            version.table("totals")
        ))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        version: &Version,
        event: &Event,
    ) -> Result<(), ApplyError> {
        // A payload that is not a payment is parked at once.
        let payment: Payment = event.json()?;
        sqlx::query(&format!(
            "INSERT INTO {} AS t (currency, total, count) VALUES ($1, $2, 1) \
             ON CONFLICT (currency) DO UPDATE SET total = t.total + excluded.total, \
               count = t.count + 1",
            version.table("totals")
        ))
        .bind(&payment.currency)
        .bind(payment.amount)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// What the routes share: the projector of the version this process feeds
/// (it reads the version served), replaced when a newer one is served.
#[derive(Clone)]
struct App {
    pool: PgPool,
    fed: Arc<Mutex<Projector<Totals>>>,
}

impl App {
    fn projector(&self) -> Projector<Totals> {
        self.fed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn problem(status: StatusCode, title: &str, detail: String) -> Response {
    let body = serde_json::json!({"title": title, "status": status.as_u16(), "detail": detail});
    let mut res = (
        status,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        body.to_string(),
    )
        .into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// `GET /totals`: the totals of the version served, sorted by currency
/// (bytewise), with `Projection-Version`.
async fn totals(State(app): State<App>) -> Response {
    let projector = app.projector();
    let served = match projector.served_version().await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The read model is still building",
                "No version of the totals has caught up with the events yet.".into(),
            )
        }
        Err(e) => return unavailable(&e),
    };
    // `total` as text: a NUMERIC of any size, written as a JSON number.
    let rows: Result<Vec<(String, String, i64)>, _> = sqlx::query_as(&format!(
        "SELECT currency, total::text, count FROM {} ORDER BY currency COLLATE \"C\"",
        projector.version_of(served).table("totals")
    ))
    .fetch_all(&app.pool)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return unavailable(&e),
    };
    let mut body = String::from("[");
    for (i, (currency, total, count)) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let currency = serde_json::Value::from(currency.as_str());
        body.push_str(&format!(
            r#"{{"currency":{currency},"total":{total},"count":{count}}}"#
        ));
    }
    body.push(']');
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::HeaderName::from_static(VERSION_HEADER),
                served.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

fn unavailable(e: &(dyn std::error::Error + 'static)) -> Response {
    tracing::warn!(error = %examples::error_chain(e), "GET /totals: the database failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "The read model's database is unavailable",
        "The totals could not be read; try again.".into(),
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing("info");
    let args = Args::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

/// Runs a stage of startup unless SIGTERM or Ctrl-C comes first, in which
/// case `run` returns `Ok(())` (exit 0).
macro_rules! stage {
    ($shutdown:expr, $stage:expr) => {
        match $shutdown.during($stage).await {
            Some(result) => result?,
            None => return Ok(()),
        }
    };
}

/// Where the events come from, connected.
#[derive(Clone)]
enum Feed {
    Outbox,
    Rabbitmq {
        url: String,
        queue: String,
        /// For the lag: the queue's ready count, through a connection of
        /// its own (the subscription has another).
        channel: lapin::Channel,
        _connection: Arc<lapin::Connection>,
    },
    Nats {
        js: jetstream::Context,
        stream: Box<jetstream::stream::Config>,
    },
}

async fn run(args: Args) -> Result<(), StartError> {
    // First, so that a signal during startup is not lost.
    let shutdown = Shutdown::install()?;
    // Before the projector, so that its series exist from the start.
    let metrics = examples::install_metrics()?;
    projection::metrics::describe();
    let stream_subjects = match (&args.subject, args.stream == STREAM) {
        (_, true) => SUBJECTS.to_owned(),
        (Some(subject), false) => subject.clone(),
        (None, false) if args.source == SourceArg::Nats => {
            return Err(examples::usage_error(
                "--stream other than PAYMENTS needs --subject",
            ))
        }
        (None, false) => String::new(),
    };
    let what = "the read model's database (PostgreSQL, --database)";
    let pool = stage!(
        shutdown,
        examples::connect_postgres(&args.database, what, POOL_SIZE)
    );
    stage!(shutdown, async {
        projection::migrate(&pool)
            .await
            .context("could not create the projection's tables (--database)")
    });
    let feed = match args.source {
        SourceArg::Outbox => Feed::Outbox,
        SourceArg::Rabbitmq => {
            // RabbitMQ keeps no history: a new version would see only what
            // arrives from now on, and take its share of the queue from
            // the version served.
            let served = stage!(shutdown, async {
                projection::served_version(&pool, NAME)
                    .await
                    .context("could not read the version served (--database)")
            });
            if let Some(served) = served.filter(|s| *s < args.version) {
                return Err(examples::usage_error(format!(
                    "--source rabbitmq cannot build version {} while version {served} is \
                     served: RabbitMQ keeps no history, so the new version would miss every \
                     payment before it started; rebuild with --source outbox or nats",
                    args.version
                )));
            }
            let conn = stage!(shutdown, async {
                inbox_consumer::rabbitmq::connect(&args.amqp, CONNECT_TIMEOUT)
                    .await
                    .context(format!(
                        "could not connect to RabbitMQ at {} (--amqp)",
                        redact_url(&args.amqp)
                    ))
            });
            let channel = stage!(shutdown, async {
                tokio::time::timeout(CONNECT_TIMEOUT, conn.create_channel())
                    .await
                    .context("RabbitMQ did not open a channel in time (--amqp)")?
                    .context("could not open a RabbitMQ channel (--amqp)")
            });
            Feed::Rabbitmq {
                url: args.amqp.clone(),
                queue: args.queue.clone(),
                channel,
                _connection: Arc::new(conn),
            }
        }
        SourceArg::Nats => {
            let client = stage!(shutdown, examples::connect_nats(&args.nats));
            Feed::Nats {
                js: jetstream::new(client),
                stream: Box::new(jetstream::stream::Config {
                    name: args.stream.clone(),
                    subjects: vec![stream_subjects],
                    ..Default::default()
                }),
            }
        }
    };
    let projector = projector_of(&pool, &feed, args.version)?;
    let state = stage!(shutdown, async {
        projector
            .register()
            .await
            .context(format!("could not register version {}", args.version))
    });
    let app = App {
        pool: pool.clone(),
        fed: Arc::new(Mutex::new(projector.clone())),
    };
    let router = Router::new()
        .route("/totals", get(totals))
        .with_state(app.clone())
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text) }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context(format!("could not listen on {} (--listen)", args.listen))?;
    let listen = listener
        .local_addr()
        .context("could not read the address")?;
    tracing::info!(%listen, source = ?args.source, version = args.version, ?state,
        database = %redact_url(&args.database), "payments-projection serving");

    let serving = async {
        examples::serve_axum(vec![listener], router, shutdown.requested()).await;
        Ok::<_, StartError>(())
    };
    let following = follow_switches(&app, shutdown.requested());
    let batching = Batching {
        size: args.batch as usize,
        window: args.batch_window,
    };
    let feeding = feed_versions(&app, &feed, batching, projector, &shutdown);
    tokio::try_join!(serving, following, feeding)?;
    tracing::info!("payments-projection stopped");
    Ok(())
}

/// The projector of version `version` for `feed`.
fn projector_of(pool: &PgPool, feed: &Feed, version: u32) -> Result<Projector<Totals>, StartError> {
    let builder = Projector::builder(pool.clone(), NAME, Totals).version(version);
    let builder = match feed {
        Feed::Outbox => builder.destinations([DESTINATION]),
        Feed::Rabbitmq { .. } | Feed::Nats { .. } => builder.source(Source::Inbox),
    };
    builder
        .build()
        .context("the projection's settings are invalid (--version)")
}

/// How feeding a version ended.
enum Ended {
    Shutdown,
    Superseded(u32),
}

/// Feeds the version of `projector`, then, each time a newer one is served,
/// that one: every process feeds (and serves) the newest version, whatever
/// `--version` it was started with.
async fn feed_versions(
    app: &App,
    feed: &Feed,
    batching: Batching,
    first: Projector<Totals>,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    let mut projector = first;
    loop {
        *app.fed.lock().unwrap_or_else(PoisonError::into_inner) = projector.clone();
        let version = projector.version().number();
        let ended = match feed {
            Feed::Outbox => match projector.run(shutdown.requested()).await {
                Ok(Finished::Superseded { served }) => Ok(Ended::Superseded(served)),
                Ok(_) => Ok(Ended::Shutdown),
                Err(e) => Err(Box::new(e) as StartError),
            },
            Feed::Rabbitmq { .. } | Feed::Nats { .. } => {
                consume(feed, batching, &projector, shutdown).await
            }
        };
        let served = match ended {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Superseded(served)) => served,
            Err(e) if is_outage(&*e) => {
                // The database is down (the registration, the inbox's
                // setup): try again; the tail retries its rounds by itself.
                tracing::warn!(version, error = %examples::error_chain(&*e),
                    "could not feed the version; retrying");
                if shutdown.during(tokio::time::sleep(RETRY)).await.is_none() {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e).context(format!("could not feed version {version}")),
        };
        tracing::info!(
            version,
            served,
            "a newer version is served: serving and feeding it"
        );
        let next = projector_of(&app.pool, feed, served)?;
        match shutdown.during(next.register()).await {
            None => return Ok(()),
            Some(Ok(_)) => projector = next,
            Some(Err(ProjectionError::Registered {
                registered,
                configured,
                ..
            })) => {
                // Processes of another source registered it (outbox tails,
                // say): serve it, and leave feeding it to them.
                *app.fed.lock().unwrap_or_else(PoisonError::into_inner) = next;
                tracing::error!(served, %registered, %configured,
                    "the version served was registered with another source: serving it \
                     without feeding it");
                shutdown.requested().await;
                return Ok(());
            }
            Some(Err(e)) => {
                tracing::warn!(served, error = %examples::error_chain(&e),
                    "could not register the version served; retrying");
                if shutdown.during(tokio::time::sleep(RETRY)).await.is_none() {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether `e` is the database failing (worth retrying).
fn is_outage(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if matches!(
            e.downcast_ref::<ProjectionError>(),
            Some(ProjectionError::Database(_))
        ) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Forgets the version served as soon as another process switches
/// (`NOTIFY projection`), so that `GET /totals` serves the new version at
/// once rather than within the projector's cache TTL (1 s, the fallback
/// when listening fails).
async fn follow_switches(
    app: &App,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let listening = async {
        let mut listener = sqlx::postgres::PgListener::connect_with(&app.pool).await?;
        listener.listen(projection::SWITCH_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let mut listener = tokio::select! {
        () = &mut shutdown => return Ok(()),
        listener = listening => match listener {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for switches; the version served is read every second");
                return Ok(());
            }
        },
    };
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            n = listener.recv() => match n {
                Ok(n) if n.payload() == NAME => {
                    // Reads the version served now, and keeps it.
                    let _ = app.projector().state().await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the switch listener failed; listening again");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            },
        }
    }
}

/// The time in a UUID v7 event id (the outbox's ids): when the event was
/// enqueued.
fn enqueued_at(id: &str) -> Option<SystemTime> {
    let (secs, nanos) = outbox::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// The age of the event a broker-fed version works on: the start of the
/// last message taken, and whether one is in hand.
#[derive(Default)]
struct InHand(Mutex<(Option<SystemTime>, bool)>);

impl InHand {
    fn take(&self, message: &InboxMessage) {
        let at = message.id().and_then(enqueued_at);
        let mut hand = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *hand = (at.or(hand.0), true);
    }

    fn done(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).1 = false;
    }

    /// Seconds behind: the age of the message in hand (or of the last one
    /// taken, while others wait), 0 when none waits.
    fn seconds(&self, waiting: u64) -> f64 {
        let (at, in_hand) = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match at {
            Some(at) if in_hand || waiting > 0 => SystemTime::now()
                .duration_since(at)
                .map_or(0.0, |d| d.as_secs_f64()),
            _ => 0.0,
        }
    }
}

/// Feeds a broker-fed version until shutdown or until a newer version is
/// served: the subscription applies each message through the inbox (acked
/// after the commit) while, every second, the lag is read from the broker
/// and recorded, and the version is switched to once caught up.
async fn consume(
    feed: &Feed,
    batching: Batching,
    projector: &Projector<Totals>,
    shutdown: &Shutdown,
) -> Result<Ended, StartError> {
    let inbox = projector.inbox().await?;
    let (superseded, stop) = tokio::sync::watch::channel(None::<u32>);
    let stopping = {
        let requested = shutdown.requested();
        let mut stop = stop.clone();
        async move {
            tokio::select! {
                () = requested => {}
                _ = stop.wait_for(Option::is_some) => {}
            }
        }
    };
    let hand = InHand::default();
    let (inbox, hand_ref) = (&inbox, &hand);
    let process = move |message: InboxMessage| async move {
        hand_ref.take(&message);
        let outcome: Outcome = projector.apply_message(inbox, &message).await;
        hand_ref.done();
        outcome
    };
    let process_batch = move |messages: Vec<InboxMessage>| async move {
        if let Some(first) = messages.first() {
            hand_ref.take(first);
        }
        let outcomes: Vec<Outcome> = projector.apply_batch(inbox, &messages).await;
        hand_ref.done();
        outcomes
    };
    let Batching { size, window } = batching;
    let consumer = projector.consumer().to_owned();
    let consuming = async {
        match feed {
            Feed::Rabbitmq { url, queue, .. } => {
                let subscription =
                    inbox_consumer::rabbitmq::Subscription::new(url.as_str(), queue.as_str())
                        .consumer_tag(consumer.as_str())
                        .prefetch(PREFETCH)
                        .declare_when_missing()
                        .connect_timeout(CONNECT_TIMEOUT)
                        .batch(size, window);
                if size > 1 {
                    subscription.run_batch(process_batch, stopping).await
                } else {
                    subscription.run(process, stopping).await
                }
                .context(format!(
                    "could not consume the queue {queue} (--amqp, --queue)"
                ))
            }
            Feed::Nats { js, stream } => {
                let subscription =
                    inbox_consumer::nats::Subscription::new(js.clone(), &stream.name, &consumer)
                        .consumer_config(jetstream::consumer::pull::Config {
                            durable_name: Some(consumer.clone()),
                            ack_wait: ACK_WAIT,
                            ..Default::default()
                        })
                        .create_stream_when_missing((**stream).clone())
                        .batch(size, window);
                if size > 1 {
                    subscription.run_batch(process_batch, stopping).await
                } else {
                    subscription.run(process, stopping).await
                }
                .context(format!(
                    "could not consume the stream {} (--nats, --stream)",
                    stream.name
                ))
            }
            Feed::Outbox => Ok(()),
        }
    };
    let measuring = async {
        loop {
            tokio::time::sleep(MEASURE).await;
            if let Some(served) = measure(feed, projector, &consumer, &hand).await {
                let _ = superseded.send(Some(served));
                return;
            }
        }
    };
    let mut consuming = std::pin::pin!(consuming);
    tokio::select! {
        consumed = &mut consuming => consumed?,
        // Superseded: the subscription stops, the message in hand settled
        // first.
        () = measuring => consuming.await?,
    }
    let served = *stop.borrow();
    Ok(match served {
        Some(served) => Ended::Superseded(served),
        None => Ended::Shutdown,
    })
}

/// One measure of a broker-fed version: its lag from the broker, recorded;
/// the switch once caught up. `Some(served)` when a newer version is served.
async fn measure(
    feed: &Feed,
    projector: &Projector<Totals>,
    consumer: &str,
    hand: &InHand,
) -> Option<u32> {
    let waiting = match feed {
        Feed::Rabbitmq { queue, channel, .. } => {
            let declared = channel.queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            );
            match tokio::time::timeout(CONNECT_TIMEOUT, declared).await {
                Ok(Ok(q)) => Some(u64::from(q.message_count())),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "could not read the queue's length");
                    None
                }
                Err(_) => None,
            }
        }
        Feed::Nats { js, stream } => {
            let info = js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                consumer,
                &stream.name,
            );
            match tokio::time::timeout(CONNECT_TIMEOUT, info).await {
                Ok(Ok(c)) => {
                    let info = c.cached_info();
                    Some(info.num_pending + info.num_ack_pending as u64)
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "could not read the consumer's pending count");
                    None
                }
                Err(_) => None,
            }
        }
        Feed::Outbox => None,
    };
    if let Some(waiting) = waiting {
        projector.record_lag(Lag::new(waiting, hand.seconds(waiting)));
    }
    match projector.state().await {
        Ok(VersionState::Superseded { served }) => Some(served),
        Ok(VersionState::Building) => {
            if waiting.is_some_and(|w| w <= projector.config().switch_lag) {
                if let Err(e) = projector.switch().await {
                    tracing::warn!(error = %examples::error_chain(&e), "could not switch");
                }
            }
            None
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %examples::error_chain(&e), "could not read the version served");
            None
        }
    }
}
