//! Relays the transactional outbox of a PostgreSQL database to RabbitMQ or
//! NATS JetStream (the `outbox` crate). Several may run on one database.
//!
//! ```text
//! cargo run --release -p examples --bin outbox-relay -- --broker rabbitmq
//! cargo run --release -p examples --bin outbox-relay -- --broker nats --enqueue 1000
//! ```
//!
//! - RabbitMQ: destination `payments` goes to the durable queue `payments`
//!   (`--queue` names another; declared when missing) through the default
//!   exchange, as a persistent message with `message_id` = the event id,
//!   under publisher confirms. Any other destination goes to the queue of
//!   its name.
//! - NATS: destination `D` goes to subject `D.created` (`payments` →
//!   `payments.created`) in stream `PAYMENTS` (subjects `payments.>`; created
//!   when missing, used as it is when present), with `Nats-Msg-Id` = the
//!   event id. `--stream NAME --subject S` send destination `payments` to
//!   subject `S` in stream `NAME` (subjects `S`) instead.
//!
//! SIGTERM or Ctrl-C: the batch in hand is published and marked, then the
//! relay exits 0; during startup (connecting, migrating), it exits 0 at
//! once. Each connect (PostgreSQL, RabbitMQ, NATS) is bounded by 5 s: at
//! startup, one that fails or does not answer is an error naming what and
//! where (exit 1); later, a lost broker is retried (the reason logged at
//! WARN). `--enqueue N` first writes N demo events (destination
//! `payments`, ordering keys `acct-0`..`acct-9`) in one transaction.
//! `--metrics-listen ADDR` serves Prometheus metrics on `GET /metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use clap::{Parser, ValueEnum};
use examples::{redact_url, ResultExt, Shutdown, StartError, CONNECT_TIMEOUT};
use outbox::nats::NatsPublisher;
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{Event, Outgoing, PostgresRelay, PublishError, Publisher, RelayConfig};

const STREAM: &str = "PAYMENTS";
const SUBJECTS: &str = "payments.>";
const QUEUE: &str = "payments";
/// The longest delay between retries of a failed event (unless
/// `--retry-delay` is longer).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Broker {
    Rabbitmq,
    Nats,
}

/// Publish the outbox's events to a broker, at least once, in order per key.
#[derive(Debug, Parser)]
struct Args {
    /// The PostgreSQL URL (the outbox lives in its schema `outbox`).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    /// Where to publish.
    #[arg(long, value_enum, default_value = "rabbitmq")]
    broker: Broker,
    /// The RabbitMQ URL (`--broker rabbitmq`; `amqps://` for TLS).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The NATS URL (`--broker nats`; `tls://` for TLS).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The durable queue destination `payments` goes to (`--broker rabbitmq`).
    #[arg(long, default_value = QUEUE)]
    queue: String,
    /// The JetStream stream (`--broker nats`); with another than `PAYMENTS`,
    /// give `--subject` too.
    #[arg(long, default_value = STREAM)]
    stream: String,
    /// The subject destination `payments` goes to (`--broker nats`; default
    /// `payments.created`); the stream is created with this subject alone
    /// when it is not `PAYMENTS`.
    #[arg(long)]
    subject: Option<String>,
    /// Events claimed per batch, of each kind (keyed, keyless).
    #[arg(long, default_value_t = outbox::config::DEFAULT_BATCH_SIZE)]
    batch_size: u32,
    /// Failed publishes before an event is dead (a refusal counts, a broker
    /// outage does not); a dead event waits for an operator
    /// (`messaging-admin outbox retry`).
    #[arg(long, value_name = "N", default_value_t = outbox::config::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// The delay before the first retry of a failed event, doubled after
    /// each further failure (up to 5 min, or this delay when it is longer).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_delay: Duration,
    /// How often to look for work without a notification.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Write this many demo events before relaying.
    #[arg(long, default_value_t = 0)]
    enqueue: u32,
    /// Serve Prometheus metrics on `GET /metrics` at this address (off by
    /// default: several relays may run on one machine).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    examples::init_tracing("info,outbox=info");
    let args = Args::parse();
    let config = match RelayConfig::builder()
        .batch_size(args.batch_size)
        .max_attempts(args.max_attempts)
        .retry_delay(args.retry_delay, args.retry_delay.max(MAX_RETRY_DELAY))
        .poll_interval(args.poll_interval)
        .build()
    {
        Ok(config) => config,
        Err(e) => {
            // Wrong flags: retrying the same command cannot help (exit 2).
            eprintln!(
                "{}: the relay settings are invalid: {e}",
                env!("CARGO_BIN_NAME")
            );
            return std::process::ExitCode::from(2);
        }
    };
    examples::finish(env!("CARGO_BIN_NAME"), run(args, config).await)
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

async fn run(args: Args, config: RelayConfig) -> Result<(), StartError> {
    // Installed first, so a SIGTERM during startup is not lost.
    let shutdown = Shutdown::install()?;
    examples::serve_metrics(args.metrics_listen).await?;
    let pool = stage!(
        shutdown,
        examples::connect_postgres(&args.database, "PostgreSQL (--database)", 10)
    );
    stage!(shutdown, async {
        outbox::migrate_postgres(&pool)
            .await
            .context("could not create the outbox table")
    });
    if args.enqueue > 0 {
        stage!(shutdown, enqueue_demo(&pool, args.enqueue));
    }
    match args.broker {
        Broker::Rabbitmq => {
            let publisher = stage!(shutdown, async {
                RabbitMqPublisher::connect_with_timeout(args.amqp.as_str(), CONNECT_TIMEOUT)
                    .await
                    .context(format!(
                        "could not connect to RabbitMQ at {} (--amqp)",
                        redact_url(&args.amqp)
                    ))
            });
            stage!(shutdown, async {
                publisher.declare_queue(&args.queue).await.context(format!(
                    "could not declare the queue {} (--queue)",
                    args.queue
                ))
            });
            tracing::info!(queue = %args.queue, "relaying to RabbitMQ");
            if args.queue == QUEUE {
                relay(pool, publisher, config, shutdown.requested()).await
            } else {
                let publisher = Renamed {
                    inner: publisher,
                    to: args.queue,
                };
                relay(pool, publisher, config, shutdown.requested()).await
            }
        }
        Broker::Nats => {
            let subjects = match (&args.subject, args.stream == STREAM) {
                (_, true) => SUBJECTS.to_owned(),
                (Some(subject), false) => subject.clone(),
                (None, false) => {
                    return Err(examples::usage_error(
                        "--stream other than PAYMENTS needs --subject",
                    ));
                }
            };
            let client = stage!(shutdown, examples::connect_nats(&args.nats));
            let js = jetstream::new(client);
            stage!(shutdown, async {
                js.get_or_create_stream(jetstream::stream::Config {
                    name: args.stream.clone(),
                    subjects: vec![subjects],
                    ..Default::default()
                })
                .await
                .context(format!(
                    "could not open or create the stream {} (--stream)",
                    args.stream
                ))
            });
            let subject = args.subject.clone();
            let publisher = NatsPublisher::new(js, move |destination| {
                Some(match &subject {
                    Some(s) if destination == QUEUE => s.clone(),
                    _ => format!("{destination}.created"),
                })
            });
            tracing::info!(stream = %args.stream, "relaying to NATS JetStream");
            relay(pool, publisher, config, shutdown.requested()).await
        }
    }
}

/// `--queue`: destination `payments` goes to the queue `to`; the event is
/// otherwise unchanged (id, ordering key, headers, payload).
struct Renamed<P> {
    inner: P,
    to: String,
}

impl<P: Publisher> Publisher for Renamed<P> {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let renamed: Vec<Outgoing> = batch
            .iter()
            .map(|o| {
                let e = o.event();
                if e.destination() != QUEUE {
                    return o.clone();
                }
                let mut event = Event::new(self.to.as_str(), e.payload().clone()).with_id(e.id());
                if let Some(key) = e.ordering_key() {
                    event = event.with_ordering_key(key);
                }
                for (name, value) in e.headers() {
                    event = event.with_header(name.as_str(), value.as_str());
                }
                Outgoing::new(o.seq(), o.attempt(), event)
            })
            .collect();
        self.inner.publish(&renamed).await
    }
}

async fn relay<P: Publisher>(
    pool: sqlx::PgPool,
    publisher: P,
    config: RelayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let relay = PostgresRelay::new(pool, publisher, config);
    let started = Instant::now();
    relay
        .run(shutdown)
        .await
        .context("the relay could not start")?;
    let m = relay.metrics();
    tracing::info!(
        published = m.published,
        retried = m.retried,
        dead = m.dead,
        unavailable = m.unavailable,
        ran = ?started.elapsed(),
        "stopped"
    );
    Ok(())
}

async fn enqueue_demo(pool: &sqlx::PgPool, n: u32) -> Result<(), StartError> {
    let started = Instant::now();
    let mut tx = pool
        .begin()
        .await
        .context("could not begin a transaction")?;
    for i in 0..n {
        let body = format!(r#"{{"account":"acct-{}","amount":{}}}"#, i % 10, i + 1);
        let event = Event::new(QUEUE, body.into_bytes())
            .with_ordering_key(format!("acct-{}", i % 10))
            .with_header("content-type", "application/json");
        outbox::enqueue(&mut *tx, &event)
            .await
            .context("could not enqueue a demo event")?;
    }
    tx.commit()
        .await
        .context("could not commit the demo events")?;
    tracing::info!(events = n, took = ?started.elapsed(), "enqueued demo events");
    Ok(())
}
