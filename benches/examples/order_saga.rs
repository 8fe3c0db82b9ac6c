//! Orders per second end to end through the order saga, and the latency
//! from `POST /orders` to `completed` (p50, p99), on RabbitMQ or NATS,
//! against a floor measured in the same run: the same number of commits
//! per order, done back to back.
//!
//! ```text
//! cargo build --release -p examples --bins
//! cargo run --release -p benches --example order_saga -- --broker rabbitmq
//! cargo run --release -p benches --example order_saga -- --broker nats
//! ```
//!
//! (`--orders N`, default 1000; `--clients N`, default 8; `--workers N`,
//! order-saga's, default 4; `--keep` keeps the run's databases, to read
//! `saga.history`.) It starts the release binaries `payments-axum` (`--transactional`),
//! `inventory-service` and `order-saga` (from `--bin-dir`, by default the
//! directory above this example's), each on a PostgreSQL database of its
//! own made for the run on the server of `DATABASE_URL`, under a prefix of
//! its own on the broker (`AMQP_URL`, `NATS_URL`). `--clients` clients each
//! place an order, wait until it is final, and place the next, `--orders`
//! in all (a closed loop). The latency of an order is from the start of the
//! transaction of its `POST /orders` to the start of its last transition
//! (`saga.instances.created_at` to `updated_at`, both the database's
//! clock); the rate is orders over the wall-clock time of the loop.
//!
//! An order is 8 commits on its way: `POST /orders` (the order, the saga
//! instance, the `reserve` command and the idempotency record), `reserve`
//! in the inventory, its reply in the saga, the charge's claim, the
//! payment, the charge's outcome (and the `ship` command), `ship` in the
//! inventory, its reply in the saga; plus the relays' marks, shared by
//! their batches. The floor: the same clients, each running 8 commits back
//! to back per order (an `INSERT` in a transaction of its own, on one
//! database of the same server): what the commits alone would allow.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Business commits of one order (see the module docs).
const COMMITS_PER_ORDER: u32 = 8;

struct Args {
    broker: String,
    orders: u32,
    clients: u32,
    workers: u32,
    bin_dir: PathBuf,
    keep: bool,
}

fn args() -> Args {
    let mut args = Args {
        broker: "rabbitmq".into(),
        orders: 1000,
        clients: 8,
        workers: 4,
        bin_dir: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.to_path_buf()))
            .unwrap_or_else(|| PathBuf::from("target/release")),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--broker" => args.broker = value(),
            "--orders" => args.orders = value().parse().unwrap_or_else(|_| usage("--orders N")),
            "--clients" => args.clients = value().parse().unwrap_or_else(|_| usage("--clients N")),
            "--workers" => args.workers = value().parse().unwrap_or_else(|_| usage("--workers N")),
            "--bin-dir" => args.bin_dir = PathBuf::from(value()),
            "--keep" => args.keep = true,
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if !matches!(args.broker.as_str(), "rabbitmq" | "nats") {
        usage("--broker rabbitmq|nats");
    }
    args
}

fn usage(why: &str) -> ! {
    eprintln!(
        "order_saga: {why}\nusage: order_saga [--broker rabbitmq|nats] [--orders N] \
         [--clients N] [--workers N] [--bin-dir DIR] [--keep]"
    );
    std::process::exit(2)
}

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("order_saga: {var} is not set");
        std::process::exit(2)
    })
}

/// A database of the run's own on the server of `DATABASE_URL`.
struct Db {
    name: String,
    url: String,
    pool: PgPool,
}

async fn database(admin: &PgPool, base: &str, name: String) -> Db {
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin)
        .await
        .expect("CREATE DATABASE");
    let root = &base[..base.rfind('/').expect("a database in DATABASE_URL")];
    let url = format!("{root}/{name}");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("the new database");
    Db { name, url, pool }
}

/// A service of the run; killed on drop.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &std::path::Path, binary: &str, args: &[&str], log: &std::path::Path) -> Service {
    let path = dir.join(binary);
    assert!(
        path.exists(),
        "{} is missing: cargo build --release -p examples --bins (or --bin-dir)",
        path.display()
    );
    let file = std::fs::File::create(log).expect("a log file");
    let child = Command::new(&path)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("the service runs");
    Service(child)
}

async fn wait_healthy(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "{url} did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = args();
    let base = env("DATABASE_URL");
    let broker_url = env(if args.broker == "rabbitmq" {
        "AMQP_URL"
    } else {
        "NATS_URL"
    });
    let admin = PgPool::connect(&base).await.expect("PostgreSQL");
    let run = format!("bench_saga_{:08x}", rand_u32());
    let orders_db = database(&admin, &base, format!("{run}_orders")).await;
    let inventory_db = database(&admin, &base, format!("{run}_inventory")).await;
    let payments_db = database(&admin, &base, format!("{run}_payments")).await;
    let prefix = format!("{run}_");
    let logs = std::env::temp_dir();
    let (payments_port, orders_port) = (free_port(), free_port());
    let broker_flag = if args.broker == "rabbitmq" {
        "--amqp"
    } else {
        "--nats"
    };
    let broker = [
        "--broker",
        args.broker.as_str(),
        broker_flag,
        broker_url.as_str(),
        "--prefix",
        prefix.as_str(),
    ];
    let payments_listen = format!("127.0.0.1:{payments_port}");
    let payments = spawn(
        &args.bin_dir,
        "payments-axum",
        &[
            "--listen",
            &payments_listen,
            "--store",
            &payments_db.url,
            "--transactional",
        ],
        &logs.join(format!("{run}-payments.log")),
    );
    let mut inventory_args = vec!["--database", inventory_db.url.as_str()];
    inventory_args.extend(broker);
    let inventory = spawn(
        &args.bin_dir,
        "inventory-service",
        &inventory_args,
        &logs.join(format!("{run}-inventory.log")),
    );
    let orders_listen = format!("127.0.0.1:{orders_port}");
    let payments_url = format!("http://{payments_listen}");
    let workers = args.workers.to_string();
    let mut saga_args = vec![
        "--listen",
        orders_listen.as_str(),
        "--database",
        orders_db.url.as_str(),
        "--payments-url",
        payments_url.as_str(),
        "--workers",
        workers.as_str(),
    ];
    saga_args.extend(broker);
    let saga = spawn(
        &args.bin_dir,
        "order-saga",
        &saga_args,
        &logs.join(format!("{run}-order-saga.log")),
    );
    let client = reqwest::Client::new();
    wait_healthy(&client, &format!("http://{payments_listen}/healthz")).await;
    wait_healthy(&client, &format!("http://{orders_listen}/healthz")).await;
    // The inventory's tables exist once it is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query("INSERT INTO inventory_stock (sku, available) VALUES ('bench', 1000000000)")
        .execute(&inventory_db.pool)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "inventory-service did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A short warm-up (connections, caches), then the measured loop.
    drive(
        &client,
        &orders_listen,
        &orders_db.pool,
        2 * args.clients,
        args.clients,
    )
    .await;
    let warm: Vec<String> = sqlx::query_scalar("SELECT id FROM saga.instances")
        .fetch_all(&orders_db.pool)
        .await
        .expect("the warm-up's instances");
    let commits_before = commits(&admin, &[&orders_db, &inventory_db, &payments_db]).await;
    let started = Instant::now();
    drive(
        &client,
        &orders_listen,
        &orders_db.pool,
        args.orders,
        args.clients,
    )
    .await;
    let elapsed = started.elapsed();
    let commits_after = commits(&admin, &[&orders_db, &inventory_db, &payments_db]).await;
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT state, EXTRACT(EPOCH FROM (updated_at - created_at))::float8 FROM saga.instances \
         WHERE NOT (id = ANY($1))",
    )
    .bind(&warm)
    .fetch_all(&orders_db.pool)
    .await
    .expect("the instances");
    let not_completed = rows.iter().filter(|(s, _)| s != "completed").count();
    let mut latencies: Vec<f64> = rows.iter().map(|(_, l)| l * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    let rate = f64::from(args.orders) / elapsed.as_secs_f64();
    let per_order = (commits_after - commits_before) as f64 / f64::from(args.orders);
    drop((saga, inventory, payments));

    // The floor, on the orders database.
    let floor = floor(&orders_db.pool, args.orders, args.clients).await;

    println!(
        "order saga, {}: {} orders, {} clients, {} workers",
        args.broker, args.orders, args.clients, args.workers
    );
    println!(
        "  end to end:  {rate:8.1} orders/s   p50 {:7.1} ms   p99 {:7.1} ms   ({not_completed} not completed; \
         {per_order:.1} transactions per order counted by PostgreSQL, reads and relay marks included)",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    );
    println!(
        "  floor:       {:8.1} orders/s   p50 {:7.1} ms   p99 {:7.1} ms   ({COMMITS_PER_ORDER} commits back to back per order)",
        floor.0, floor.1, floor.2
    );
    println!(
        "  end to end / floor: {:.2}x the rate, {:.1}x the p50",
        rate / floor.0,
        percentile(&latencies, 50.0) / floor.1
    );
    for db in [orders_db, inventory_db, payments_db] {
        db.pool.close().await;
        if args.keep {
            println!("  kept database {}", db.name);
            continue;
        }
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name))
            .execute(&admin)
            .await;
    }
    delete_broker_names(&args.broker, &broker_url, &prefix).await;
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

/// Transactions committed in the databases so far (PostgreSQL's counter,
/// which every statement outside an explicit transaction also moves).
async fn commits(admin: &PgPool, dbs: &[&Db]) -> i64 {
    // The statistics are flushed at the end of each transaction, at most
    // once a second: give them that second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
    sqlx::query_scalar(
        "SELECT sum(xact_commit)::int8 FROM pg_stat_database WHERE datname = ANY($1)",
    )
    .bind(&names)
    .fetch_one(admin)
    .await
    .expect("pg_stat_database")
}

/// Orders placed and not yet final, each with its client's wake-up.
type Waiting = Vec<(String, tokio::sync::oneshot::Sender<()>)>;

/// `orders` orders, `clients` at a time, each client waiting until its
/// order is final before placing the next.
async fn drive(client: &reqwest::Client, listen: &str, pool: &PgPool, orders: u32, clients: u32) {
    let next = Arc::new(AtomicU32::new(0));
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    // One poller for every client: one query per round.
    let poller = {
        let (waiting, pool) = (waiting.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                let ids: Vec<String> = waiting
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(i, _)| i.clone())
                    .collect();
                if !ids.is_empty() {
                    let done: Vec<String> = sqlx::query_scalar(
                        "SELECT id FROM saga.instances WHERE id = ANY($1) \
                         AND state IN ('completed', 'compensated', 'failed')",
                    )
                    .bind(&ids)
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_default();
                    let mut waiting = waiting.lock().unwrap();
                    let mut i = 0;
                    while i < waiting.len() {
                        if done.contains(&waiting[i].0) {
                            let (_, tx) = waiting.swap_remove(i);
                            let _ = tx.send(());
                        } else {
                            i += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, next, waiting) = (client.clone(), next.clone(), waiting.clone());
            let url = format!("http://{listen}/orders");
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= orders {
                        return;
                    }
                    let body = format!(
                        r#"{{"sku":"bench","quantity":1,"amount":{}}}"#,
                        100 + i % 50
                    );
                    let response = client
                        .post(&url)
                        .header("idempotency-key", format!("bench-{c}-{i}-{}", rand_u32()))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("POST /orders");
                    assert_eq!(response.status().as_u16(), 202, "POST /orders");
                    let created: serde_json::Value =
                        serde_json::from_slice(&response.bytes().await.expect("a body"))
                            .expect("JSON");
                    let id = created["id"].as_str().expect("an id").to_owned();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiting.lock().unwrap().push((id, tx));
                    tokio::time::timeout(Duration::from_secs(60), rx)
                        .await
                        .expect("an order did not end within 60 s")
                        .expect("the poller");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client");
    }
    poller.abort();
}

/// The floor: `clients` clients, each running [`COMMITS_PER_ORDER`]
/// commits back to back per order: (orders/s, p50 ms, p99 ms).
async fn floor(pool: &PgPool, orders: u32, clients: u32) -> (f64, f64, f64) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .expect("the floor's pool");
    sqlx::query("CREATE TABLE bench_floor (order_id BIGINT NOT NULL, step INT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&pool)
        .await
        .expect("the floor's table");
    let next = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (pool, next) = (pool.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= orders {
                        return latencies;
                    }
                    let began = Instant::now();
                    for step in 0..COMMITS_PER_ORDER {
                        let mut tx = pool.begin().await.expect("begin");
                        sqlx::query("INSERT INTO bench_floor (order_id, step) VALUES ($1, $2)")
                            .bind(i64::from(i))
                            .bind(step as i32)
                            .execute(&mut *tx)
                            .await
                            .expect("insert");
                        tx.commit().await.expect("commit");
                    }
                    latencies.push(began.elapsed().as_secs_f64() * 1000.0);
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("a floor client"));
    }
    let rate = f64::from(orders) / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    pool.close().await;
    (
        rate,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    )
}

async fn delete_broker_names(broker: &str, url: &str, prefix: &str) {
    if broker == "rabbitmq" {
        if let Ok(conn) =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
        {
            if let Ok(ch) = conn.create_channel().await {
                for queue in ["inventory", "orders"] {
                    let _ = ch
                        .queue_delete(
                            format!("{prefix}{queue}").as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
            }
        }
    } else if let Ok(client) = async_nats::connect(url).await {
        let js = async_nats::jetstream::new(client);
        for stream in ["INVENTORY", "ORDERS"] {
            let _ = js.delete_stream(format!("{prefix}{stream}")).await;
        }
    }
}
