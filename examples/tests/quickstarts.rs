//! The README's quick starts, run: each is a binary of this crate whose
//! source is the README's block, character for character (checked here),
//! started on a free port (`PORT`) and sent the same `POST /payments`
//! twice: the first runs the handler, the second replays its answer.
//!
//! The transactional one needs the README's PostgreSQL
//! (`postgres://postgres@127.0.0.1:5432/test`) and runs when
//! `DATABASE_URL` is set; it deletes the row and the record it made.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Each quick start: its binary, and its source beside it.
const QUICK_STARTS: [(&str, &str, &str); 3] = [
    (
        "quickstart-axum",
        env!("CARGO_BIN_EXE_quickstart-axum"),
        include_str!("../src/bin/quickstart-axum.rs"),
    ),
    (
        "quickstart-actix",
        env!("CARGO_BIN_EXE_quickstart-actix"),
        include_str!("../src/bin/quickstart-actix.rs"),
    ),
    (
        "quickstart-transactional",
        env!("CARGO_BIN_EXE_quickstart-transactional"),
        include_str!("../src/bin/quickstart-transactional.rs"),
    ),
];

/// The database the transactional quick start names.
const README_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/test";

#[test]
fn each_quick_start_binary_is_the_readme_block() {
    let readme = include_str!("../../README.md");
    for (name, _, source) in QUICK_STARTS {
        // The file's own doc comment is not part of the block.
        let code = source
            .split_once("\n\n")
            .filter(|(doc, _)| doc.lines().all(|l| l.starts_with("//!")))
            .map_or(source, |(_, code)| code);
        let block = format!("```rust,no_run\n{code}```\n");
        assert!(
            readme.contains(&block),
            "README.md has no ```rust,no_run block identical to examples/src/bin/{name}.rs: \
             edit both together"
        );
    }
}

#[tokio::test]
async fn the_axum_quick_start_replays_a_retry() {
    let (_, binary, _) = QUICK_STARTS[0];
    let answers = post_twice(binary, &fresh_key()).await;
    assert_replayed(&answers, 200, "paid");
}

#[tokio::test]
async fn the_actix_quick_start_replays_a_retry() {
    let (_, binary, _) = QUICK_STARTS[1];
    let answers = post_twice(binary, &fresh_key()).await;
    assert_replayed(&answers, 201, "paid");
}

#[tokio::test]
async fn the_transactional_quick_start_commits_one_row_and_replays_a_retry() {
    if test_support::service_url(
        "DATABASE_URL",
        "the_transactional_quick_start_commits_one_row_and_replays_a_retry",
    )
    .is_none()
    {
        return;
    }
    let pool = sqlx::PgPool::connect(README_DATABASE)
        .await
        .expect("the README's PostgreSQL answers");
    // The quick start creates its table; the rows above this id are ours.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('quickstart_payments') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    let before: i64 = if exists {
        sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM quickstart_payments")
            .fetch_one(&pool)
            .await
            .unwrap()
    } else {
        0
    };
    let (_, binary, _) = QUICK_STARTS[2];
    let key = fresh_key();
    let answers = post_twice(binary, &key).await;
    assert_replayed(&answers, 201, "");
    let ours: Vec<i64> = sqlx::query_scalar("SELECT id FROM quickstart_payments WHERE id > $1")
        .bind(before)
        .fetch_all(&pool)
        .await
        .unwrap();
    // Nothing left behind: the row and the record (no scope header: the
    // global scope).
    sqlx::query("DELETE FROM quickstart_payments WHERE id = ANY($1)")
        .bind(&ours)
        .execute(&pool)
        .await
        .unwrap();
    let id = idempotency_core::RecordId::from_parts(
        idempotency_core::Scope::GLOBAL.as_bytes(),
        key.as_bytes(),
    );
    let records = sqlx::query("DELETE FROM idempotency.idempotency_records WHERE id = $1")
        .bind(id.as_bytes().to_vec())
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(ours.len(), 1, "one payment row for two requests");
    assert_eq!(records, 1, "one idempotency record, committed with the row");
}

fn fresh_key() -> String {
    test_support::unique("quickstart")
}

#[derive(Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    body: String,
}

fn assert_replayed(answers: &[Answer; 2], status: u16, body: &str) {
    let [first, second] = answers;
    assert_eq!(
        (first.status, first.replayed, first.body.as_str()),
        (status, false, body),
        "the first request runs the handler"
    );
    assert_eq!(
        (second.status, second.replayed, second.body.as_str()),
        (status, true, body),
        "the retry replays the stored answer"
    );
}

/// Starts `binary` on a free port, sends `POST /payments` with `key` twice,
/// and stops it.
async fn post_twice(binary: &str, key: &str) -> [Answer; 2] {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(binary)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the quick start starts");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_listening(&mut child, addr).await;
    let first = post(addr, key).await;
    let second = post(addr, key).await;
    let _ = child.kill().await;
    [first, second]
}

async fn wait_until_listening(child: &mut Child, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the quick start exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "the quick start never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `POST /payments` on its own connection.
async fn post(addr: SocketAddr, key: &str) -> Answer {
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST /payments HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Idempotency-Key: {key}\r\nAuthorization: Bearer quickstart\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), talk)
        .await
        .expect("an answer within 30 s")
        .expect("an HTTP exchange");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let replayed = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("idempotent-replayed: true"));
    Answer {
        status,
        replayed,
        body: dechunk(head, body),
    }
}

/// The body, whether sent with a length or chunked.
fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}
