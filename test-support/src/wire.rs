//! Proxies in front of a real server: one that counts round trips on the
//! wire, one that a test can cut and restore, one that loses answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    /// The text of every PostgreSQL simple query ('Q'), in order.
    pub pg_queries: std::sync::Mutex<Vec<String>>,
}

/// What a [`CountingProxy`] had seen at one moment: subtract two with
/// [`Wire::since`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wire {
    pub flights: u64,
    pub statement_flights: u64,
    pub executes: u64,
    pub parses: u64,
    /// The text of every simple query ('Q'), in order.
    pub queries: Vec<String>,
}

impl Wire {
    /// What happened between `before` and this.
    pub fn since(&self, before: &Wire) -> Wire {
        Wire {
            flights: self.flights - before.flights,
            statement_flights: self.statement_flights - before.statement_flights,
            executes: self.executes - before.executes,
            parses: self.parses - before.parses,
            queries: self.queries[before.queries.len()..].to_vec(),
        }
    }

    /// How many simple queries start with `word` (case-insensitive):
    /// `COMMIT`, `BEGIN`, ...
    pub fn simple(&self, word: &str) -> usize {
        self.queries
            .iter()
            .filter(|q| {
                q.trim_start()
                    .get(..word.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(word))
            })
            .count()
    }
}

impl Counts {
    /// Everything so far, simple queries included.
    pub fn wire(&self) -> Wire {
        Wire {
            flights: self.flights.load(Ordering::SeqCst),
            statement_flights: self.pg_statement_flights.load(Ordering::SeqCst),
            executes: self.pg_execute.load(Ordering::SeqCst),
            parses: self.pg_parse.load(Ordering::SeqCst),
            queries: self.pg_queries.lock().unwrap().clone(),
        }
    }

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
    /// Proxies `127.0.0.1:<port>` to `upstream`. With `postgres`, it also
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
                    for (ty, query) in parser.feed(&buf[..n]) {
                        if let Some(query) = query {
                            counts.pg_queries.lock().unwrap().push(query);
                        }
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
/// startup message, then `type byte + i32 length` frames; each comes out as
/// its type, and a simple query ('Q') with its text.
#[derive(Default)]
struct PgParser {
    started: bool,
    pending: Vec<u8>,
}

impl PgParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<(u8, Option<String>)> {
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
            let frame: Vec<u8> = self.pending.drain(..1 + len).collect();
            let query = (frame[0] == b'Q').then(|| {
                let text = &frame[5..frame.len().saturating_sub(1).max(5)];
                String::from_utf8_lossy(text).into_owned()
            });
            types.push((frame[0], query));
        }
        types
    }
}

/// A TCP proxy to `upstream` that a test can cut (every connection dropped,
/// new ones refused) and restore: a real broker outage, private to a test.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            generation,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A TCP proxy to `upstream` that loses answers: it forwards every request
/// whole, and the first bytes upstream sends back after a request are, with
/// a chance of one in `one_in`, dropped, and both connections closed. In
/// front of an HTTP server that answers after it commits, the effect has
/// happened and the client never learns it: a lost answer, as a network
/// cut or a crashed load balancer makes one.
pub struct LossyProxy {
    pub addr: std::net::SocketAddr,
    one_in: Arc<std::sync::atomic::AtomicU32>,
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LossyProxy {
    /// Listens on a free local port; drops about one answer in `one_in`
    /// (0: none).
    pub async fn start(upstream: String, one_in: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let one_in = Arc::new(std::sync::atomic::AtomicU32::new(one_in));
        let dropped = Arc::new(AtomicU64::new(0));
        let (chance, count) = (one_in.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, chance, count) = (upstream.clone(), chance.clone(), count.clone());
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        lossy(inbound, outbound, &chance, &count).await;
                    }
                });
            }
        });
        Self {
            addr,
            one_in,
            dropped,
            task,
        }
    }

    /// Drops about one answer in `one_in` from now on (0: none).
    pub fn set_one_in(&self, one_in: u32) {
        self.one_in.store(one_in, Ordering::SeqCst);
    }

    /// How many answers it dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Copies both ways; the first chunk of an answer (upstream's bytes after
/// the client sent some) may be dropped, which ends both connections.
async fn lossy(
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    one_in: &std::sync::atomic::AtomicU32,
    dropped: &AtomicU64,
) {
    let (mut client_read, mut client_write) = inbound.split();
    let (mut server_read, mut server_write) = outbound.split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut asked = false;
    loop {
        tokio::select! {
            n = client_read.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if server_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                    asked = true;
                }
            },
            n = server_read.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chance = one_in.load(Ordering::SeqCst);
                    if asked && chance > 0 && rand::random::<u32>() % chance == 0 {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    asked = false;
                    if client_write.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (userinfo, _) = authority
        .rsplit_once('@')
        .map_or(("", authority), |(u, h)| (u, h));
    let at = if userinfo.is_empty() { "" } else { "@" };
    format!("{scheme}://{userinfo}{at}{addr}/{path}")
}

/// The `host:port` of `url`.
pub fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// A server that accepts connections and never answers (or only sends a
/// `greeting` first): a broker or database that hangs. It keeps the first
/// bytes each client sent, so a test can tell a TLS ClientHello (first byte
/// `0x16`) from a plaintext protocol header.
pub struct SilentServer {
    pub addr: std::net::SocketAddr,
    first_bytes: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentServer {
    /// Accepts on a free local port, says nothing.
    pub async fn start() -> Self {
        Self::with_greeting(Vec::new()).await
    }

    /// Accepts on a free local port, sends `greeting` to each client (a
    /// NATS server's `INFO {...}\r\n`, say), then says nothing more.
    pub async fn with_greeting(greeting: impl Into<Vec<u8>>) -> Self {
        let greeting = greeting.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, first_bytes) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (tx, greeting) = (tx.clone(), greeting.clone());
                tokio::spawn(async move {
                    if !greeting.is_empty() && socket.write_all(&greeting).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 512];
                    let mut got = Vec::new();
                    // Up to 8 bytes, or what came before the client closed.
                    while got.len() < 8 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(got);
                    // Hold the connection open, silent, until the client goes.
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            first_bytes,
            task,
        }
    }

    /// The first bytes (up to 8) the next client sent, within `within`.
    pub async fn first_bytes(&mut self, within: std::time::Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(within, self.first_bytes.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Whether `bytes` open a TLS handshake record (`0x16`, then version 3.x).
pub fn is_tls_client_hello(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x16 && bytes[1] == 0x03
}

/// A local port nothing listens on (bound, then released): connecting to it
/// is refused.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// How a [`SlowProxy`] slows its link: each chunk of bytes, in each
/// direction, is held for a delay drawn uniformly from `min..=max`, and one
/// chunk in a hundred `loss_percent` times is held `retransmit` longer. A
/// byte-stream proxy cannot drop bytes without corrupting the stream, so a
/// lost segment is what TCP makes of it: a retransmission, later.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Slowness {
    pub min: std::time::Duration,
    pub max: std::time::Duration,
    pub loss_percent: u32,
    pub retransmit: std::time::Duration,
}

/// A TCP proxy to `upstream` that delays (and "loses", see [`Slowness`])
/// what it forwards, in order, the delays of consecutive chunks
/// overlapping as a link's latency does. Set its [`Slowness`] at any time;
/// the default forwards at once.
pub struct SlowProxy {
    pub addr: std::net::SocketAddr,
    slowness: Arc<std::sync::Mutex<Slowness>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowProxy {
    /// Listens on `bind` (`"127.0.0.1:0"`, or an address of a test's own).
    pub async fn start(bind: &str, upstream: String) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let slowness = Arc::new(std::sync::Mutex::new(Slowness::default()));
        let shared = slowness.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (upstream, slowness) = (upstream.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    let up = tokio::spawn(slow_copy(client_read, server_write, slowness.clone()));
                    slow_copy(server_read, client_write, slowness).await;
                    up.abort();
                });
            }
        });
        Self {
            addr,
            slowness,
            task,
        }
    }

    /// From now on, slows the link so (existing connections too).
    pub fn set(&self, slowness: Slowness) {
        *self.slowness.lock().unwrap() = slowness;
    }
}

/// Copies `from` to `to`, each chunk held until its due time.
async fn slow_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    slowness: Arc<std::sync::Mutex<Slowness>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_due = tokio::time::Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let s = *slowness.lock().unwrap();
        let mut delay = s.min;
        if s.max > s.min {
            let spread = (s.max - s.min).as_micros() as u64;
            delay += std::time::Duration::from_micros(rand::random::<u64>() % (spread + 1));
        }
        if s.loss_percent > 0 && rand::random::<u32>() % 100 < s.loss_percent {
            delay += s.retransmit;
        }
        // In order: never before the chunk ahead of it.
        let due = (tokio::time::Instant::now() + delay).max(last_due);
        last_due = due;
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// An echo server behind the proxy: the delay is paid each way, the
    /// bytes come back whole and in order, and clearing the slowness
    /// makes it fast again.
    #[tokio::test]
    async fn slow_proxy_delays_in_order_and_can_be_cleared() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = SlowProxy::start("127.0.0.1:0", upstream).await;
        proxy.set(Slowness {
            min: Duration::from_millis(100),
            max: Duration::from_millis(150),
            loss_percent: 0,
            retransmit: Duration::ZERO,
        });
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let started = Instant::now();
        let sent: Vec<u8> = (0..200u8).collect();
        for chunk in sent.chunks(10) {
            client.write_all(chunk).await.unwrap();
        }
        let mut got = vec![0u8; sent.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent, "whole and in order");
        let slow = started.elapsed();
        assert!(slow >= Duration::from_millis(200), "{slow:?}");
        proxy.set(Slowness::default());
        let started = Instant::now();
        client.write_all(b"x").await.unwrap();
        client.read_exact(&mut got[..1]).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100), "fast again");
    }
}
