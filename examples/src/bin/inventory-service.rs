//! The inventory of the order saga (DESIGN section 7): consumes the saga's
//! commands (`reserve`, `release`, `ship`) from `<prefix>inventory` through
//! the transactional inbox, and answers each through its own outbox,
//! relayed in process to `<prefix>orders`: the stock, the reservation, the
//! inbox mark and the reply commit in one transaction. The reply carries
//! the command's correlation headers (`saga::reply_headers`).
//!
//! `cargo run --release -p examples --bin inventory-service -- --help`

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use examples::order_messaging::{BrokerArgs, InventoryCommand, InventoryReply, Messaging};
use examples::{init_tracing, ResultExt, Shutdown, StartError};
use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage};
use sqlx::{PgConnection, Postgres, Transaction};

/// The inventory: stock and reservations, commanded by the order saga.
#[derive(Debug, Parser)]
#[command(
    about = "The order saga's inventory: reserve, release and ship, once per command",
    after_help = "Tables (created when missing): inventory_stock(sku, available) (a SKU without \
                  a row has 0 available; seed it with SQL) and inventory_reservations(order_id, \
                  sku, quantity, state) with state reserved, released or shipped. A SKU that \
                  starts with noship- cannot be shipped.\n\
                  Each connect is bounded by 5 s; a lost broker is retried with backoff. SIGTERM \
                  or Ctrl-C at any stage: startup stops, or the command in hand and the relay's \
                  batch are finished; exit 0."
)]
struct Args {
    /// The PostgreSQL URL: the stock, the reservations, the inbox and the
    /// outbox live there.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    #[command(flatten)]
    broker: BrokerArgs,
    /// The inbox consumer's name (and the NATS durable consumer's).
    #[arg(long, default_value = "inventory")]
    consumer: String,
    /// How long the handler sleeps inside the transaction, before the effect
    /// (to widen crash windows in tests).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    handler_delay: Duration,
    /// Serve Prometheus metrics (the inbox's and the relay's) on
    /// `GET /metrics` at this address (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Creates the tables, through [`examples::create_tables`].
const CREATE: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS inventory_stock (sku TEXT PRIMARY KEY, available BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS inventory_reservations (order_id TEXT PRIMARY KEY, sku TEXT, \
     quantity BIGINT NOT NULL, state TEXT NOT NULL \
     CHECK (state IN ('reserved', 'released', 'shipped')))",
];

/// The order's reservation, locked for this transaction.
const RESERVATION: &str =
    "SELECT sku, quantity, state FROM inventory_reservations WHERE order_id = $1 FOR UPDATE";

/// Takes `quantity` of a SKU when that many are available (the row lock
/// orders concurrent reservations of one SKU).
const TAKE: &str =
    "UPDATE inventory_stock SET available = available - $2 WHERE sku = $1 AND available >= $2";

/// Gives `quantity` of a SKU back.
const GIVE_BACK: &str = "UPDATE inventory_stock SET available = available + $2 WHERE sku = $1";

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

async fn run(args: Args) -> Result<(), StartError> {
    // First, so that a signal during startup is not lost.
    let shutdown = Shutdown::install()?;
    examples::serve_metrics(args.metrics_listen).await?;
    let what = "the inventory database (PostgreSQL, --database)";
    let pool = stage!(
        shutdown,
        examples::connect_postgres(&args.database, what, 6)
    );
    stage!(shutdown, migrate(&pool));
    let config = InboxConfig::builder(args.consumer.clone())
        .build()
        .context("the inbox settings are invalid (--consumer)")?;
    let inbox = stage!(shutdown, async {
        Inbox::postgres(pool.clone(), config)
            .await
            .context("could not set up the inbox")
    });
    let messaging = stage!(shutdown, Messaging::connect(&args.broker));
    let (commands, replies) = (messaging.names().inventory(), messaging.names().orders());
    tracing::info!(
        broker = ?args.broker.broker,
        prefix = %args.broker.prefix,
        consumer = %args.consumer,
        "inventory-service ready"
    );
    let relaying = messaging.relay(pool.clone(), "inventory-service", shutdown.requested());
    let delay = args.handler_delay;
    let consuming = messaging.consume(
        &commands,
        &args.consumer,
        |message| {
            let (inbox, replies) = (&inbox, replies.clone());
            async move {
                inbox
                    .process(&message, move |tx, message| {
                        Box::pin(handle(tx, message, delay, replies))
                    })
                    .await
            }
        },
        shutdown.requested(),
    );
    tokio::try_join!(relaying, consuming)?;
    tracing::info!(metrics = ?inbox.metrics(), "inventory-service stopped");
    Ok(())
}

async fn migrate(pool: &sqlx::PgPool) -> Result<(), StartError> {
    outbox::migrate_postgres(pool)
        .await
        .context("could not create the outbox table")?;
    examples::create_tables(pool, &CREATE, "the inventory tables").await
}

/// One command, in the inbox's transaction: its effect, then its reply
/// (with the command's correlation headers) into the outbox.
async fn handle(
    tx: &mut Transaction<'static, Postgres>,
    message: &InboxMessage,
    delay: Duration,
    replies: String,
) -> Result<(), HandlerError> {
    let command: InventoryCommand = serde_json::from_slice(message.payload())
        .map_err(|e| HandlerError::permanent(format!("not an inventory command: {e}")))?;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let reply = apply(tx, command).await.map_err(HandlerError::transient)?;
    let order_id = match &reply {
        InventoryReply::Reserved { order_id }
        | InventoryReply::Rejected { order_id }
        | InventoryReply::Released { order_id }
        | InventoryReply::Shipped { order_id }
        | InventoryReply::Unshippable { order_id } => order_id.clone(),
    };
    let payload = serde_json::to_vec(&reply).map_err(HandlerError::permanent)?;
    let mut event = outbox::Event::new(replies, payload)
        .with_ordering_key(order_id)
        .with_header("content-type", "application/json");
    for (name, value) in saga::reply_headers(message) {
        event = event.with_header(name, value);
    }
    outbox::enqueue(&mut **tx, &event)
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// The effect of a command on the stock and the reservations.
async fn apply(
    conn: &mut PgConnection,
    command: InventoryCommand,
) -> Result<InventoryReply, sqlx::Error> {
    match command {
        InventoryCommand::Reserve {
            order_id,
            sku,
            quantity,
        } => {
            let existing: Option<(Option<String>, i64, String)> = sqlx::query_as(RESERVATION)
                .bind(&order_id)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some((_, _, state)) = existing {
                // Asked again (a retry after a timeout): the same answer. A
                // release that came first (commands overtaken by a
                // redelivery) left a released row: reserve nothing then.
                return Ok(if state == "released" {
                    InventoryReply::Rejected { order_id }
                } else {
                    InventoryReply::Reserved { order_id }
                });
            }
            let taken = sqlx::query(TAKE)
                .bind(&sku)
                .bind(quantity)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if taken == 0 {
                return Ok(InventoryReply::Rejected { order_id });
            }
            sqlx::query(
                "INSERT INTO inventory_reservations (order_id, sku, quantity, state) \
                 VALUES ($1, $2, $3, 'reserved')",
            )
            .bind(&order_id)
            .bind(&sku)
            .bind(quantity)
            .execute(&mut *conn)
            .await?;
            Ok(InventoryReply::Reserved { order_id })
        }
        InventoryCommand::Release { order_id } => {
            let existing: Option<(Option<String>, i64, String)> = sqlx::query_as(RESERVATION)
                .bind(&order_id)
                .fetch_optional(&mut *conn)
                .await?;
            match existing {
                Some((Some(sku), quantity, state)) if state == "reserved" => {
                    sqlx::query(
                        "UPDATE inventory_reservations SET state = 'released' WHERE order_id = $1",
                    )
                    .bind(&order_id)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query(GIVE_BACK)
                        .bind(&sku)
                        .bind(quantity)
                        .execute(&mut *conn)
                        .await?;
                }
                Some(_) => {}
                None => {
                    // Nothing reserved (yet): a tombstone, so that a reserve
                    // of this order arriving later reserves nothing.
                    sqlx::query(
                        "INSERT INTO inventory_reservations (order_id, sku, quantity, state) \
                         VALUES ($1, NULL, 0, 'released')",
                    )
                    .bind(&order_id)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Ok(InventoryReply::Released { order_id })
        }
        InventoryCommand::Ship { order_id } => {
            let existing: Option<(Option<String>, i64, String)> = sqlx::query_as(RESERVATION)
                .bind(&order_id)
                .fetch_optional(&mut *conn)
                .await?;
            match existing {
                Some((Some(sku), _, state))
                    if state != "released" && !sku.starts_with("noship-") =>
                {
                    sqlx::query(
                        "UPDATE inventory_reservations SET state = 'shipped' WHERE order_id = $1",
                    )
                    .bind(&order_id)
                    .execute(&mut *conn)
                    .await?;
                    Ok(InventoryReply::Shipped { order_id })
                }
                // A noship- SKU, or nothing reserved to ship.
                _ => Ok(InventoryReply::Unshippable { order_id }),
            }
        }
    }
}
