//! Counts the store's round trips on the wire, through a TCP proxy: a fresh
//! request (claim + complete) costs 2, a replay 1, on Redis and PostgreSQL.
//! Reads `REDIS_URL` / `DATABASE_URL` at run time; skips when unset.

mod common;

use std::time::Duration;

use common::CountingProxy;
use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome, StoredResponse,
    TokenOutcome,
};

fn outcome() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![(
            "content-type".into(),
            bytes::Bytes::from_static(b"application/json"),
        )],
        body: bytes::Bytes::from(vec![b'x'; 1024]),
    })
}

async fn claim(store: &dyn Store, id: &RecordId) -> ClaimOutcome {
    let fp = Fingerprint::compute("POST", "/rt", None, None, b"body");
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(300),
    };
    store
        .claim(id, LeaseToken::random(), claim)
        .await
        .expect("claim")
}

/// A fresh request: claim (acquired) then complete.
async fn fresh(store: &dyn Store) -> RecordId {
    let id = RecordId::from_parts(b"rt", &rand::random::<[u8; 16]>());
    let ClaimOutcome::Acquired(token) = claim(store, &id).await else {
        panic!("not acquired");
    };
    let done = store
        .complete(&id, token, &outcome(), Duration::from_secs(300))
        .await
        .expect("complete");
    assert_eq!(done, TokenOutcome::Applied);
    id
}

async fn replay(store: &dyn Store, id: &RecordId) {
    assert!(matches!(
        claim(store, id).await,
        ClaimOutcome::Completed { .. }
    ));
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use idempotency_core::store::redis::RedisStore;

    fn upstream(url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:6379")
        }
    }

    async fn proxied(upstream_url: &str) -> (CountingProxy, RedisStore) {
        let proxy = CountingProxy::start(upstream(upstream_url), false).await;
        let store = RedisStore::connect(&format!("redis://127.0.0.1:{}", proxy.port))
            .await
            .expect("connect through the proxy")
            .with_prefix(format!("{}:", common::unique("rt")));
        (proxy, store)
    }

    #[tokio::test]
    async fn redis_fresh_is_two_round_trips_and_replay_one() {
        let Some(url) = common::service_url("REDIS_URL", "redis_fresh_is_two_round_trips") else {
            return;
        };
        let (proxy, store) = proxied(&url).await;
        let id = fresh(&store).await; // warm up
        replay(&store, &id).await;
        for _ in 0..5 {
            let before = proxy.counts.snapshot()[0];
            let id = fresh(&store).await;
            let after_fresh = proxy.counts.snapshot()[0];
            replay(&store, &id).await;
            let after_replay = proxy.counts.snapshot()[0];
            assert_eq!(after_fresh - before, 2, "fresh request round trips");
            assert_eq!(after_replay - after_fresh, 1, "replay round trips");
        }
        // A conflict (in flight) is one round trip too.
        let id = RecordId::from_parts(b"rt", &rand::random::<[u8; 16]>());
        let ClaimOutcome::Acquired(_) = claim(&store, &id).await else {
            panic!("not acquired")
        };
        let before = proxy.counts.snapshot()[0];
        assert!(matches!(
            claim(&store, &id).await,
            ClaimOutcome::InFlight { .. }
        ));
        assert_eq!(
            proxy.counts.snapshot()[0] - before,
            1,
            "conflict round trips"
        );
    }

    /// After Redis lost its scripts (a restart), the first call falls back
    /// (NOSCRIPT, SCRIPT LOAD, EVALSHA) and the next is back to one.
    #[tokio::test]
    async fn redis_noscript_fallback_is_a_one_off() {
        let Some(server) = common::RedisServer::start("redis_noscript_fallback_is_a_one_off")
        else {
            return;
        };
        let (proxy, store) = proxied(&server.url()).await;
        let id = fresh(&store).await;
        let mut admin = redis::Client::open(server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("admin connection");
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .expect("script flush");
        let before = proxy.counts.snapshot()[0];
        replay(&store, &id).await;
        let after_fallback = proxy.counts.snapshot()[0];
        replay(&store, &id).await;
        let after_steady = proxy.counts.snapshot()[0];
        assert_eq!(after_fallback - before, 3, "NOSCRIPT fallback");
        assert_eq!(
            after_steady - after_fallback,
            1,
            "steady state after the fallback"
        );
    }
}

#[cfg(feature = "postgres")]
mod postgres_store {
    use super::*;
    use idempotency_core::store::postgres::{PostgresOptions, PostgresStore};
    use sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;

    #[tokio::test]
    async fn postgres_fresh_is_two_statements_and_replay_one() {
        let Some(url) = common::service_url("DATABASE_URL", "postgres_fresh_is_two_statements")
        else {
            return;
        };
        let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let proxy = CountingProxy::start(upstream, true).await;
        // Through the proxy, in plain text so that it can read the protocol
        // (trust authentication: the proxy URL carries no password).
        let proxied = format!(
            "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
            options.get_username(),
            proxy.port,
            options.get_database().unwrap_or("postgres"),
        );
        let store = PostgresStore::connect_with(
            &proxied,
            PostgresOptions::new()
                .schema(common::unique("idem_rt"))
                .max_connections(1),
        )
        .await
        .expect("connect through the proxy");
        // Warm up: the connection prepares each statement once.
        let id = fresh(&store).await;
        replay(&store, &id).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..5 {
            let [_, e0, q0, p0, f0] = proxy.counts.snapshot();
            let id = fresh(&store).await;
            let [_, e1, q1, _, f1] = proxy.counts.snapshot();
            replay(&store, &id).await;
            let [_, e2, q2, p2, f2] = proxy.counts.snapshot();
            assert_eq!(
                (e1 - e0, q1 - q0),
                (2, 0),
                "fresh request: statements (Execute, Query)"
            );
            assert_eq!(f1 - f0, 2, "fresh request: round trips that run statements");
            assert_eq!(
                (e2 - e1, q2 - q1),
                (1, 0),
                "replay: statements (Execute, Query)"
            );
            assert_eq!(f2 - f1, 1, "replay: round trips that run statements");
            assert_eq!(p2 - p0, 0, "no statement is prepared again");
        }
        let [flights, ..] = proxy.counts.snapshot();
        eprintln!(
            "(all flights on the wire, including the pool's background Sync checks: {flights})"
        );
        sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", store.schema()))
            .execute(store.pool())
            .await
            .expect("drop schema");
    }
}
