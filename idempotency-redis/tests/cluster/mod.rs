//! Helpers for the Redis Cluster tests (whose URL is `REDIS_CLUSTER_URL`):
//! the cluster's nodes and slots as the cluster reports them, and a private
//! cluster of redis-server processes that a test may kill.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// The `host:port` seed nodes of a `redis+cluster://` URL.
pub fn seeds(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let list = rest.split(['/', '?']).next().unwrap_or(rest);
    let hosts = list.rsplit_once('@').map_or(list, |(_, h)| h);
    hosts.split(',').map(|h| h.trim().to_owned()).collect()
}

/// A plain connection to one node.
pub async fn node(addr: &str) -> MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(format!("redis://{addr}"))
        .expect("node url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to a cluster node")
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub addr: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The master's id, for a replica.
    pub replica_of: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

impl Node {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// The cluster as `conn`'s node sees it.
pub async fn nodes(conn: &mut MultiplexedConnection) -> Vec<Node> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .expect("cluster nodes");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f[1].split('@').next().unwrap_or(f[1]).to_owned();
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            let flags = f[2];
            Node {
                id: f[0].to_owned(),
                addr,
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                replica_of: (f[3] != "-").then(|| f[3].to_owned()),
                slots: f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| {
                        let (a, b) = s.split_once('-').unwrap_or((s, s));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect(),
            }
        })
        .collect()
}

/// `CLUSTER KEYSLOT key`.
pub async fn keyslot(conn: &mut MultiplexedConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .expect("cluster keyslot")
}

/// The master that serves `slot`, as `conn`'s node sees it.
pub async fn master_of(conn: &mut MultiplexedConnection, slot: u16) -> Option<Node> {
    nodes(conn)
        .await
        .into_iter()
        .find(|n| n.master && !n.failed && n.serves(slot))
}

fn free_port() -> u16 {
    // A port whose cluster bus port (port + 10000) is free too.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A cluster of its own: three masters with one replica each, killed on drop.
pub struct PrivateCluster {
    pub ports: Vec<u16>,
    children: Vec<(u16, Child)>,
    dir: std::path::PathBuf,
}

impl PrivateCluster {
    /// Starts one with `node_timeout` (`cluster-node-timeout`), or `None`
    /// (after printing why) when redis-server or redis-cli cannot run here.
    pub fn start(test: &str, node_timeout: Duration) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "idempotency-cluster-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        match cluster.boot(node_timeout) {
            Ok(()) => Some(cluster),
            Err(e) => {
                eprintln!("skipping {test}: cannot start a private Redis Cluster: {e}");
                None
            }
        }
    }

    fn boot(&mut self, node_timeout: Duration) -> Result<(), String> {
        for _ in 0..6 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(self.dir.join(format!("nodes-{port}.conf")))
                .args([
                    "--cluster-node-timeout",
                    &node_timeout.as_millis().to_string(),
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("redis-server: {e}"))?;
            self.ports.push(port);
            self.children.push((port, child));
        }
        for &port in &self.ports {
            test_support::wait_for_pong(port)?;
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.settled() {
            if Instant::now() > deadline {
                return Err("the cluster did not settle within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Every node says `cluster_state:ok` and sees three replicas, and every
    /// replica's link to its master is up (its initial sync done).
    fn settled(&self) -> bool {
        self.ports.iter().all(|&port| {
            let info = cli(port, &["cluster", "info"]);
            let nodes = cli(port, &["cluster", "nodes"]);
            let replication = cli(port, &["info", "replication"]);
            info.contains("cluster_state:ok")
                && nodes.matches("slave").count() == 3
                && (replication.contains("role:master") && replication.contains(",state=online,")
                    || replication.contains("master_link_status:up"))
        })
    }

    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// SIGKILLs the node on `port` and waits until it is gone.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
