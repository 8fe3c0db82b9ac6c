//! The example binaries as a user meets them: startup errors are sentences
//! (never `Debug`) with a non-zero exit code, a `sqlite:` URL without a file
//! fails at startup, logs to a pipe carry no colour codes, and `HEAD` answers
//! like `GET` on both payments binaries. And on both payments binaries: the
//! `Location` of a payment answers (`GET /payments/<id>`), `--listen` takes a
//! host name, `--pool-size` is documented and used, a 400 does not echo a
//! megabyte of the client's input, a client that sends half its headers is
//! dropped or answered within a bound, and `/metrics` lists the memory
//! store's evictions.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const AXUM: &str = env!("CARGO_BIN_EXE_payments-axum");
const ACTIX: &str = env!("CARGO_BIN_EXE_payments-actix");
const RABBITMQ: &str = env!("CARGO_BIN_EXE_inbox-rabbitmq");
const NATS: &str = env!("CARGO_BIN_EXE_inbox-nats");

/// How long a binary may take to fail at startup, or to log that it serves.
const STARTUP: Duration = Duration::from_secs(30);

/// The command for `binary`, logging at `info` to a pipe, colours not
/// turned off by the environment.
fn command(binary: &str) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `binary` with `args`, which must make it exit (not serve) within
/// [`STARTUP`].
fn run_to_exit(binary: &str, args: &[&str]) -> Output {
    let mut child = command(binary).args(args).spawn().expect("the binary runs");
    let deadline = Instant::now() + STARTUP;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{binary} {args:?} did not exit within {STARTUP:?} (it serves?); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A startup error, as the user sees it: one sentence, no `Debug` text, no
/// colour codes, a non-zero exit code. Returns stderr.
fn startup_error(binary: &str, args: &[&str]) -> String {
    let out = run_to_exit(binary, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let name = binary.rsplit(['/', '\\']).next().unwrap_or(binary);
    let name = name.strip_suffix(".exe").unwrap_or(name);
    assert!(!out.status.success(), "{name} {args:?} exited 0: {stderr}");
    assert_ne!(out.status.code(), Some(101), "{name} panicked: {stderr}");
    assert!(
        stderr.starts_with(&format!("{name}: ")),
        "{name} {args:?}: the message does not start with the binary's name: {stderr}"
    );
    for debug in ["{", "}", "Error: ", "Some(", "source:", "url: \""] {
        assert!(
            !stderr.contains(debug),
            "{name} {args:?}: stderr looks like Debug output ({debug:?}): {stderr}"
        );
    }
    assert!(
        !stderr.contains("\x1b["),
        "{name}: colour codes: {stderr:?}"
    );
    assert!(!stderr.contains("serving"), "{name} served: {stderr}");
    stderr
}

#[test]
fn an_unknown_store_is_a_sentence_naming_the_valid_ones() {
    for binary in [AXUM, ACTIX] {
        let stderr = startup_error(binary, &["--listen", "127.0.0.1:0", "--store", "foo://x"]);
        for valid in [
            "memory",
            "sqlite://PATH",
            "redis://HOST:PORT",
            "postgres://",
        ] {
            assert!(stderr.contains(valid), "{valid} missing: {stderr}");
        }
        assert!(stderr.contains("foo://x"), "{stderr}");
        let out = run_to_exit(binary, &["--listen", "127.0.0.1:0", "--store", "foo://x"]);
        assert_eq!(out.status.code(), Some(2), "a bad flag exits 2");
    }
}

#[test]
fn a_sqlite_url_without_a_file_fails_at_startup() {
    for binary in [AXUM, ACTIX] {
        for store in ["sqlite://", "sqlite:"] {
            let stderr = startup_error(binary, &["--listen", "127.0.0.1:0", "--store", store]);
            assert!(stderr.contains("sqlite://payments.sqlite"), "{stderr}");
        }
        let stderr = startup_error(
            binary,
            &["--listen", "127.0.0.1:0", "--store", "sqlite::memory:"],
        );
        assert!(stderr.contains("in-memory"), "{stderr}");
    }
}

#[test]
fn a_sqlite_file_still_serves() {
    let dir = std::env::temp_dir().join(format!(
        "examples-sqlite-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = format!("sqlite://{}", dir.join("records.sqlite").display());
    let server = Server::start(AXUM, &["--store", &store]);
    let res = http(server.addr, "GET /payments");
    assert_eq!(res.status, 200);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_inbox_consumers_print_sentences_too() {
    for binary in [RABBITMQ, NATS] {
        let stderr = startup_error(binary, &["--database", "not-a-url"]);
        assert!(stderr.contains("ledger database"), "{stderr}");
    }
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    for binary in [AXUM, ACTIX] {
        let server = Server::start(binary, &[]);
        assert!(
            !server.log.contains('\x1b'),
            "{binary}: colour codes in piped logs: {:?}",
            server.log
        );
    }
}

#[test]
fn head_answers_like_get_on_both_binaries() {
    let axum = Server::start(AXUM, &[]);
    let actix = Server::start(ACTIX, &[]);
    for path in ["/payments", "/healthz"] {
        let mut answers = Vec::new();
        for server in [&axum, &actix] {
            let get = http(server.addr, &format!("GET {path}"));
            let head = http(server.addr, &format!("HEAD {path}"));
            let name = server.binary;
            assert_eq!(get.status, 200, "{name} GET {path}");
            assert_eq!(head.status, 200, "{name} HEAD {path}");
            assert!(head.body.is_empty(), "{name} HEAD {path} sent a body");
            for header in ["content-type", "content-length"] {
                assert_eq!(
                    head.header(header),
                    get.header(header),
                    "{name} HEAD {path}: {header} differs from GET"
                );
            }
            answers.push((
                head.status,
                head.header("content-type").map(str::to_owned),
                head.header("content-length").map(str::to_owned),
            ));
        }
        assert_eq!(answers[0], answers[1], "HEAD {path}: axum vs actix");
    }
}

/// A serving binary, killed on drop.
struct Server {
    binary: &'static str,
    child: Child,
    addr: SocketAddr,
    /// stderr up to and including the "serving" line.
    log: String,
}

impl Server {
    /// Starts `binary` on a free port and waits for its "serving" line.
    fn start(binary: &'static str, args: &[&str]) -> Self {
        Self::start_on(binary, "127.0.0.1:0", args)
    }

    /// Starts `binary` with `--listen listen` and waits for its "serving" line.
    fn start_on(binary: &'static str, listen: &str, args: &[&str]) -> Self {
        let mut child = command(binary)
            .args(["--listen", listen])
            .args(args)
            .spawn()
            .expect("the binary runs");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drains stderr until the binary exits, so it never blocks on
            // a full pipe.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        let mut log = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{binary} did not log that it serves; stderr:\n{log}");
                }
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
                    log,
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
/// (actix), escape codes and all stripped.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let plain: String = strip_ansi(line);
    let value = plain.split("listen=").nth(1)?.split_whitespace().next()?;
    value
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

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
}

/// One HTTP/1.1 request (`"METHOD /path"`) on its own connection.
fn http(addr: SocketAddr, request_line: &str) -> Answer {
    exchange(
        addr,
        format!("{request_line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `POST /payments` of `body` (JSON) with `Idempotency-Key: key`.
fn post(addr: SocketAddr, key: &str, body: &[u8]) -> Answer {
    let mut raw = format!(
        "POST /payments HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &raw)
}

/// Sends `raw` on a connection of its own and reads the answer to its end.
fn exchange(addr: SocketAddr, raw_request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(raw_request).expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

impl Answer {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }
}

/// Both payments binaries, each in a thread of its own (their waits overlap).
fn on_both(check: fn(&'static str)) {
    let threads: Vec<_> = [AXUM, ACTIX]
        .into_iter()
        .map(|binary| std::thread::spawn(move || check(binary)))
        .collect();
    for thread in threads {
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// A temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "examples-{name}-{}-{n}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn sqlite(&self, file: &str) -> String {
        format!("sqlite://{}", self.0.join(file).display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET` the `Location` of a new payment: 200 with the JSON `POST` returned;
/// an unknown id: 404 problem+json.
fn check_get_payment(server: &Server) {
    let name = server.binary;
    let created = post(
        server.addr,
        "get-1",
        br#"{"amount": 42, "currency": "EUR"}"#,
    );
    assert_eq!(created.status, 201, "{name}: {}", created.text());
    let location = created.header("location").expect("Location").to_owned();
    assert!(location.starts_with("/payments/pay_"), "{name}: {location}");
    let got = http(server.addr, &format!("GET {location}"));
    assert_eq!(got.status, 200, "{name} GET {location}: {}", got.text());
    assert_eq!(
        got.header("content-type"),
        Some("application/json"),
        "{name}"
    );
    let mut as_posted: serde_json::Value = serde_json::from_slice(&created.body).expect("JSON");
    let as_got: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
    // GET adds whether it has been refunded.
    as_posted["refunded"] = serde_json::Value::Bool(false);
    assert_eq!(
        as_got, as_posted,
        "{name}: GET returns the payment as POST did, with refunded: false"
    );
    let missing = http(server.addr, "GET /payments/pay_000000000000000000000000");
    assert_eq!(missing.status, 404, "{name}: {}", missing.text());
    assert_eq!(
        missing.header("content-type"),
        Some("application/problem+json"),
        "{name}"
    );
    assert!(
        missing.text().contains("\"status\":404"),
        "{name}: {}",
        missing.text()
    );
}

#[test]
fn the_location_of_a_payment_answers_on_both_binaries() {
    on_both(|binary| check_get_payment(&Server::start(binary, &[])));
}

#[test]
fn the_location_of_a_payment_answers_in_transactional_mode() {
    on_both(|binary| {
        let dir = TempDir::new("get-tx");
        let store = dir.sqlite("records.sqlite");
        let server = Server::start(binary, &["--transactional", "--store", &store]);
        check_get_payment(&server);
    });
}

#[test]
fn listen_takes_a_host_name() {
    on_both(|binary| {
        let server = Server::start_on(binary, "localhost:0", &[]);
        let res = http(server.addr, "GET /healthz");
        assert_eq!(res.status, 200, "{binary}");
        drop(server);
        // A listen address that is not HOST:PORT is a usage error.
        let out = run_to_exit(binary, &["--listen", "localhost"]);
        assert_eq!(out.status.code(), Some(2), "{binary}");
    });
}

#[test]
fn pool_size_is_documented_and_used() {
    on_both(|binary| {
        let help = run_to_exit(binary, &["--help"]);
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--pool-size <N>"), "{binary}: {help}");
        assert!(help.contains("pool exhausted"), "{binary}: {help}");
        let dir = TempDir::new("pool");
        let store = dir.sqlite("records.sqlite");
        let server = Server::start(
            binary,
            &["--transactional", "--store", &store, "--pool-size", "2"],
        );
        let res = post(
            server.addr,
            "pool-1",
            br#"{"amount": 1, "currency": "EUR"}"#,
        );
        assert_eq!(res.status, 201, "{binary}: {}", res.text());
        let out = run_to_exit(binary, &["--pool-size", "0"]);
        assert_eq!(out.status.code(), Some(2), "{binary}: --pool-size 0");
    });
}

#[test]
fn a_400_does_not_echo_a_megabyte_field_name() {
    on_both(|binary| {
        let server = Server::start(binary, &[]);
        let mut body = br#"{"amount": 1, "currency": "EUR", ""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 1_000_000));
        body.extend_from_slice(br#"": 1}"#);
        let res = post(server.addr, "echo-1", &body);
        assert_eq!(
            res.status,
            400,
            "{binary}: {}",
            &res.text()[..200.min(res.body.len())]
        );
        assert_eq!(
            res.header("content-type"),
            Some("application/problem+json"),
            "{binary}"
        );
        assert!(
            res.body.len() < 1024,
            "{binary}: a 400 of {} bytes: {}…",
            res.body.len(),
            &res.text()[..200]
        );
        assert!(
            res.text().contains("unknown field"),
            "{binary}: {}",
            res.text()
        );
        // A value is not echoed whole either.
        let mut body = br#"{"amount": ""#.to_vec();
        body.extend(std::iter::repeat_n(b'7', 500_000));
        body.extend_from_slice(br#"", "currency": "EUR"}"#);
        let res = post(server.addr, "echo-2", &body);
        assert_eq!(res.status, 400, "{binary}");
        assert!(res.body.len() < 1024, "{binary}: {} bytes", res.body.len());
    });
}

#[test]
fn half_headers_are_dropped_or_answered_within_a_bound() {
    on_both(|binary| {
        let server = Server::start(binary, &[]);
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        // Bounded: a server that holds the connection fails the test.
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        stream
            .write_all(b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: half\r\nContent-Ty")
            .expect("write");
        let sent = Instant::now();
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        let took = sent.elapsed();
        assert!(
            read.is_ok(),
            "{binary}: still holding the connection after {took:?}: {read:?}"
        );
        assert!(
            took < Duration::from_secs(8),
            "{binary}: the connection ended after {took:?}"
        );
        let answer = String::from_utf8_lossy(&raw);
        assert!(
            raw.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{binary}: {answer}"
        );
        eprintln!(
            "{binary}: half headers ended after {took:?} with {:?}",
            answer.lines().next().unwrap_or("(closed)")
        );
    });
}

#[test]
fn metrics_list_the_memory_store_evictions() {
    on_both(|binary| {
        let server = Server::start(binary, &[]);
        let metrics = http(server.addr, "GET /metrics");
        assert_eq!(metrics.status, 200);
        for reason in ["capacity", "bytes"] {
            let series = format!("idempotency_memory_evictions_total{{reason=\"{reason}\"}} 0");
            assert!(
                metrics.text().contains(&series),
                "{binary}: {}",
                metrics.text()
            );
        }
    });
}

/// `--encryption-key-file`: a payment's stored response is ciphertext in
/// the SQLite file (its reference is nowhere in it), the retry replays it;
/// restarted with a key file that lacks its key, the retry answers 503 and
/// runs nothing; a key file that is wrong is a startup sentence, exit 2.
fn check_encryption_key_file(binary: &'static str) {
    let dir = TempDir::new("encryption");
    let store = dir.sqlite("records.sqlite");
    let keys = dir.0.join("keys");
    std::fs::write(
        &keys,
        "# the payments API's record keys\nk1:Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=\n",
    )
    .expect("key file");
    let key_file = keys.to_str().expect("a UTF-8 path");
    let body = br#"{"amount":100,"currency":"EUR","reference":"secret-reference-42"}"#;
    {
        let server = Server::start(
            binary,
            &["--store", &store, "--encryption-key-file", key_file],
        );
        let first = post(server.addr, "enc-1", body);
        assert_eq!(first.status, 201, "{binary}: {}", first.text());
        let retry = post(server.addr, "enc-1", body);
        assert_eq!(retry.status, 201, "{binary}: {}", retry.text());
        assert_eq!(
            retry.header("idempotent-replayed"),
            Some("true"),
            "{binary}"
        );
        assert_eq!(
            retry.body, first.body,
            "{binary}: the replay is the response"
        );
    }
    let file = std::fs::read(dir.0.join("records.sqlite")).expect("the SQLite file");
    let wal = std::fs::read(dir.0.join("records.sqlite-wal")).unwrap_or_default();
    for bytes in [&file, &wal] {
        assert!(
            !bytes.windows(19).any(|w| w == b"secret-reference-42"),
            "{binary}: the stored response is in clear"
        );
    }
    std::fs::write(&keys, "k2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").expect("key file");
    {
        let server = Server::start(
            binary,
            &["--store", &store, "--encryption-key-file", key_file],
        );
        let retry = post(server.addr, "enc-1", body);
        assert_eq!(retry.status, 503, "{binary}: {}", retry.text());
        let listed = http(server.addr, "GET /payments");
        assert_eq!(listed.text(), "[]", "{binary}: the handler did not run");
    }
    std::fs::write(&keys, "k3:too-short\n").expect("key file");
    let stderr = startup_error(
        binary,
        &["--store", &store, "--encryption-key-file", key_file],
    );
    assert!(
        stderr.contains("--encryption-key-file"),
        "{binary}: {stderr}"
    );
}

#[test]
fn encryption_key_file_seals_records_on_both_binaries() {
    on_both(check_encryption_key_file);
}
