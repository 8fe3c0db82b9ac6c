//! Encryption at rest on SQLite (a temporary file) and PostgreSQL
//! (`DATABASE_URL`, skipped, saying why, when it is unset), in both modes:
//! the conformance suites over encrypted stores, the encryption cases, and
//! what only the database can show: the `outcome` column holds ciphertext
//! (written by `complete` and by a transactional commit), and a value
//! changed in the table, or copied to another row, is `Corrupt`.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

#[cfg(feature = "postgres")]
mod pg;

use std::time::Duration;

use idempotency_core::conformance::{Conformance, EncryptionConformance, TransactionalConformance};
use idempotency_core::{
    Begun, Claim, ClaimOutcome, DecryptError, Encrypted, EncryptionKeys, Fingerprint, LeaseToken,
    RecordId, Store, StoreError, StoredOutcome, StoredResponse, TokenOutcome, TransactionalStore,
};

/// The short lease of the suites: unoptimised (a test build), AES-GCM
/// takes about 250 ms a MiB, and the 1 MiB case runs beside the timing
/// cases.
const SLOW: Duration = Duration::from_secs(2);

fn keys() -> EncryptionKeys {
    EncryptionKeys::new("k1", rand::random()).expect("key")
}

const SECRET: &[u8] = b"IBAN DE89370400440532013000";

fn response() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: bytes::Bytes::from_static(SECRET),
    })
}

fn fresh_id() -> RecordId {
    RecordId::from_parts(b"encrypted", &rand::random::<[u8; 16]>())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::compute("POST", "/payments", None, None, b"{}")
}

fn claim(fp: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    }
}

/// Two records written through `store` (an encrypted one): `plain` by
/// claim and complete, `committed` by a transactional commit.
async fn write_both<S: Store + TransactionalStore>(store: &S) -> (RecordId, RecordId) {
    let fp = fingerprint();
    let (plain, committed) = (fresh_id(), fresh_id());
    let token = LeaseToken::random();
    assert!(matches!(
        store.claim(&plain, token, claim(&fp)).await,
        Ok(ClaimOutcome::Acquired(_))
    ));
    assert_eq!(
        store
            .complete(&plain, token, &response(), Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
    let Ok(Begun::Acquired(open)) = store
        .begin(&committed, LeaseToken::random(), claim(&fp))
        .await
    else {
        panic!("begin")
    };
    open.commit(response(), Duration::from_secs(60), Duration::from_secs(5))
        .await
        .expect("commit");
    (plain, committed)
}

/// The sealed bytes of a column: no secret in them.
fn check_sealed(outcome: &[u8], what: &str) {
    assert_eq!(&outcome[..2], &[1, 3], "{what}: not a sealed outcome");
    assert!(
        !outcome.windows(SECRET.len()).any(|w| w == SECRET),
        "{what}: the body is in the table in clear"
    );
    assert!(!outcome.windows(10).any(|w| w == b"text/plain"), "{what}");
}

/// The outcome read back through `store`: as written, or the `DecryptError`.
async fn read<S: Store>(store: &S, id: &RecordId) -> Result<StoredOutcome, DecryptError> {
    let fp = fingerprint();
    match store.claim(id, LeaseToken::random(), claim(&fp)).await {
        Ok(ClaimOutcome::Completed { outcome, .. }) => Ok(outcome),
        Err(StoreError::Corrupt { source, .. }) => Err(source
            .downcast_ref::<DecryptError>()
            .unwrap_or_else(|| panic!("not a DecryptError: {source}"))
            .clone()),
        other => panic!("expected Completed or Corrupt, got {other:?}"),
    }
}

fn flip(mut outcome: Vec<u8>) -> Vec<u8> {
    let at = outcome.len() - 20;
    outcome[at] ^= 0x01;
    outcome
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_sqlite_store_conforms_in_both_modes() {
    use idempotency_sqlx::{sqlite::SqliteStore, SqliteTransaction};
    let db = test_support::TempDb::new("encrypted_conformance");
    let store = SqliteStore::connect(&db.url()).await.expect("sqlite");
    Conformance::new(Encrypted::new(store.clone(), keys()))
        .short_lease(SLOW)
        .run_all()
        .await;
    TransactionalConformance::<SqliteTransaction>::new(Encrypted::new(store.clone(), keys()))
        .short_lease(SLOW)
        .run_all()
        .await;
    EncryptionConformance::transactional(store).run_all().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_holds_ciphertext_and_a_value_changed_or_moved_in_the_table_is_corrupt() {
    use idempotency_sqlx::sqlite::SqliteStore;
    let db = test_support::TempDb::new("encrypted_at_rest");
    let store = SqliteStore::connect(&db.url()).await.expect("sqlite");
    let encrypted = Encrypted::new(store.clone(), keys());
    let (plain, committed) = write_both(&encrypted).await;
    let pool = store.pool();
    for (id, what) in [(&plain, "complete"), (&committed, "commit")] {
        let outcome: Vec<u8> =
            sqlx::query_scalar("SELECT outcome FROM idempotency_records WHERE id = ?")
                .bind(id.as_bytes().as_slice())
                .fetch_one(pool)
                .await
                .expect("select");
        check_sealed(&outcome, what);
        assert_eq!(read(&encrypted, id).await, Ok(response()), "{what}");

        let moved = fresh_id();
        sqlx::query(
            "INSERT INTO idempotency_records (id, fingerprint, token, lease_until, expires_at, outcome) \
             SELECT ?, fingerprint, token, lease_until, expires_at, outcome FROM idempotency_records WHERE id = ?",
        )
        .bind(moved.as_bytes().as_slice())
        .bind(id.as_bytes().as_slice())
        .execute(pool)
        .await
        .expect("copy the row");
        assert!(
            matches!(
                read(&encrypted, &moved).await,
                Err(DecryptError::NotAuthentic { .. })
            ),
            "{what}: moved to another row"
        );

        sqlx::query("UPDATE idempotency_records SET outcome = ? WHERE id = ?")
            .bind(flip(outcome))
            .bind(id.as_bytes().as_slice())
            .execute(pool)
            .await
            .expect("update");
        assert!(
            matches!(
                read(&encrypted, id).await,
                Err(DecryptError::NotAuthentic { .. })
            ),
            "{what}: changed in the table"
        );
    }
}

#[cfg(feature = "postgres")]
async fn postgres(test: &str) -> Option<(String, idempotency_sqlx::postgres::PostgresStore)> {
    use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};
    let url = test_support::service_url("DATABASE_URL", test)?;
    let schema = test_support::unique("idem_encrypted");
    let store = PostgresStore::connect_with(
        &url,
        PostgresOptions::new().schema(&schema).max_connections(16),
    )
    .await
    .expect("postgres");
    Some((url, store))
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_postgres_store_conforms_in_both_modes() {
    let Some((url, store)) = postgres("an_encrypted_postgres_store_conforms").await else {
        return;
    };
    let keys = keys();
    let peer = pg::connect(&url, store.schema()).await;
    Conformance::new(Encrypted::new(store.clone(), keys.clone()))
        .short_lease(SLOW)
        .with_peer(Encrypted::new(peer, keys.clone()))
        .run_all()
        .await;
    TransactionalConformance::<idempotency_sqlx::PostgresTransaction>::new(Encrypted::new(
        store.clone(),
        keys,
    ))
    .short_lease(SLOW)
    .run_all()
    .await;
    EncryptionConformance::transactional(store.clone())
        .run_all()
        .await;
    pg::drop_schema(&store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_holds_ciphertext_and_a_value_changed_or_moved_in_the_table_is_corrupt() {
    let Some((_, store)) = postgres("postgres_holds_ciphertext").await else {
        return;
    };
    let encrypted = Encrypted::new(store.clone(), keys());
    let (plain, committed) = write_both(&encrypted).await;
    let (pool, table) = (
        store.pool(),
        format!("\"{}\".idempotency_records", store.schema()),
    );
    for (id, what) in [(&plain, "complete"), (&committed, "commit")] {
        let outcome: Vec<u8> =
            sqlx::query_scalar(&format!("SELECT outcome FROM {table} WHERE id = $1"))
                .bind(id.as_bytes().as_slice())
                .fetch_one(pool)
                .await
                .expect("select");
        check_sealed(&outcome, what);
        assert_eq!(read(&encrypted, id).await, Ok(response()), "{what}");

        let moved = fresh_id();
        sqlx::query(&format!(
            "INSERT INTO {table} (id, fingerprint, token, lease_until, expires_at, outcome) \
             SELECT $1, fingerprint, token, lease_until, expires_at, outcome FROM {table} WHERE id = $2"
        ))
        .bind(moved.as_bytes().as_slice())
        .bind(id.as_bytes().as_slice())
        .execute(pool)
        .await
        .expect("copy the row");
        assert!(
            matches!(
                read(&encrypted, &moved).await,
                Err(DecryptError::NotAuthentic { .. })
            ),
            "{what}: moved to another row"
        );

        sqlx::query(&format!("UPDATE {table} SET outcome = $1 WHERE id = $2"))
            .bind(flip(outcome))
            .bind(id.as_bytes().as_slice())
            .execute(pool)
            .await
            .expect("update");
        assert!(
            matches!(
                read(&encrypted, id).await,
                Err(DecryptError::NotAuthentic { .. })
            ),
            "{what}: changed in the table"
        );
    }
    pg::drop_schema(&store).await;
}
