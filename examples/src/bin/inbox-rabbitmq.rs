//! Consumes ledger messages from a RabbitMQ queue into PostgreSQL, each
//! message's effect exactly once (inbox-consumer, transactional mode).
//!
//! ```text
//! cargo run --release -p examples --bin inbox-rabbitmq -- --queue payments
//! cargo run --release -p examples --bin inbox-rabbitmq -- --queue payments --batch 100
//! ```
//!
//! Each message is JSON `{"account": "<string>", "amount": <integer>}` with
//! the AMQP `message_id` property; its effect is one row in
//! `ledger_entries(account, amount, message_id)`, a table with no unique
//! constraint of its own: the inbox alone prevents doubles.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use examples::{ledger, ResultExt, Shutdown, StartError, CONNECT_TIMEOUT};
use inbox_consumer::rabbitmq::Subscription;

/// Deliveries RabbitMQ sends ahead of the acks.
const PREFETCH: u16 = 32;

/// Consume a RabbitMQ queue into a PostgreSQL ledger, once per message.
#[derive(Debug, Parser)]
#[command(
    after_help = "A lost connection (a broker restart, a network cut) is logged at WARN and \
                  retried with backoff (100 ms doubling to 5 s); unacked deliveries are \
                  redelivered and the inbox acks those already processed. Each connect is \
                  bounded by 5 s; a broker or database that cannot be reached at startup is an \
                  error (exit 1). SIGTERM or Ctrl-C: the delivery (or batch) in hand is finished, \
                  exit 0. With --batch N, a crash before a batch's commit redelivers the whole \
                  batch and nothing of it is applied; a crash after the commit, before the ack, \
                  redelivers duplicates only, acked without running again."
)]
struct Args {
    /// The durable queue to consume (declared, durable and without arguments, when missing).
    #[arg(long, default_value = "payments")]
    queue: String,
    /// The RabbitMQ URL (`amqps://` for TLS).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The PostgreSQL URL (the ledger and the inbox live there).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    /// The consumer name: the scope of message ids in the inbox.
    #[arg(long, default_value = "ledger")]
    consumer: String,
    /// How long the handler sleeps inside the transaction, before the insert.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    handler_delay: Duration,
    /// Process up to N deliveries per transaction: those that arrived within
    /// `--batch-window` of the first, deduplicated by one statement, their
    /// rows inserted in one transaction, committed once, then acked with one multiple ack; the prefetch is raised to 2×N. A failing
    /// message sends its batch back through one message at a time. 1 (the
    /// default): one message per transaction.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// With `--batch N`: how long a batch waits for more deliveries after its first.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    batch_window: Duration,
    /// Failed attempts before a message is dead. A dead message keeps its
    /// payload in the inbox; `messaging-admin inbox retry` asks for a
    /// replay, which this consumer runs through the inbox.
    #[arg(long, value_name = "N", default_value_t = inbox_consumer::config::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// The redelivery delay after a first failure, doubled after each
    /// further one (up to 60 s, or this delay when it is longer).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_delay: Duration,
    /// How often to look for the replays of dead messages an operator asked for.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    replay_interval: Duration,
    /// Serve Prometheus metrics (`inbox_messages_total{consumer,outcome}`)
    /// on `GET /metrics` at this address (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    examples::init_tracing("info,inbox_consumer=debug");
    let args = Args::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: Args) -> Result<(), StartError> {
    // First, so that a signal during startup is not lost.
    let shutdown = Shutdown::install()?;
    examples::serve_metrics(args.metrics_listen).await?;
    let Some(inbox) = shutdown
        .during(ledger::open_with(
            &args.database,
            ledger::config(&args.consumer, args.max_attempts, args.retry_delay)?,
        ))
        .await
        .transpose()?
    else {
        return Ok(());
    };
    let subscription = Subscription::new(args.amqp.as_str(), args.queue.as_str())
        .consumer_tag(args.consumer.as_str())
        .prefetch(PREFETCH)
        .declare_when_missing()
        .connect_timeout(CONNECT_TIMEOUT)
        .batch(args.batch as usize, args.batch_window);
    let (inbox, delay) = (&inbox, args.handler_delay);
    // The subscription acks only after `process` returns, i.e. after the commit.
    let consuming = async {
        if args.batch > 1 {
            tracing::info!(batch = args.batch, window = ?args.batch_window, "batches");
            subscription
                .run_batch(
                    move |messages| async move { ledger::process_batch(inbox, &messages, delay).await },
                    shutdown.requested(),
                )
                .await
        } else {
            subscription
                .run(
                    move |message| async move { ledger::process(inbox, &message, delay).await },
                    shutdown.requested(),
                )
                .await
        }
    };
    // Beside the deliveries: the replays of dead messages an operator asked
    // for, through the inbox with the same handler.
    let consumed = ledger::consume_with_replays(
        inbox,
        consuming,
        delay,
        args.replay_interval,
        shutdown.requested(),
    )
    .await;
    consumed.context(format!(
        "could not consume the queue {} (--amqp, --queue)",
        args.queue
    ))?;
    tracing::info!(metrics = ?inbox.metrics(), "stopped");
    Ok(())
}
