//! The connection a store talks through (one server or a Redis Cluster),
//! and how it is opened.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use idempotency_core::StoreError;

use crate::store::backend;
use crate::url::cluster_nodes;

/// The connection a [`RedisStore`](crate::RedisStore) talks through: one server or a Redis
/// Cluster. Cheap to clone (clones share the connection); it runs any
/// command (`query_async(&mut conn)`), e.g. for health checks.
#[derive(Clone)]
#[non_exhaustive]
pub enum RedisConnection {
    /// One server, through a connection manager (one multiplexed connection
    /// that reconnects by itself).
    Single(ConnectionManager),
    /// A Redis Cluster: each command goes to the master of its key's slot,
    /// and the slot map is refreshed on `MOVED` and when a node is lost.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConnection {
    /// Opens a connection to `url` (one server, or a Redis Cluster for a
    /// `redis+cluster://` URL), each command's answer awaited at most
    /// `response_timeout`; with it, where its listener subscribes: the
    /// server, or each seed node of a cluster.
    pub(crate) async fn open(
        url: &str,
        response_timeout: Duration,
    ) -> Result<(Self, Vec<redis::Client>), StoreError> {
        let url = url.trim();
        if let Some(nodes) = cluster_nodes(url)? {
            return Self::open_cluster(nodes, response_timeout).await;
        }
        let client = redis::Client::open(url).map_err(backend)?;
        let subscriber = client.clone();
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(response_timeout));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        Ok((Self::Single(conn), vec![subscriber]))
    }

    /// A Redis Cluster from its seed nodes (`redis://` URLs).
    async fn open_cluster(
        nodes: Vec<String>,
        response_timeout: Duration,
    ) -> Result<(Self, Vec<redis::Client>), StoreError> {
        // Any node will do for pub/sub: a cluster delivers every `PUBLISH`
        // to every node.
        let subscribers = nodes
            .iter()
            .filter_map(|node| redis::Client::open(node.as_str()).ok())
            .collect();
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_secs(1))
            // Per attempt and, the same, for a call with all its retries.
            .response_timeout(response_timeout)
            .retries(6)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(backend)?;
        let conn = client.get_async_connection().await.map_err(backend)?;
        Ok((Self::Cluster(conn), subscribers))
    }
}
