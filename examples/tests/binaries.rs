//! The example binaries as a user meets them: startup errors are sentences
//! (never `Debug`) with a non-zero exit code, a `sqlite:` URL without a file
//! fails at startup, logs to a pipe carry no colour codes, and `HEAD` answers
//! like `GET` on both payments binaries.

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
        let mut child = command(binary)
            .args(["--listen", "127.0.0.1:0"])
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
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
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
