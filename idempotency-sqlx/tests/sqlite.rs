//! SQLite-specific behaviour: several processes sharing one file, purging,
//! and opening by bare path. (That `connect` picks SQLite from its URL is in
//! idempotency-connect's tests.)
#![cfg(feature = "sqlite")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store};
use idempotency_sqlx::sqlite::SqliteStore;

const CHILD: &str = "IDEMPOTENCY_SQLITE_CHILD";
const PROCESSES: usize = 4;
const TASKS_PER_PROCESS: usize = 8;
const KEYS: usize = 20;

fn fp() -> Fingerprint {
    Fingerprint::compute("POST", "/sqlite", None, None, b"same")
}

/// Run by the parent as a child process: opens the shared file (creating and
/// migrating it, racing the other children) and claims every key from 8
/// concurrent tasks; prints the keys it acquired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by several_processes_share_one_file"]
async fn sqlite_child_claims_every_key() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let store = Arc::new(
        SqliteStore::connect(&path)
            .await
            .expect("open the shared file"),
    );
    let mut tasks = Vec::new();
    for _ in 0..TASKS_PER_PROCESS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for k in 0..KEYS {
                let id = RecordId::from_parts(b"multi-process", &[k as u8]);
                let outcome = store
                    .claim(
                        &id,
                        LeaseToken::random(),
                        Claim {
                            fingerprint: &fp(),
                            lease: Duration::from_secs(60),
                            ttl: Duration::from_secs(60),
                        },
                    )
                    .await
                    .expect("claim");
                match outcome {
                    ClaimOutcome::Acquired(_) => won.push(k),
                    ClaimOutcome::InFlight { fingerprint, .. } => assert_eq!(fingerprint, fp()),
                    other => panic!("unexpected {other:?}"),
                }
            }
            won
        }));
    }
    for t in tasks {
        for k in t.await.expect("task") {
            println!("ACQUIRED {k}");
        }
    }
    println!("CHILD-DONE");
}

#[tokio::test]
async fn several_processes_share_one_file() {
    let db = test_support::TempDb::new("multi_process");
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "sqlite_child_claims_every_key",
                    "--ignored",
                    "--nocapture",
                ])
                .env(CHILD, db.url())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn a child")
        })
        .collect();
    let mut acquired: HashMap<usize, usize> = HashMap::new();
    for child in children {
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("CHILD-DONE"),
            "a child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            if let Some(k) = line.strip_prefix("ACQUIRED ") {
                *acquired.entry(k.parse().expect("key")).or_default() += 1;
            }
        }
    }
    for k in 0..KEYS {
        assert_eq!(
            acquired.get(&k).copied().unwrap_or(0),
            1,
            "key {k}: acquired {:?} times across {} processes x {} tasks",
            acquired.get(&k),
            PROCESSES,
            TASKS_PER_PROCESS
        );
    }
}

#[tokio::test]
async fn purge_deletes_only_expired_rows_and_the_purger_runs() {
    let db = test_support::TempDb::new("purge");
    // A bare path works as well as sqlite://PATH.
    let store = SqliteStore::connect(db.path.to_str().expect("utf-8 path"))
        .await
        .expect("open");
    for i in 0..13 {
        let ttl = if i < 10 {
            Duration::ZERO
        } else {
            Duration::from_secs(60)
        };
        test_support::records::completed(&store, &RecordId::from_parts(b"purge", &[i]), ttl).await;
    }
    assert_eq!(store.purge_expired(4).await.expect("purge"), 4);
    assert_eq!(store.purge_expired(4).await.expect("purge"), 4);
    assert_eq!(store.purge_expired(4).await.expect("purge"), 2);
    assert_eq!(store.purge_expired(4).await.expect("purge"), 0);
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM idempotency_records")
            .fetch_one(store.pool())
            .await
            .expect("count")
    };
    assert_eq!(count().await, 3);

    for i in 0..5u8 {
        let id = RecordId::from_parts(b"purger", &[i]);
        let _ = store
            .claim(
                &id,
                LeaseToken::random(),
                Claim {
                    fingerprint: &fp(),
                    lease: Duration::ZERO,
                    ttl: Duration::ZERO,
                },
            )
            .await
            .expect("claim");
    }
    assert_eq!(count().await, 8);
    let purger = store.spawn_purger(Duration::from_millis(20), 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count().await > 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purger did not purge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    purger.abort();
}

#[tokio::test]
async fn an_unopenable_file_is_a_typed_error() {
    let err = SqliteStore::connect("sqlite:///nonexistent-dir/sub/x.db")
        .await
        .expect_err("no such directory");
    assert!(matches!(
        err,
        idempotency_core::StoreError::Backend {
            backend: "sqlite",
            ..
        }
    ));
    assert!(std::error::Error::source(&err).is_some());
}
