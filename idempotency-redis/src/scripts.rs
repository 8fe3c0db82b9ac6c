//! The Lua scripts (one file each under `scripts/`), their placeholders
//! filled in, and how they are called: `EVALSHA`, then `EVAL` with the
//! script's text on a node that lacks it.

use redis::{Cmd, Script};

use idempotency_core::StoreError;

use crate::store::{RedisStore, BACKEND};

// KEYS[1] the record; ARGV: fingerprint, token, lease ms, ttl ms.
// Returns 1 (acquired) | {fingerprint, lease remaining ms} (in flight) | the
// record's value (completed, or not a record this store wrote).
// The claim's slow path: the native `SET NX GET` decides every other case.
const CLAIM: &str = include_str!("scripts/claim.lua");

/// The start of every fenced script: `v` is the record, and the script
/// returns 0 unless it is in flight under the token in `ARGV[1]`.
const HELD: &str = include_str!("scripts/held.lua");

/// After a fenced script changed a record: if a duplicate watched it (`w`),
/// publish its key on the prefix's channel (the key without its 66-byte
/// `{<hex id>}` tag, then `settled`).
const SETTLED: &str = include_str!("scripts/settled.lua");

// KEYS[1]; ARGV: token, outcome, ttl ms. Returns 1 (applied) or 0 (fenced).
const COMPLETE: &str = include_str!("scripts/complete.lua");

// KEYS[1]; ARGV: token. Returns 1 or 0.
const RELEASE: &str = include_str!("scripts/release.lua");

// KEYS[1]. A duplicate waits for this record: mark it watched (`i` -> `w`,
// its expiry kept), so that its completion or release publishes. Returns 1
// when it is in flight (now watched), 0 otherwise.
const WATCH: &str = include_str!("scripts/watch.lua");

// KEYS[1]; ARGV: token, lease ms. Returns 1 or 0.
const EXTEND: &str = include_str!("scripts/extend.lua");

/// A script: its SHA for `EVALSHA`, its text for `EVAL` on a node that
/// lacks it.
pub(crate) struct Lua {
    pub(crate) script: Script,
    code: String,
}

impl Lua {
    fn new(code: String) -> Self {
        Self {
            script: Script::new(&code),
            code,
        }
    }

    /// `EVALSHA script 1 <record key>`, built in one buffer; the caller
    /// appends the arguments.
    pub(crate) fn call(&self, key: &[u8], capacity: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(8, 64 + key.len() + capacity);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(key);
        cmd
    }

    /// Runs `cmd` (built by [`call`](Self::call) for this script) on
    /// `store`'s connection. On a server that lacks the script (`NOSCRIPT`),
    /// sends the same call as `EVAL` with the script's text: it goes to the
    /// same node (the key's), which runs and caches it.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        store: &RedisStore,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = store.connection().clone();
        let start = tokio::time::Instant::now();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut eval = Cmd::with_capacity(8, self.code.len() + 256);
                eval.arg("EVAL").arg(self.code.as_str());
                for arg in cmd.args_iter().skip(2) {
                    if let redis::Arg::Simple(bytes) = arg {
                        eval.arg(bytes);
                    }
                }
                // Within what is left of the call's bound.
                let fallback =
                    async { eval.query_async(&mut conn).await.map_err(|e| store.fail(e)) };
                match store.response_timeout {
                    Some(timeout) => tokio::time::timeout_at(start + timeout, fallback)
                        .await
                        .unwrap_or(Err(StoreError::Timeout {
                            backend: BACKEND,
                            timeout,
                        })),
                    None => fallback.await,
                }
            }
            result => result.map_err(|e| store.fail(e)),
        }
    }
}

pub(crate) struct Scripts {
    pub(crate) claim: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
    pub(crate) extend: Lua,
    pub(crate) watch: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
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

    pub(crate) fn all(&self) -> [&Lua; 5] {
        [
            &self.claim,
            &self.complete,
            &self.release,
            &self.extend,
            &self.watch,
        ]
    }
}
