//! Counts the store's round trips on the wire, through a TCP proxy: a fresh
//! request (claim + complete) costs 2, a replay 1, on Redis, Redis Cluster and
//! PostgreSQL. Reads `REDIS_URL` / `REDIS_CLUSTER_URL` / `DATABASE_URL` at run
//! time; skips when unset.

#[cfg(feature = "redis")]
mod cluster;
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
    fresh_on(store, &id).await;
    id
}

/// A fresh request on the record `id`.
async fn fresh_on(store: &dyn Store, id: &RecordId) {
    let ClaimOutcome::Acquired(token) = claim(store, id).await else {
        panic!("not acquired");
    };
    let done = store
        .complete(id, token, &outcome(), Duration::from_secs(300))
        .await
        .expect("complete");
    assert_eq!(done, TokenOutcome::Applied);
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

    /// After Redis lost its scripts (a restart), the first call of a script
    /// (here `complete`) falls back (NOSCRIPT, then EVAL with the script's
    /// text) and the next is back to one; a replay needs no script at all.
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
        let after_replay = proxy.counts.snapshot()[0];
        fresh(&store).await;
        let after_fallback = proxy.counts.snapshot()[0];
        fresh(&store).await;
        let after_steady = proxy.counts.snapshot()[0];
        assert_eq!(after_replay - before, 1, "a replay uses no script");
        assert_eq!(after_fallback - after_replay, 3, "NOSCRIPT fallback");
        assert_eq!(
            after_steady - after_fallback,
            2,
            "steady state after the fallback"
        );
    }
}

/// The same counts on a Redis Cluster (`REDIS_CLUSTER_URL`): a proxy in
/// front of every node counts the round trips to all of them, and the
/// fallback after a node lost its scripts happens per node.
#[cfg(feature = "redis")]
mod redis_cluster_store {
    use super::*;
    use idempotency_core::store::redis::RedisStore;
    use redis::cluster::{ClusterClientBuilder, NodeAddress};
    use std::collections::HashMap;

    struct Proxied {
        proxies: Vec<CountingProxy>,
        store: RedisStore,
        /// Each master's `host:port` and the slots it serves.
        masters: Vec<cluster::Node>,
    }

    impl Proxied {
        fn flights(&self) -> u64 {
            self.proxies.iter().map(|p| p.counts.snapshot()[0]).sum()
        }
    }

    async fn proxied(url: &str) -> Proxied {
        let seeds = cluster::seeds(url);
        let mut admin = cluster::node(&seeds[0]).await;
        let nodes = cluster::nodes(&mut admin).await;
        let mut proxies = Vec::new();
        let mut map = HashMap::new();
        for node in &nodes {
            let proxy = CountingProxy::start(node.addr.clone(), false).await;
            let (host, port) = node.addr.rsplit_once(':').expect("host:port");
            map.insert(
                NodeAddress::new(host, port.parse().expect("port")),
                NodeAddress::new("127.0.0.1", proxy.port),
            );
            proxies.push(proxy);
        }
        let client = ClusterClientBuilder::new(
            proxies
                .iter()
                .map(|p| format!("redis://127.0.0.1:{}", p.port))
                .collect::<Vec<_>>(),
        )
        .node_address_map(map)
        .build()
        .expect("cluster client");
        let conn = client
            .get_async_connection()
            .await
            .expect("connect through the proxies");
        let store =
            RedisStore::from_cluster(conn).with_prefix(format!("{}:", common::unique("rt")));
        store.load_scripts().await.expect("load scripts");
        let masters = nodes.into_iter().filter(|n| n.master).collect();
        Proxied {
            proxies,
            store,
            masters,
        }
    }

    #[tokio::test]
    async fn redis_cluster_fresh_is_two_round_trips_and_replay_one() {
        let Some(url) = cluster::cluster_url("redis_cluster_fresh_is_two_round_trips") else {
            return;
        };
        let p = proxied(&url).await;
        let store = &p.store;
        let id = fresh(store).await; // warm up
        replay(store, &id).await;
        for _ in 0..20 {
            let before = p.flights();
            let id = fresh(store).await;
            let after_fresh = p.flights();
            replay(store, &id).await;
            let after_replay = p.flights();
            assert_eq!(after_fresh - before, 2, "fresh request round trips");
            assert_eq!(after_replay - after_fresh, 1, "replay round trips");
        }
        let id = RecordId::from_parts(b"rt", &rand::random::<[u8; 16]>());
        let ClaimOutcome::Acquired(_) = claim(store, &id).await else {
            panic!("not acquired")
        };
        let before = p.flights();
        assert!(matches!(
            claim(store, &id).await,
            ClaimOutcome::InFlight { .. }
        ));
        assert_eq!(p.flights() - before, 1, "conflict round trips");
    }

    /// Every node forgets its scripts: on each master, the first fresh
    /// request costs one round trip more (NOSCRIPT, then EVAL on that same
    /// node), the next is back to 2.
    #[tokio::test]
    async fn redis_cluster_noscript_fallback_is_per_node() {
        let Some(url) = cluster::cluster_url("redis_cluster_noscript_fallback_is_per_node") else {
            return;
        };
        // A cluster of its own where one is at hand, since flushing scripts
        // would cost the shared cluster's other tests a fallback each.
        let private = cluster::PrivateCluster::start(
            "redis_cluster_noscript_fallback_is_per_node",
            Duration::from_secs(5),
        );
        let url = private.as_ref().map_or(url, |c| c.url());
        let p = proxied(&url).await;
        let store = &p.store;
        fresh(store).await;
        let mut admins = Vec::new();
        for master in &p.masters {
            admins.push(cluster::node(&master.addr).await);
        }
        for admin in &mut admins {
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(admin)
                .await
                .expect("script flush");
        }
        let mut admin = admins.pop().expect("a master");
        for master in &p.masters {
            // Two fresh records on this master.
            let mut ids = Vec::new();
            while ids.len() < 2 {
                let id = RecordId::from_parts(b"rt", &rand::random::<[u8; 16]>());
                if master.serves(cluster::keyslot(&mut admin, &store.key(&id)).await) {
                    ids.push(id);
                }
            }
            let before = p.flights();
            fresh_on(store, &ids[0]).await;
            let after_fallback = p.flights();
            fresh_on(store, &ids[1]).await;
            let after_steady = p.flights();
            assert_eq!(
                after_fallback - before,
                3,
                "NOSCRIPT fallback on {}",
                master.addr
            );
            assert_eq!(
                after_steady - after_fallback,
                2,
                "steady state on {}",
                master.addr
            );
        }
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
