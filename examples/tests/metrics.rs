//! `GET /metrics` on both payments binaries: every request outcome is a
//! series from startup on, and known traffic (3 fresh payments, 2 replays,
//! 1 mismatch, 1 missing key, 1 conflict) gives exactly those counts, in the
//! two-commit mode and in transactional mode. Scrapes are not counted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const ACTIX: &str = env!("CARGO_BIN_EXE_payments-actix");

/// How long a binary may take to log that it serves.
const STARTUP: Duration = Duration::from_secs(30);

/// Every outcome, in the order of `idempotency_core::metrics::outcome::ALL`.
const OUTCOMES: [&str; 7] = [
    "executed",
    "replayed",
    "conflict",
    "mismatch",
    "rejected",
    "unavailable",
    "unguarded",
];

/// The handler's delay: long enough for a duplicate to arrive while the
/// first request runs.
const DELAY: &str = "600ms";

#[test]
fn both_binaries_count_each_outcome_exactly() {
    for binary in [AXUM, ACTIX] {
        let server = Server::start(binary, &["--handler-delay", DELAY]);
        check(&server);
    }
}

#[test]
fn transactional_mode_counts_each_outcome_exactly() {
    let dir = std::env::temp_dir().join(format!(
        "examples-metrics-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for binary in [AXUM, ACTIX] {
        let name = binary.rsplit(['/', '\\']).next().unwrap_or(binary);
        let store = format!("sqlite://{}", dir.join(format!("{name}.sqlite")).display());
        let args = [
            "--handler-delay",
            DELAY,
            "--transactional",
            "--store",
            &store,
        ];
        let server = Server::start(binary, &args);
        check(&server);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Scrapes, sends the known traffic, scrapes again.
fn check(server: &Server) {
    let name = server.binary;
    let addr = server.addr;
    // Right after startup: every outcome is listed, at 0.
    let first = scrape(addr);
    assert_eq!(counts(&first), [0; 7], "{name}: first scrape:\n{first}");
    assert!(
        first.contains("# TYPE idempotency_requests_total counter"),
        "{name}:\n{first}"
    );
    let pay = |key: &str, body: &str| post(addr, key, body).0;
    let body = r#"{"amount": 100, "currency": "EUR"}"#;
    for key in ["m-1", "m-2", "m-3"] {
        assert_eq!(pay(key, body), 201, "{name}: fresh {key}");
    }
    for _ in 0..2 {
        assert_eq!(pay("m-1", body), 201, "{name}: replay");
    }
    let other = r#"{"amount": 200, "currency": "EUR"}"#;
    assert_eq!(pay("m-1", other), 422, "{name}: mismatch");
    assert_eq!(pay("", body), 400, "{name}: missing key");
    // A duplicate while the first is in its handler.
    let first = std::thread::spawn(move || post(addr, "m-4", body).0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pay("m-4", body), 409, "{name}: conflict");
    assert_eq!(first.join().expect("first request"), 201, "{name}: m-4");
    // Not covered, not counted.
    assert_eq!(get(addr, "/payments"), 200);
    let text = scrape(addr);
    // executed, replayed, conflict, mismatch, rejected, unavailable, unguarded
    assert_eq!(counts(&text), [4, 2, 1, 1, 1, 0, 0], "{name}:\n{text}");
    assert_eq!(
        counts(&scrape(addr)),
        [4, 2, 1, 1, 1, 0, 0],
        "{name}: scraping again"
    );
}

/// The count of each outcome in a scrape (every one must be listed).
fn counts(text: &str) -> [u64; 7] {
    OUTCOMES.map(|outcome| {
        let series = format!("idempotency_requests_total{{outcome=\"{outcome}\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&series))
            .unwrap_or_else(|| panic!("no {series:?} in:\n{text}"));
        line[series.len()..].trim().parse().expect("a count")
    })
}

fn scrape(addr: SocketAddr) -> String {
    let (status, head, body) = http(addr, "GET", "/metrics", &[], "");
    assert_eq!(status, 200, "GET /metrics: {body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

fn get(addr: SocketAddr, path: &str) -> u16 {
    http(addr, "GET", path, &[], "").0
}

/// `POST /payments` with `key` (none if empty).
fn post(addr: SocketAddr, key: &str, body: &str) -> (u16, String) {
    let mut headers = vec![("Content-Type", "application/json")];
    if !key.is_empty() {
        headers.push(("Idempotency-Key", key));
    }
    let (status, _, body) = http(addr, "POST", "/payments", &headers, body);
    (status, body)
}

/// One HTTP/1.1 request on its own connection: status, head and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head.to_owned(), body.to_owned())
}

/// A serving binary, killed on drop.
struct Server {
    binary: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts `binary` on a free port and waits for its "serving" line.
    fn start(binary: &'static str, args: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drains stderr until the binary exits, so it never blocks.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        let mut log = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{binary} {args:?} did not log that it serves; stderr:\n{log}");
            };
            log.push_str(&line);
            log.push('\n');
            if line.contains("serving") {
                let addr =
                    listen_addr(&line).unwrap_or_else(|| panic!("no listen address in {line:?}"));
                return Self {
                    binary,
                    child,
                    addr,
                };
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
