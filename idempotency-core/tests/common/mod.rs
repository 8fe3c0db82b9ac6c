//! Helpers shared by the backend tests: service URLs from the environment,
//! unique names, and a wire-level counter of round trips.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
        _ => "...",
    }
}

/// A name no other test run uses: `{prefix}_{random}`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A temporary SQLite file path (removed with its WAL files on drop).
pub struct TempDb {
    pub path: std::path::PathBuf,
}

impl TempDb {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.sqlite", unique(name)));
        Self { path }
    }

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

/// What a [`CountingProxy`] saw from clients.
#[derive(Debug, Default)]
pub struct Counts {
    /// Client-to-server flights: bytes the client sent after the server last
    /// answered (one per round trip the client starts).
    pub flights: AtomicU64,
    /// PostgreSQL frontend messages by type, when the proxy parses them.
    pub pg_execute: AtomicU64,
    pub pg_query: AtomicU64,
    pub pg_parse: AtomicU64,
    /// PostgreSQL flights that carried at least one Execute or Query message
    /// (round trips that run statements, as opposed to bare `Sync` pings).
    pub pg_statement_flights: AtomicU64,
}

impl Counts {
    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.flights.load(Ordering::SeqCst),
            self.pg_execute.load(Ordering::SeqCst),
            self.pg_query.load(Ordering::SeqCst),
            self.pg_parse.load(Ordering::SeqCst),
            self.pg_statement_flights.load(Ordering::SeqCst),
        ]
    }
}

/// A TCP proxy in front of a server that counts round trips on the wire.
pub struct CountingProxy {
    pub port: u16,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingProxy {
    /// Proxies 127.0.0.1:<port> to `upstream`. With `postgres`, it also
    /// parses the frontend protocol (use `sslmode=disable`).
    pub async fn start(upstream: String, postgres: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let counts = Arc::new(Counts::default());
        let c = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = match TcpStream::connect(&upstream).await {
                    Ok(s) => s,
                    Err(_) => continue,
                };
                tokio::spawn(pipe(client, server, Arc::clone(&c), postgres));
            }
        });
        Self { port, counts, task }
    }
}

async fn pipe(client: TcpStream, server: TcpStream, counts: Arc<Counts>, postgres: bool) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // true when the server spoke last: the next client bytes start a flight.
    let server_last = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s_last = Arc::clone(&server_last);
    let up = {
        let counts = Arc::clone(&counts);
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut parser = PgParser::default();
            let mut flight_has_statement = false;
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Record before forwarding: the server cannot answer (and so
                // the client cannot start the next flight) before this.
                if server_last.swap(false, Ordering::SeqCst) {
                    counts.flights.fetch_add(1, Ordering::SeqCst);
                    flight_has_statement = false;
                }
                if postgres {
                    for ty in parser.feed(&buf[..n]) {
                        match ty {
                            b'E' => counts.pg_execute.fetch_add(1, Ordering::SeqCst),
                            b'Q' => counts.pg_query.fetch_add(1, Ordering::SeqCst),
                            b'P' => counts.pg_parse.fetch_add(1, Ordering::SeqCst),
                            _ => 0,
                        };
                        if (ty == b'E' || ty == b'Q') && !flight_has_statement {
                            flight_has_statement = true;
                            counts.pg_statement_flights.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = sw.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            s_last.store(true, Ordering::SeqCst);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Splits the PostgreSQL frontend stream into messages: first the untyped
/// startup message, then `type byte + i32 length` frames.
#[derive(Default)]
struct PgParser {
    started: bool,
    pending: Vec<u8>,
}

impl PgParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut types = Vec::new();
        loop {
            if !self.started {
                if self.pending.len() < 4 {
                    break;
                }
                let len = i32::from_be_bytes(self.pending[..4].try_into().unwrap()) as usize;
                if self.pending.len() < len {
                    break;
                }
                self.pending.drain(..len);
                self.started = true;
                continue;
            }
            if self.pending.len() < 5 {
                break;
            }
            let len = i32::from_be_bytes(self.pending[1..5].try_into().unwrap()) as usize;
            if self.pending.len() < 1 + len {
                break;
            }
            types.push(self.pending[0]);
            self.pending.drain(..1 + len);
        }
        types
    }
}

/// A private `redis-server` (no persistence) on a port of its own, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts one on a free port, or `None` (after printing why) when
    /// `redis-server` cannot run here.
    pub fn start(test: &str) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut server = Self { port, child: None };
        match server.restart() {
            Ok(()) => Some(server),
            Err(e) => {
                eprintln!("skipping {test}: cannot start redis-server: {e}");
                None
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub fn restart(&mut self) -> Result<(), String> {
        let bin = ["/usr/bin/redis-server", "redis-server"]
            .into_iter()
            .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
            .unwrap_or("redis-server");
        let child = std::process::Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A store that counts claims, watches, and watches that resolved (were
/// woken, rather than dropped when the waiter's fallback poll came first),
/// and forwards everything else. [`Counting::polling`] hides the store's
/// notifications, so waiters poll as with a store that cannot notify.
pub struct Counting<S> {
    pub inner: S,
    pub claims: AtomicU64,
    pub watches: AtomicU64,
    pub woken: Arc<AtomicU64>,
    notify: bool,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            claims: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            woken: Arc::new(AtomicU64::new(0)),
            notify: true,
        }
    }

    pub fn polling(inner: S) -> Self {
        Self {
            notify: false,
            ..Self::new(inner)
        }
    }

    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::SeqCst)
    }
}

mod counting {
    use super::Counting;
    use idempotency_core::store::{Claim, Store, StoreError, StoreFuture, Watch};
    use idempotency_core::{ClaimOutcome, LeaseToken, RecordId, StoredOutcome, TokenOutcome};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    impl<S: Store> Store for Counting<S> {
        fn claim<'a>(
            &'a self,
            id: &'a RecordId,
            token: LeaseToken,
            claim: Claim<'a>,
        ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
            self.claims.fetch_add(1, Ordering::SeqCst);
            self.inner.claim(id, token, claim)
        }
        fn complete<'a>(
            &'a self,
            id: &'a RecordId,
            token: LeaseToken,
            outcome: &'a StoredOutcome,
            ttl: Duration,
        ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
            self.inner.complete(id, token, outcome, ttl)
        }
        fn release<'a>(
            &'a self,
            id: &'a RecordId,
            token: LeaseToken,
        ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
            self.inner.release(id, token)
        }
        fn extend<'a>(
            &'a self,
            id: &'a RecordId,
            token: LeaseToken,
            lease: Duration,
        ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
            self.inner.extend(id, token, lease)
        }
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        fn watch<'a>(
            &'a self,
            id: &'a RecordId,
        ) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
            if !self.notify {
                return StoreFuture::ready(Ok(None));
            }
            self.watches.fetch_add(1, Ordering::SeqCst);
            let woken = Arc::clone(&self.woken);
            StoreFuture::new(async move {
                Ok(self.inner.watch(id).await?.map(|watch| {
                    Watch::new(async move {
                        watch.await;
                        woken.fetch_add(1, Ordering::SeqCst);
                    })
                }))
            })
        }
    }
}
