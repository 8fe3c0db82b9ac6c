//! `connect` picks every backend from its URL: SQLite (feature `sqlite`)
//! always; Redis and PostgreSQL (features `redis`, `postgres`) when
//! `REDIS_URL` / `DATABASE_URL` are set, skipped with the reason otherwise.
#![cfg(feature = "sqlite")]

#[tokio::test]
async fn store_connect_picks_every_backend_from_its_url() {
    let db = test_support::TempDb::new("connect");
    let store = idempotency_connect::connect(&db.url())
        .await
        .expect("sqlite URL");
    assert_eq!(store.backend(), "sqlite");
    if let Some(url) = test_support::service_url("REDIS_URL", "store_connect (redis part)") {
        #[cfg(feature = "redis")]
        assert_eq!(
            idempotency_connect::connect(&url)
                .await
                .expect("redis")
                .backend(),
            "redis"
        );
        let _ = url;
    }
    if let Some(url) = test_support::service_url("DATABASE_URL", "store_connect (postgres part)") {
        #[cfg(feature = "postgres")]
        assert_eq!(
            idempotency_connect::connect(&url)
                .await
                .expect("postgres")
                .backend(),
            "postgres"
        );
        let _ = url;
    }
    let err = idempotency_connect::connect("sqlite:///nonexistent-dir/sub/x.db")
        .await
        .err()
        .expect("error");
    assert!(matches!(
        err,
        idempotency_connect::ConnectError::Store {
            backend: "sqlite",
            ..
        }
    ));
}
