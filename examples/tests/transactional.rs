//! `--transactional` and `--wait-for-in-flight` on the real binaries: a
//! crash (SIGKILL) in the middle of the handler leaves neither the payment
//! nor its idempotency record, and the retry after a restart runs at once.
//!
//! PostgreSQL tests read `DATABASE_URL` at run time and skip, saying why,
//! when it is unset; SQLite tests use a file of their own and always run.
//! The `payments` table of a PostgreSQL database is shared by every test (and
//! run) on it, so each test counts only the rows of its own currency.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotency_core::RecordId;
use sqlx::{PgPool, SqlitePool};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const ACTIX: &str = env!("CARGO_BIN_EXE_payments-actix");

/// How long a binary may take to serve, or to fail at startup.
const STARTUP: Duration = Duration::from_secs(30);

/// The longest any one HTTP exchange may take.
const EXCHANGE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- the crash

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crash_mid_handler_leaves_nothing_and_the_retry_runs_at_once_axum() {
    if let Some(db) = Db::postgres("postgres_crash_axum").await {
        crash_and_retry(AXUM, db).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crash_mid_handler_leaves_nothing_and_the_retry_runs_at_once_actix() {
    if let Some(db) = Db::postgres("postgres_crash_actix").await {
        crash_and_retry(ACTIX, db).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_crash_mid_handler_leaves_nothing_and_the_retry_runs_at_once_axum() {
    crash_and_retry(AXUM, Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_crash_mid_handler_leaves_nothing_and_the_retry_runs_at_once_actix() {
    crash_and_retry(ACTIX, Db::sqlite()).await;
}

/// Kills `binary` (SIGKILL) after the handler inserted the payment in its
/// transaction and while it sleeps; then a fresh process on the same store
/// answers the same request 201 at once, and the table holds one row.
async fn crash_and_retry(binary: &'static str, db: Db) {
    let started = Instant::now();
    let request = PaymentRequest::new();
    let store = db.store_url();

    let first = Server::start(
        binary,
        &[
            "--transactional",
            "--store",
            &store,
            "--handler-delay",
            "3s",
        ],
    )
    .await;
    let in_flight = tokio::spawn(request.send(first.addr));
    db.wait_until_inserted_in_transaction(&first, &in_flight)
        .await;
    let inserted = started.elapsed();
    first.kill().await;
    let answer = in_flight.await.expect("the request task");
    assert!(
        answer.is_err(),
        "the killed server answered: {:?}",
        answer.map(|a| a.status)
    );
    db.wait_until_disconnected().await;

    assert_eq!(
        db.payments(&request.currency).await,
        0,
        "the crash left the payment"
    );
    assert_eq!(
        db.records(&request.record_id()).await,
        (0, 0),
        "the crash left the idempotency record"
    );

    let second = Server::start(
        binary,
        &[
            "--transactional",
            "--store",
            &store,
            "--handler-delay",
            "0ms",
        ],
    )
    .await;
    let retried = Instant::now();
    let retry = request.send(second.addr).await.expect("the retry");
    let retry_took = retried.elapsed();
    assert_eq!(retry.status, 201, "the retry: {}", retry.text());
    assert_eq!(retry.header("idempotent-replayed"), None, "the retry ran");
    assert!(
        retry_took < Duration::from_secs(5),
        "the retry waited {retry_took:?} (a lease to wait out?)"
    );
    let created = retry.json();
    assert_eq!(created["amount"], request.amount);
    assert_eq!(created["currency"], request.currency.as_str());
    let id = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(
        retry.header("location"),
        Some(format!("/payments/{id}").as_str())
    );
    assert_eq!(db.payments(&request.currency).await, 1, "one payment");
    assert_eq!(
        db.records(&request.record_id()).await,
        (1, 1),
        "one completed record"
    );

    let replay = request.send(second.addr).await.expect("the replay");
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["id"], id.as_str());
    assert_eq!(db.payments(&request.currency).await, 1, "still one payment");
    drop(second);
    db.cleanup();
    println!(
        "{}: inserted after {inserted:?}, retry answered in {retry_took:?}, total {:?}",
        name(binary),
        started.elapsed()
    );
}

// ------------------------------------------------------- startup, replays

#[tokio::test(flavor = "multi_thread")]
async fn transactional_needs_a_store_with_transactions() {
    for binary in [AXUM, ACTIX] {
        for store in ["memory", "redis://127.0.0.1:6379"] {
            let (code, stderr) = run_to_exit(
                binary,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--transactional",
                    "--store",
                    store,
                ],
            )
            .await;
            let name = name(binary);
            assert_eq!(code, Some(2), "{name} --store {store}: exit code; {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(stderr.starts_with(&format!("{name}: ")), "{stderr}");
            for part in ["--transactional", "postgres://", "sqlite://"] {
                assert!(stderr.contains(part), "{part} missing: {stderr}");
            }
            assert!(!stderr.contains("serving"), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transactional_sqlite_replays_and_lists_the_table_on_both_binaries() {
    for binary in [AXUM, ACTIX] {
        let db = Db::sqlite();
        replays_and_lists(binary, &db).await;
        db.cleanup();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transactional_postgres_replays_and_lists_the_table_on_both_binaries() {
    let Some(db) = Db::postgres("transactional_postgres_replays").await else {
        return;
    };
    for binary in [AXUM, ACTIX] {
        replays_and_lists(binary, &db).await;
    }
}

async fn replays_and_lists(binary: &'static str, db: &Db) {
    let server = Server::start(binary, &["--transactional", "--store", &db.store_url()]).await;
    let request = PaymentRequest::new();
    let first = request.send(server.addr).await.expect("the first");
    assert_eq!(first.status, 201, "{}: {}", name(binary), first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let second = request.send(server.addr).await.expect("the second");
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.json(), second.json());
    assert_eq!(db.payments(&request.currency).await, 1);

    let list = get(server.addr, "/payments").await;
    assert_eq!(list.status, 200);
    let mine: Vec<_> = list
        .json()
        .as_array()
        .expect("a JSON array")
        .iter()
        .filter(|p| p["currency"] == request.currency.as_str())
        .cloned()
        .collect();
    // As POST returned it, and whether it has been refunded.
    let mut listed = first.json();
    listed["refunded"] = serde_json::Value::Bool(false);
    assert_eq!(mine, vec![listed], "{}: GET /payments", name(binary));
}

// ------------------------------------------------------ wait-for-in-flight

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_waits_for_the_first_and_gets_its_response() {
    for binary in [AXUM, ACTIX] {
        let memory = Db::Memory;
        duplicate_waits(binary, &memory).await;
        let sqlite = Db::sqlite();
        duplicate_waits(binary, &sqlite).await;
        sqlite.cleanup();
    }
}

async fn duplicate_waits(binary: &'static str, db: &Db) {
    let mut args = vec!["--handler-delay", "500ms", "--wait-for-in-flight", "5s"];
    let store = db.store_url();
    args.extend(["--store", &store]);
    if !matches!(db, Db::Memory) {
        args.push("--transactional");
    }
    let server = Server::start(binary, &args).await;
    let request = PaymentRequest::new();
    let first = tokio::spawn(request.send(server.addr));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = request.send(server.addr).await.expect("the second");
    let first = first.await.expect("task").expect("the first");
    let what = format!("{} --store {store}", name(binary));
    assert_eq!(first.status, 201, "{what}: {}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None, "{what}");
    assert_eq!(second.status, 201, "{what}: {}", second.text());
    assert_eq!(second.header("idempotent-replayed"), Some("true"), "{what}");
    assert_eq!(first.json(), second.json(), "{what}");
    if !matches!(db, Db::Memory) {
        assert_eq!(db.payments(&request.currency).await, 1, "{what}");
    }
}

// ------------------------------------------------------------ the stores

enum Db {
    Memory,
    Postgres {
        /// `DATABASE_URL` with an `application_name` of this test's own, so
        /// its sessions can be told apart in `pg_stat_activity`.
        url: String,
        application: String,
        pool: PgPool,
    },
    Sqlite {
        dir: PathBuf,
    },
}

impl Db {
    /// `None` (saying why) when `DATABASE_URL` is unset.
    async fn postgres(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var("DATABASE_URL") else {
            println!("skipping {test}: DATABASE_URL is not set");
            return None;
        };
        let pool = PgPool::connect(&base)
            .await
            .expect("DATABASE_URL is set but PostgreSQL does not answer");
        let application = format!("examples-{}", unique());
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}application_name={application}");
        Some(Self::Postgres {
            url,
            application,
            pool,
        })
    }

    fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("examples-transactional-{}", unique()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self::Sqlite { dir }
    }

    fn store_url(&self) -> String {
        match self {
            Self::Memory => "memory".into(),
            Self::Postgres { url, .. } => url.clone(),
            Self::Sqlite { dir } => format!("sqlite://{}", dir.join("payments.sqlite").display()),
        }
    }

    /// A pool of its own on the SQLite file (opened after the binary made it).
    async fn sqlite_pool(dir: &std::path::Path) -> SqlitePool {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("payments.sqlite"))
            .busy_timeout(Duration::from_secs(5));
        SqlitePool::connect_with(options)
            .await
            .expect("open the file")
    }

    /// How many rows of `payments` are of `currency`.
    async fn payments(&self, currency: &str) -> i64 {
        const COUNT: &str = "SELECT count(*) FROM payments WHERE currency = $1";
        match self {
            Self::Memory => unreachable!("no table"),
            Self::Postgres { pool, .. } => sqlx::query_scalar(COUNT)
                .bind(currency)
                .fetch_one(pool)
                .await
                .expect("count payments"),
            Self::Sqlite { dir } => {
                let pool = Self::sqlite_pool(dir).await;
                let n = sqlx::query_scalar(COUNT)
                    .bind(currency)
                    .fetch_one(&pool)
                    .await
                    .expect("count payments");
                pool.close().await;
                n
            }
        }
    }

    /// The committed records of `id`: (all, completed).
    async fn records(&self, id: &RecordId) -> (i64, i64) {
        let id = id.as_bytes().to_vec();
        match self {
            Self::Memory => unreachable!("not a database"),
            Self::Postgres { pool, .. } => sqlx::query_as(
                "SELECT count(*), count(outcome) FROM idempotency.idempotency_records WHERE id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count records"),
            Self::Sqlite { dir } => {
                let pool = Self::sqlite_pool(dir).await;
                let n = sqlx::query_as(
                    "SELECT count(*), count(outcome) FROM idempotency_records WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("count records");
                pool.close().await;
                n
            }
        }
    }

    /// Returns once `server`'s handler has inserted the payment in its
    /// transaction (and sleeps): PostgreSQL shows the session idle in
    /// transaction after the insert; on SQLite, which shows nothing
    /// uncommitted, the binary's debug log says so.
    async fn wait_until_inserted_in_transaction<T>(
        &self,
        server: &Server,
        request: &tokio::task::JoinHandle<T>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let inserted = match self {
                Self::Memory => unreachable!("not a database"),
                Self::Postgres {
                    pool, application, ..
                } => {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                         AND state = 'idle in transaction' AND query LIKE 'INSERT INTO payments%'",
                    )
                    .bind(application)
                    .fetch_one(pool)
                    .await
                    .expect("pg_stat_activity");
                    n == 1
                }
                Self::Sqlite { .. } => server.log().contains("payment inserted"),
            };
            if inserted {
                assert!(
                    !request.is_finished(),
                    "the request finished before the crash"
                );
                return;
            }
            assert!(
                !request.is_finished(),
                "the request finished before its insert was seen; log:\n{}",
                server.log()
            );
            assert!(
                Instant::now() < deadline,
                "no insert in a transaction seen; log:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// PostgreSQL notices the dead client and rolls back its transaction on
    /// its own time: wait until the killed process's sessions are gone.
    async fn wait_until_disconnected(&self) {
        let Self::Postgres {
            pool, application, ..
        } = self
        else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(application)
            .fetch_one(pool)
            .await
            .expect("pg_stat_activity");
            if n == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the killed server's sessions are still there"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn cleanup(&self) {
        if let Self::Sqlite { dir } = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// -------------------------------------------------------------- requests

/// One payment request, sent as often as needed: the same key, scope and
/// body each time; a currency of its own to count its rows by.
#[derive(Clone)]
struct PaymentRequest {
    key: String,
    scope: String,
    amount: i64,
    currency: String,
}

impl PaymentRequest {
    fn new() -> Self {
        let n = unique();
        Self {
            key: format!("key-{n}"),
            scope: format!("Bearer test-{n}"),
            amount: 1 + (rand::random::<u32>() % 1_000_000) as i64,
            currency: format!("T{:012x}", rand::random::<u64>() >> 16),
        }
    }

    /// The address of its record: the scope is the `Authorization` value.
    fn record_id(&self) -> RecordId {
        RecordId::from_parts(self.scope.as_bytes(), self.key.as_bytes())
    }

    fn send(&self, addr: SocketAddr) -> impl std::future::Future<Output = std::io::Result<Answer>> {
        let body =
            serde_json::json!({"amount": self.amount, "currency": self.currency}).to_string();
        let headers = vec![
            ("Idempotency-Key".to_owned(), self.key.clone()),
            ("Authorization".to_owned(), self.scope.clone()),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ];
        async move { exchange(addr, "POST", "/payments", &headers, &body).await }
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(addr, "GET", path, &[], "").await.expect("GET")
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 exchange on its own connection; an error when the server
/// closes it (or dies) before a complete head.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<Answer> {
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(EXCHANGE, talk)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no complete head")
        })?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

// --------------------------------------------------------------- servers

/// A serving binary; killed (SIGKILL) on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

fn command(binary: &str) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env("RUST_LOG", "info,examples=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

impl Server {
    /// Starts `binary` with `args` on a free port; returns once it serves.
    async fn start(binary: &'static str, args: &[&str]) -> Self {
        let mut child = command(binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .spawn()
            .expect("the binary runs");
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
            let serving = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lines()
                .find(|l| l.contains("serving"))
                .map(str::to_owned);
            if let Some(line) = serving {
                let addr =
                    listen_addr(&line).unwrap_or_else(|| panic!("no listen address in {line:?}"));
                return Self { child, addr, log };
            }
            let exited = child.try_wait().expect("wait");
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "{} {args:?} did not serve ({exited:?}); stderr:\n{}",
                    name(binary),
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// SIGKILL (no shutdown of any kind), and the exit reaped.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill the server");
    }
}

/// Runs `binary`, which must exit within [`STARTUP`]: its exit code and
/// stderr.
async fn run_to_exit(binary: &str, args: &[&str]) -> (Option<i32>, String) {
    let child = command(binary).args(args).spawn().expect("the binary runs");
    let out = tokio::time::timeout(STARTUP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{binary} {args:?} did not exit (it serves?)"))
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The address in `listen=127.0.0.1:1234` (axum) or `listen=[127.0.0.1:1234]`
/// (actix).
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

fn name(binary: &str) -> &str {
    binary.rsplit(['/', '\\']).next().unwrap_or(binary)
}

/// Unique across the tests of this run and across runs.
fn unique() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}
