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
//! One record is one hash at `{prefix}{<64 hex digits of the record id>}`
//! with the fields `s` (state: `i` in flight, `c` completed), `f`
//! (fingerprint), `t` (token), `l` (lease end, ms on Redis's clock), `x` (how
//! long an abandoned claim is kept after its lease, ms) and `o` (the encoded
//! outcome; a completed record keeps its last `t`, `l` and `x`, unused). The key expires by itself (`PEXPIREAT`/`PEXPIRE`) when the record
//! does, so nothing needs purging.
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
//! - **Time.** Leases and expiry come from Redis's clock (`TIME` inside the
//!   scripts, and key expiry), so instances with skewed clocks agree.
//! - **Crashes.** A service instance that dies mid-request leaves an in-flight
//!   record: retries of the same request get 409 until its lease passes, then
//!   one of them takes it over. What Redis itself keeps across *its* restart
//!   depends on its persistence (`appendonly yes` with `appendfsync everysec`
//!   can lose up to a second of records; a lost record means a retry runs the
//!   handler again).
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

use super::{BoxFuture, ClaimRequest, Store, StoreError};
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

const BACKEND: &str = "redis";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// Durations are capped at about 31 years so that times stay exact in Lua's
/// doubles (and in `PEXPIREAT`).
const MAX_MILLIS: u64 = 1_000_000_000_000;

/// Enables effects replication on Redis 5 and 6 (a no-op on 7; it must come
/// before the script's first write), so that scripts may write after calling
/// `TIME`; then reads Redis's clock in ms.
const NOW: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

// KEYS[1] the record; ARGV: fingerprint, token, lease ms, ttl ms.
// Returns {'a'} | {'i', fingerprint, lease remaining ms} | {'c', fingerprint, outcome}.
// A replay returns before reading the clock: one HMGET, nothing else.
const CLAIM: &str = r"
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 'l', 'o')
if rec[1] == 'c' then
  return {'c', rec[2], rec[4]}
end
__NOW__
if rec[1] == 'i' then
  local lease_until = tonumber(rec[3])
  if lease_until > now or rec[2] ~= ARGV[1] then
    return {'i', rec[2], math.max(0, lease_until - now)}
  end
end
local lease_until = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 's', 'i', 'f', ARGV[1], 't', ARGV[2], 'l', lease_until, 'x', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], lease_until + tonumber(ARGV[4]))
return {'a'}
";

// KEYS[1]; ARGV: token, outcome, ttl ms. Returns 1 (applied) or 0 (fenced).
const COMPLETE: &str = r"
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', 'c', 'o', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

// KEYS[1]; ARGV: token. Returns 1 or 0.
const RELEASE: &str = r"
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

// KEYS[1]; ARGV: token, lease ms. Returns 1 or 0.
const EXTEND: &str = r"
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'x')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
__NOW__
local lease_until = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'l', lease_until)
redis.call('PEXPIREAT', KEYS[1], lease_until + tonumber(rec[3]))
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
        let timed = |body: &str| Script::new(&body.replace("__NOW__", NOW));
        Self {
            claim: timed(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            extend: timed(EXTEND),
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
}

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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_MILLIS)
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
    /// # Errors
    /// [`StoreError::Backend`] when the URL is invalid or Redis cannot be
    /// reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        let store = Self::new(conn);
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
        format!("{}{{{}}}", self.prefix, id.to_hex())
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

    async fn claim_now(&self, req: ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Value = self
            .scripts
            .claim
            .key(self.key(req.id))
            .arg(req.fingerprint.as_bytes().as_slice())
            .arg(req.token.to_bytes().as_slice())
            .arg(millis(req.lease))
            .arg(millis(req.ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        parse_claim(reply, req.token)
    }

    async fn fenced(
        &self,
        script: &Script,
        id: &RecordId,
        token: LeaseToken,
        extra: &[Vec<u8>],
    ) -> Result<TokenOutcome, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = script.key(self.key(id));
        call.arg(token.to_bytes().as_slice());
        for arg in extra {
            call.arg(arg.as_slice());
        }
        let applied: i64 = call.invoke_async(&mut conn).await.map_err(backend)?;
        Ok(if applied == 1 {
            TokenOutcome::Applied
        } else {
            TokenOutcome::Fenced
        })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("redis claim reply: {what}"))
}

fn bulk(v: Value, what: &str) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        _ => Err(corrupt(what)),
    }
}

fn fingerprint(v: Value) -> Result<Fingerprint, StoreError> {
    let bytes = bulk(v, "fingerprint missing")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| corrupt("fingerprint is not 32 bytes"))?;
    Ok(Fingerprint::from_bytes(bytes))
}

fn parse_claim(reply: Value, token: LeaseToken) -> Result<ClaimOutcome, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt("not an array"));
    };
    let mut items = items.into_iter();
    let tag = bulk(items.next().unwrap_or(Value::Nil), "no state")?;
    match tag.as_slice() {
        b"a" => Ok(ClaimOutcome::Acquired(token)),
        b"i" => {
            let fingerprint = fingerprint(items.next().unwrap_or(Value::Nil))?;
            let remaining = match items.next() {
                Some(Value::Int(ms)) => u64::try_from(ms).unwrap_or(0),
                _ => return Err(corrupt("lease missing")),
            };
            Ok(ClaimOutcome::InFlight {
                fingerprint,
                lease_remaining: Duration::from_millis(remaining),
            })
        }
        b"c" => {
            let fingerprint = fingerprint(items.next().unwrap_or(Value::Nil))?;
            let outcome = bulk(items.next().unwrap_or(Value::Nil), "outcome missing")?;
            Ok(ClaimOutcome::Completed {
                fingerprint,
                outcome: Arc::new(StoredOutcome::decode(Bytes::from(outcome))?),
            })
        }
        _ => Err(corrupt("unknown state")),
    }
}

impl Store for RedisStore {
    fn claim<'a>(
        &'a self,
        req: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>> {
        Box::pin(self.claim_now(req))
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: Arc<StoredOutcome>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        Box::pin(async move {
            let extra = [outcome.encode(), millis(ttl).to_string().into_bytes()];
            self.fenced(&self.scripts.complete, id, token, &extra).await
        })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        Box::pin(self.fenced(&self.scripts.release, id, token, &[]))
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<TokenOutcome, StoreError>> {
        Box::pin(async move {
            let extra = [millis(lease).to_string().into_bytes()];
            self.fenced(&self.scripts.extend, id, token, &extra).await
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
            Value::Array(vec![]),
            Value::Array(vec![Value::BulkString(b"z".to_vec())]),
            Value::Array(vec![Value::BulkString(b"i".to_vec())]),
            Value::Array(vec![
                Value::BulkString(b"i".to_vec()),
                Value::BulkString(vec![0; 31]),
                Value::Int(5),
            ]),
            Value::Array(vec![
                Value::BulkString(b"c".to_vec()),
                Value::BulkString(vec![0; 32]),
                Value::BulkString(vec![9, 9]),
            ]),
        ] {
            assert!(
                matches!(parse_claim(reply, t), Err(StoreError::Corrupt(_))),
                "accepted a malformed reply"
            );
        }
    }
}
