//! The Redis store (feature `redis`): many instances share one view of the
//! records, and they survive a restart of the service (and of Redis, as far as
//! Redis's own persistence goes).
//!
//! ```no_run
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use idempotency_core::store::redis::RedisStore;
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("payments:");
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! One record is one string at `{prefix}{<64 hex digits of the record id>}`:
//! in flight, `i` + fingerprint (32 bytes) + token (16 bytes) + how long an
//! abandoned claim is kept after its lease (decimal ms); completed, `c` +
//! fingerprint + the encoded outcome. The key's own expiry is the clock: an
//! in-flight key expires when its lease ends plus that time, so the lease
//! remaining is its `PTTL` minus it; a completed key expires its ttl after
//! completion. Nothing needs purging.
//!
//! A key that holds anything else (another value type, or a string this store
//! did not write) is reported as [`StoreError::Corrupt`] or
//! [`StoreError::Backend`] and never overwritten.
//!
//! # Guarantees
//!
//! - **Concurrency.** Each operation is one Lua script, and Redis runs a
//!   script atomically, so of any number of concurrent claims from any number
//!   of instances exactly one acquires. Every script touches one key only,
//!   whose hash tag is the record id, so the scripts run on Redis Cluster.
//! - **Round trips.** Scripts are loaded once (on [`RedisStore::connect`], or
//!   on first use) and called by SHA with `EVALSHA`: a fresh request costs 2
//!   round trips (claim, complete), a replay 1. After Redis lost its script
//!   cache (a restart), the first call of each script costs 2 more (`NOSCRIPT`,
//!   `SCRIPT LOAD`) and the steady state returns.
//! - **Time.** Leases and expiry come from Redis's clock (key expiry, read
//!   back with `PTTL`), so instances with skewed clocks agree.
//! - **Work per call.** A fresh claim runs `GET` and `SET` inside its script,
//!   a replay one `GET`, a completion `GET` and `SET`.
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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{Claim, Store, StoreError, StoreFuture};
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, CorruptRecord, LeaseToken, StoredOutcome, TokenOutcome};

const BACKEND: &str = "redis";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// Durations are capped at about 31 years so that times stay exact in Lua's
/// doubles (and in `PEXPIRE`).
const MAX_MILLIS: u64 = 1_000_000_000_000;

// A record is one string value:
//   in flight: 'i' .. fingerprint (32 bytes) .. token (16 bytes) .. x
//   completed: 'c' .. fingerprint (32 bytes) .. encoded outcome
// where x (decimal ms) is how long an abandoned claim is kept after its
// lease. The key's own expiry is the clock: an in-flight key expires at lease
// end + x, so the lease remaining is `PTTL - x`; a completed key expires ttl
// after completion.

// KEYS[1] the record; ARGV: fingerprint, token, lease ms, ttl ms.
// Returns 1 (acquired) | {fingerprint, lease remaining ms} (in flight) | the
// record's value (completed, or not a record this store wrote).
// A fresh claim is GET + SET; a replay one GET.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 1) ~= 105 then return v end
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
if not v or string.byte(v, 1) ~= 105 or string.sub(v, 34, 49) ~= ARGV[1] then return 0 end
";

// KEYS[1]; ARGV: token, outcome, ttl ms. Returns 1 (applied) or 0 (fenced).
const COMPLETE: &str = r"
__HELD__
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
return 1
";

// KEYS[1]; ARGV: token. Returns 1 or 0.
const RELEASE: &str = r"
__HELD__
redis.call('DEL', KEYS[1])
return 1
";

// KEYS[1]; ARGV: token, lease ms. Returns 1 or 0.
const EXTEND: &str = r"
__HELD__
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(string.sub(v, 50)))
return 1
";

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
}

impl Scripts {
    fn new() -> Self {
        let fenced = |body: &str| Script::new(&body.replace("__HELD__", HELD));
        Self {
            claim: Script::new(CLAIM),
            complete: fenced(COMPLETE),
            release: fenced(RELEASE),
            extend: fenced(EXTEND),
        }
    }
}

/// A store in Redis. Cheap to clone: clones share one connection manager
/// (one multiplexed connection that reconnects by itself).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    prefix: Arc<str>,
    /// The connection manager's response timeout, when this store set it.
    response_timeout: Option<Duration>,
}

/// How long [`RedisStore::connect`] lets one command wait for its answer:
/// the same as the middleware's default `store_timeout`, so that the
/// middleware needs no timer of its own around each call.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
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

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` where the `redis` crate is built with TLS) and loads the
    /// scripts.
    ///
    /// The connection manager answers a dropped connection with an error and
    /// reconnects in the background, retrying a few times with a short
    /// backoff (at most about a second), and again on the next call if Redis
    /// is still away.
    ///
    /// Each command waits at most [`DEFAULT_RESPONSE_TIMEOUT`] for its
    /// answer, then fails with [`StoreError::Timeout`].
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the URL is invalid or Redis cannot be
    /// reached.
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
        let client = redis::Client::open(url).map_err(backend)?;
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
        store.load_scripts().await?;
        Ok(store)
    }

    /// A store over a connection manager you configured yourself. The
    /// scripts are loaded on first use (or call
    /// [`load_scripts`](Self::load_scripts)).
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            scripts: Arc::new(Scripts::new()),
            prefix: Arc::from(DEFAULT_PREFIX),
            response_timeout: None,
        }
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

    /// Loads the four scripts into Redis's script cache (`SCRIPT LOAD`), so
    /// that the first requests need no `NOSCRIPT` fallback.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when Redis cannot be reached.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        for script in [
            &self.scripts.claim,
            &self.scripts.complete,
            &self.scripts.release,
            &self.scripts.extend,
        ] {
            script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(backend)?;
        }
        Ok(())
    }

    /// The connection manager (for health checks and tests).
    pub fn connection(&self) -> &ConnectionManager {
        &self.conn
    }

    /// `EVALSHA script 1 <record key>`, built in one buffer; the caller
    /// appends the arguments.
    fn call(&self, script: &Script, id: &RecordId, capacity: usize) -> redis::Cmd {
        let key = self.key_bytes(id);
        let mut cmd = redis::Cmd::with_capacity(8, 64 + key.len() + capacity);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(key.as_slice());
        cmd
    }

    /// Runs `cmd` (built by [`call`](Self::call) for `script`). After Redis
    /// lost its script cache (`NOSCRIPT`), loads the script and runs it again.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let start = tokio::time::Instant::now();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis lost its scripts: load this one and call it again,
                // within what is left of the call's bound.
                let fallback = async {
                    script
                        .prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| self.fail(e))?;
                    cmd.query_async(&mut conn).await.map_err(|e| self.fail(e))
                };
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

    async fn fenced(&self, script: &Script, cmd: redis::Cmd) -> Result<TokenOutcome, StoreError> {
        let applied: i64 = self.invoke(script, &cmd).await?;
        Ok(if applied == 1 {
            TokenOutcome::Applied
        } else {
            TokenOutcome::Fenced
        })
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
        Value::BulkString(record) => match record.first() {
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
        },
        _ => Err(corrupt("unexpected reply")),
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
            let script = &self.scripts.claim;
            let mut cmd = self.call(script, id, 96);
            cmd.arg(claim.fingerprint.as_bytes().as_slice())
                .arg(token.to_bytes().as_slice())
                .arg(millis(claim.lease))
                .arg(millis(claim.ttl));
            let reply: Value = self.invoke(script, &cmd).await?;
            parse_claim(reply, token)
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
            let script = &self.scripts.complete;
            let outcome = outcome.encode();
            let mut cmd = self.call(script, id, outcome.len() + 48);
            cmd.arg(token.to_bytes().as_slice())
                .arg(outcome.as_slice())
                .arg(millis(ttl));
            self.fenced(script, cmd).await
        })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.future(async move {
            let script = &self.scripts.release;
            let mut cmd = self.call(script, id, 16);
            cmd.arg(token.to_bytes().as_slice());
            self.fenced(script, cmd).await
        })
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.future(async move {
            let script = &self.scripts.extend;
            let mut cmd = self.call(script, id, 40);
            cmd.arg(token.to_bytes().as_slice()).arg(millis(lease));
            self.fenced(script, cmd).await
        })
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
