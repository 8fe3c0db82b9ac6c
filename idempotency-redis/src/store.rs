//! The Redis store (feature `redis`): many instances share one view of the
//! records, and they survive a restart of the service (and of Redis, as far as
//! Redis's own persistence goes). One Redis server, or a Redis Cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use idempotency_core::store::redis::RedisStore;
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("payments:");
//! // A Redis Cluster, from one or more seed nodes:
//! let cluster = RedisStore::connect("redis+cluster://10.0.0.1:7000,10.0.0.2:7000").await?;
//! # let _ = (store, cluster);
//! # Ok(())
//! # }
//! ```
//!
//! # URLs
//!
//! - `redis://[user:password@]host[:port][/db]` (or `rediss://` where the
//!   `redis` crate is built with TLS): one server.
//! - `redis+cluster://[user:password@]HOST:PORT[,HOST:PORT...]`: a Redis
//!   Cluster, given by seed nodes (any of its nodes; the client reads the
//!   slot map from them and finds the rest). A list that is empty, has an
//!   empty entry or a bad port is refused with [`StoreError::Config`], which
//!   says what is wrong.
//!
//! # Layout
//!
//! One record is one string at `{prefix}{<64 hex digits of the record id>}`:
//! in flight, `i` + fingerprint (32 bytes) + token (16 bytes) + how long an
//! abandoned claim is kept after its lease (decimal ms); completed, `c` +
//! fingerprint + the encoded outcome. The key's own expiry is the clock: an
//! in-flight key expires when its lease ends plus that time, so the lease
//! remaining is its `PTTL` minus it; a completed key expires its ttl after
//! completion. Nothing needs purging. The hex id is the key's hash tag, so a
//! record's key lands on one cluster slot whatever the prefix (keep `{` and
//! `}` out of the prefix). An in-flight record that a duplicate waits for
//! starts with `w` instead of `i` (below).
//!
//! # Waiting duplicates (`wait_for_in_flight`)
//!
//! A duplicate that waits for a record in flight is woken through pub/sub,
//! not by polling:
//!
//! - its [`watch`](Store::watch) subscribes this store's listener (one
//!   connection of its own per store, opened on the first watch, closed
//!   when the store and its clones are dropped) to the channel
//!   `<prefix>settled`, registers the waiter, then marks the record watched
//!   (`i` → `w`, its expiry kept; one script call);
//! - the completion or release of a watched record publishes its key on
//!   that channel, in the same script, so it costs nothing more while
//!   nobody waits: the hot path keeps its round trips and publishes
//!   nothing;
//! - on a Redis Cluster the listener subscribes on one seed node (a cluster
//!   delivers every `PUBLISH` to every node), and on the next one when that
//!   node is lost;
//! - a listener that lost its connection wakes every waiter (they claim
//!   again and see what happened), subscribes again with a backoff, and
//!   wakes them once more when it is back. While it is down, waiters fall
//!   back to the engine's poll every 250 ms. A takeover rewrites the record
//!   unwatched; its waiters see it on that poll and watch it again.
//!
//! A key that holds anything else (another value type, or a string this store
//! did not write) is reported as [`StoreError::Corrupt`] or
//! [`StoreError::Backend`] and never overwritten.
//!
//! # Guarantees
//!
//! - **Concurrency.** A claim is one native atomic command,
//!   `SET key record NX GET PX lease+ttl` (Redis 7 or later), pipelined with a
//!   `PTTL` of the same key in the same round trip: it stores the claim only
//!   where there is no record (absent or expired), and otherwise returns the
//!   record untouched. Only a takeover (a record in flight past its lease,
//!   same fingerprint) goes on to a Lua script, which re-reads and decides
//!   atomically. `complete`, `release` and `extend` are one Lua script each.
//!   Redis runs each command and script atomically, so of any number of
//!   concurrent claims from any number of instances exactly one acquires. On
//!   a server older than 7 (`SET ... NX GET` is a syntax error there) the
//!   store notices on its first claim and claims by script from then on.
//! - **Round trips.** A fresh request costs 2 round trips (claim, complete),
//!   a replay 1, a conflict 1; a takeover 2. Scripts are loaded once (on
//!   [`RedisStore::connect`]) and called by SHA with `EVALSHA`. A server that
//!   lacks a script (a restart, `SCRIPT FLUSH`, a replica promoted to master)
//!   answers `NOSCRIPT`; the store then sends that call once more as `EVAL`
//!   with the script's text, to the same node, which caches it: one round
//!   trip more, once per script and node.
//! - **Time.** Leases and expiry come from Redis's clock (key expiry, read
//!   back with `PTTL`), so instances with skewed clocks agree.
//! - **Crashes.** A service instance that dies mid-request leaves an in-flight
//!   record: retries of the same request get 409 until its lease passes, then
//!   one of them takes it over. What Redis itself keeps across *its* restart
//!   depends on its persistence (`appendonly yes` with `appendfsync everysec`
//!   can lose up to a second of records; a lost record means a retry runs the
//!   handler again).
//! - **Timeouts.** [`RedisStore::connect`] bounds each command's answer by
//!   [`DEFAULT_RESPONSE_TIMEOUT`] (the middleware's default
//!   `store_timeout`); one that takes longer fails with
//!   [`StoreError::Timeout`]. Its futures say so
//!   ([`StoreFuture::bounded`](super::StoreFuture::bounded)), and the
//!   middleware then arms no timer of its own.
//! - **Outages.** A call to an unreachable Redis fails with
//!   [`StoreError::Backend`] (the `redis` error as its source), and the
//!   middleware answers 503 (fail-closed) or runs unguarded (fail-open). The
//!   connection manager reconnects by itself in the background; once Redis
//!   answers again, calls succeed without recreating the store.
//!
//! # Redis Cluster
//!
//! Every command touches one key, so it goes to the master of that key's
//! slot (the `redis` crate's cluster client, feature `cluster-async`; it
//! follows `MOVED`/`ASK` and refreshes its slot map when a node is lost).
//! Records spread over every master.
//!
//! - **Failover.** When a master dies, calls for its slots fail (fail-closed:
//!   503 with `Retry-After`, the handler does not run without a claim) until
//!   the cluster promotes one of its replicas (after `cluster-node-timeout`
//!   and an election, typically one to a few seconds); the store then finds
//!   the new master by itself and calls succeed again, with no restart of
//!   the store or the service. Between the moment the cluster marks the
//!   master failed and the promotion (about a second), a cluster with
//!   `cluster-require-full-coverage yes` (the default) refuses commands for
//!   every slot; with `no`, the other masters' slots are served throughout.
//! - **Retries inside the client.** The cluster client resends a command
//!   after a redirection or a lost connection, within the call's bound. A
//!   claim resent after its first answer was lost finds its own claim and
//!   answers in flight (409; the record then waits out its lease), and a
//!   completion resent after it was applied reports itself fenced: neither
//!   runs the handler twice.
//! - **What a failover can lose.** Redis replicates asynchronously: a master
//!   acknowledges a write before its replicas have it. A claim or a
//!   completion acknowledged by the master in the last moments before it
//!   died may be missing on the promoted replica. A lost claim lets a retry
//!   claim afresh and run the handler while the first request may still be
//!   running (or has run); a lost completion makes the record in flight again
//!   (its lease then passes and a retry runs the handler again) or absent (a
//!   retry runs the handler again). So across a failover, at-most-once
//!   becomes "at most once except for requests in flight or just completed
//!   at the moment of the failover". The same holds for one server that
//!   restarts without persistence. Redis's `WAIT` narrows the window but does
//!   not close it (a failover can still pick a replica that missed a write);
//!   use the PostgreSQL store where no window is acceptable.
//! - **Scripts** are loaded into every node on connect; a node that lacks
//!   one (a promoted replica, a restarted node) gets it by the `EVAL`
//!   fallback above, per node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::notify::{Listener, Listening, RECONNECT_MAX};
use super::{Claim, Store, StoreError, StoreFuture, Waiters, Watch};
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, CorruptRecord, LeaseToken, StoredOutcome, TokenOutcome};

const BACKEND: &str = "redis";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// The scheme of a Redis Cluster URL.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// Durations are capped at about 31 years so that times stay exact in Lua's
/// doubles (and in `PEXPIRE`).
const MAX_MILLIS: u64 = 1_000_000_000_000;

// A record is one string value:
//   in flight: 'i' .. fingerprint (32 bytes) .. token (16 bytes) .. x
//              ('w' instead of 'i' once a duplicate waits for it)
//   completed: 'c' .. fingerprint (32 bytes) .. encoded outcome
// where x (decimal ms) is how long an abandoned claim is kept after its
// lease. The key's own expiry is the clock: an in-flight key expires at lease
// end + x, so the lease remaining is `PTTL - x`; a completed key expires ttl
// after completion.

/// Where the token of an in-flight record starts, and where `x` starts.
const TOKEN_AT: usize = 33;
const KEEP_AT: usize = 49;

// KEYS[1] the record; ARGV: fingerprint, token, lease ms, ttl ms.
// Returns 1 (acquired) | {fingerprint, lease remaining ms} (in flight) | the
// record's value (completed, or not a record this store wrote).
// The claim's slow path: the native `SET NX GET` decides every other case.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local b = string.byte(v, 1)
  if b ~= 105 and b ~= 119 then return v end
  local x = tonumber(string.sub(v, 50))
  if #v < 50 or not x then return v end
  -- Redis 3.2 to 4 replicate scripts verbatim unless told otherwise, and
  -- PTTL is not deterministic. A no-op from Redis 7.
  if redis.replicate_commands then redis.replicate_commands() end
  local remaining = redis.call('PTTL', KEYS[1]) - x
  local fingerprint = string.sub(v, 2, 33)
  if remaining > 0 or fingerprint ~= ARGV[1] then
    return {fingerprint, math.max(0, remaining)}
  end
end
redis.call('SET', KEYS[1], 'i' .. ARGV[1] .. ARGV[2] .. ARGV[4], 'PX', tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
";

/// The start of every fenced script: `v` is the record, and the script
/// returns 0 unless it is in flight under the token in `ARGV[1]`.
const HELD: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local b = string.byte(v, 1)
if (b ~= 105 and b ~= 119) or string.sub(v, 34, 49) ~= ARGV[1] then return 0 end
";

/// After a fenced script changed a record: if a duplicate watched it (`w`),
/// publish its key on the prefix's channel (the key without its 66-byte
/// `{<hex id>}` tag, then `settled`).
const SETTLED: &str = r"
if b == 119 then redis.call('PUBLISH', string.sub(KEYS[1], 1, -67) .. 'settled', KEYS[1]) end
";

// KEYS[1]; ARGV: token, outcome, ttl ms. Returns 1 (applied) or 0 (fenced).
const COMPLETE: &str = r"
__HELD__
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
__SETTLED__
return 1
";

// KEYS[1]; ARGV: token. Returns 1 or 0.
const RELEASE: &str = r"
__HELD__
redis.call('DEL', KEYS[1])
__SETTLED__
return 1
";

// KEYS[1]. A duplicate waits for this record: mark it watched (`i` -> `w`,
// its expiry kept), so that its completion or release publishes. Returns 1
// when it is in flight (now watched), 0 otherwise.
const WATCH: &str = r"
local b = redis.call('GETRANGE', KEYS[1], 0, 0)
if b == 'i' then redis.call('SETRANGE', KEYS[1], 0, 'w') return 1 end
if b == 'w' then return 1 end
return 0
";

// KEYS[1]; ARGV: token, lease ms. Returns 1 or 0.
const EXTEND: &str = r"
__HELD__
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(string.sub(v, 50)))
return 1
";

/// A script: its SHA for `EVALSHA`, its text for `EVAL` on a node that
/// lacks it.
struct Lua {
    script: Script,
    code: String,
}

impl Lua {
    fn new(code: String) -> Self {
        Self {
            script: Script::new(&code),
            code,
        }
    }
}

struct Scripts {
    claim: Lua,
    complete: Lua,
    release: Lua,
    extend: Lua,
    watch: Lua,
}

impl Scripts {
    fn new() -> Self {
        let fenced = |body: &str| {
            Lua::new(
                body.replace("__HELD__", HELD)
                    .replace("__SETTLED__", SETTLED),
            )
        };
        Self {
            claim: Lua::new(CLAIM.to_owned()),
            complete: fenced(COMPLETE),
            release: fenced(RELEASE),
            extend: fenced(EXTEND),
            watch: Lua::new(WATCH.to_owned()),
        }
    }

    fn all(&self) -> [&Lua; 5] {
        [
            &self.claim,
            &self.complete,
            &self.release,
            &self.extend,
            &self.watch,
        ]
    }
}

/// The connection a [`RedisStore`] talks through: one server or a Redis
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

/// A store in Redis or a Redis Cluster. Cheap to clone: clones share one
/// connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    scripts: Arc<Scripts>,
    prefix: Arc<str>,
    /// The connection's response timeout, when this store set it.
    response_timeout: Option<Duration>,
    /// Whether the server takes `SET ... NX GET` (Redis 7 or later); cleared
    /// on the first claim that finds it does not.
    native: Arc<AtomicBool>,
    /// Wakes this process's waiting duplicates through pub/sub; `None` for
    /// a store over a connection it did not open (it cannot subscribe).
    notifier: Option<Arc<Notifier>>,
}

/// How long [`RedisStore::connect`] lets one command wait for its answer:
/// the same as the middleware's default `store_timeout`, so that the
/// middleware needs no timer of its own around each call.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("cluster", &matches!(self.conn, RedisConnection::Cluster(_)))
            .finish_non_exhaustive()
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::backend(BACKEND, e)
}

/// Whole milliseconds, at least 1 (`PX 0` is an error in Redis) and at most
/// [`MAX_MILLIS`].
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MILLIS)
}

/// A `redis+cluster://` URL that names no usable seed node.
#[derive(Debug)]
struct ClusterUrlError {
    /// The URL, password removed.
    url: String,
    problem: String,
}

impl std::fmt::Display for ClusterUrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad Redis Cluster URL `{}`: {}; write {CLUSTER_SCHEME}://HOST:PORT[,HOST:PORT...]",
            self.url, self.problem
        )
    }
}

impl std::error::Error for ClusterUrlError {}

/// The seed nodes of a `redis+cluster://[user:password@]HOST[:PORT][,HOST[:PORT]...][/db][?query]`
/// URL, each as a `redis://` URL (`None` for any other URL).
fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>, StoreError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case(CLUSTER_SCHEME) {
        return Ok(None);
    }
    let refuse = |problem: String| {
        StoreError::config(
            BACKEND,
            ClusterUrlError {
                url: super::redact(url),
                problem,
            },
        )
    };
    let (list, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match list.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), list),
    };
    if hosts.trim().is_empty() {
        return Err(refuse("it names no node".into()));
    }
    let mut nodes = Vec::new();
    for (n, node) in hosts.split(',').enumerate() {
        let node = node.trim();
        if node.is_empty() {
            return Err(refuse(format!("node {} of the list is empty", n + 1)));
        }
        let (host, port) = match node.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((host, port)) if !port.ends_with(']') => (host, Some(port)),
            _ => (node, None),
        };
        if host.is_empty() {
            return Err(refuse(format!("node `{node}` has no host")));
        }
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(refuse(format!(
                        "node `{node}` has a bad port `{port}` (1 to 65535)"
                    )))
                }
            },
            None => 6379,
        };
        nodes.push(format!("redis://{userinfo}{host}:{port}{tail}"));
    }
    Ok(Some(nodes))
}

/// How a claim went on the native path.
enum Native {
    /// Decided.
    Done(ClaimOutcome),
    /// In flight past its lease with the same fingerprint: a takeover,
    /// which the claim script decides.
    Takeover,
    /// The server does not take `SET ... NX GET`.
    Unsupported,
}

/// The tasks of this process that wait for a record of this store, and the
/// subscriber that wakes them. One per store and prefix, shared by clones.
struct Notifier {
    listener: Listener,
    /// Where to subscribe: the server, or each seed node of a cluster.
    subscribers: Vec<redis::Client>,
}

impl Notifier {
    fn new(subscribers: Vec<redis::Client>) -> Self {
        Self {
            listener: Listener::new(),
            subscribers,
        }
    }

    /// Starts the subscriber on `channel`; dropping what it returns ends it.
    fn start(
        &self,
        channel: Vec<u8>,
    ) -> impl FnOnce(tokio::sync::watch::Sender<Listening>, Waiters) -> tokio::sync::watch::Sender<()>
    {
        let subscribers = self.subscribers.clone();
        move |state, waiters| {
            let (stop, stopped) = tokio::sync::watch::channel(());
            tokio::spawn(listen(subscribers, channel, waiters, state, stopped));
            stop
        }
    }
}

/// Subscribes to `channel` on the first of `subscribers` that answers.
async fn subscribe(
    subscribers: &[redis::Client],
    channel: &[u8],
) -> Result<redis::aio::PubSubStream, redis::RedisError> {
    let mut last = None;
    for client in subscribers {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, subscribed).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "SUBSCRIBE did not answer in time",
                )))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from(std::io::Error::other("no node to subscribe on"))
    }))
}

/// The record a notification names: its payload is the record's key,
/// `<prefix>{<64 hex digits>}`.
fn notified_record(payload: &[u8]) -> Option<RecordId> {
    let tag = payload.strip_suffix(b"}")?;
    let open = tag.len().checked_sub(65)?;
    if tag[open] != b'{' {
        return None;
    }
    RecordId::from_hex(&tag[open + 1..])
}

/// The listener task: subscribes to the store's channel and wakes the
/// waiters of each record published. After a lost connection it subscribes
/// again (on the next node that answers, backing off up to
/// [`RECONNECT_MAX`]) and wakes every waiter, since what was published
/// meanwhile is lost. Ends when the store and its clones are dropped, or
/// when its first subscription fails.
async fn listen(
    subscribers: Vec<redis::Client>,
    channel: Vec<u8>,
    waiters: Waiters,
    state: tokio::sync::watch::Sender<Listening>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    use futures_util::StreamExt;
    let mut stream = match subscribe(&subscribers, &channel).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(
                backend = BACKEND,
                error = &e as &dyn std::error::Error,
                "the idempotency listener could not SUBSCRIBE; waiting duplicates poll"
            );
            state.send_replace(Listening::Failed(Arc::from(e.to_string())));
            return;
        }
    };
    state.send_replace(Listening::Up);
    let mut pause = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            message = stream.next() => match message {
                Some(message) => match notified_record(message.get_payload_bytes()) {
                    Some(id) => waiters.wake(&id),
                    None => tracing::debug!(backend = BACKEND, "ignoring a notification that names no record"),
                },
                None => {
                    tracing::warn!(backend = BACKEND, "the idempotency listener lost its connection; subscribing again");
                    state.send_replace(Listening::Down);
                    waiters.wake_all();
                    stream = loop {
                        tokio::select! {
                            _ = stop.changed() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(RECONNECT_MAX);
                        match subscribe(&subscribers, &channel).await {
                            Ok(stream) => break stream,
                            Err(e) => tracing::debug!(
                                backend = BACKEND,
                                error = &e as &dyn std::error::Error,
                                "the idempotency listener could not subscribe yet"
                            ),
                        }
                    };
                    pause = Duration::from_millis(100);
                    state.send_replace(Listening::Up);
                    // Whatever settled while it was down.
                    waiters.wake_all();
                }
            },
        }
    }
}

impl RedisStore {
    /// Connects to `url` and loads the scripts:
    /// `redis://[user:password@]host[:port][/db]` (or `rediss://` where the
    /// `redis` crate is built with TLS) for one server,
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]` for a Redis Cluster.
    ///
    /// The connection manager (one server) answers a dropped connection with
    /// an error and reconnects in the background, retrying a few times with
    /// a short backoff (at most about a second), and again on the next call
    /// if Redis is still away. The cluster client reconnects to each node by
    /// itself, follows redirections and refreshes its slot map after a
    /// failover.
    ///
    /// Each command waits at most [`DEFAULT_RESPONSE_TIMEOUT`] for its
    /// answer (on a cluster: including the client's retries), then fails
    /// with [`StoreError::Timeout`].
    ///
    /// # Errors
    /// [`StoreError::Config`] for a `redis+cluster://` URL without a usable
    /// node list, and [`StoreError::Backend`] when the URL is otherwise
    /// invalid or Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_timeout(url, DEFAULT_RESPONSE_TIMEOUT).await
    }

    /// As [`connect`](Self::connect), with each command's answer awaited at
    /// most `response_timeout`. Give the middleware's `store_timeout` (or
    /// less) to spare it a timer per call.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with_timeout(
        url: &str,
        response_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let url = url.trim();
        if let Some(nodes) = cluster_nodes(url)? {
            return Self::connect_cluster(nodes, response_timeout).await;
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
        let mut store = Self::new(conn);
        store.response_timeout = Some(response_timeout);
        store.notifier = Some(Arc::new(Notifier::new(vec![subscriber])));
        store.load_scripts().await?;
        Ok(store)
    }

    /// A Redis Cluster from its seed nodes (`redis://` URLs).
    async fn connect_cluster(
        nodes: Vec<String>,
        response_timeout: Duration,
    ) -> Result<Self, StoreError> {
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
        let mut store = Self::from_cluster(conn);
        store.response_timeout = Some(response_timeout);
        store.notifier = Some(Arc::new(Notifier::new(subscribers)));
        // Into every node that answers; one that does not (a node down while
        // the cluster serves) gets each script by the `EVAL` fallback.
        if let Err(e) = store.load_scripts().await {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "could not load the idempotency scripts into every cluster node; a node that lacks one gets it on first use"
            );
        }
        Ok(store)
    }

    /// A store over a connection manager you configured yourself. The
    /// scripts are loaded on first use (or call
    /// [`load_scripts`](Self::load_scripts)).
    pub fn new(conn: ConnectionManager) -> Self {
        Self::over(RedisConnection::Single(conn))
    }

    /// A store over a cluster connection you configured yourself
    /// ([`redis::cluster::ClusterClientBuilder`]). The scripts are loaded on
    /// first use (or call [`load_scripts`](Self::load_scripts)).
    pub fn from_cluster(conn: ClusterConnection) -> Self {
        Self::over(RedisConnection::Cluster(conn))
    }

    fn over(conn: RedisConnection) -> Self {
        Self {
            conn,
            scripts: Arc::new(Scripts::new()),
            prefix: Arc::from(DEFAULT_PREFIX),
            response_timeout: None,
            native: Arc::new(AtomicBool::new(true)),
            notifier: None,
        }
    }

    /// Claims by the Lua script alone, as on a server older than Redis 7
    /// (for benchmarks that compare it with the native claim).
    #[doc(hidden)]
    pub fn with_scripted_claims(mut self) -> Self {
        self.native = Arc::new(AtomicBool::new(false));
        self
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, RedisConnection::Cluster(_))
    }

    /// A Redis error, as [`StoreError::Timeout`] when it is the response
    /// timeout this store set.
    fn fail(&self, e: redis::RedisError) -> StoreError {
        match self.response_timeout {
            Some(timeout) if e.is_timeout() => StoreError::Timeout {
                backend: BACKEND,
                timeout,
            },
            _ => backend(e),
        }
    }

    /// Puts every key under `prefix` (default [`DEFAULT_PREFIX`]), to share
    /// one Redis between services, or between tests. Avoid `{` and `}` in
    /// it: they would change the keys' hash tag (still correct, but every
    /// record would land on one cluster slot).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        // Another prefix publishes on another channel.
        self.notifier = self
            .notifier
            .map(|n| Arc::new(Notifier::new(n.subscribers.clone())));
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of a record: `{prefix}{<hex id>}`.
    pub fn key(&self, id: &RecordId) -> String {
        // The prefix is UTF-8 and the rest ASCII, so nothing is replaced.
        String::from_utf8_lossy(&self.key_bytes(id)).into_owned()
    }

    fn key_bytes(&self, id: &RecordId) -> Vec<u8> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut key = Vec::with_capacity(self.prefix.len() + 66);
        key.extend_from_slice(self.prefix.as_bytes());
        key.push(b'{');
        for b in id.as_bytes() {
            key.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]);
        }
        key.push(b'}');
        key
    }

    /// Loads the four scripts into Redis's script cache (`SCRIPT LOAD`; on a
    /// cluster into every node), so that the first requests need no
    /// `NOSCRIPT` fallback.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when Redis (on a cluster: any node) cannot be
    /// reached.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        for lua in self.scripts.all() {
            lua.script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(backend)?;
        }
        Ok(())
    }

    /// The connection (for health checks and tests).
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// `EVALSHA script 1 <record key>`, built in one buffer; the caller
    /// appends the arguments.
    fn call(&self, lua: &Lua, key: &[u8], capacity: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(8, 64 + key.len() + capacity);
        cmd.arg("EVALSHA")
            .arg(lua.script.get_hash())
            .arg(1)
            .arg(key);
        cmd
    }

    /// Runs `cmd` (built by [`call`](Self::call) for `lua`). On a server that
    /// lacks the script (`NOSCRIPT`), sends the same call as `EVAL` with the
    /// script's text: it goes to the same node (the key's), which runs and
    /// caches it.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        lua: &Lua,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let start = tokio::time::Instant::now();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut eval = Cmd::with_capacity(8, lua.code.len() + 256);
                eval.arg("EVAL").arg(lua.code.as_str());
                for arg in cmd.args_iter().skip(2) {
                    if let redis::Arg::Simple(bytes) = arg {
                        eval.arg(bytes);
                    }
                }
                // Within what is left of the call's bound.
                let fallback =
                    async { eval.query_async(&mut conn).await.map_err(|e| self.fail(e)) };
                match self.response_timeout {
                    Some(timeout) => tokio::time::timeout_at(start + timeout, fallback)
                        .await
                        .unwrap_or(Err(StoreError::Timeout {
                            backend: BACKEND,
                            timeout,
                        })),
                    None => fallback.await,
                }
            }
            result => result.map_err(|e| self.fail(e)),
        }
    }

    /// `call` as a store future, bounded when this store bounds its commands.
    fn future<'a, T>(
        &self,
        call: impl std::future::Future<Output = T> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        match self.response_timeout {
            Some(bound) => StoreFuture::bounded(call, bound),
            None => StoreFuture::new(call),
        }
    }

    async fn fenced(&self, lua: &Lua, cmd: Cmd) -> Result<TokenOutcome, StoreError> {
        let applied: i64 = self.invoke(lua, &cmd).await?;
        Ok(if applied == 1 {
            TokenOutcome::Applied
        } else {
            TokenOutcome::Fenced
        })
    }

    /// The claim in one round trip: `SET key record NX GET PX lease+ttl`,
    /// then `PTTL key` in the same pipeline.
    async fn claim_native(
        &self,
        key: &[u8],
        token: LeaseToken,
        claim: &Claim<'_>,
    ) -> Result<Native, StoreError> {
        let keep = millis(claim.ttl);
        let mut record = Vec::with_capacity(KEEP_AT + 20);
        record.push(b'i');
        record.extend_from_slice(claim.fingerprint.as_bytes());
        record.extend_from_slice(&token.to_bytes());
        record.extend_from_slice(keep.to_string().as_bytes());
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(key)
            .arg(record)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(claim.lease) + keep)
            .cmd("PTTL")
            .arg(key);
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.fail(e))?;
        let mut replies = replies.into_iter();
        let (Some(previous), Some(pttl)) = (replies.next(), replies.next()) else {
            return Err(corrupt("unexpected reply"));
        };
        if let Value::ServerError(e) = &previous {
            if e.details().is_some_and(|d| d.contains("syntax error")) {
                return Ok(Native::Unsupported);
            }
        }
        if let Value::ServerError(e) = previous {
            return Err(self.fail(e.into()));
        }
        parse_native(previous, pttl, claim.fingerprint, token).map(|outcome| match outcome {
            Some(outcome) => Native::Done(outcome),
            None => Native::Takeover,
        })
    }

    /// The channel this store's completions and releases publish on, for a
    /// record a duplicate watches: the prefix, then `settled`.
    fn channel(&self) -> Vec<u8> {
        let mut channel = self.prefix.as_bytes().to_vec();
        channel.extend_from_slice(b"settled");
        channel
    }

    /// [`Store::watch`]: the listener subscribed (on the first watch), the
    /// waiter registered, then the record marked watched, so that its
    /// completion or release from then on publishes.
    async fn watch_now(&self, id: &RecordId) -> Result<Option<Watch>, StoreError> {
        let Some(notifier) = &self.notifier else {
            return Ok(None);
        };
        match notifier
            .listener
            .ready(notifier.start(self.channel()))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(why) => {
                return Err(StoreError::backend(
                    BACKEND,
                    format!("cannot SUBSCRIBE for waiting duplicates: {why}"),
                ))
            }
        }
        let watch = notifier.listener.waiters.watch(id);
        let lua = &self.scripts.watch;
        let cmd = self.call(lua, &self.key_bytes(id), 0);
        let _in_flight: i64 = self.invoke(lua, &cmd).await?;
        Ok(Some(watch))
    }

    /// The claim by script: a takeover, or a server without `SET ... NX GET`.
    async fn claim_script(
        &self,
        key: &[u8],
        token: LeaseToken,
        claim: &Claim<'_>,
    ) -> Result<ClaimOutcome, StoreError> {
        let lua = &self.scripts.claim;
        let mut cmd = self.call(lua, key, 96);
        cmd.arg(claim.fingerprint.as_bytes().as_slice())
            .arg(token.to_bytes().as_slice())
            .arg(millis(claim.lease))
            .arg(millis(claim.ttl));
        let reply: Value = self.invoke(lua, &cmd).await?;
        parse_claim(reply, token)
    }
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::corrupt(BACKEND, CorruptRecord::new(what))
}

fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| corrupt("fingerprint is not 32 bytes"))?;
    Ok(Fingerprint::from_bytes(bytes))
}

/// Decodes the claim script's reply.
fn parse_claim(reply: Value, token: LeaseToken) -> Result<ClaimOutcome, StoreError> {
    match reply {
        Value::Int(1) => Ok(ClaimOutcome::Acquired(token)),
        Value::Array(items) => match items.as_slice() {
            [Value::BulkString(fp), Value::Int(ms)] => Ok(ClaimOutcome::InFlight {
                fingerprint: fingerprint(fp)?,
                lease_remaining: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
            }),
            _ => Err(corrupt("malformed in-flight reply")),
        },
        Value::BulkString(record) => parse_completed(record),
        _ => Err(corrupt("unexpected reply")),
    }
}

/// A completed record (`c` + fingerprint + outcome), or an error for
/// anything else.
fn parse_completed(record: Vec<u8>) -> Result<ClaimOutcome, StoreError> {
    match record.first() {
        Some(b'c') if record.len() >= 33 => {
            let fingerprint = fingerprint(&record[1..33])?;
            let outcome = Bytes::from(record).slice(33..);
            Ok(ClaimOutcome::Completed {
                fingerprint,
                outcome: StoredOutcome::decode(outcome)
                    .map_err(|e| StoreError::corrupt(BACKEND, e))?,
            })
        }
        _ => Err(corrupt("the key holds something this store did not write")),
    }
}

/// Decodes the native claim's replies: the key's previous value (`SET ...
/// NX GET`: nil when the claim was stored) and its `PTTL` just after.
/// `None` when the record is in flight past its lease under `mine` (a
/// takeover, for the claim script to decide).
fn parse_native(
    previous: Value,
    pttl: Value,
    mine: &Fingerprint,
    token: LeaseToken,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let record = match previous {
        Value::Nil => return Ok(Some(ClaimOutcome::Acquired(token))),
        Value::BulkString(record) => record,
        _ => return Err(corrupt("unexpected reply")),
    };
    if !matches!(record.first(), Some(b'i' | b'w')) {
        return parse_completed(record).map(Some);
    }
    let keep = std::str::from_utf8(record.get(KEEP_AT..).unwrap_or_default())
        .ok()
        .and_then(|x| x.parse::<i64>().ok())
        .filter(|_| record.len() > KEEP_AT)
        .ok_or_else(|| corrupt("the key holds something this store did not write"))?;
    let held = fingerprint(&record[1..TOKEN_AT])?;
    // -2: the key is gone since (released or expired); -1: it lost its
    // expiry. Both count as a passed lease, for the script to look at.
    let Value::Int(pttl) = pttl else {
        return Err(corrupt("unexpected PTTL reply"));
    };
    let remaining = pttl.saturating_sub(keep);
    if remaining > 0 || held != *mine {
        return Ok(Some(ClaimOutcome::InFlight {
            fingerprint: held,
            lease_remaining: Duration::from_millis(u64::try_from(remaining).unwrap_or(0)),
        }));
    }
    Ok(None)
}

impl Store for RedisStore {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        self.future(async move {
            let key = self.key_bytes(id);
            if self.native.load(Ordering::Relaxed) {
                match self.claim_native(&key, token, &claim).await? {
                    Native::Done(outcome) => return Ok(outcome),
                    Native::Takeover => {}
                    Native::Unsupported => {
                        tracing::info!("this Redis does not take SET ... NX GET (Redis 7 or later does): claiming by script");
                        self.native.store(false, Ordering::Relaxed);
                    }
                }
            }
            self.claim_script(&key, token, &claim).await
        })
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.future(async move {
            let lua = &self.scripts.complete;
            let outcome = outcome.encode();
            let mut cmd = self.call(lua, &self.key_bytes(id), outcome.len() + 48);
            cmd.arg(token.to_bytes().as_slice())
                .arg(outcome.as_slice())
                .arg(millis(ttl));
            self.fenced(lua, cmd).await
        })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.future(async move {
            let lua = &self.scripts.release;
            let mut cmd = self.call(lua, &self.key_bytes(id), 16);
            cmd.arg(token.to_bytes().as_slice());
            self.fenced(lua, cmd).await
        })
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.future(async move {
            let lua = &self.scripts.extend;
            let mut cmd = self.call(lua, &self.key_bytes(id), 40);
            cmd.arg(token.to_bytes().as_slice()).arg(millis(lease));
            self.fenced(lua, cmd).await
        })
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        self.future(self.watch_now(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_their_record_or_nothing() {
        let id = RecordId::from_parts(b"p", b"k");
        let key = |prefix: &str, hex: &str| format!("{prefix}{{{hex}}}").into_bytes();
        assert_eq!(notified_record(&key("pay:", &id.to_hex())), Some(id));
        assert_eq!(notified_record(&key("", &id.to_hex())), Some(id));
        for bad in [
            b"".to_vec(),
            b"}".to_vec(),
            key("pay:", &id.to_hex()[1..]),
            format!("pay:[{}}}", id.to_hex()).into_bytes(),
            format!("pay:{{{}", id.to_hex()).into_bytes(),
            key("pay:", &format!("{}zz", &id.to_hex()[2..])),
        ] {
            assert_eq!(notified_record(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_replies_are_typed_errors() {
        let t = LeaseToken::random();
        for reply in [
            Value::Nil,
            Value::Int(0),
            Value::Array(vec![]),
            Value::Array(vec![Value::BulkString(vec![0; 32])]),
            Value::Array(vec![Value::BulkString(vec![0; 31]), Value::Int(5)]),
            Value::BulkString(vec![]),
            Value::BulkString(b"z".to_vec()),
            Value::BulkString(b"i-not-a-record".to_vec()),
            Value::BulkString([&b"c"[..], &[0; 31]].concat()),
            Value::BulkString([&b"c"[..], &[0; 32], &[9, 9]].concat()),
        ] {
            assert!(
                matches!(parse_claim(reply, t), Err(StoreError::Corrupt { .. })),
                "accepted a malformed reply"
            );
        }
    }

    #[test]
    fn durations_are_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }

    #[test]
    fn well_formed_replies_parse() {
        let t = LeaseToken::random();
        assert!(matches!(
            parse_claim(Value::Int(1), t),
            Ok(ClaimOutcome::Acquired(got)) if got == t
        ));
        let in_flight = Value::Array(vec![Value::BulkString(vec![7; 32]), Value::Int(1500)]);
        assert!(matches!(
            parse_claim(in_flight, t),
            Ok(ClaimOutcome::InFlight { fingerprint, lease_remaining })
                if fingerprint == Fingerprint::from_bytes([7; 32])
                    && lease_remaining == Duration::from_millis(1500)
        ));
    }

    #[test]
    fn cluster_urls_give_seed_nodes() {
        let nodes = |url| cluster_nodes(url).expect(url).expect(url);
        assert_eq!(
            nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            nodes("redis+cluster://u:p,w@a:1, b ,[::1]:3,[::1]/?protocol=3"),
            [
                "redis://u:p,w@a:1/?protocol=3",
                "redis://u:p,w@b:6379/?protocol=3",
                "redis://u:p,w@[::1]:3/?protocol=3",
                "redis://u:p,w@[::1]:6379/?protocol=3",
            ]
        );
        assert!(cluster_nodes("redis://127.0.0.1:6379")
            .expect("single")
            .is_none());
    }

    #[test]
    fn bad_cluster_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+cluster://", "names no node"),
            ("redis+cluster://u:secret@", "names no node"),
            ("redis+cluster://a:1,,b:2", "node 2 of the list is empty"),
            ("redis+cluster://a:1,", "node 2 of the list is empty"),
            ("redis+cluster://a:x", "bad port `x`"),
            ("redis+cluster://a:0", "bad port `0`"),
            ("redis+cluster://u:secret@a:70000", "bad port `70000`"),
            ("redis+cluster://:7000", "has no host"),
        ] {
            let err = cluster_nodes(url)
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert!(
                matches!(
                    err,
                    StoreError::Config {
                        backend: "redis",
                        ..
                    }
                ),
                "{url}"
            );
            let source = std::error::Error::source(&err)
                .expect("a source")
                .to_string();
            assert!(source.contains(says), "{url}: {source}");
            assert!(source.contains("redis+cluster://HOST:PORT"), "{source}");
            assert!(!source.contains("secret"), "{source}");
        }
    }

    fn in_flight(fp: [u8; 32], keep: &str) -> Value {
        Value::BulkString([&b"i"[..], &fp, &[5; 16], keep.as_bytes()].concat())
    }

    #[test]
    fn native_replies_parse() {
        let t = LeaseToken::random();
        let mine = Fingerprint::from_bytes([7; 32]);
        assert!(matches!(
            parse_native(Value::Nil, Value::Int(-1), &mine, t),
            Ok(Some(ClaimOutcome::Acquired(got))) if got == t
        ));
        // In flight: the lease remaining is PTTL minus the time kept after it.
        assert!(matches!(
            parse_native(in_flight([7; 32], "60000"), Value::Int(61_500), &mine, t),
            Ok(Some(ClaimOutcome::InFlight { lease_remaining, .. }))
                if lease_remaining == Duration::from_millis(1500)
        ));
        // Past its lease: a takeover for the script, with the same fingerprint
        // (also when the key vanished since, -2, or lost its expiry, -1) ...
        for pttl in [60_000, 10, -1, -2] {
            assert!(matches!(
                parse_native(in_flight([7; 32], "60000"), Value::Int(pttl), &mine, t),
                Ok(None)
            ));
        }
        // ... and in flight for another request.
        assert!(matches!(
            parse_native(in_flight([8; 32], "60000"), Value::Int(10), &mine, t),
            Ok(Some(ClaimOutcome::InFlight { fingerprint, lease_remaining }))
                if fingerprint == Fingerprint::from_bytes([8; 32]) && lease_remaining.is_zero()
        ));
        let done = StoredOutcome::NotReplayable { status: 201 }.encode();
        let completed = Value::BulkString([&b"c"[..], &[7; 32], &done].concat());
        assert!(matches!(
            parse_native(completed, Value::Int(5), &mine, t),
            Ok(Some(ClaimOutcome::Completed { .. }))
        ));
    }

    #[test]
    fn malformed_native_replies_are_typed_errors() {
        let t = LeaseToken::random();
        let mine = Fingerprint::from_bytes([7; 32]);
        for (previous, pttl) in [
            (Value::Int(1), Value::Int(5)),
            (Value::Okay, Value::Int(5)),
            (Value::BulkString(vec![]), Value::Int(5)),
            (Value::BulkString(b"z".to_vec()), Value::Int(5)),
            (Value::BulkString(b"i-short".to_vec()), Value::Int(5)),
            (in_flight([7; 32], ""), Value::Int(5)),
            (in_flight([7; 32], "12x"), Value::Int(5)),
            (in_flight([7; 32], "100"), Value::Nil),
            (
                Value::BulkString([&b"c"[..], &[0; 31]].concat()),
                Value::Int(5),
            ),
        ] {
            assert!(
                matches!(
                    parse_native(previous, pttl, &mine, t),
                    Err(StoreError::Corrupt { .. })
                ),
                "accepted a malformed reply"
            );
        }
    }
}

/// For the fuzz targets only ([`crate::__fuzz`]): the private reply decoders.
#[doc(hidden)]
pub mod __fuzz {
    use super::{
        parse_claim, parse_native, ClaimOutcome, Fingerprint, LeaseToken, StoreError, Value,
    };

    /// `parse_claim` of the claim script's `reply`.
    pub fn claim_reply(reply: Value, token: LeaseToken) -> Result<ClaimOutcome, StoreError> {
        parse_claim(reply, token)
    }

    /// `parse_native` of the native claim's replies.
    pub fn native_reply(
        previous: Value,
        pttl: Value,
        mine: &Fingerprint,
        token: LeaseToken,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        parse_native(previous, pttl, mine, token)
    }
}
