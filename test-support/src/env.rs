//! Service URLs from the environment, unique names, bounded waits, and
//! temporary SQLite files.

use std::time::Duration;

/// The URL in `var`, or `None` after printing why the test skips.
pub fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipping {test}: {var} is not set (e.g. {var}={})",
                example(var)
            );
            None
        }
    }
}

fn example(var: &str) -> &'static str {
    match var {
        "REDIS_URL" => "redis://127.0.0.1:6379",
        "DATABASE_URL" => "postgres://postgres@127.0.0.1:5432/test",
        "AMQP_URL" => "amqp://guest:guest@127.0.0.1:5672/%2f",
        "NATS_URL" => "nats://127.0.0.1:4222",
        "REDIS_CLUSTER_URL" => "$(.ci/redis-cluster.sh start)",
        _ => "...",
    }
}

/// A name no other test run uses: `{prefix}_{random}`, lowercase letters,
/// digits and `_` only (a valid SQL identifier, queue or stream name).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// The upper bound of any wait in a test: a broken test fails, it never hangs.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` under [`LIMIT`].
///
/// # Panics
/// When `f` takes longer, naming `what`.
pub async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

/// Waits until `check` holds, polling every 20 ms, under [`LIMIT`].
///
/// # Panics
/// When it does not hold within [`LIMIT`], naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    bounded(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A temporary SQLite file path (removed with its WAL files on drop).
pub struct TempDb {
    /// The file.
    pub path: std::path::PathBuf,
}

impl TempDb {
    /// A new file name in the temporary directory (not created yet).
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.sqlite", unique(name)));
        Self { path }
    }

    /// Its `sqlite://` URL.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}
