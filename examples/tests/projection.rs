//! `payments-projection` end to end, on the real binaries: payments go in
//! through `payments-axum --transactional --outbox`, their events reach the
//! read model from the outbox table itself or through `outbox-relay` and
//! RabbitMQ or NATS JetStream, and `GET /totals` must equal the totals of
//! the `payments` table:
//!
//! - the chaos runs: 2 000 payments from 8 clients, some through a server
//!   that holds its transactions open (`--handler-delay`, so that events
//!   commit out of `seq` order), while two projection processes are
//!   SIGKILLed and restarted again and again; one per source;
//! - a rebuild under load: version 2 starts while payments keep arriving
//!   and version 1 serves; every process switches to version 2, which is
//!   exact, and the version-1 processes go on feeding it once the version-2
//!   process is gone; outbox and NATS (RabbitMQ keeps no history: refused);
//! - a poison event is parked and the events behind it applied;
//! - startup: `--help`, silent services, SIGTERM (at startup and while
//!   running).
//!
//! Tests read `DATABASE_URL`, `AMQP_URL` and `NATS_URL` at run time and
//! skip, saying why, when one they need is unset. Each test has a
//! PostgreSQL database of its own, and its own queue or stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use test_support::{bounded, eventually, service_url, unique, PgDatabase, SilentServer};

const PROJECTION: &str = env!("CARGO_BIN_EXE_payments-projection");
const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const RELAY: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// How long a binary may take to be ready, or to fail at startup.
const STARTUP: Duration = Duration::from_secs(30);
/// The longest one HTTP exchange may take.
const EXCHANGE: Duration = Duration::from_secs(10);
/// The currencies of the traffic.
const CURRENCIES: [&str; 5] = ["CHF", "EUR", "GBP", "JPY", "USD"];

/// Per currency: (total, count).
type Totals = BTreeMap<String, (i64, i64)>;

// ------------------------------------------------------------- the chaos

#[tokio::test(flavor = "multi_thread")]
async fn chaos_outbox_2000_payments_projection_killed_and_restarted_totals_exact() {
    chaos(Src::Outbox, "chaos_outbox").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_rabbitmq_2000_payments_projection_killed_and_restarted_totals_exact() {
    chaos(Src::Rabbitmq, "chaos_rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_nats_2000_payments_projection_killed_and_restarted_totals_exact() {
    chaos(Src::Nats, "chaos_nats").await;
}

/// 2 000 payments from 8 clients, one in five through a server whose
/// transactions stay open 150 ms (events committing after later ones),
/// while two projection processes are SIGKILLed and restarted, one at a
/// time, every 0.6-1.2 s (at least 5 kills). Then `GET /totals` of each
/// equals the totals of the `payments` table, and stays so; nothing parked.
async fn chaos(src: Src, test: &str) {
    const PAYMENTS: u32 = 2_000;
    const CLIENTS: u32 = 8;
    const KILLS: u32 = 5;
    let Some(env) = Env::new(src, test).await else {
        return;
    };
    let started = Instant::now();
    let fast = Proc::server(&env.db.url, &[]).await;
    let slow = Proc::server(&env.db.url, &["--handler-delay", "150ms"]).await;
    let _relay = env.relay().await;
    let args = env.projection_args(1);
    // With a broker, one process applies a message per transaction and the
    // other batches of up to 20 (`--batch`); a restart takes the mode of
    // the process it replaces.
    let batched = if src == Src::Outbox {
        args.clone()
    } else {
        let mut batched = args.clone();
        batched.extend(["--batch".to_owned(), "20".to_owned()]);
        batched
    };
    let mut projections = vec![
        (Proc::projection(&args).await, false),
        (Proc::projection(&batched).await, true),
    ];

    let traffic = Traffic::new(vec![fast.addr(), slow.addr()]);
    let clients = traffic.clients(CLIENTS, Some(PAYMENTS), Duration::ZERO);
    let done = Arc::new(AtomicBool::new(false));
    let chaos = {
        let done = done.clone();
        let (args, batched) = (args.clone(), batched.clone());
        tokio::spawn(async move {
            let mut kills = Vec::new();
            while !done.load(Ordering::SeqCst) || kills.len() < KILLS as usize {
                tokio::time::sleep(jitter(600, 600)).await;
                let i = rand::random::<u32>() as usize % projections.len();
                let (victim, batches) = projections.swap_remove(i);
                victim.kill().await;
                kills.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
                let again = if batches { &batched } else { &args };
                projections.push((Proc::projection(again).await, batches));
            }
            (projections, kills)
        })
    };
    let created = bounded("the traffic", clients).await;
    let traffic_took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let (projections, kills) = bounded("the chaos", chaos).await.expect("the chaos task");
    assert_eq!(created, PAYMENTS);
    assert!(
        kills[0] < traffic_took,
        "the first kill came after the traffic: {kills:?}, traffic {traffic_took:?}"
    );

    let expected = env.db_totals().await;
    assert_eq!(
        expected.values().map(|(_, n)| n).sum::<i64>(),
        i64::from(PAYMENTS)
    );
    for (p, _) in &projections {
        p.serves(&expected, 1).await;
    }
    // Stays so: no copy applied late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (p, _) in &projections {
        let (version, totals) = p.totals().await.expect("GET /totals");
        assert_eq!((version, &totals), (1, &expected), "{test}: later");
    }
    assert_eq!(
        env.db.count("SELECT count(*) FROM projection.parked").await,
        0
    );
    println!(
        "{test}: {PAYMENTS} payments in {traffic_took:?} ({} client retries), {} kills at \
         {kills:?}, exact after {:?}",
        traffic.retries.load(Ordering::SeqCst),
        kills.len(),
        started.elapsed()
    );
    drop(projections);
    env.finish().await;
}

// ---------------------------------------------------------- the rebuild

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_outbox_under_load_version_2_served_everywhere_and_exact() {
    rebuild(Src::Outbox, "rebuild_outbox").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_nats_under_load_version_2_served_everywhere_and_exact() {
    rebuild(Src::Nats, "rebuild_nats").await;
}

/// Two version-1 processes serve while payments arrive; once 300 payments
/// are in, a version-2 process starts and builds from the history. Every
/// answer of a version-1 process meanwhile is 200 and its version never goes
/// down; all three end up serving version 2. The version-2 process is then
/// SIGKILLed: the version-1 processes feed version 2 from then on, and
/// after the traffic their totals are exact, with `Projection-Version: 2`.
async fn rebuild(src: Src, test: &str) {
    const CLIENTS: u32 = 4;
    const HISTORY: i64 = 300;
    // Each client pauses between payments (at most ~130 payments/s in
    // all), so that the arrivals stay below what one version-2 process
    // applies on a loaded CI machine, where the chaos runs share the cores.
    const PACE: Duration = Duration::from_millis(30);
    let Some(env) = Env::new(src, test).await else {
        return;
    };
    let started = Instant::now();
    let fast = Proc::server(&env.db.url, &[]).await;
    let slow = Proc::server(&env.db.url, &["--handler-delay", "100ms"]).await;
    let _relay = env.relay().await;
    let v1 = env.projection_args(1);
    let old = [Proc::projection(&v1).await, Proc::projection(&v1).await];

    let traffic = Traffic::new(vec![fast.addr(), slow.addr()]);
    let clients = tokio::spawn(traffic.clients(CLIENTS, None, PACE));
    eventually("version 1 serves the history", || async {
        let count = old[0]
            .totals()
            .await
            .filter(|(v, _)| *v == 1)
            .map_or(0, |(_, t)| t.values().map(|(_, n)| n).sum::<i64>());
        count >= HISTORY
    })
    .await;
    let history = env.db.count("SELECT count(*) FROM payments").await;
    let new = Proc::projection(&env.projection_args(2)).await;
    let building = Instant::now();
    let mut seen = vec![Vec::new(), Vec::new()];
    bounded("the switch to version 2 everywhere", async {
        loop {
            for (i, p) in old.iter().enumerate() {
                let (version, _) = p.totals().await.unwrap_or_else(|| {
                    panic!("a version-1 process did not answer 200 during the build")
                });
                if seen[i].last() != Some(&version) {
                    seen[i].push(version);
                }
            }
            let new_version = new.totals().await.map(|(v, _)| v);
            if seen.iter().all(|s| s.last() == Some(&2)) && new_version == Some(2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let switched = building.elapsed();
    for s in &seen {
        assert!(
            s.as_slice() == [1, 2] || s.as_slice() == [2],
            "the version served went {s:?}"
        );
    }
    // The version-1 processes go on feeding version 2 without it.
    new.kill().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    traffic.stop();
    let created = bounded("the clients", clients).await.expect("the clients");
    let expected = env.db_totals().await;
    for p in &old {
        p.serves(&expected, 2).await;
    }
    if src == Src::Outbox {
        assert_eq!(
            env.db
                .count(
                    "SELECT count(*) FROM outbox.holds \
                     WHERE starts_with(name, 'projection/payment_totals/v1/')"
                )
                .await,
            0,
            "version 1's outbox holds are released at the switch"
        );
    }
    println!(
        "{test}: {created} payments, {history} before version 2 started; switched everywhere \
         {switched:?} after its start; versions seen {seen:?}; exact after {:?}",
        started.elapsed()
    );
    drop(old);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_rabbitmq_is_refused_rabbitmq_keeps_no_history() {
    let Some(env) = Env::new(Src::Rabbitmq, "rebuild_rabbitmq_refused").await else {
        return;
    };
    let v1 = Proc::projection(&env.projection_args(1)).await;
    eventually("version 1 is served", || async {
        v1.totals().await.is_some()
    })
    .await;
    let args = env.projection_args(2);
    let (code, stderr) = run_to_exit(PROJECTION, &strs(&args)).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("RabbitMQ keeps no history"), "{stderr}");
    assert_eq!(v1.totals().await.map(|(v, _)| v), Some(1));
    drop(v1);
    env.finish().await;
}

// ---------------------------------------------------------------- poison

/// An event that is not a payment is parked with its reason (at once: it
/// cannot decode), and the events behind it are applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_event_is_parked_and_the_events_behind_it_applied() {
    let Some(env) = Env::new(Src::Outbox, "projection_poison").await else {
        return;
    };
    let p = Proc::projection(&env.projection_args(1)).await;
    let payment = |amount: i64| {
        serde_json::json!({"account": "acct-1", "amount": amount, "currency": "EUR"}).to_string()
    };
    let events = [
        outbox::Event::new("payments", payment(10).into_bytes()),
        outbox::Event::new(
            "payments",
            br#"{"amount": "ten", "currency": "EUR"}"#.to_vec(),
        ),
        outbox::Event::new("payments", payment(5).into_bytes()),
        // Another destination: not a payment event, not applied.
        outbox::Event::new("refunds", b"not json".to_vec()),
    ];
    let poison = events[1].id().to_string();
    for event in &events {
        let mut tx = env.db.pool.begin().await.expect("begin");
        outbox::enqueue(&mut *tx, event).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }
    let expected: Totals = [("EUR".to_owned(), (15, 2))].into_iter().collect();
    p.serves(&expected, 1).await;
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, reason FROM projection.parked")
            .fetch_all(&env.db.pool)
            .await
            .expect("projection.parked");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, poison);
    assert!(
        parked[0].1.contains("not the JSON expected"),
        "{}",
        parked[0].1
    );
    let metrics = p.get("/metrics").await.expect("GET /metrics").1;
    for series in [
        r#"projection_events_parked_total{projection="payment_totals",version="1"} 1"#,
        r#"projection_events_applied_total{projection="payment_totals",version="1"} 2"#,
        r#"projection_events_behind{projection="payment_totals",version="1"} 0"#,
        r#"projection_served_version{projection="payment_totals"} 1"#,
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    assert!(metrics.contains("projection_seconds_behind{"), "{metrics}");
    // SIGTERM while it runs: the round in hand ends, exit 0.
    let (code, took) = p.terminate().await;
    assert_eq!(code, Some(0), "SIGTERM: exit {code:?}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    env.finish().await;
}

// --------------------------------------------------------------- startup

#[test]
fn help_documents_the_flags_and_the_routes() {
    let out = std::process::Command::new(PROJECTION)
        .arg("--help")
        .output()
        .expect("the binary runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for words in [
        "--listen",
        "127.0.0.1:3200",
        "--database",
        "--source",
        "outbox:",
        "rabbitmq:",
        "nats:",
        "--version",
        "--queue",
        "--stream",
        "--subject",
        "--batch",
        "--batch-window",
        "GET /totals",
        "Projection-Version",
        "SIGKILL",
    ] {
        assert!(help.contains(words), "no {words:?} in:\n{help}");
    }
}

/// A database or broker that accepts and never answers: one line naming
/// it within the bound (no password), exit 1; SIGTERM while waiting: exit
/// 0 at once.
#[tokio::test(flavor = "multi_thread")]
async fn silent_services_fail_within_the_bound_and_sigterm_exits_at_once() {
    // The broker cases need a database that answers.
    let database = PgDatabase::create("projection_silent").await;
    let mut cases = vec![("PostgreSQL", "--database", None)];
    if let Some(db) = &database {
        cases.push(("RabbitMQ", "--amqp", Some(("rabbitmq", db.url.clone()))));
        cases.push(("NATS", "--nats", Some(("nats", db.url.clone()))));
    }
    for (what, flag, source) in cases {
        for sigterm in [false, true] {
            let silent = SilentServer::start().await;
            let url = match what {
                "PostgreSQL" => format!("postgres://postgres:secret-pw@{}/test", silent.addr),
                "RabbitMQ" => format!("amqp://guest:secret-pw@{}/%2f", silent.addr),
                _ => format!("nats://{}", silent.addr),
            };
            let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
            if let Some((source, db)) = &source {
                args.extend([
                    "--source".to_owned(),
                    (*source).to_owned(),
                    "--database".to_owned(),
                    db.clone(),
                ]);
            }
            args.extend([flag.to_owned(), url]);
            let child = command(PROJECTION)
                .args(&args)
                .spawn()
                .expect("the binary runs");
            let started = Instant::now();
            if sigterm {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                sigterm_pid(child.id().expect("running"));
            }
            let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .unwrap_or_else(|_| panic!("{what} silent: still runs after 20 s"))
                .expect("its output");
            let took = started.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("secret-pw"), "a password in:\n{stderr}");
            if sigterm {
                assert_eq!(out.status.code(), Some(0), "{what}, SIGTERM:\n{stderr}");
                assert!(
                    took < Duration::from_secs(4),
                    "{what}: SIGTERM took {took:?}"
                );
            } else {
                assert_eq!(out.status.code(), Some(1), "{what}:\n{stderr}");
                assert!(took < Duration::from_secs(15), "{what}: took {took:?}");
                let last = stderr.lines().last().unwrap_or_default();
                assert!(
                    last.starts_with("payments-projection: ") && last.contains(what),
                    "{what}: the error line: {last}"
                );
            }
        }
    }
    if let Some(db) = database {
        db.finish().await;
    }
}

// ---------------------------------------------------------- environment

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Outbox,
    Rabbitmq,
    Nats,
}

/// A test's database, and its broker's URL and names.
struct Env {
    db: PgDatabase,
    src: Src,
    broker: String,
    queue: String,
    stream: String,
    subject: String,
}

impl Env {
    /// `None` (saying why) when a service the source needs is not set.
    async fn new(src: Src, test: &str) -> Option<Self> {
        let broker = match src {
            Src::Outbox => String::new(),
            Src::Rabbitmq => service_url("AMQP_URL", test)?,
            Src::Nats => service_url("NATS_URL", test)?,
        };
        let db = PgDatabase::create(test).await?;
        let stream = unique("PROJ").to_uppercase();
        Some(Self {
            db,
            src,
            broker,
            queue: unique("projection_q"),
            subject: format!("{}.created", stream.to_lowercase()),
            stream,
        })
    }

    /// The relay to the broker (none for the outbox source).
    async fn relay(&self) -> Option<Proc> {
        let args: Vec<String> = match self.src {
            Src::Outbox => return None,
            Src::Rabbitmq => [
                "--broker",
                "rabbitmq",
                "--amqp",
                &self.broker,
                "--queue",
                &self.queue,
            ]
            .map(str::to_owned)
            .to_vec(),
            Src::Nats => [
                "--broker",
                "nats",
                "--nats",
                &self.broker,
                "--stream",
                &self.stream,
                "--subject",
                &self.subject,
            ]
            .map(str::to_owned)
            .to_vec(),
        };
        let mut all = vec![
            "--database".to_owned(),
            self.db.url.clone(),
            "--poll-interval".to_owned(),
            "100ms".to_owned(),
        ];
        all.extend(args);
        Some(Proc::start(RELAY, &strs(&all), "relaying to").await)
    }

    fn projection_args(&self, version: u32) -> Vec<String> {
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--database".to_owned(),
            self.db.url.clone(),
            "--version".to_owned(),
            version.to_string(),
        ];
        let source: &[&str] = match self.src {
            Src::Outbox => &["--source", "outbox"],
            Src::Rabbitmq => &[
                "--source",
                "rabbitmq",
                "--amqp",
                &self.broker,
                "--queue",
                &self.queue,
            ],
            Src::Nats => &[
                "--source",
                "nats",
                "--nats",
                &self.broker,
                "--stream",
                &self.stream,
                "--subject",
                &self.subject,
            ],
        };
        args.extend(source.iter().map(|s| (*s).to_owned()));
        args
    }

    /// The totals of the `payments` table.
    async fn db_totals(&self) -> Totals {
        sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT currency, sum(amount)::int8, count(*) FROM payments GROUP BY currency",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("the payments")
        .into_iter()
        .map(|(c, t, n)| (c, (t, n)))
        .collect()
    }

    async fn finish(self) {
        match self.src {
            Src::Outbox => {}
            Src::Rabbitmq => {
                if let Ok(conn) =
                    lapin::Connection::connect(&self.broker, lapin::ConnectionProperties::default())
                        .await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(self.queue.as_str().into(), Default::default())
                            .await;
                    }
                    let _ = conn.close(200, "bye".into()).await;
                }
            }
            Src::Nats => {
                if let Ok(client) = async_nats::connect(&self.broker).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&self.stream)
                        .await;
                }
            }
        }
        self.db.finish().await;
    }
}

// -------------------------------------------------------------- traffic

/// Clients posting payments to the servers (one in five to the second).
struct Traffic {
    servers: Arc<Vec<SocketAddr>>,
    http: reqwest::Client,
    next: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    retries: Arc<AtomicU32>,
}

impl Traffic {
    fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers: Arc::new(servers),
            http: client(),
            next: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            retries: Arc::new(AtomicU32::new(0)),
        }
    }

    /// `clients` clients, each posting one payment after another (with
    /// `pause` between them), until `payments` are created in all (or until
    /// [`stop`](Self::stop)): the payments created.
    fn clients(
        &self,
        clients: u32,
        payments: Option<u32>,
        pause: Duration,
    ) -> impl std::future::Future<Output = u32> + Send + 'static {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (servers, http, next, stop, retries) = (
                    self.servers.clone(),
                    self.http.clone(),
                    self.next.clone(),
                    self.stop.clone(),
                    self.retries.clone(),
                );
                tokio::spawn(async move {
                    let mut created = 0;
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            return created;
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if payments.is_some_and(|n| i >= n) {
                            return created;
                        }
                        let server = if rand::random::<u32>() % 5 == 0 {
                            servers[servers.len() - 1]
                        } else {
                            servers[0]
                        };
                        pay(&http, server, &retries).await;
                        created += 1;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        async move {
            let mut created = 0;
            for t in tasks {
                created += t.await.expect("a client");
            }
            created
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One payment of a random currency and amount, retried with its key until
/// a 201 (a 409 or 5xx, or no answer, is retried).
async fn pay(http: &reqwest::Client, server: SocketAddr, retries: &AtomicU32) {
    let key = unique("key");
    let currency = CURRENCIES[rand::random::<u32>() as usize % CURRENCIES.len()];
    let body =
        serde_json::json!({"amount": 1 + rand::random::<u32>() % 1000, "currency": currency})
            .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no 201 within 60 s; last: {last}"
        );
        let sent = http
            .post(format!("http://{server}/payments"))
            .header("Idempotency-Key", &key)
            .header("Authorization", "Bearer projection-test")
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(res) if res.status().as_u16() == 201 => return,
            Ok(res) if res.status().as_u16() == 409 || res.status().is_server_error() => {
                last = format!("{}", res.status());
            }
            Ok(res) => panic!(
                "unexpected {}: {}",
                res.status(),
                res.text().await.unwrap_or_default()
            ),
            Err(e) => last = e.to_string(),
        }
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(jitter(20, 30)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(EXCHANGE)
        .build()
        .expect("an HTTP client")
}

fn jitter(base_ms: u64, spread_ms: u64) -> Duration {
    Duration::from_millis(base_ms + rand::random::<u64>() % spread_ms)
}

// ------------------------------------------------------------ processes

/// A running binary; SIGKILLed on drop.
struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
}

fn command(binary: &str) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

impl Proc {
    /// payments-axum with `--transactional --outbox` on `url`.
    async fn server(url: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--transactional",
            "--outbox",
            "--store",
            url,
        ];
        args.extend(extra);
        Self::start(AXUM, &args, "serving").await
    }

    async fn projection(args: &[String]) -> Self {
        Self::start(PROJECTION, &strs(args), "payments-projection serving").await
    }

    /// Starts `binary`; returns once its log has a line with `ready`.
    async fn start(binary: &str, args: &[&str], ready: &str) -> Self {
        let mut child = command(binary).args(args).spawn().expect("the binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let writer = Arc::clone(&log);
        // Drains stderr until the binary exits, so it never blocks on a
        // full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = writer.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let line = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lines()
                .find(|l| l.contains(ready))
                .map(str::to_owned);
            if let Some(line) = line {
                return Self {
                    child,
                    addr: listen_addr(&line),
                    log,
                    http: client(),
                };
            }
            let exited = child.try_wait().expect("wait");
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "{binary} {args:?} was not ready ({exited:?}); stderr:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr.expect("a server's address")
    }

    /// SIGKILL, and the exit reaped.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM: the exit code, and how long the exit took.
    async fn terminate(mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        sigterm_pid(self.child.id().expect("running"));
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still runs 20 s after SIGTERM"))
            .expect("wait");
        (status.code(), started.elapsed())
    }

    /// `GET path`: the status and the body; `None` without an answer.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let res = self
            .http
            .get(format!("http://{}{path}", self.addr()))
            .send()
            .await
            .ok()?;
        let status = res.status().as_u16();
        Some((status, res.text().await.ok()?))
    }

    /// `GET /totals` when it answers 200: `Projection-Version` and the
    /// totals.
    async fn totals(&self) -> Option<(u32, Totals)> {
        let res = self
            .http
            .get(format!("http://{}/totals", self.addr()))
            .send()
            .await
            .ok()?;
        if res.status().as_u16() != 200 {
            return None;
        }
        let version: u32 = res
            .headers()
            .get("projection-version")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("a Projection-Version header");
        let body = res.text().await.ok()?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        let currencies: Vec<&str> = rows
            .iter()
            .map(|r| r["currency"].as_str().expect("a currency"))
            .collect();
        let mut sorted = currencies.clone();
        sorted.sort_unstable();
        assert_eq!(currencies, sorted, "sorted by currency: {body}");
        let totals = rows
            .iter()
            .map(|r| {
                (
                    r["currency"].as_str().expect("a currency").to_owned(),
                    (
                        r["total"].as_i64().expect("a total"),
                        r["count"].as_i64().expect("a count"),
                    ),
                )
            })
            .collect();
        Some((version, totals))
    }

    /// Waits until `GET /totals` answers `expected` with `version`.
    async fn serves(&self, expected: &Totals, version: u32) {
        let mut last = None;
        let reached = tokio::time::timeout(test_support::LIMIT, async {
            loop {
                let now = self.totals().await;
                if now.as_ref() == Some(&(version, expected.clone())) {
                    return;
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "GET /totals is not version {version} with {expected:?} after {:?}; last: {last:?}; \
             log:\n{}",
            test_support::LIMIT,
            self.log.lock().unwrap_or_else(|p| p.into_inner())
        );
    }
}

fn sigterm_pid(pid: u32) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
}

/// Runs `binary`, which must exit within [`STARTUP`]: its exit code and
/// stderr.
async fn run_to_exit(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let child = command(binary).args(args).spawn().expect("the binary runs");
    let out = tokio::time::timeout(STARTUP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{binary} {args:?} did not exit"))
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The address in `listen=127.0.0.1:1234`.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let value = line.split("listen=").nth(1)?.split_whitespace().next()?;
    value
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
