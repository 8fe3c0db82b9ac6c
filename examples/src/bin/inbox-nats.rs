//! Consumes ledger messages from NATS JetStream into PostgreSQL, each
//! message's effect exactly once (inbox-consumer, transactional mode).
//!
//! ```text
//! cargo run --release -p examples --bin inbox-nats
//! cargo run --release -p examples --bin inbox-nats -- --batch 100
//! ```
//!
//! Stream `PAYMENTS` (subjects `payments.>`; created when missing, used as it
//! is when present), durable pull consumer named after `--consumer`. The id is
//! the `Nats-Msg-Id` header, else the stream sequence. `--stream NAME
//! --subject S` consume stream `NAME` (subjects `S`, created when missing)
//! instead. Each message is JSON
//! `{"account": "<string>", "amount": <integer>}`; its effect is one row in
//! `ledger_entries(account, amount, message_id)`, which has no unique
//! constraint of its own: the inbox alone prevents doubles.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser;
use examples::{ledger, ResultExt, Shutdown, StartError};
use inbox_consumer::nats::Subscription;

const STREAM: &str = "PAYMENTS";
const SUBJECTS: &str = "payments.>";

/// Consume a JetStream stream into a PostgreSQL ledger, once per message.
#[derive(Debug, Parser)]
#[command(
    after_help = "The client reconnects by itself after a lost connection; errors of the \
                  consumer are logged at WARN, and a deleted consumer or stream is opened (or \
                  created) again with backoff. A new durable consumer starts at the stream's \
                  first message. Each connect is bounded by 5 s; NATS or a database that cannot \
                  be reached at startup is an error (exit 1). SIGTERM or Ctrl-C: the message (or \
                  batch) in hand is finished, exit 0. With --batch N, a crash before a batch's \
                  commit redelivers the whole batch and nothing of it is applied; a crash after \
                  the commit, before the acks, redelivers duplicates only, acked without running \
                  again."
)]
struct Args {
    /// The NATS URL (`tls://` for TLS).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The PostgreSQL URL (the ledger and the inbox live there).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    /// The JetStream stream; with another than `PAYMENTS`, give `--subject` too.
    #[arg(long, default_value = STREAM)]
    stream: String,
    /// The subjects of the stream when it is created and is not `PAYMENTS`.
    #[arg(long)]
    subject: Option<String>,
    /// The consumer name: the durable pull consumer's name and the scope of message ids.
    #[arg(long, default_value = "ledger")]
    consumer: String,
    /// How long the handler sleeps inside the transaction, before the insert.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    handler_delay: Duration,
    /// Process up to N messages per transaction: those that arrived within
    /// `--batch-window` of the first, deduplicated by one statement, their
    /// rows inserted in one transaction, committed once, then each acked; each pull asks for 2×N (at least 200). A failing
    /// message sends its batch back through one message at a time. 1 (the
    /// default): one message per transaction.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// With `--batch N`: how long a batch waits for more messages after its first.
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
    let subjects = match (&args.subject, args.stream == STREAM) {
        (_, true) => SUBJECTS.to_owned(),
        (Some(subject), false) => subject.clone(),
        (None, false) => {
            return Err(examples::usage_error(
                "--stream other than PAYMENTS needs --subject",
            ))
        }
    };
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
    let Some(client) = shutdown
        .during(examples::connect_nats(&args.nats))
        .await
        .transpose()?
    else {
        return Ok(());
    };
    // The stream is created when missing; an existing one is used as it is.
    let subscription = Subscription::new(jetstream::new(client), &args.stream, &args.consumer)
        .create_stream_when_missing(jetstream::stream::Config {
            name: args.stream.clone(),
            subjects: vec![subjects],
            ..Default::default()
        })
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
        "could not consume the stream {} (--nats, --stream)",
        args.stream
    ))?;
    tracing::info!(metrics = ?inbox.metrics(), "stopped");
    Ok(())
}
