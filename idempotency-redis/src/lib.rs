//! The Redis store of idempotent HTTP APIs ([`idempotency_core`]): many
//! instances share one view of the
//! records, and they survive a restart of the service (and of Redis, as far as
//! Redis's own persistence goes). One Redis server, or a Redis Cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idempotency_core::StoreError> {
//! use idempotency_redis::RedisStore;
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
//! - its [`watch`](idempotency_core::Store::watch) subscribes this store's listener (one
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
//!   ([`StoreFuture::bounded`](idempotency_core::StoreFuture::bounded)), and the
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
//!
//! [`StoreError::Backend`]: idempotency_core::StoreError::Backend
//! [`StoreError::Config`]: idempotency_core::StoreError::Config
//! [`StoreError::Corrupt`]: idempotency_core::StoreError::Corrupt
//! [`StoreError::Timeout`]: idempotency_core::StoreError::Timeout

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod connection;
mod listener;
mod reply;
mod scripts;
mod store;
mod url;

pub use connection::RedisConnection;
pub use store::{RedisStore, DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT};
pub use url::CLUSTER_SCHEME;

/// For the fuzz targets only ([`crate::__fuzz`]): the private reply decoders.
#[doc(hidden)]
pub mod __fuzz {
    use crate::reply::{parse_claim, parse_native};
    use idempotency_core::{ClaimOutcome, Fingerprint, LeaseToken, StoreError};

    pub use redis::Value as RedisValue;

    /// `parse_claim` of the claim script's `reply`.
    pub fn claim_reply(reply: RedisValue, token: LeaseToken) -> Result<ClaimOutcome, StoreError> {
        parse_claim(reply, token)
    }

    /// `parse_native` of the native claim's replies.
    pub fn native_reply(
        previous: RedisValue,
        pttl: RedisValue,
        mine: &Fingerprint,
        token: LeaseToken,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        parse_native(previous, pttl, mine, token)
    }
}
