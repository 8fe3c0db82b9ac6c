//! The store: [`RedisStore`] and its [`Store`] impl.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Value};

use idempotency_core::{
    Claim, ClaimOutcome, LeaseToken, RecordId, Store, StoreError, StoreFuture, StoredOutcome,
    TokenOutcome, Watch,
};

use crate::connection::RedisConnection;
use crate::listener::Notifier;
use crate::reply::{corrupt, parse_claim, parse_native, KEEP_AT};
use crate::scripts::{Lua, Scripts};

/// The backend's name in this crate's [`StoreError`]s.
pub(crate) const BACKEND: &str = "redis";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// Durations are capped at about 31 years so that times stay exact in Lua's
/// doubles (and in `PEXPIRE`).
const MAX_MILLIS: u64 = 1_000_000_000_000;

/// A store in Redis or a Redis Cluster. Cheap to clone: clones share one
/// connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
    scripts: Arc<Scripts>,
    prefix: Arc<str>,
    /// The connection's response timeout, when this store set it.
    pub(crate) response_timeout: Option<Duration>,
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

pub(crate) fn backend(e: redis::RedisError) -> StoreError {
    StoreError::backend(BACKEND, e)
}

/// Whole milliseconds, at least 1 (`PX 0` is an error in Redis) and at most
/// [`MAX_MILLIS`].
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MILLIS)
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
        let (conn, subscribers) = RedisConnection::open(url, response_timeout).await?;
        let mut store = Self::over(conn);
        store.response_timeout = Some(response_timeout);
        store.notifier = Some(Arc::new(Notifier::new(subscribers)));
        if store.is_cluster() {
            // Into every node that answers; one that does not (a node down while
            // the cluster serves) gets each script by the `EVAL` fallback.
            if let Err(e) = store.load_scripts().await {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "could not load the idempotency scripts into every cluster node; a node that lacks one gets it on first use"
                );
            }
        } else {
            store.load_scripts().await?;
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
    pub(crate) fn fail(&self, e: redis::RedisError) -> StoreError {
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

    /// Loads the five scripts into Redis's script cache (`SCRIPT LOAD`; on a
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
        let applied: i64 = lua.invoke(self, &cmd).await?;
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
        let cmd = lua.call(&self.key_bytes(id), 0);
        let _in_flight: i64 = lua.invoke(self, &cmd).await?;
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
        let mut cmd = lua.call(key, 96);
        cmd.arg(claim.fingerprint.as_bytes().as_slice())
            .arg(token.to_bytes().as_slice())
            .arg(millis(claim.lease))
            .arg(millis(claim.ttl));
        let reply: Value = lua.invoke(self, &cmd).await?;
        parse_claim(reply, token)
    }
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
            let mut cmd = lua.call(&self.key_bytes(id), outcome.len() + 48);
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
            let mut cmd = lua.call(&self.key_bytes(id), 16);
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
            let mut cmd = lua.call(&self.key_bytes(id), 40);
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
    fn durations_are_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }
}
