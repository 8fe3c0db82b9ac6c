//! PostgreSQL-specific behaviour: the claim's race with a concurrent insert
//! that commits after the claim's snapshot, purging, migrations. Reads
//! `DATABASE_URL` at run time; skips (saying why) when it is unset.
#![cfg(feature = "postgres")]

mod pg;

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoreError, StoredOutcome,
    StoredResponse,
};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
use sqlx::Connection;

async fn store(test: &str) -> Option<(PostgresStore, String)> {
    let url = test_support::service_url("DATABASE_URL", test)?;
    let schema = test_support::unique("idem_pg");
    let store = pg::connect(&url, &schema).await;
    Some((store, schema))
}

fn fp(body: &[u8]) -> Fingerprint {
    Fingerprint::compute("POST", "/pg", None, None, body)
}

fn id() -> RecordId {
    RecordId::from_parts(b"pg", &rand::random::<[u8; 16]>())
}

async fn claim(store: &PostgresStore, id: &RecordId, fp: &Fingerprint) -> ClaimOutcome {
    let claim = Claim {
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    };
    store
        .claim(id, LeaseToken::random(), claim)
        .await
        .expect("claim")
}

/// A row inserted by a transaction that commits after the claim's snapshot
/// was taken: the claim's upsert waits for it, finds it, and must answer
/// InFlight with the other's fingerprint in the same statement (not
/// Acquired, not an error, not "no row").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_racing_an_uncommitted_insert_sees_the_winner() {
    let Some((store, schema)) = store("a_claim_racing_an_uncommitted_insert_sees_the_winner").await
    else {
        return;
    };
    let url = std::env::var("DATABASE_URL").expect("url");
    let mut other = sqlx::PgConnection::connect(&url).await.expect("connect");
    for winner_state in ["in flight", "completed"] {
        let id = id();
        let (winner_fp, loser_fp) = (fp(b"winner"), fp(b"loser"));
        let mut tx = other.begin().await.expect("begin");
        let outcome = StoredOutcome::response(StoredResponse {
            status: 201,
            headers: vec![],
            body: bytes::Bytes::from_static(b"winner's"),
        });
        let encoded = (winner_state == "completed").then(|| outcome.encode());
        sqlx::query(&format!(
            "INSERT INTO \"{schema}\".idempotency_records VALUES ($1, $2, $3, now() + interval '30 s', now() + interval '90 s', $4)"
        ))
        .bind(id.as_bytes().as_slice())
        .bind(winner_fp.as_bytes().as_slice())
        .bind(LeaseToken::random().to_bytes().to_vec())
        .bind(encoded)
        .execute(&mut *tx)
        .await
        .expect("insert");
        let s = store.clone();
        let racing = tokio::spawn(async move { claim(&s, &id, &loser_fp).await });
        // Let the claim take its snapshot and block on the uncommitted row.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !racing.is_finished(),
            "the claim did not wait for the conflicting insert"
        );
        tx.commit().await.expect("commit");
        match racing.await.expect("task") {
            ClaimOutcome::InFlight { fingerprint, .. } if winner_state == "in flight" => {
                assert_eq!(fingerprint, winner_fp)
            }
            ClaimOutcome::Completed {
                fingerprint,
                outcome: o,
            } if winner_state == "completed" => {
                assert_eq!(fingerprint, winner_fp);
                assert_eq!(o, outcome);
            }
            other => panic!("{winner_state}: the racing claim got {other:?}"),
        }
    }
    pg::drop_schema(&store).await;
}

/// The same race on a takeover: the lease passed, another claimer takes the
/// row over in a transaction that commits after our snapshot (which still
/// shows the row takeable). We must not take it over as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_racing_another_takeover_sees_the_winner() {
    let Some((store, schema)) = store("a_takeover_racing_another_takeover_sees_the_winner").await
    else {
        return;
    };
    let url = std::env::var("DATABASE_URL").expect("url");
    let mut other = sqlx::PgConnection::connect(&url).await.expect("connect");
    let id = id();
    let f = fp(b"same request");
    let crashed = LeaseToken::random();
    pg::insert_in_flight(
        &store,
        &id,
        &f,
        crashed,
        "now() - interval '1 s'",
        "now() + interval '60 s'",
    )
    .await;
    let mut tx = other.begin().await.expect("begin");
    sqlx::query(&format!(
        "UPDATE \"{schema}\".idempotency_records SET token = $2, lease_until = now() + interval '30 s' WHERE id = $1"
    ))
    .bind(id.as_bytes().as_slice())
    .bind(LeaseToken::random().to_bytes().to_vec())
    .execute(&mut *tx)
    .await
    .expect("take over");
    let s = store.clone();
    let racing = tokio::spawn(async move { claim(&s, &id, &f).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !racing.is_finished(),
        "the claim did not wait for the other takeover"
    );
    tx.commit().await.expect("commit");
    match racing.await.expect("task") {
        ClaimOutcome::InFlight {
            fingerprint,
            lease_remaining,
        } => {
            assert_eq!(fingerprint, f);
            assert!(
                lease_remaining > Duration::from_secs(20),
                "{lease_remaining:?}"
            );
        }
        other => panic!("the racing takeover got {other:?}"),
    }
    pg::drop_schema(&store).await;
}

/// Two stores with their own pools (two service instances) race on many
/// fresh keys at once: exactly one acquires each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_race_on_many_keys() {
    let Some((a, schema)) = store("two_instances_race_on_many_keys").await else {
        return;
    };
    let url = std::env::var("DATABASE_URL").expect("url");
    let b = pg::connect(&url, &schema).await;
    let stores: [Arc<dyn Store>; 2] = [Arc::new(a.clone()), Arc::new(b)];
    let ids: Vec<RecordId> = (0..20).map(|_| id()).collect();
    let acquired = test_support::records::race(&stores, &ids, 8).await;
    for id in &ids {
        assert_eq!(acquired[id], 1, "{id:?}");
    }
    pg::drop_schema(&a).await;
}

#[tokio::test]
async fn purge_deletes_only_expired_rows_in_batches() {
    let Some((store, schema)) = store("purge_deletes_only_expired_rows_in_batches").await else {
        return;
    };
    for i in 0..25 {
        // 20 expire at once, 5 live for a minute.
        let ttl = if i < 20 {
            Duration::ZERO
        } else {
            Duration::from_secs(60)
        };
        test_support::records::completed(&store, &id(), ttl).await;
    }
    assert_eq!(store.purge_expired(8).await.expect("purge"), 8);
    assert_eq!(store.purge_expired(8).await.expect("purge"), 8);
    assert_eq!(store.purge_expired(8).await.expect("purge"), 4);
    assert_eq!(store.purge_expired(8).await.expect("purge"), 0);
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".idempotency_records"
    ))
    .fetch_one(store.pool())
    .await
    .expect("count");
    assert_eq!(left, 5);
    pg::drop_schema(&store).await;
}

#[tokio::test]
async fn the_purger_task_purges_in_the_background() {
    let Some((store, schema)) = store("the_purger_task_purges_in_the_background").await else {
        return;
    };
    let f = fp(b"purger");
    for _ in 0..7 {
        let id = id();
        let _ = store
            .claim(
                &id,
                LeaseToken::random(),
                Claim {
                    fingerprint: &f,
                    lease: Duration::ZERO,
                    ttl: Duration::ZERO,
                },
            )
            .await
            .expect("claim");
    }
    let purger = store.spawn_purger(Duration::from_millis(50), 3);
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT count(*) FROM \"{schema}\".idempotency_records"
        ))
        .fetch_one(store.pool())
        .await
        .expect("count")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purger did not purge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    purger.abort();
    pg::drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_run_at_once() {
    let Some(url) = test_support::service_url("DATABASE_URL", "migrations_are_idempotent") else {
        return;
    };
    let schema = test_support::unique("idem_migrate");
    let connects = (0..4).map(|_| {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::spawn(async move {
            PostgresStore::connect_with(
                &url,
                PostgresOptions::new().schema(schema).max_connections(2),
            )
            .await
        })
    });
    let mut stores = Vec::new();
    for c in connects {
        stores.push(
            c.await
                .expect("task")
                .expect("concurrent connect + migrate"),
        );
    }
    stores[0].migrate().await.expect("migrate again");
    pg::drop_schema(&stores[0]).await;
}

#[tokio::test]
async fn bad_options_are_typed_errors() {
    let err = PostgresStore::connect_with(
        "postgres://postgres@127.0.0.1:1/none",
        PostgresOptions::new().migrate_on_connect(false),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(matches!(
        err,
        StoreError::Backend {
            backend: "postgres",
            ..
        }
    ));
    assert!(std::error::Error::source(&err).is_some());
    let err = PostgresStore::connect("not a url")
        .await
        .expect_err("bad url");
    assert!(matches!(err, StoreError::Backend { .. }));
    let Some(url) = test_support::service_url("DATABASE_URL", "bad_options_are_typed_errors")
    else {
        return;
    };
    let err = PostgresStore::connect_with(&url, PostgresOptions::new().schema("x\"; DROP"))
        .await
        .expect_err("bad schema");
    assert!(pg::is_config(&err), "{err:?}");
    let source = std::error::Error::source(&err).expect("source").to_string();
    assert!(source.contains("invalid schema name"), "{source}");
}

#[tokio::test]
async fn asynchronous_commit_is_opt_in() {
    let Some(url) = test_support::service_url("DATABASE_URL", "asynchronous_commit_is_opt_in")
    else {
        return;
    };
    let show = |store: PostgresStore| async move {
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(store.pool())
            .await
            .expect("show")
    };
    let durable = PostgresStore::connect(&url).await.expect("connect");
    assert_eq!(show(durable).await, "on");
    let fast = PostgresStore::connect_with(&url, PostgresOptions::new().synchronous_commit(false))
        .await
        .expect("connect");
    assert_eq!(show(fast).await, "off");
}

/// An invalid schema name is a configuration error (no server needed: the
/// pool is lazy and nothing is sent), with `InvalidSchema` as its source.
#[tokio::test]
async fn an_invalid_schema_is_a_config_error() {
    use idempotency_sqlx::postgres::InvalidSchema;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("a lazy pool");
    for bad in ["bad-name", "x\"; DROP", "", "1a"] {
        let err = PostgresStore::from_pool(pool.clone(), bad).expect_err(bad);
        assert!(pg::is_config(&err), "{bad}: {err:?}");
        let source = std::error::Error::source(&err).expect("source");
        assert!(
            matches!(source.downcast_ref::<InvalidSchema>(), Some(InvalidSchema(s)) if s == bad),
            "{bad}: {source:?}"
        );
    }
    PostgresStore::from_pool(pool, "idempotency").expect("a plain identifier");
}
