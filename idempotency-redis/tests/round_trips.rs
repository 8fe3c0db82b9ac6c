//! Counts the store's round trips on the wire, through a TCP proxy: a fresh
//! request (claim + complete) costs 2, a replay 1, on Redis and Redis
//! Cluster. Reads `REDIS_URL` / `REDIS_CLUSTER_URL` at run time; skips when
//! unset. (PostgreSQL's: in idempotency-sqlx's tests.)

mod cluster;

use std::time::Duration;

use idempotency_core::{ClaimOutcome, RecordId};
use test_support::records::{claim, fresh, fresh_on, replay};
use test_support::CountingProxy;

mod redis_store {
    use super::*;
    use idempotency_redis::RedisStore;

    async fn proxied(upstream_url: &str) -> (CountingProxy, RedisStore) {
        let proxy = CountingProxy::start(test_support::host_port(upstream_url, 6379), false).await;
        let store = RedisStore::connect(&format!("redis://127.0.0.1:{}", proxy.port))
            .await
            .expect("connect through the proxy")
            .with_prefix(format!("{}:", test_support::unique("rt")));
        (proxy, store)
    }

    #[tokio::test]
    async fn redis_fresh_is_two_round_trips_and_replay_one() {
        let Some(url) = test_support::service_url("REDIS_URL", "redis_fresh_is_two_round_trips")
        else {
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
        let Some(server) = test_support::RedisServer::start("redis_noscript_fallback_is_a_one_off")
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
mod redis_cluster_store {
    use super::*;
    use idempotency_redis::RedisStore;
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
            RedisStore::from_cluster(conn).with_prefix(format!("{}:", test_support::unique("rt")));
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
        let Some(url) = test_support::service_url(
            "REDIS_CLUSTER_URL",
            "redis_cluster_fresh_is_two_round_trips",
        ) else {
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
        let Some(url) = test_support::service_url(
            "REDIS_CLUSTER_URL",
            "redis_cluster_noscript_fallback_is_per_node",
        ) else {
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
