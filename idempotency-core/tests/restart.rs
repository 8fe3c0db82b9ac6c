//! A record survives a process restart: a child process (this test binary,
//! re-run) claims and completes a record and exits; the parent opens a new
//! store and must replay it byte for byte. SQLite always; Redis and
//! PostgreSQL when `REDIS_URL` / `DATABASE_URL` are set.

mod common;

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome, StoredResponse,
    TokenOutcome,
};

const CHILD: &str = "IDEMPOTENCY_RESTART_CHILD";

fn expected() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![
            (
                "location".into(),
                bytes::Bytes::from_static(b"/payments/42"),
            ),
            (
                "x-bin".into(),
                bytes::Bytes::from_static(&[0, 0x80, 0xff, b'\r']),
            ),
            ("location".into(), bytes::Bytes::from_static(b"/again")),
        ],
        body: bytes::Bytes::from((0..=255u8).cycle().take(70_000).collect::<Vec<u8>>()),
    })
}

fn fingerprint() -> Fingerprint {
    Fingerprint::compute("POST", "/payments", None, Some(b"application/json"), b"{}")
}

async fn open(backend: &str, url: &str, namespace: &str) -> Arc<dyn Store> {
    match backend {
        #[cfg(feature = "sqlite")]
        "sqlite" => Arc::new(
            idempotency_core::store::sqlite::SqliteStore::connect(url)
                .await
                .expect("sqlite"),
        ),
        #[cfg(feature = "redis")]
        "redis" => Arc::new(
            idempotency_core::store::redis::RedisStore::connect(url)
                .await
                .expect("redis")
                .with_prefix(namespace),
        ),
        #[cfg(feature = "postgres")]
        "postgres" => Arc::new(
            idempotency_core::store::postgres::PostgresStore::connect_with(
                url,
                idempotency_core::store::postgres::PostgresOptions::new().schema(namespace),
            )
            .await
            .expect("postgres"),
        ),
        other => panic!("unknown backend {other} (or its feature is off)"),
    }
}

/// Run by the parent as a child process: claims and completes one record.
#[tokio::test]
#[ignore = "run as a child process by survives_a_process_restart"]
async fn restart_child_writes_a_record() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let [backend, namespace, id_hex, url] = parts[..] else {
        panic!("bad child spec");
    };
    let store = open(backend, url, namespace).await;
    let id = RecordId::from_parts(b"restart", id_hex.as_bytes());
    let token = LeaseToken::random();
    let ClaimOutcome::Acquired(_) = store
        .claim(
            &id,
            token,
            Claim {
                fingerprint: &fingerprint(),
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(600),
            },
        )
        .await
        .expect("claim")
    else {
        panic!("the child did not acquire");
    };
    let done = store
        .complete(&id, token, &expected(), Duration::from_secs(600))
        .await
        .expect("complete");
    assert_eq!(done, TokenOutcome::Applied);
    println!("CHILD-COMPLETED");
}

async fn survives_a_process_restart(backend: &str, url: &str, namespace: &str) {
    let id_hex = format!("{:032x}", rand::random::<u128>());
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "restart_child_writes_a_record",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, format!("{backend}|{namespace}|{id_hex}|{url}"))
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-COMPLETED"),
        "the child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A new process's view: a new store, new connections.
    let store = open(backend, url, namespace).await;
    let id = RecordId::from_parts(b"restart", id_hex.as_bytes());
    match store
        .claim(
            &id,
            LeaseToken::random(),
            Claim {
                fingerprint: &fingerprint(),
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(600),
            },
        )
        .await
        .expect("claim after the restart")
    {
        ClaimOutcome::Completed {
            fingerprint: f,
            outcome,
        } => {
            assert_eq!(f, fingerprint());
            assert_eq!(
                outcome.encode(),
                expected().encode(),
                "{backend}: not byte for byte"
            );
        }
        other => panic!("{backend}: after the restart the retry got {other:?}"),
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_records_survive_a_process_restart() {
    let db = common::TempDb::new("restart");
    survives_a_process_restart("sqlite", &db.url(), "").await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_records_survive_a_process_restart() {
    let Some(url) = common::service_url("REDIS_URL", "redis_records_survive_a_process_restart")
    else {
        return;
    };
    survives_a_process_restart("redis", &url, &format!("{}:", common::unique("restart"))).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_records_survive_a_process_restart() {
    let Some(url) =
        common::service_url("DATABASE_URL", "postgres_records_survive_a_process_restart")
    else {
        return;
    };
    let schema = common::unique("idem_restart");
    survives_a_process_restart("postgres", &url, &schema).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .expect("drop schema");
}
