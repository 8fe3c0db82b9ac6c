//! The metrics of transactional mode, seen through `metrics-util`'s
//! `DebuggingRecorder`, on SQLite. (The other metrics: in idempotency-core's
//! tests.)
#![cfg(feature = "sqlite")]

use std::time::Duration;

use idempotency_core::Idempotency;
use test_support::recorder::{config, post, post_answering, recorded, DebuggingRecorder, Seen};

/// Transactional mode (SQLite): executed once its transaction commits or
/// its answer is not stored; a transaction that times out is unavailable.
#[test]
fn transactional_mode_counts_at_the_end_of_the_transaction() {
    let dir = std::env::temp_dir().join(format!(
        "core-metrics-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("records.sqlite");
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let statuses = recorded(&recorder, async {
        let store =
            idempotency_sqlx::sqlite::SqliteStore::connect(path.to_str().expect("utf-8 path"))
                .await
                .expect("sqlite");
        let config = config()
            .transaction_timeout(Duration::from_millis(100))
            .build()
            .expect("config");
        let engine = Idempotency::transactional(store, config);
        let slow = Duration::from_millis(400);
        vec![
            post(&engine, "a", "{}", None).await,
            post(&engine, "a", "{}", None).await,
            post(&engine, "a", r#"{"n":2}"#, None).await,
            post_answering(&engine, "b", "{}", None, Duration::ZERO, 500).await,
            post_answering(&engine, "c", "{}", None, slow, 201).await,
        ]
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(statuses, [201, 201, 422, 500, 503]);
    // executed, replayed, conflict, mismatch, rejected, unavailable, unguarded
    assert_eq!(Seen::take(&snapshotter).outcomes(), [2, 1, 0, 1, 0, 1, 0]);
}
