//! The order saga (DESIGN section 7): an orders API on axum whose
//! `POST /orders` writes the order and starts saga `order` in the request's
//! own transaction (the idempotency middleware in transactional mode on
//! PostgreSQL: the order row, the saga instance, its first command in the
//! outbox and the idempotency record commit together), the saga's workers,
//! its outbox relayed in process, and its replies consumed through the
//! transactional inbox.
//!
//! The saga `order`, its steps and their compensations:
//!
//! ```text
//!  forward       reserve ─────▶ charge ─────▶ ship ─────▶ completed
//!                (message)      (call)        (message)
//!  compensation  release ◀───── refund
//!
//!  reserve: rejected (out of stock)  → compensated, nothing to undo
//!  charge:  402 (declined)           → release → compensated
//!  ship:    unshippable              → refund → release → compensated
//! ```
//!
//! `cargo run --release -p examples --bin order-saga -- --help`

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use examples::order_messaging::{BrokerArgs, InventoryCommand, InventoryReply, Messaging, Names};
use examples::payments_client::PaymentsClient;
use examples::{init_tracing, ResultExt, Shutdown, StartError, METRICS_CONTENT_TYPE, PROBLEM_JSON};
use idempotency_connect::stores::{PostgresOptions, PostgresStore};
use idempotency_core::{Idempotency, IdempotencyConfig};
use idempotency_tower::{IdempotencyLayer, Transaction};
use inbox_consumer::{Inbox, InboxConfig};
use saga::{
    CallOutcome, Command, DefinitionError, OnTimeout, Reply, ReplyError, Saga, SagaConfig, Sagas,
    Step,
};
use serde::{Deserialize, Serialize};

/// The orders API, its saga workers, its outbox relay and its reply consumer.
#[derive(Debug, Parser)]
#[command(
    about = "Orders, each one saga: reserve (inventory-service), charge (the payments API), ship",
    after_help = "Routes: POST /orders (Idempotency-Key required; JSON sku, quantity, amount; \
                  202 with the order pending), GET /orders/<id>, GET /orders, GET /healthz, \
                  GET /metrics (the saga's, the relay's and the inbox's metrics).\n\
                  The broker: commands to <prefix>inventory, replies from <prefix>orders \
                  (RabbitMQ durable queues; NATS streams <prefix>INVENTORY and <prefix>ORDERS).\n\
                  Each connect is bounded by 5 s; a call to the payments API by 5 s (a claimed \
                  call is made again after 15 s if its worker died). SIGTERM or Ctrl-C at any \
                  stage: startup stops, or the server drains, the workers finish their round, \
                  the relay its batch and the consumer its message; exit 0."
)]
struct Args {
    /// Where to serve.
    #[arg(long, default_value = "127.0.0.1:3100")]
    listen: SocketAddr,
    /// The PostgreSQL URL: orders, saga instances, the outbox, the inbox and
    /// the idempotency records live there.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database: String,
    #[command(flatten)]
    broker: BrokerArgs,
    /// The payments API (payments-axum or payments-actix).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    payments_url: String,
    /// How long a message step waits for its reply before it sends the
    /// command again (reserve: 3 attempts, then compensate; ship: 10).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    step_timeout: Duration,
    /// How many saga workers run in this process.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
}

/// The saga's data: the order, and its payment once charged.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    sku: String,
    quantity: i64,
    amount: i64,
    payment_id: Option<String>,
}

/// The body of `POST /orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    sku: String,
    quantity: i64,
    amount: i64,
}

/// The saga's name (and the first word of its idempotency keys:
/// `order-<id>-charge`, `order-<id>-refund`).
const SAGA: &str = "order";

/// The inbox consumer (and NATS durable consumer) of the replies.
const CONSUMER: &str = "order-saga";

/// How long a claimed call holds its instance: above the payments client's
/// request timeout, so only a worker that died leaves it to another.
const CALL_LEASE: Duration = Duration::from_secs(15);

/// How often an idle worker looks for due instances (a call due at once
/// waits at most this long).
const POLL: Duration = Duration::from_millis(50);

fn command(destination: &str, command: &InventoryCommand) -> Command {
    Command::json(destination, command)
}

fn inventory_reply(reply: &Reply) -> Result<InventoryReply, ReplyError> {
    reply.json()
}

fn unexpected(step: &str, reply: &InventoryReply) -> ReplyError {
    ReplyError::Undecodable(format!("`{step}` does not expect {reply:?}"))
}

/// The saga `order`: reserve, charge, ship (see the module docs).
fn order_saga(
    payments: &PaymentsClient,
    names: &Names,
    step_timeout: Duration,
) -> Result<Saga<Order>, DefinitionError> {
    let inventory = names.inventory();
    let (to_reserve, to_release, to_ship) = (inventory.clone(), inventory.clone(), inventory);
    let (charging, refunding) = (payments.clone(), payments.clone());
    Saga::builder(SAGA, 1)
        .step_timeout(step_timeout)
        .call_retry(Duration::from_millis(100), Duration::from_secs(5))
        .step(
            Step::message("reserve", move |o: &Order, _| {
                let reserve = InventoryCommand::Reserve {
                    order_id: o.id.clone(),
                    sku: o.sku.clone(),
                    quantity: o.quantity,
                };
                command(&to_reserve, &reserve)
            })
            .on_reply(|_, reply| match inventory_reply(reply)? {
                InventoryReply::Reserved { .. } => Ok(()),
                InventoryReply::Rejected { .. } => Err(ReplyError::failed("out of stock")),
                other => Err(unexpected("reserve", &other)),
            })
            // Reserving is idempotent by order: ask again before giving up.
            .timeout(step_timeout, OnTimeout::Retry { attempts: 3 })
            .compensate(
                Step::message("release", move |o: &Order, _| {
                    let release = InventoryCommand::Release {
                        order_id: o.id.clone(),
                    };
                    command(&to_release, &release)
                })
                .on_reply(|_, reply| match inventory_reply(reply)? {
                    InventoryReply::Released { .. } => Ok(()),
                    other => Err(unexpected("release", &other)),
                }),
            ),
        )
        .step(
            Step::call("charge", move |mut o: Order, ctx| {
                let payments = charging.clone();
                async move {
                    match payments
                        .charge(&o.id, o.amount, &ctx.idempotency_key())
                        .await
                    {
                        CallOutcome::Done(payment_id) => {
                            o.payment_id = Some(payment_id);
                            CallOutcome::Done(o)
                        }
                        CallOutcome::Failed(why) => CallOutcome::Failed(why),
                        CallOutcome::Uncertain(why) => CallOutcome::Uncertain(why),
                    }
                }
            })
            .compensate(Step::call("refund", move |o: Order, ctx| {
                let payments = refunding.clone();
                async move {
                    let Some(payment_id) = o.payment_id.clone() else {
                        // Never charged: nothing to refund.
                        return CallOutcome::Done(o);
                    };
                    match payments.refund(&payment_id, &ctx.idempotency_key()).await {
                        CallOutcome::Done(()) => CallOutcome::Done(o),
                        CallOutcome::Failed(why) => CallOutcome::Failed(why),
                        CallOutcome::Uncertain(why) => CallOutcome::Uncertain(why),
                    }
                }
            })),
        )
        .step(
            Step::message("ship", move |o: &Order, _| {
                let ship = InventoryCommand::Ship {
                    order_id: o.id.clone(),
                };
                command(&to_ship, &ship)
            })
            .on_reply(|_, reply| match inventory_reply(reply)? {
                InventoryReply::Shipped { .. } => Ok(()),
                InventoryReply::Unshippable { .. } => Err(ReplyError::failed("unshippable")),
                other => Err(unexpected("ship", &other)),
            })
            // A ship that happened must not be compensated: ask again.
            .timeout(step_timeout, OnTimeout::Retry { attempts: 10 }),
        )
        .build()
}

/// Creates table `orders`, through [`examples::create_tables`].
const CREATE_ORDERS: [&str; 1] = [
    "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, sku TEXT NOT NULL, \
     quantity BIGINT NOT NULL, amount BIGINT NOT NULL, \
     created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
];

/// One order, in the request's transaction.
const INSERT_ORDER: &str = "INSERT INTO orders (id, sku, quantity, amount) VALUES ($1, $2, $3, $4)";

/// Orders with the state and payment of their saga instance.
const SELECT_ORDERS: &str = "SELECT o.id, o.sku, o.quantity, o.amount, i.state, \
     i.data ->> 'payment_id' FROM orders o LEFT JOIN saga.instances i ON i.id = o.id";

type OrderRow = (String, String, i64, i64, Option<String>, Option<String>);

/// An order as `GET /orders/<id>` shows it.
#[derive(Debug, Serialize)]
struct OrderView {
    id: String,
    sku: String,
    quantity: i64,
    amount: i64,
    state: &'static str,
    payment_id: Option<String>,
}

fn view((id, sku, quantity, amount, state, payment_id): OrderRow) -> OrderView {
    let state = match state.as_deref() {
        Some("completed") => "completed",
        Some("compensated") => "compensated",
        Some("failed") => "failed",
        // running, compensating (or a saga that a rollback never started).
        _ => "pending",
    };
    OrderView {
        id,
        sku,
        quantity,
        amount,
        state,
        payment_id,
    }
}

#[derive(Clone)]
struct App {
    sagas: Sagas,
    pool: sqlx::PgPool,
}

fn problem(status: StatusCode, kind: &str, title: &str, detail: String) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:orders:problem:{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        body.to_string(),
    )
        .into_response()
}

fn database_failed(e: &(dyn std::error::Error + 'static)) -> Response {
    tracing::error!(error = %examples::error_chain(e), "the orders database failed");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "database",
        "The order could not be read or recorded",
        "Nothing was done. Retry with the same Idempotency-Key.".into(),
    )
}

fn invalid(detail: String) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "invalid-order",
        "Invalid order",
        detail,
    )
}

/// The order of a `POST /orders` body, with a new id; `Err` is the detail
/// of its 400.
fn new_order(body: &[u8]) -> Result<Order, String> {
    let new: NewOrder = serde_json::from_slice(body).map_err(|e| {
        let mut detail = e.to_string();
        detail.truncate(200);
        format!(
            "expected JSON {{\"sku\": \"<string>\", \"quantity\": <integer ≥ 1>, \
             \"amount\": <integer ≥ 1>}}: {detail}"
        )
    })?;
    if new.sku.is_empty() || new.sku.len() > 100 {
        return Err("sku must be 1 to 100 characters".into());
    }
    if new.quantity < 1 || new.amount < 1 {
        return Err("quantity and amount must be integers ≥ 1".into());
    }
    Ok(Order {
        id: format!("{:024x}", rand::random::<u128>() >> 32),
        sku: new.sku,
        quantity: new.quantity,
        amount: new.amount,
        payment_id: None,
    })
}

/// `POST /orders`: the order row and the saga's start, in the request's
/// transaction, which the middleware commits with the idempotency record.
async fn create_order(
    State(app): State<App>,
    mut tx: Transaction<sqlx::Transaction<'static, sqlx::Postgres>>,
    body: Bytes,
) -> Response {
    let order = match new_order(&body) {
        Ok(order) => order,
        Err(detail) => return invalid(detail),
    };
    let inserted = sqlx::query(INSERT_ORDER)
        .bind(&order.id)
        .bind(&order.sku)
        .bind(order.quantity)
        .bind(order.amount)
        .execute(&mut *tx)
        .await;
    if let Err(e) = inserted {
        return database_failed(&e);
    }
    if let Err(e) = app.sagas.start(&mut tx, SAGA, &order.id, &order).await {
        return database_failed(&e);
    }
    let body = serde_json::json!({"id": order.id, "state": "pending"});
    (
        StatusCode::ACCEPTED,
        [
            (header::LOCATION, format!("/orders/{}", order.id)),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn get_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    let row: Result<Option<OrderRow>, _> =
        sqlx::query_as(&format!("{SELECT_ORDERS} WHERE o.id = $1"))
            .bind(&id)
            .fetch_optional(&app.pool)
            .await;
    match row {
        Ok(Some(row)) => axum::Json(view(row)).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "No such order",
            "No order has this id.".into(),
        ),
        Err(e) => database_failed(&e),
    }
}

async fn list_orders(State(app): State<App>) -> Response {
    let rows: Result<Vec<OrderRow>, _> =
        sqlx::query_as(&format!("{SELECT_ORDERS} ORDER BY o.created_at, o.id"))
            .fetch_all(&app.pool)
            .await;
    match rows {
        Ok(rows) => axum::Json(rows.into_iter().map(view).collect::<Vec<_>>()).into_response(),
        Err(e) => database_failed(&e),
    }
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

async fn run(args: Args) -> Result<(), StartError> {
    // First, so that a signal during startup is not lost.
    let shutdown = Shutdown::install()?;
    // Before the inbox, the relay and the sagas, so their series exist at once.
    let metrics = examples::install_metrics()?;
    saga::metrics::describe();
    outbox::metrics::describe();
    let names = Names::new(&args.broker.prefix)?;
    let payments = PaymentsClient::new(&args.payments_url)?;
    let definition = order_saga(&payments, &names, args.step_timeout)
        .context("the order saga's definition is invalid")?;
    let what = "the orders database (PostgreSQL, --database)";
    let pool = stage!(
        shutdown,
        examples::connect_postgres(&args.database, what, args.workers + 6)
    );
    stage!(shutdown, migrate(&pool));
    let store = stage!(shutdown, async {
        PostgresStore::connect_with(&args.database, PostgresOptions::new().max_connections(10))
            .await
            .context("could not open the idempotency store (--database)")
    });
    let config = IdempotencyConfig::builder()
        .scope_header("authorization")
        .build()
        .context("the idempotency settings are invalid")?;
    let engine = Idempotency::transactional(store, config);
    let inbox_config = InboxConfig::builder(CONSUMER)
        .build()
        .context("the inbox settings are invalid")?;
    let inbox = stage!(shutdown, async {
        Inbox::postgres(pool.clone(), inbox_config)
            .await
            .context("could not set up the inbox")
    });
    let messaging = stage!(shutdown, Messaging::connect(&args.broker));
    let sagas = Sagas::builder(pool.clone())
        .register(definition)
        .config(SagaConfig {
            poll_interval: POLL,
            call_lease: CALL_LEASE,
            ..SagaConfig::default()
        })
        .build();

    let app = App {
        sagas: sagas.clone(),
        pool: pool.clone(),
    };
    let router = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .with_state(app)
        .layer(IdempotencyLayer::new(engine))
        // Outside the layer: health checks and scrapes are not orders.
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
    tracing::info!(
        %listen,
        broker = ?args.broker.broker,
        prefix = %args.broker.prefix,
        workers = args.workers,
        payments = %args.payments_url,
        "order-saga serving"
    );

    // Through http-serve, as payments-axum: a client must send its
    // request's headers within 5 s (axum::serve sets no such bound).
    let serving = async {
        examples::serve_axum(vec![listener], router, shutdown.requested()).await;
        Ok::<_, StartError>(())
    };
    let working = async {
        let workers = (0..args.workers).map(|_| sagas.run(shutdown.requested()));
        futures_util::future::join_all(workers).await;
        Ok::<_, StartError>(())
    };
    let relaying = messaging.relay(pool.clone(), CONSUMER, shutdown.requested());
    let replies = names.orders();
    let consuming = messaging.consume(
        &replies,
        CONSUMER,
        |message| {
            let (sagas, inbox) = (sagas.clone(), &inbox);
            async move { sagas.process_reply(inbox, &message).await }
        },
        shutdown.requested(),
    );
    let purging = purge_inbox(&inbox, shutdown.requested());
    tokio::try_join!(serving, working, relaying, consuming, purging)?;
    tracing::info!("order-saga stopped");
    Ok(())
}

/// The tables of the outbox, the sagas and the orders.
async fn migrate(pool: &sqlx::PgPool) -> Result<(), StartError> {
    outbox::migrate_postgres(pool)
        .await
        .context("could not create the outbox table")?;
    saga::migrate(pool)
        .await
        .context("could not create the saga tables")?;
    examples::create_tables(pool, &CREATE_ORDERS, "table orders").await
}

/// Purges processed inbox rows past their retention, hourly.
async fn purge_inbox(
    inbox: &inbox_consumer::PostgresInbox,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = every.tick() => {
                if let Err(e) = inbox.purge().await {
                    tracing::warn!(error = %examples::error_chain(&e), "purging the inbox failed");
                }
            }
        }
    }
}
