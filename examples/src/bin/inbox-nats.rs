//! Consumes ledger messages from NATS JetStream into PostgreSQL, each
//! message's effect exactly once (inbox-consumer, transactional mode).
//!
//! ```text
//! cargo run --release -p examples --bin inbox-nats
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

use std::time::Duration;

use async_nats::jetstream;
use clap::Parser;
use examples::{ledger, ResultExt, StartError};
use futures_util::StreamExt;
use inbox_consumer::nats;

const STREAM: &str = "PAYMENTS";
const SUBJECTS: &str = "payments.>";

/// Consume a JetStream stream into a PostgreSQL ledger, once per message.
#[derive(Debug, Parser)]
struct Args {
    /// The NATS URL.
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    examples::init_tracing("info,inbox_consumer=debug");
    let args = Args::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: Args) -> Result<(), StartError> {
    let inbox = ledger::open(&args.database, &args.consumer).await?;

    let client = async_nats::connect(&args.nats)
        .await
        .context("could not connect to NATS (--nats)")?;
    let js = jetstream::new(client);
    let subjects = match (&args.subject, args.stream == STREAM) {
        (_, true) => SUBJECTS.to_owned(),
        (Some(subject), false) => subject.clone(),
        (None, false) => {
            return Err(examples::usage_error(
                "--stream other than PAYMENTS needs --subject",
            ))
        }
    };
    // Created when missing; an existing stream is used as it is.
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: args.stream.clone(),
            subjects: vec![subjects],
            ..Default::default()
        })
        .await
        .context(format!(
            "could not open or create the stream {} (--stream)",
            args.stream
        ))?;
    let consumer = stream
        .get_or_create_consumer(
            &args.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(args.consumer.clone()),
                ..Default::default()
            },
        )
        .await
        .context(format!(
            "could not open or create the consumer {}",
            args.consumer
        ))?;
    let mut messages = consumer
        .messages()
        .await
        .context("could not start pulling messages")?;
    tracing::info!(stream = %args.stream, consumer = %args.consumer, "consuming");

    let delay = args.handler_delay;
    loop {
        let msg = tokio::select! {
            next = messages.next() => match next {
                Some(msg) => msg.context("receiving a message failed")?,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        let message = nats::message(&msg);
        let outcome = ledger::process(&inbox, &message, delay).await;
        // Ack only now, after the commit.
        nats::settle(&msg, &outcome)
            .await
            .context("could not settle a message")?;
    }
    tracing::info!(metrics = ?inbox.metrics(), "stopped");
    Ok(())
}
