//! The order saga through the real binaries (DESIGN section 7, "The order
//! saga"): `order-saga`, `inventory-service` and `payments-axum`, each on a
//! PostgreSQL database of its own, through RabbitMQ or NATS JetStream under
//! a prefix of the test's own.
//!
//! - the orders API's contract, one order of each kind to its end, and
//!   SIGTERM (RabbitMQ);
//! - the chaos run, on each broker: a few hundred orders (good, declined,
//!   out of stock, unshippable, and a scarce SKU), each POST sent 1 to 3
//!   times at once, while each of the three processes is SIGKILLed and
//!   restarted several times and a proxy between the saga and payments
//!   loses some answers after payments has committed. Then every order is
//!   final and the books add up (see [`Books::check`]).
//!
//! Tests read `DATABASE_URL`, `AMQP_URL` and `NATS_URL` at run time and skip,
//! saying why, when one they need is unset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::{closed_port, service_url, unique, LossyProxy, PgDatabase};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ORDER_SAGA: &str = env!("CARGO_BIN_EXE_order-saga");
const INVENTORY: &str = env!("CARGO_BIN_EXE_inventory-service");
const PAYMENTS: &str = env!("CARGO_BIN_EXE_payments-axum");

/// How long a binary may take to be ready.
const STARTUP: Duration = Duration::from_secs(30);

/// Payments above this are declined (402).
const DECLINE_ABOVE: i64 = 1000;

// ------------------------------------------------------------ the contract

#[tokio::test(flavor = "multi_thread")]
async fn orders_api_each_kind_of_order_ends_as_it_should_and_sigterm_exits_0() {
    let test = "saga_contract";
    let Some(mut system) = System::start(test, Broker::Rabbitmq, 0).await else {
        return;
    };
    let client = client();
    let addr = system.orders_addr;
    let stock = [("sku-1", 100), ("noship-1", 100), ("empty-1", 0)];
    system.seed(&stock).await;

    // The API: 202, Location, pending; a replay; bad input; a key required.
    let key = unique("order");
    let body = json!({"sku": "sku-1", "quantity": 2, "amount": 300});
    let first = post(&client, addr, "/orders", Some(&key), &body)
        .await
        .expect("POST");
    assert_eq!(first.status, 202, "{first:?}");
    let id = first.json()["id"].as_str().expect("an id").to_owned();
    assert_eq!(first.json(), json!({"id": id, "state": "pending"}));
    assert_eq!(
        first.location.as_deref(),
        Some(format!("/orders/{id}").as_str())
    );
    let replay = post(&client, addr, "/orders", Some(&key), &body)
        .await
        .expect("POST");
    assert_eq!(
        (replay.status, replay.body.as_str()),
        (202, first.body.as_str())
    );
    for bad in [
        json!({"sku": "sku-1", "quantity": 0, "amount": 1}),
        json!({"sku": "sku-1", "quantity": 1}),
        json!({"sku": "", "quantity": 1, "amount": 1}),
        json!({"sku": "sku-1", "quantity": 1, "amount": 1, "colour": "red"}),
    ] {
        let answer = post(&client, addr, "/orders", Some(&unique("bad")), &bad)
            .await
            .unwrap();
        assert_eq!(answer.status, 400, "{bad}: {answer:?}");
        assert_eq!(answer.content_type, "application/problem+json", "{bad}");
    }
    let keyless = post(&client, addr, "/orders", None, &body).await.unwrap();
    assert_eq!(keyless.status, 400, "{keyless:?}");

    // One order of each kind, to its end.
    let kinds = [
        (
            "good",
            json!({"sku": "sku-1", "quantity": 1, "amount": 100}),
            "completed",
            true,
            false,
        ),
        (
            "declined",
            json!({"sku": "sku-1", "quantity": 1, "amount": 5000}),
            "compensated",
            false,
            false,
        ),
        (
            "out of stock",
            json!({"sku": "empty-1", "quantity": 1, "amount": 100}),
            "compensated",
            false,
            false,
        ),
        (
            "unshippable",
            json!({"sku": "noship-1", "quantity": 1, "amount": 100}),
            "compensated",
            true,
            true,
        ),
    ];
    let mut ids = vec![(id.clone(), "good", "completed")];
    for (kind, body, _, _, _) in &kinds {
        let answer = post(&client, addr, "/orders", Some(&unique("order")), body)
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "{kind}: {answer:?}");
        ids.push((answer.json()["id"].as_str().unwrap().to_owned(), kind, ""));
    }
    system.wait_until_final(Duration::from_secs(60)).await;
    for ((id, kind, _), expected) in ids.iter().zip(std::iter::once(&kinds[0]).chain(&kinds)) {
        let got = get(&client, addr, &format!("/orders/{id}")).await;
        assert_eq!(got.status, 200, "{kind}: {got:?}");
        let order = got.json();
        assert_eq!(order["state"], expected.2, "{kind}: {order}");
        assert_eq!(
            order["payment_id"].is_string(),
            expected.3,
            "{kind}: {order}"
        );
        for field in ["id", "sku", "quantity", "amount", "state", "payment_id"] {
            assert!(order.get(field).is_some(), "{kind}: no {field} in {order}");
        }
    }
    let books = Books::read(&system).await;
    books.check(&stock, &HashMap::new());
    let unshippable = &ids[4].0;
    assert_eq!(
        books.refunded_orders(),
        HashSet::from([unshippable.clone()])
    );
    let list = get(&client, addr, "/orders").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(ids.len()), "{list}");
    assert_eq!(get(&client, addr, "/orders/nope").await.status, 404);
    assert_eq!(get(&client, addr, "/healthz").await.status, 200);
    let metrics = get(&client, addr, "/metrics").await.body;
    for series in [
        "saga_steps_total{saga=\"order\",step=\"charge\",outcome=\"done\"}",
        "saga_instances_ended_total{saga=\"order\",state=\"completed\"}",
        "outbox_events_total{relay=\"order-saga\",outcome=\"published\"}",
        "inbox_messages_total{consumer=\"order-saga\",outcome=\"processed\"}",
        "idempotency_requests_total{outcome=\"replayed\"}",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }

    // SIGTERM: each exits 0, promptly.
    for proc in [
        &mut system.saga,
        &mut system.inventory_proc,
        &mut system.payments_proc,
    ] {
        proc.sigterm();
        let code = proc.exit_within(Duration::from_secs(15)).await;
        assert_eq!(
            code,
            Some(0),
            "{}: exit {code:?}; log:\n{}",
            proc.name,
            proc.log()
        );
    }
    system.finish().await;
}

// ------------------------------------------- startup: bounds and SIGTERM

/// Each binary, with one dependency (PostgreSQL, RabbitMQ, NATS) a server
/// that accepts and never answers: a one-line error naming it, exit 1,
/// within the connect bound; and SIGTERM while it waits there: exit 0 at
/// once. The others real, when they are there.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_dependency_is_a_clear_error_in_time_and_sigterm_exits_0_at_any_stage() {
    let test = "saga_startup";
    let mut cases = Vec::new();
    for binary in [ORDER_SAGA, INVENTORY] {
        for (what, flag) in [
            ("PostgreSQL", "--database"),
            ("RabbitMQ", "--amqp"),
            ("NATS", "--nats"),
        ] {
            let mut args = Vec::new();
            if what != "PostgreSQL" {
                let Some(db) = service_url("DATABASE_URL", test) else {
                    continue;
                };
                args.extend(strings(&["--database", &db]));
            }
            if what == "NATS" {
                args.extend(strings(&["--broker", "nats"]));
            }
            if binary == ORDER_SAGA {
                args.extend(strings(&["--listen", "127.0.0.1:0"]));
            }
            cases.push((binary, what, flag, args));
        }
    }
    let checks = cases
        .into_iter()
        .map(|(binary, what, flag, args)| async move {
            let name = binary.rsplit('/').next().unwrap_or(binary);
            for sigterm in [false, true] {
                let silent = test_support::SilentServer::start().await;
                let url = match what {
                    "PostgreSQL" => format!("postgres://postgres:secret-pw@{}/test", silent.addr),
                    "RabbitMQ" => format!("amqp://guest:secret-pw@{}/%2f", silent.addr),
                    _ => format!("nats://{}", silent.addr),
                };
                let mut args = args.clone();
                args.extend([flag.to_owned(), url]);
                let child = Command::new(binary)
                    .args(&args)
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("the binary runs");
                let started = Instant::now();
                if sigterm {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let pid = child.id().expect("running").to_string();
                    let sent = std::process::Command::new("kill")
                        .args(["-TERM", &pid])
                        .status();
                    assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
                }
                let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                    .await
                    .unwrap_or_else(|_| panic!("{name} ({what} silent) still runs after 20 s"))
                    .expect("its output");
                let took = started.elapsed();
                let log = String::from_utf8_lossy(&out.stderr).into_owned();
                let last = log.lines().last().unwrap_or_default().to_owned();
                if sigterm {
                    assert_eq!(
                        out.status.code(),
                        Some(0),
                        "{name}, SIGTERM while {what} is silent: {log}"
                    );
                    assert!(
                        took < Duration::from_secs(4),
                        "{name}: SIGTERM took {took:?}"
                    );
                } else {
                    assert_eq!(out.status.code(), Some(1), "{name}, {what} silent: {log}");
                    assert!(
                        last.starts_with(&format!("{name}: ")) && last.contains(what),
                        "{name}: the error does not name {what}: {last}"
                    );
                    assert!(
                        !log.contains("secret-pw"),
                        "{name}: a password in the log: {log}"
                    );
                    assert!(
                        took < Duration::from_secs(15),
                        "{name}, {what} silent: failed after {took:?}"
                    );
                }
            }
        });
    futures_util::future::join_all(checks).await;
}

// --------------------------------------------------------------- the chaos

#[tokio::test(flavor = "multi_thread")]
async fn chaos_rabbitmq_orders_survive_kills_and_lost_answers() {
    chaos("saga_chaos_rabbitmq", Broker::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_nats_orders_survive_kills_and_lost_answers() {
    chaos("saga_chaos_nats", Broker::Nats).await;
}

/// Orders per run.
const ORDERS: u32 = 300;
/// Client tasks sending them.
const CLIENTS: u32 = 8;
/// Kills of each process.
const KILLS: u32 = 3;
/// The proxy loses about one answer of payments in this many.
const LOSE_ONE_IN: u32 = 4;

/// What an order is meant to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Completed.
    Good,
    /// Above `--decline-above`: compensated, no payment.
    Declined,
    /// No stock: compensated, no payment.
    OutOfStock,
    /// A `noship-` SKU: compensated, a payment and its refund.
    Unshippable,
    /// A SKU with little stock: completed or compensated, either way
    /// consistent.
    Scarce,
}

impl Kind {
    fn of(i: u32) -> Self {
        match i % 10 {
            0..=4 => Kind::Good,
            5 => Kind::Declined,
            6 => Kind::OutOfStock,
            7 => Kind::Unshippable,
            _ => Kind::Scarce,
        }
    }

    fn body(self, i: u32) -> Value {
        let quantity = 1 + i64::from(i % 3);
        let amount = 100 + i64::from(i % 7) * 100;
        let (sku, amount) = match self {
            Kind::Good => (format!("sku-{}", i % 4), amount),
            Kind::Declined => (format!("sku-{}", i % 4), DECLINE_ABOVE + amount),
            Kind::OutOfStock => ("empty-1".to_owned(), amount),
            Kind::Unshippable => ("noship-1".to_owned(), amount),
            Kind::Scarce => ("scarce-1".to_owned(), amount),
        };
        json!({"sku": sku, "quantity": quantity, "amount": amount})
    }
}

async fn chaos(test: &str, broker: Broker) {
    let Some(mut system) = System::start(test, broker, LOSE_ONE_IN).await else {
        return;
    };
    let started = Instant::now();
    let stock = [
        ("sku-0", 100_000),
        ("sku-1", 100_000),
        ("sku-2", 100_000),
        ("sku-3", 100_000),
        ("noship-1", 100_000),
        ("empty-1", 0),
        ("scarce-1", 20),
    ];
    system.seed(&stock).await;
    let addr = system.orders_addr;

    // The traffic: CLIENTS tasks share the orders; each order is sent 1 to
    // 3 times at once under one key, every copy retried until it gets 202.
    let next = Arc::new(AtomicU32::new(0));
    let retries = Arc::new(AtomicU32::new(0));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (next, retries) = (next.clone(), retries.clone());
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut placed = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ORDERS {
                    return placed;
                }
                let kind = Kind::of(i);
                let body = kind.body(i);
                let key = unique("order");
                let copies = 1 + rand::random::<u32>() % 3;
                let sends: Vec<_> = (0..copies)
                    .map(|_| {
                        let (client, body, key, retries) =
                            (client.clone(), body.clone(), key.clone(), retries.clone());
                        tokio::spawn(async move {
                            place(&client, addr, &key, &body, &retries, deadline).await
                        })
                    })
                    .collect();
                let mut ids = HashSet::new();
                for send in sends {
                    ids.insert(send.await.expect("a send task"));
                }
                assert_eq!(ids.len(), 1, "order {i}: copies got different ids: {ids:?}");
                placed.push((ids.into_iter().next().expect("an id"), kind));
                tokio::time::sleep(Duration::from_millis(
                    40 + u64::from(rand::random::<u32>() % 40),
                ))
                .await;
            }
        }));
    }

    // The chaos: each process SIGKILLed and restarted KILLS times,
    // staggered, while the orders come in.
    let mut kills: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut order = [Role::Saga, Role::Inventory, Role::Payments]
        .into_iter()
        .cycle();
    for _ in 0..KILLS * 3 {
        tokio::time::sleep(Duration::from_millis(
            250 + u64::from(rand::random::<u32>() % 250),
        ))
        .await;
        let role = order.next().expect("a role");
        system.kill(role).await;
        kills
            .entry(role.name())
            .or_default()
            .push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(
            50 + u64::from(rand::random::<u32>() % 200),
        ))
        .await;
        system.restart(role).await;
    }

    let mut placed = HashMap::new();
    for client in clients {
        placed.extend(client.await.expect("a client"));
    }
    let traffic = started.elapsed();
    for (role, at) in &kills {
        assert_eq!(at.len(), KILLS as usize);
        assert!(
            at[0] < traffic,
            "{role} was first killed after the traffic: {at:?}, traffic {traffic:?}"
        );
    }
    assert_eq!(placed.len(), ORDERS as usize, "one id per order");

    system.wait_until_final(Duration::from_secs(120)).await;
    let settled = started.elapsed();
    let books = Books::read(&system).await;
    books.check(&stock, &placed);
    let lost = system.proxy.dropped();
    assert!(
        lost > 0,
        "the proxy lost no answer: the test tested less than it says"
    );
    let summary = books.summary();
    system.finish().await;
    println!(
        "{test}: {ORDERS} orders ({summary}); traffic {traffic:?} with {} client retries; \
         final after {settled:?}; {lost} payments answers lost by the proxy; kills {kills:?}",
        retries.load(Ordering::SeqCst),
    );
}

/// Sends an order until it gets its 202 (retrying errors, 409 and 5xx),
/// before `deadline`: its id.
async fn place(
    client: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    body: &Value,
    retries: &AtomicU32,
    deadline: Instant,
) -> String {
    let mut last = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no 202 for {key} before the deadline; last: {last}"
        );
        match post(client, addr, "/orders", Some(key), body).await {
            Ok(a) if a.status == 202 => return a.json()["id"].as_str().expect("an id").to_owned(),
            Ok(a) if a.status == 409 || a.status >= 500 => last = format!("{a:?}"),
            Ok(a) => panic!("{key}: unexpected {a:?}"),
            Err(e) => last = e,
        }
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(
            20 + u64::from(rand::random::<u32>() % 30),
        ))
        .await;
    }
}

// ------------------------------------------------------------ the books

/// An order with its saga's state and payment.
type OrderRow = (String, String, i64, Option<String>, Option<String>);

/// What the three databases hold once every order is final.
struct Books {
    /// Order id → (sku, quantity, state, payment_id).
    orders: HashMap<String, (String, i64, String, Option<String>)>,
    /// Payment id → reference.
    payments: HashMap<String, Option<String>>,
    /// Payment ids refunded (one row each).
    refunds: Vec<String>,
    /// Order id → (sku, quantity, state).
    reservations: HashMap<String, (Option<String>, i64, String)>,
    available: HashMap<String, i64>,
    /// Why an order is not final: its saga's history.
    histories: HashMap<String, Vec<String>>,
    dead_events: i64,
}

impl Books {
    async fn read(system: &System) -> Self {
        let rows: Vec<OrderRow> = sqlx::query_as(
            "SELECT o.id, o.sku, o.quantity, i.state, i.data ->> 'payment_id' \
             FROM orders o LEFT JOIN saga.instances i ON i.id = o.id",
        )
        .fetch_all(&system.orders.pool)
        .await
        .expect("the orders");
        let mut histories = HashMap::new();
        for (id, _, _, state, _) in &rows {
            if !matches!(state.as_deref(), Some("completed" | "compensated")) {
                let history: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT event, step, detail FROM saga.history WHERE instance_id = $1 ORDER BY seq",
                )
                .bind(id)
                .fetch_all(&system.orders.pool)
                .await
                .expect("a history");
                histories.insert(
                    id.clone(),
                    history
                        .into_iter()
                        .map(|(e, s, d)| {
                            format!("{e} {} {}", s.unwrap_or_default(), d.unwrap_or_default())
                        })
                        .collect(),
                );
            }
        }
        let orders = rows
            .into_iter()
            .map(|(id, sku, quantity, state, payment)| {
                (
                    id,
                    (
                        sku,
                        quantity,
                        state.unwrap_or_else(|| "none".into()),
                        payment,
                    ),
                )
            })
            .collect();
        let payments =
            sqlx::query_as::<_, (String, Option<String>)>("SELECT id, reference FROM payments")
                .fetch_all(&system.payments.pool)
                .await
                .expect("the payments")
                .into_iter()
                .collect();
        let refunds = sqlx::query_scalar("SELECT payment_id FROM refunds")
            .fetch_all(&system.payments.pool)
            .await
            .expect("the refunds");
        let reservations = sqlx::query_as::<_, (String, Option<String>, i64, String)>(
            "SELECT order_id, sku, quantity, state FROM inventory_reservations",
        )
        .fetch_all(&system.inventory.pool)
        .await
        .expect("the reservations")
        .into_iter()
        .map(|(id, sku, q, state)| (id, (sku, q, state)))
        .collect();
        let available =
            sqlx::query_as::<_, (String, i64)>("SELECT sku, available FROM inventory_stock")
                .fetch_all(&system.inventory.pool)
                .await
                .expect("the stock")
                .into_iter()
                .collect();
        let mut dead_events = 0;
        for db in [&system.orders, &system.inventory] {
            dead_events += db
                .count("SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL")
                .await;
        }
        Self {
            orders,
            payments,
            refunds,
            reservations,
            available,
            histories,
            dead_events,
        }
    }

    /// Orders (by id) whose payment was refunded.
    fn refunded_orders(&self) -> HashSet<String> {
        self.refunds
            .iter()
            .filter_map(|p| self.payments.get(p).cloned().flatten())
            .filter_map(|r| r.strip_prefix("order-").map(str::to_owned))
            .collect()
    }

    fn summary(&self) -> String {
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, state, _) in self.orders.values() {
            *by_state.entry(state.as_str()).or_default() += 1;
        }
        format!(
            "{by_state:?}, {} payments, {} refunds",
            self.payments.len(),
            self.refunds.len()
        )
    }

    /// Every order final and the books add up: a completed order has
    /// exactly one payment (reference `order-<id>`), no refund, and its
    /// reservation shipped; a compensated one no payment, or one payment
    /// and one refund, and nothing left reserved; each SKU's stock is its
    /// initial stock less the completed orders' quantities; no reference
    /// is paid twice; and each kind of order (`placed`) ended as it must.
    fn check(&self, stock: &[(&str, i64)], placed: &HashMap<String, Kind>) {
        let mut wrong = Vec::new();
        let not_final: Vec<_> = self
            .orders
            .iter()
            .filter(|(_, (_, _, state, _))| state != "completed" && state != "compensated")
            .map(|(id, (sku, _, state, _))| {
                format!("{id} ({sku}) is {state}: {:?}", self.histories.get(id))
            })
            .collect();
        assert!(
            not_final.is_empty(),
            "orders not final:\n{}",
            not_final.join("\n")
        );
        let mut by_reference: HashMap<&str, Vec<&str>> = HashMap::new();
        for (payment, reference) in &self.payments {
            let reference = reference.as_deref().unwrap_or("<none>");
            by_reference.entry(reference).or_default().push(payment);
        }
        for (reference, payments) in &by_reference {
            if payments.len() > 1 {
                wrong.push(format!(
                    "reference {reference} paid {} times: {payments:?}",
                    payments.len()
                ));
            }
            let known = reference
                .strip_prefix("order-")
                .is_some_and(|id| self.orders.contains_key(id));
            if !known {
                wrong.push(format!(
                    "payment(s) {payments:?} of no order: reference {reference}"
                ));
            }
        }
        let mut refunds: HashMap<&str, usize> = HashMap::new();
        for payment in &self.refunds {
            *refunds.entry(payment.as_str()).or_default() += 1;
        }
        let mut sold: HashMap<&str, i64> = HashMap::new();
        for (id, (sku, quantity, state, payment_id)) in &self.orders {
            let paid = by_reference
                .get(format!("order-{id}").as_str())
                .cloned()
                .unwrap_or_default();
            let refunded: usize = paid
                .iter()
                .map(|p| refunds.get(p).copied().unwrap_or(0))
                .sum();
            let reservation = self.reservations.get(id);
            let reserved = reservation.map(|(_, _, s)| s.as_str());
            match state.as_str() {
                "completed" => {
                    *sold.entry(sku.as_str()).or_default() += quantity;
                    if paid.len() != 1 || refunded != 0 {
                        wrong.push(format!(
                            "completed {id}: {} payments, {refunded} refunds",
                            paid.len()
                        ));
                    } else if payment_id.as_deref() != Some(paid[0]) {
                        wrong.push(format!(
                            "completed {id}: payment_id {payment_id:?}, paid {paid:?}"
                        ));
                    }
                    if reserved != Some("shipped") {
                        wrong.push(format!("completed {id}: reservation {reservation:?}"));
                    }
                }
                _ => {
                    if !(paid.is_empty() || (paid.len() == 1 && refunded == 1)) {
                        wrong.push(format!(
                            "compensated {id}: {} payments, {refunded} refunds",
                            paid.len()
                        ));
                    }
                    if reserved == Some("reserved") || reserved == Some("shipped") {
                        wrong.push(format!("compensated {id}: reservation {reservation:?}"));
                    }
                }
            }
            if let Some(kind) = placed.get(id) {
                let as_meant = match kind {
                    Kind::Good => state == "completed",
                    Kind::Declined | Kind::OutOfStock => state == "compensated" && paid.is_empty(),
                    Kind::Unshippable => state == "compensated" && paid.len() == 1 && refunded == 1,
                    Kind::Scarce => true,
                };
                if !as_meant {
                    wrong.push(format!(
                        "{kind:?} order {id} ({sku}) ended {state} with {} payments, {refunded} refunds",
                        paid.len()
                    ));
                }
            }
        }
        for (payment, n) in &refunds {
            if *n > 1 {
                wrong.push(format!("payment {payment} refunded {n} times"));
            }
        }
        for (sku, initial) in stock {
            let expected = initial - sold.get(sku).copied().unwrap_or(0);
            let available = self.available.get(*sku).copied();
            if available != Some(expected) {
                wrong.push(format!(
                    "{sku}: available {available:?}, expected {expected} ({initial} less {} sold)",
                    sold.get(sku).copied().unwrap_or(0)
                ));
            }
        }
        if !placed.is_empty() {
            let ids: HashSet<&String> = placed.keys().collect();
            let rows: HashSet<&String> = self.orders.keys().collect();
            if ids != rows {
                wrong.push(format!(
                    "orders answered {} but {} rows (a retried POST made a second order?)",
                    ids.len(),
                    rows.len()
                ));
            }
        }
        if self.dead_events > 0 {
            wrong.push(format!("{} dead outbox events", self.dead_events));
        }
        assert!(
            wrong.is_empty(),
            "the books do not add up:\n{}",
            wrong.join("\n")
        );
    }
}

// ----------------------------------------------------------- the system

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Rabbitmq,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Saga,
    Inventory,
    Payments,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Saga => "order-saga",
            Role::Inventory => "inventory-service",
            Role::Payments => "payments-axum",
        }
    }
}

/// The three services, each on a database of its own, and the proxy that
/// loses payments' answers.
struct System {
    broker: Broker,
    broker_url: String,
    prefix: String,
    orders: PgDatabase,
    inventory: PgDatabase,
    payments: PgDatabase,
    orders_addr: SocketAddr,
    payments_addr: SocketAddr,
    proxy: LossyProxy,
    saga: Proc,
    inventory_proc: Proc,
    payments_proc: Proc,
}

impl System {
    /// `None` (the reason printed) when a service it needs is unset.
    async fn start(test: &str, broker: Broker, lose_one_in: u32) -> Option<Self> {
        let (var, _) = match broker {
            Broker::Rabbitmq => ("AMQP_URL", ()),
            Broker::Nats => ("NATS_URL", ()),
        };
        let broker_url = service_url(var, test)?;
        let orders = PgDatabase::create(&format!("{test}_orders")).await?;
        let inventory = PgDatabase::create(&format!("{test}_inventory")).await?;
        let payments = PgDatabase::create(&format!("{test}_payments")).await?;
        let prefix = format!("{}_", unique("saga"));
        let payments_addr: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
        let orders_addr: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
        let proxy = LossyProxy::start(payments_addr.to_string(), lose_one_in).await;
        let mut system = Self {
            broker,
            broker_url,
            prefix,
            orders,
            inventory,
            payments,
            orders_addr,
            payments_addr,
            proxy,
            saga: Proc::idle(Role::Saga),
            inventory_proc: Proc::idle(Role::Inventory),
            payments_proc: Proc::idle(Role::Payments),
        };
        for role in [Role::Payments, Role::Inventory, Role::Saga] {
            system.restart(role).await;
        }
        Some(system)
    }

    fn broker_args(&self) -> Vec<String> {
        let (name, flag) = match self.broker {
            Broker::Rabbitmq => ("rabbitmq", "--amqp"),
            Broker::Nats => ("nats", "--nats"),
        };
        strings(&[
            "--broker",
            name,
            flag,
            &self.broker_url,
            "--prefix",
            &self.prefix,
        ])
    }

    fn args(&self, role: Role) -> Vec<String> {
        match role {
            Role::Payments => strings(&[
                "--listen",
                &self.payments_addr.to_string(),
                "--store",
                &self.payments.url,
                "--transactional",
                "--decline-above",
                &DECLINE_ABOVE.to_string(),
                "--handler-delay",
                "3ms",
            ]),
            Role::Inventory => {
                let mut args =
                    strings(&["--database", &self.inventory.url, "--handler-delay", "2ms"]);
                args.extend(self.broker_args());
                args
            }
            Role::Saga => {
                let mut args = strings(&[
                    "--listen",
                    &self.orders_addr.to_string(),
                    "--database",
                    &self.orders.url,
                    "--payments-url",
                    &format!("http://{}", self.proxy.addr),
                    "--step-timeout",
                    "20s",
                ]);
                args.extend(self.broker_args());
                args
            }
        }
    }

    fn proc(&mut self, role: Role) -> &mut Proc {
        match role {
            Role::Saga => &mut self.saga,
            Role::Inventory => &mut self.inventory_proc,
            Role::Payments => &mut self.payments_proc,
        }
    }

    /// SIGKILL: no shutdown of any kind.
    async fn kill(&mut self, role: Role) {
        self.proc(role).kill().await;
    }

    /// Starts `role` (again), waiting until it is ready.
    async fn restart(&mut self, role: Role) {
        let args = self.args(role);
        let ready = match role {
            Role::Saga => "order-saga serving",
            Role::Inventory => "inventory-service ready",
            Role::Payments => "payments-axum serving",
        };
        let binary = match role {
            Role::Saga => ORDER_SAGA,
            Role::Inventory => INVENTORY,
            Role::Payments => PAYMENTS,
        };
        self.proc(role).start(binary, &args, ready).await;
    }

    /// Stock rows (the inventory service created its tables when ready).
    async fn seed(&self, stock: &[(&str, i64)]) {
        for (sku, available) in stock {
            sqlx::query("INSERT INTO inventory_stock (sku, available) VALUES ($1, $2)")
                .bind(sku)
                .bind(available)
                .execute(&self.inventory.pool)
                .await
                .expect("seeding the stock");
        }
    }

    /// Waits until no saga instance runs or compensates.
    async fn wait_until_final(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let open = self
                .orders
                .count(
                    "SELECT count(*) FROM orders o LEFT JOIN saga.instances i ON i.id = o.id \
                     WHERE i.state IS NULL OR i.state IN ('running', 'compensating')",
                )
                .await;
            if open == 0 {
                return;
            }
            if Instant::now() > deadline {
                let stuck: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
                    "SELECT id, state, step, failure FROM saga.instances \
                     WHERE state IN ('running', 'compensating') LIMIT 10",
                )
                .fetch_all(&self.orders.pool)
                .await
                .unwrap_or_default();
                let mut report =
                    format!("{open} orders still pending after {within:?}: {stuck:?}\n");
                for (id, ..) in stuck.iter().take(3) {
                    let history: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
                        "SELECT event, step, detail FROM saga.history WHERE instance_id = $1 ORDER BY seq",
                    )
                    .bind(id)
                    .fetch_all(&self.orders.pool)
                    .await
                    .unwrap_or_default();
                    report.push_str(&format!("{id}: {history:?}\n"));
                }
                for proc in [&self.saga, &self.inventory_proc, &self.payments_proc] {
                    report.push_str(&format!(
                        "--- {} (last lines)\n{}",
                        proc.name,
                        proc.tail(15)
                    ));
                }
                panic!("{report}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the services and drops what the run made.
    async fn finish(mut self) {
        for role in [Role::Saga, Role::Inventory, Role::Payments] {
            self.proc(role).kill().await;
        }
        match self.broker {
            Broker::Rabbitmq => {
                if let Ok(conn) = lapin::Connection::connect(
                    &self.broker_url,
                    lapin::ConnectionProperties::default(),
                )
                .await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        for queue in ["inventory", "orders"] {
                            let _ = ch
                                .queue_delete(
                                    format!("{}{queue}", self.prefix).as_str().into(),
                                    lapin::options::QueueDeleteOptions::default(),
                                )
                                .await;
                        }
                    }
                }
            }
            Broker::Nats => {
                if let Ok(client) = async_nats::connect(&self.broker_url).await {
                    let js = async_nats::jetstream::new(client);
                    for stream in ["INVENTORY", "ORDERS"] {
                        let _ = js.delete_stream(format!("{}{stream}", self.prefix)).await;
                    }
                }
            }
        }
        for db in [self.orders, self.inventory, self.payments] {
            db.finish().await;
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// One service's process (restarted in place), its logs kept across
/// restarts for the report of a failure.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn idle(role: Role) -> Self {
        Self {
            name: role.name(),
            child: None,
            log: Arc::default(),
        }
    }

    async fn start(&mut self, binary: &str, args: &[String], ready: &str) {
        let mut child = Command::new(binary)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::clone(&self.log);
        let mark = {
            let mut log = log.lock().unwrap();
            log.push_str(&format!("=== started {}\n", self.name));
            log.len()
        };
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            if self.log.lock().unwrap()[mark..].contains(ready) {
                self.child = Some(child);
                return;
            }
            let exited = child.try_wait().expect("wait");
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill().await;
                panic!(
                    "{} was not ready ({exited:?}); log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            self.log.lock().unwrap().push_str("=== SIGKILL\n");
        }
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().and_then(Child::id).expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid}");
    }

    async fn exit_within(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let status = tokio::time::timeout(within, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: still running after {within:?}", self.name))
            .expect("wait");
        self.child = None;
        status.code()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let mut out = all[all.len().saturating_sub(lines)..].join("\n");
        out.push('\n');
        out
    }
}

// ---------------------------------------------------------------- HTTP

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    location: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

async fn answer(response: reqwest::Response) -> Result<Answer, String> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (content_type, location) = (
        header("content-type").unwrap_or_default(),
        header("location"),
    );
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        content_type,
        location,
        body,
    })
}

async fn post(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> Result<Answer, String> {
    let mut request = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    answer(request.send().await.map_err(|e| e.to_string())?).await
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Answer {
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    answer(response).await.expect("an answer")
}
