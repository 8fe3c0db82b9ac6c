//! What the middleware covers, how long it remembers, and what it stores.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What happens to a covered request when the store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureMode {
    /// Refuse with 503 and `Retry-After`; the handler does not run. (Default.)
    #[default]
    Closed,
    /// Run the handler without protection and log the outage at `error`.
    Open,
}

/// Headers never stored for replay, besides `content-length` (always
/// recomputed): cookies, dates, authentication and hop-by-hop headers.
pub const DEFAULT_NEVER_REPLAYED: &[&str] = &[
    "set-cookie",
    "date",
    "www-authenticate",
    "proxy-authenticate",
    "authentication-info",
    "proxy-authentication-info",
    "authorization",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "idempotent-replayed",
];

/// How long a covered request's body may take to arrive, by default: 30 s.
///
/// A covered body is read in full before the claim (it is part of the
/// fingerprint), so a client that stops sending holds a connection and up
/// to the body limit (1 MiB) of buffer. 30 s lets a 1 MiB body through at
/// 35 KB/s, slower than any client that is still sending, and ends a
/// stalled one before the idle timeouts of common load balancers (60 s), so
/// the client gets the 408 rather than a reset.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);

type StatusPredicate = Arc<dyn Fn(u16) -> bool + Send + Sync>;

/// The middleware's settings, shared by the tower and actix adapters.
/// Build it with [`IdempotencyConfig::builder`].
#[derive(Clone)]
pub struct IdempotencyConfig {
    pub(crate) methods: Vec<String>,
    pub(crate) require_key: bool,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) request_body_timeout: Duration,
    pub(crate) max_stored_response: usize,
    pub(crate) store_response: StatusPredicate,
    pub(crate) never_replayed: Vec<String>,
    /// Bit `n` set: a name of `n` bytes is in `never_replayed` (bit 0: one
    /// of 64 bytes or more). Most headers are ruled out by their length.
    pub(crate) never_replayed_lengths: u64,
    pub(crate) failure_mode: FailureMode,
    pub(crate) store_timeout: Duration,
    pub(crate) scope_header: Option<String>,
    pub(crate) complete_attempts: u32,
    pub(crate) complete_backoff: Duration,
    pub(crate) wait_for_in_flight: Duration,
    /// `None`: the lease.
    pub(crate) transaction_timeout: Option<Duration>,
    pub(crate) in_flight_retry_after: Duration,
    /// `Some`: stored outcomes are encrypted with these keys.
    pub(crate) encryption: Option<crate::EncryptionKeys>,
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("max_request_body", &self.max_request_body)
            .field("request_body_timeout", &self.request_body_timeout)
            .field("max_stored_response", &self.max_stored_response)
            .field("never_replayed", &self.never_replayed)
            .field("failure_mode", &self.failure_mode)
            .field("store_timeout", &self.store_timeout)
            .field("scope_header", &self.scope_header)
            .field("complete_attempts", &self.complete_attempts)
            .field("wait_for_in_flight", &self.wait_for_in_flight)
            .field("transaction_timeout", &self.transaction_timeout())
            .field("in_flight_retry_after", &self.in_flight_retry_after)
            .field("encryption", &self.encryption)
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            methods: vec!["POST".into(), "PATCH".into()],
            require_key: true,
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            max_request_body: 1024 * 1024,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            max_stored_response: 1024 * 1024,
            store_response: Arc::new(default_store_response),
            never_replayed: DEFAULT_NEVER_REPLAYED
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            never_replayed_lengths: lengths(DEFAULT_NEVER_REPLAYED),
            failure_mode: FailureMode::Closed,
            store_timeout: Duration::from_secs(2),
            scope_header: None,
            complete_attempts: 4,
            complete_backoff: Duration::from_millis(50),
            wait_for_in_flight: Duration::ZERO,
            transaction_timeout: None,
            in_flight_retry_after: Duration::from_secs(1),
            encryption: None,
        }
    }
}

/// The default storage rule: 2xx, 3xx and 4xx other than 408, 409, 425 and
/// 429 are stored and replayed; 5xx and those transient 4xx release the claim
/// so that a retry runs the handler again.
pub fn default_store_response(status: u16) -> bool {
    match status {
        200..=399 => true,
        408 | 409 | 425 | 429 => false,
        400..=499 => true,
        _ => false,
    }
}

impl IdempotencyConfig {
    /// A builder whose defaults match the design: POST and PATCH covered, key
    /// required, 24 h ttl, 30 s lease, 1 MiB request and stored-response
    /// limits, 30 s to read a request body, fail-closed, 2 s store timeout.
    pub fn builder() -> IdempotencyConfigBuilder {
        IdempotencyConfigBuilder {
            config: Self::default(),
            error: None,
        }
    }

    /// Whether requests with this method (uppercase, as on the wire) are covered.
    pub fn covers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// Whether a response with this status is stored (else the claim is released).
    pub fn stores_status(&self, status: u16) -> bool {
        (self.store_response)(status)
    }

    /// Whether a response header (name in lowercase) is stored for replay.
    pub fn replays_header(&self, lowercase_name: &str) -> bool {
        lowercase_name != "content-length"
            && (self.never_replayed_lengths & length_bit(lowercase_name) == 0
                || !self.never_replayed.iter().any(|h| h == lowercase_name))
    }

    /// How long completed records replay.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long a claim holds without a heartbeat.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The largest request body accepted on covered requests.
    pub fn max_request_body(&self) -> usize {
        self.max_request_body
    }

    /// How long a covered request's body may take to arrive.
    pub fn request_body_timeout(&self) -> Duration {
        self.request_body_timeout
    }

    /// The largest response body stored for replay.
    pub fn max_stored_response(&self) -> usize {
        self.max_stored_response
    }

    /// Fail-closed or fail-open.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure_mode
    }

    /// The timeout of each store call.
    pub fn store_timeout(&self) -> Duration {
        self.store_timeout
    }

    /// In transactional mode, how long a handler may hold its transaction
    /// before it is rolled back and answered 503 (default: the lease).
    pub fn transaction_timeout(&self) -> Duration {
        self.transaction_timeout.unwrap_or(self.lease)
    }

    /// The keys stored responses are encrypted with, if any.
    pub fn encryption(&self) -> Option<&crate::EncryptionKeys> {
        self.encryption.as_ref()
    }
}

/// Builds an [`IdempotencyConfig`]; [`build`](Self::build) checks it.
#[derive(Debug)]
#[must_use]
pub struct IdempotencyConfigBuilder {
    config: IdempotencyConfig,
    error: Option<ConfigError>,
}

impl IdempotencyConfigBuilder {
    /// The methods to cover (default POST and PATCH). Others pass through untouched.
    pub fn methods<I, M>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: AsRef<str>,
    {
        let mut list = Vec::new();
        for m in methods {
            let m = m.as_ref();
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                self.error
                    .get_or_insert(ConfigError::InvalidMethod(m.to_owned()));
            }
            list.push(m.to_ascii_uppercase());
        }
        self.config.methods = list;
        self
    }

    /// Whether covered requests without a key are refused with 400 (default
    /// `true`). With `false` they pass through unprotected.
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// How long a completed record replays (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long a claim holds without a heartbeat (default 30 s). While the
    /// handler runs, the lease is extended every half lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// The largest request body of a covered request (default 1 MiB); larger gets 413.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config.max_request_body = bytes;
        self
    }

    /// How long a covered request's body may take to arrive, from the first
    /// poll of its body to its end (default [`DEFAULT_REQUEST_BODY_TIMEOUT`],
    /// 30 s). Past it the request is answered 408 problem+json with
    /// `Connection: close`, the handler does not run and nothing is claimed:
    /// a client that stops sending (a chunked body that never ends, a
    /// `Content-Length` longer than what it sends) no longer holds a
    /// connection and its buffer for as long as it likes. A body that has
    /// arrived whole by the time it is first read arms no timer.
    ///
    /// The bound is the engine's, so both adapters keep it alike; it covers
    /// only the requests the engine reads. Give the server its own header
    /// and body timeouts too (see the README's production settings).
    pub fn request_body_timeout(mut self, bound: Duration) -> Self {
        self.config.request_body_timeout = bound;
        self
    }

    /// The largest response body stored for replay (default 1 MiB). A larger
    /// one still reaches the client in full; its record completes as not
    /// replayable.
    pub fn max_stored_response(mut self, bytes: usize) -> Self {
        self.config.max_stored_response = bytes;
        self
    }

    /// Which statuses are stored and replayed; the others release the claim.
    /// Default: [`default_store_response`].
    pub fn store_response_when(
        mut self,
        predicate: impl Fn(u16) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.store_response = Arc::new(predicate);
        self
    }

    /// Adds a response header that is never replayed.
    pub fn never_replay_header(mut self, name: &str) -> Self {
        if !valid_token(name) {
            self.error
                .get_or_insert(ConfigError::InvalidHeaderName(name.to_owned()));
        }
        self.config.never_replayed.push(name.to_ascii_lowercase());
        self
    }

    /// Replaces the whole list of headers never replayed.
    pub fn never_replay_headers<I, H>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = H>,
        H: AsRef<str>,
    {
        self.config.never_replayed.clear();
        for n in names {
            self = self.never_replay_header(n.as_ref());
        }
        self
    }

    /// Fail-closed (default) or fail-open when the store is down.
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.config.failure_mode = mode;
        self
    }

    /// The timeout of each store call (default 2 s).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// Derive the scope from this request header (for example `authorization`
    /// or `x-tenant-id`). Requests without it share one anonymous scope. The
    /// adapters also take a closure over their own request type.
    pub fn scope_header(mut self, name: &str) -> Self {
        if !valid_token(name) {
            self.error
                .get_or_insert(ConfigError::InvalidHeaderName(name.to_owned()));
        }
        self.config.scope_header = Some(name.to_ascii_lowercase());
        self
    }

    /// How often `complete` is tried when the store fails after the handler
    /// ran (default 4), and the first backoff (default 50 ms, doubling).
    pub fn complete_retries(mut self, attempts: u32, first_backoff: Duration) -> Self {
        self.config.complete_attempts = attempts;
        self.config.complete_backoff = first_backoff;
        self
    }

    /// Instead of answering 409 at once, a duplicate of a request still in
    /// flight waits up to `bound` for it: it gets the stored response when the
    /// first completes, runs the handler itself when the first released its
    /// claim (a 5xx), and 409 when the bound passes. Default: zero (409 at
    /// once, as Stripe and the IETF draft do). Keep it short: a waiting
    /// request holds a connection. A store that notifies
    /// ([`Store::watch`](crate::store::Store::watch): memory, Redis,
    /// PostgreSQL) wakes the waiter when the first completes or is released;
    /// it claims again every 250 ms in case a notification was lost. Other
    /// stores are polled every 25 ms.
    pub fn wait_for_in_flight(mut self, bound: Duration) -> Self {
        self.config.wait_for_in_flight = bound;
        self
    }

    /// The `Retry-After` of a 409 for a request still in flight (default
    /// 1 s, whole seconds, rounded up): most handlers finish well within it,
    /// and a client told the whole remaining lease would wait 30 s for a
    /// response that was ready after 5 ms. It is never more than the lease,
    /// nor than what is left of the first request's lease.
    pub fn in_flight_retry_after(mut self, hint: Duration) -> Self {
        self.config.in_flight_retry_after = hint;
        self
    }

    /// In transactional mode, how long a handler may hold its transaction
    /// (default: the lease). Past it, the handler is cancelled, its effect
    /// and the record are rolled back, and the client gets 503: a retry runs
    /// it again. Every covered request in flight holds one pool connection
    /// for this long at most.
    pub fn transaction_timeout(mut self, bound: Duration) -> Self {
        self.config.transaction_timeout = Some(bound);
        self
    }

    /// Encrypts the stored responses at rest with `keys` (AES-256-GCM, the
    /// record id as associated data, the current key for new records):
    /// the engine wraps its store in [`Encrypted`](crate::Encrypted), in
    /// both modes and over any store. A record that does not decrypt (its
    /// key was removed, it was changed or moved) is answered 503
    /// (fail-closed) or runs the handler unprotected (fail-open), never
    /// replayed. See [`EncryptionKeys`](crate::EncryptionKeys) for what it
    /// protects, the key file and rotation. Default: off.
    ///
    /// ```
    /// # fn demo(path: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// use idempotency_core::{EncryptionKeys, IdempotencyConfig};
    ///
    /// let config = IdempotencyConfig::builder()
    ///     .encryption(EncryptionKeys::from_key_file(path)?)
    ///     .build()?;
    /// # let _ = config; Ok(()) }
    /// ```
    pub fn encryption(mut self, keys: crate::EncryptionKeys) -> Self {
        self.config.encryption = Some(keys);
        self
    }

    /// Checks and returns the config.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first setting that is out of range.
    pub fn build(self) -> Result<IdempotencyConfig, ConfigError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut c = self.config;
        c.never_replayed_lengths = lengths(&c.never_replayed);
        if c.methods.is_empty() {
            return Err(ConfigError::NoMethods);
        }
        if c.transaction_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::ZeroDuration("transaction_timeout"));
        }
        if c.ttl.is_zero() {
            return Err(ConfigError::ZeroDuration("ttl"));
        }
        if c.lease < MIN_LEASE {
            return Err(ConfigError::TooShort {
                setting: "lease",
                min: MIN_LEASE,
                got: c.lease,
            });
        }
        if c.store_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("store_timeout"));
        }
        if c.request_body_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("request_body_timeout"));
        }
        if c.max_request_body == 0 {
            return Err(ConfigError::ZeroLimit("max_request_body"));
        }
        if c.complete_attempts == 0 {
            return Err(ConfigError::ZeroLimit("complete attempts"));
        }
        Ok(c)
    }
}

fn length_bit(name: &str) -> u64 {
    1 << if name.len() < 64 { name.len() } else { 0 }
}

fn lengths(names: &[impl AsRef<str>]) -> u64 {
    names
        .iter()
        .fold(0, |bits, n| bits | length_bit(n.as_ref()))
}

fn valid_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No method is covered.
    #[error("at least one method must be covered")]
    NoMethods,
    /// A method name is not a valid HTTP method token.
    #[error("{0:?} is not an HTTP method")]
    InvalidMethod(String),
    /// A header name is not a valid HTTP header name.
    #[error("{0:?} is not a valid header name")]
    InvalidHeaderName(String),
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A size or count that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroLimit(&'static str),
    /// A duration is shorter than its minimum.
    #[error("{setting} must be at least {min:?}, got {got:?}")]
    TooShort {
        /// The setting.
        setting: &'static str,
        /// Its minimum.
        min: Duration,
        /// What it was set to.
        got: Duration,
    },
}

/// The shortest lease: half of it is the heartbeat's period.
const MIN_LEASE: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_lease_is_told_its_minimum() {
        let err = IdempotencyConfig::builder()
            .lease(Duration::from_millis(5))
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "lease must be at least 10ms, got 5ms");
        let err = IdempotencyConfig::builder()
            .transaction_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "transaction_timeout must be greater than zero"
        );
    }

    #[test]
    fn defaults_match_the_design() {
        let c = IdempotencyConfig::builder().build().unwrap();
        assert!(c.covers("POST") && c.covers("PATCH") && !c.covers("GET") && !c.covers("PUT"));
        assert!(c.require_key);
        assert_eq!(c.ttl(), Duration::from_secs(86_400));
        assert_eq!(c.lease(), Duration::from_secs(30));
        assert_eq!(c.max_request_body(), 1 << 20);
        assert_eq!(c.request_body_timeout(), Duration::from_secs(30));
        assert_eq!(c.max_stored_response(), 1 << 20);
        assert_eq!(c.failure_mode(), FailureMode::Closed);
        assert_eq!(c.store_timeout(), Duration::from_secs(2));
        for s in [200, 201, 204, 301, 304, 400, 404, 410, 422] {
            assert!(c.stores_status(s), "{s}");
        }
        for s in [408, 409, 425, 429, 500, 502, 503] {
            assert!(!c.stores_status(s), "{s}");
        }
        for h in [
            "set-cookie",
            "date",
            "www-authenticate",
            "connection",
            "transfer-encoding",
            "content-length",
        ] {
            assert!(!c.replays_header(h), "{h}");
        }
        assert!(c.replays_header("link") && c.replays_header("location"));
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        assert_eq!(
            IdempotencyConfig::builder()
                .ttl(Duration::ZERO)
                .build()
                .unwrap_err(),
            ConfigError::ZeroDuration("ttl")
        );
        assert!(matches!(
            IdempotencyConfig::builder().methods(["PO ST"]).build(),
            Err(ConfigError::InvalidMethod(_))
        ));
        assert_eq!(
            IdempotencyConfig::builder()
                .methods(Vec::<String>::new())
                .build()
                .unwrap_err(),
            ConfigError::NoMethods
        );
        assert!(matches!(
            IdempotencyConfig::builder()
                .never_replay_header("bad header")
                .build(),
            Err(ConfigError::InvalidHeaderName(_))
        ));
        assert_eq!(
            IdempotencyConfig::builder()
                .max_request_body(0)
                .build()
                .unwrap_err(),
            ConfigError::ZeroLimit("max_request_body")
        );
    }
}
