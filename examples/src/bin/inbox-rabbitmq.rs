//! Consumes ledger messages from a RabbitMQ queue into PostgreSQL, each
//! message's effect exactly once (inbox-consumer, transactional mode).
//!
//! ```text
//! cargo run --release -p examples --bin inbox-rabbitmq -- --queue payments
//! ```
//!
//! Each message is JSON `{"account": "<string>", "amount": <integer>}` with
//! the AMQP `message_id` property; its effect is one row in
//! `ledger_entries(account, amount, message_id)`, a table with no unique
//! constraint of its own: the inbox alone prevents doubles.

use std::time::Duration;

use clap::Parser;
use examples::{ledger, ResultExt, StartError};
use futures_util::StreamExt;
use inbox_consumer::rabbitmq;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// Consume a RabbitMQ queue into a PostgreSQL ledger, once per message.
#[derive(Debug, Parser)]
struct Args {
    /// The durable queue to consume (declared, durable and without arguments, when missing).
    #[arg(long, default_value = "payments")]
    queue: String,
    /// The RabbitMQ URL.
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    examples::init_tracing("info,inbox_consumer=debug");
    let args = Args::parse();
    examples::finish(env!("CARGO_BIN_NAME"), run(args).await)
}

async fn run(args: Args) -> Result<(), StartError> {
    let inbox = ledger::open(&args.database, &args.consumer).await?;

    let amqp = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .context("could not connect to RabbitMQ (--amqp)")?;
    let channel = amqp
        .create_channel()
        .await
        .context("could not open a RabbitMQ channel")?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context(format!(
            "could not declare the queue {} (--queue)",
            args.queue
        ))?;
    channel
        .basic_qos(32, BasicQosOptions::default())
        .await
        .context("could not set the prefetch count")?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            args.consumer.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context(format!("could not consume the queue {}", args.queue))?;
    tracing::info!(queue = %args.queue, consumer = %args.consumer, "consuming");

    let delay = args.handler_delay;
    loop {
        let delivery = tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => delivery.context("receiving a delivery failed")?,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        let message = rabbitmq::message(&delivery);
        let outcome = ledger::process(&inbox, &message, delay).await;
        // Ack only now, after the commit.
        rabbitmq::settle(&delivery, &outcome)
            .await
            .context("could not settle a delivery")?;
    }
    tracing::info!(metrics = ?inbox.metrics(), "stopped");
    Ok(())
}
