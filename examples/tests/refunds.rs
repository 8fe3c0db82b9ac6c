//! References, declines and refunds (DESIGN section 7, "Payments:
//! references, declines and refunds") on both payments binaries: in memory,
//! with a Redis store (`REDIS_URL`), in transactional mode on SQLite, and on PostgreSQL with `--outbox`
//! (`DATABASE_URL`; skipped, saying so, when unset): the reference stored
//! and returned (`null` when absent), `--decline-above` a stored 402, a
//! refund 201 once and replayed under its key, 409 under another key (also
//! when two race), 404 for an unknown payment, a key required, `refunded`
//! in `GET /payments/<id>`, and the event's payload with `currency` and
//! `reference`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::{service_url, TempDb};

const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const ACTIX: &str = env!("CARGO_BIN_EXE_payments-actix");

const STARTUP: Duration = Duration::from_secs(30);

/// A payments binary serving on a free port; killed on drop.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Server {
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
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let name = binary.rsplit('/').next().unwrap_or(binary);
        let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let deadline = Instant::now() + STARTUP;
        let mut log = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} {args:?} did not serve; stderr:\n{log}");
            };
            log.push_str(&line);
            log.push('\n');
            if line.contains("serving") {
                let value = line.split("listen=").nth(1).expect("listen=");
                let value = value.split_whitespace().next().expect("an address");
                let addr = value
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .next()
                    .and_then(|a| a.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no address in {line:?}"));
                return Self { name, child, addr };
            }
        }
    }

    /// `method path` with `key` (if any) and a JSON `body` (if any).
    fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Reply {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(key) = key {
            raw.push_str(&format!("Idempotency-Key: {key}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(&body);
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(raw.as_bytes()).expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("read");
        let end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        let head = String::from_utf8_lossy(&answer[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let header = |name: &str| {
            head.split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        Reply {
            status,
            content_type: header("content-type").unwrap_or_default(),
            location: header("location"),
            body: String::from_utf8_lossy(&answer[end + 4..]).into_owned(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    location: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// A problem+json of `status` and `kind` (the end of its `type`).
    fn assert_problem(&self, status: u16, kind: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {self:?}");
        assert!(
            self.content_type.starts_with("application/problem+json"),
            "{what}: not problem+json: {self:?}"
        );
        let kind_of = self.json()["type"].as_str().unwrap_or_default().to_owned();
        assert!(
            kind_of.ends_with(kind),
            "{what}: type {kind_of}, expected *{kind}"
        );
    }
}

fn key(what: &str) -> String {
    format!("{what}-{:016x}", rand::random::<u64>())
}

/// What both binaries must do in every mode, `--decline-above 500` given.
/// Returns the ids of the refunded payment and of the one without a
/// reference.
fn check(server: &Server) -> (String, String) {
    let name = server.name;
    // A reference is stored and returned; none is null.
    let with = json!({"amount": 100, "currency": "EUR", "reference": "order-42"});
    let created = server.call("POST", "/payments", Some(&key("pay")), Some(&with));
    assert_eq!(created.status, 201, "{name}: {created:?}");
    let payment = created.json();
    let id = payment["id"].as_str().expect("an id").to_owned();
    assert_eq!(payment["reference"], "order-42", "{name}: {payment}");
    assert_eq!(
        created.location.as_deref(),
        Some(format!("/payments/{id}").as_str())
    );
    let without = server.call(
        "POST",
        "/payments",
        Some(&key("pay")),
        Some(&json!({"amount": 7, "currency": "EUR"})),
    );
    assert_eq!(without.status, 201, "{name}: {without:?}");
    assert!(without.json()["reference"].is_null(), "{name}: {without:?}");
    let plain = without.json()["id"].as_str().expect("an id").to_owned();
    let long = json!({"amount": 1, "currency": "EUR", "reference": "r".repeat(201)});
    server
        .call("POST", "/payments", Some(&key("pay")), Some(&long))
        .assert_problem(400, "invalid-payment", name);

    // Above the limit: 402, and the same key gets the same 402 (stored),
    // even once the body would pass.
    let declined_key = key("declined");
    let big = json!({"amount": 501, "currency": "EUR"});
    let first = server.call("POST", "/payments", Some(&declined_key), Some(&big));
    first.assert_problem(402, "declined", name);
    let again = server.call("POST", "/payments", Some(&declined_key), Some(&big));
    again.assert_problem(402, "declined", name);
    assert_eq!(first.body, again.body, "{name}: the 402 is replayed");
    let at_limit = json!({"amount": 500, "currency": "EUR"});
    let ok = server.call("POST", "/payments", Some(&key("pay")), Some(&at_limit));
    assert_eq!(
        ok.status, 201,
        "{name}: at the limit is not above it: {ok:?}"
    );

    // GET shows refunded: false, then true.
    let got = server.call("GET", &format!("/payments/{id}"), None, None);
    assert_eq!(got.status, 200, "{name}: {got:?}");
    let mut expected = payment.clone();
    expected["refunded"] = json!(false);
    assert_eq!(got.json(), expected, "{name}");

    // A refund: a key is required; 201 once, replayed under its key.
    let refunds = format!("/payments/{id}/refunds");
    server
        .call("POST", &refunds, None, None)
        .assert_problem(400, "missing-key", name);
    let refund_key = key("refund");
    let refund = server.call("POST", &refunds, Some(&refund_key), None);
    assert_eq!(refund.status, 201, "{name}: {refund:?}");
    let body = refund.json();
    assert_eq!(body["payment_id"], id.as_str(), "{name}: {body}");
    assert_eq!(body["amount"], 100, "{name}: {body}");
    assert!(body["id"]
        .as_str()
        .is_some_and(|r| !r.is_empty() && r != id));
    let replay = server.call("POST", &refunds, Some(&refund_key), None);
    assert_eq!(
        (replay.status, replay.body.as_str()),
        (201, refund.body.as_str()),
        "{name}: the same key replays the refund"
    );
    // Under another key: 409, it is refunded already.
    let second = server.call("POST", &refunds, Some(&key("refund")), None);
    second.assert_problem(409, "already-refunded", name);
    assert!(
        second.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("already refunded")),
        "{name}: {second:?}"
    );
    server
        .call(
            "POST",
            "/payments/pay_nope/refunds",
            Some(&key("refund")),
            None,
        )
        .assert_problem(404, "not-found", name);
    let got = server.call("GET", &format!("/payments/{id}"), None, None);
    assert_eq!(got.json()["refunded"], true, "{name}: {got:?}");
    let list = server.call("GET", "/payments", None, None).json();
    let listed = list
        .as_array()
        .expect("an array")
        .iter()
        .find(|p| p["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{name}: {id} not listed: {list}"));
    assert_eq!(listed["refunded"], true);
    (id, plain)
}

fn on_both(args: &[&str]) {
    std::thread::scope(|s| {
        for binary in [AXUM, ACTIX] {
            s.spawn(move || check(&Server::start(binary, args)));
        }
    });
}

#[test]
fn references_declines_and_refunds_in_memory() {
    on_both(&["--store", "memory", "--decline-above", "500"]);
}

#[test]
fn references_declines_and_refunds_with_a_redis_store() {
    let Some(url) = service_url("REDIS_URL", "refunds with redis") else {
        return;
    };
    on_both(&["--store", &url, "--decline-above", "500"]);
}

#[test]
fn references_declines_and_refunds_on_sqlite_in_transactional_mode() {
    std::thread::scope(|s| {
        for binary in [AXUM, ACTIX] {
            s.spawn(move || {
                let db = TempDb::new("refunds");
                let url = db.url();
                let server = Server::start(
                    binary,
                    &["--store", &url, "--transactional", "--decline-above", "500"],
                );
                check(&server);
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn references_declines_and_refunds_on_postgres_with_the_outbox() {
    let Some(url) = service_url("DATABASE_URL", "refunds on postgres") else {
        return;
    };
    let pool = sqlx::PgPool::connect(&url).await.expect("PostgreSQL");
    for binary in [AXUM, ACTIX] {
        let url = url.clone();
        let (id, plain) = tokio::task::spawn_blocking(move || {
            let args = [
                "--store",
                url.as_str(),
                "--transactional",
                "--outbox",
                "--decline-above",
                "500",
            ];
            let server = Server::start(binary, &args);
            let ids = check(&server);
            // Two refunds of one payment under two keys at once: one 201,
            // one 409 (the unique payment_id of `refunds` decides).
            let created = server.call(
                "POST",
                "/payments",
                Some(&key("pay")),
                Some(&json!({"amount": 9, "currency": "EUR"})),
            );
            let raced = created.json()["id"].as_str().expect("an id").to_owned();
            let path = format!("/payments/{raced}/refunds");
            let statuses: Vec<u16> = std::thread::scope(|s| {
                let racers: Vec<_> = (0..2)
                    .map(|_| s.spawn(|| server.call("POST", &path, Some(&key("race")), None)))
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().unwrap().status)
                    .collect()
            });
            let mut sorted = statuses.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [201, 409], "racing refunds: {statuses:?}");
            ids
        })
        .await
        .expect("the checks");
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT id, payment_id, amount FROM refunds WHERE payment_id = $1")
                .bind(&id)
                .fetch_all(&pool)
                .await
                .expect("refunds");
        assert_eq!(rows.len(), 1, "one refund row: {rows:?}");
        assert_eq!(rows[0].2, 100);
        let reference: Option<String> =
            sqlx::query_scalar("SELECT reference FROM payments WHERE id = $1")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .expect("the payment row");
        assert_eq!(reference.as_deref(), Some("order-42"));
        for (payment, expected) in [
            (
                &id,
                json!({"account": id, "amount": 100, "currency": "EUR", "reference": "order-42"}),
            ),
            (
                &plain,
                json!({"account": plain, "amount": 7, "currency": "EUR", "reference": null}),
            ),
        ] {
            let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
                // Other tests' payloads need not be JSON: a byte search.
                "SELECT payload FROM outbox.events WHERE position($1::bytea IN payload) > 0",
            )
            .bind(payment.as_bytes())
            .fetch_all(&pool)
            .await
            .expect("the events");
            assert_eq!(payloads.len(), 1, "one event for {payment}");
            let payload: Value = serde_json::from_slice(&payloads[0]).expect("JSON");
            assert_eq!(payload, expected);
        }
    }
}
