//! One HTTP behaviour suite for every adapter.
//!
//! The suite is written once against the [`Adapter`] trait: an adapter builds
//! an in-process app that serves one framework-neutral [`Backend`] behind its
//! middleware, and sends [`SuiteRequest`]s to it. `tests/tower.rs` and
//! `tests/actix.rs` run every case with [`adapter_suite!`]; `tests/parity.rs`
//! checks that both adapters give the same statuses, headers and bodies.
#![forbid(unsafe_code)]
#![allow(missing_docs)]

pub mod actix_adapter;
/// The workspace README's Rust snippets (axum and actix quick starts)
/// compile as doctests here, where both frameworks are dependencies.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme_doctests {}

pub mod cases;
pub mod tower_adapter;

use bytes::Bytes;
use idempotency_core::conformance::{Hook, Hooked, Op};
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// A request, framework-neutral.
#[derive(Debug, Clone)]
pub struct SuiteRequest {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    /// After `body`, the body never ends (a client that stops sending).
    pub stall: bool,
}

impl SuiteRequest {
    pub fn new(method: &str, uri: &str) -> Self {
        Self {
            method: method.to_owned(),
            uri: uri.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            stall: false,
        }
    }

    /// A POST of a JSON body with `Idempotency-Key: key`.
    pub fn post(uri: &str, key: &str, json: &str) -> Self {
        Self::new("POST", uri)
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Bytes::copy_from_slice(json.as_bytes()))
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    #[must_use]
    pub fn without_header(mut self, name: &str) -> Self {
        self.headers.retain(|(n, _)| n != name);
        self
    }

    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The body sends its bytes, then nothing more, and never ends.
    #[must_use]
    pub fn stalled(mut self) -> Self {
        self.stall = true;
        self
    }
}

/// A response, framework-neutral. Header names are lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl SuiteResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .collect()
    }

    pub fn is_replay(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    /// The headers that the suite compares across adapters (framework
    /// defaults such as `date` or `server` left out).
    pub fn compared_headers(&self) -> Vec<(String, Vec<u8>)> {
        const COMPARED: &[&str] = &[
            "content-type",
            "content-length",
            "location",
            "link",
            "set-cookie",
            "x-execution",
            "idempotent-replayed",
            "retry-after",
        ];
        self.headers
            .iter()
            .filter(|(n, _)| COMPARED.contains(&n.as_str()))
            .cloned()
            .collect()
    }
}

/// An adapter under test: an in-process app serving `backend` behind the
/// adapter's middleware driven by `engine`.
pub trait Adapter: Sized {
    /// Builds the app. The scope is the `authorization` header (from the config).
    fn build(engine: Idempotency, backend: Arc<Backend>) -> impl Future<Output = Self>;
    /// Sends one request in process, as a server does: a panic in the app
    /// is caught where the framework's future is polled, and that future is
    /// dropped afterwards, not while the panic unwinds (as hyper's connection
    /// task, actix's dispatcher task or a catch-panic layer do). `None`: the
    /// app panicked.
    fn try_send(&self, req: SuiteRequest) -> impl Future<Output = Option<SuiteResponse>>;

    /// Sends one request in process; fails the case if the app panicked.
    fn send(&self, req: SuiteRequest) -> impl Future<Output = SuiteResponse> {
        async move {
            self.try_send(req)
                .await
                .expect("the app panicked while serving the request")
        }
    }
}

/// The application behind the middleware, the same for every framework.
///
/// Routes (any method):
/// - `/payments`: counts an execution, answers 201 with `Location`, two
///   `Set-Cookie`, two `Link`, `Date`, `X-Execution` and a JSON body;
/// - `/slow`: like `/payments`, but first signals [`Backend::started`] and
///   waits for [`Backend::open_gate`];
/// - `/status/NNN`: answers status NNN (counted);
/// - `/flaky`: 500 the first time, then like `/payments`;
/// - `/panic`: panics the first time (counted), then like `/payments`;
/// - `/big/N`: answers N bytes;
/// - anything else: 200 `passed through`.
#[derive(Debug)]
pub struct Backend {
    executions: AtomicUsize,
    per_path: Mutex<HashMap<String, usize>>,
    started: Notify,
    started_count: AtomicUsize,
    finished: Notify,
    finished_count: AtomicUsize,
    gate: Semaphore,
}

impl Backend {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            executions: AtomicUsize::new(0),
            per_path: Mutex::default(),
            started: Notify::new(),
            started_count: AtomicUsize::new(0),
            finished: Notify::new(),
            finished_count: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        })
    }

    /// Executions of counted routes, in total.
    pub fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    /// Executions of one path.
    pub fn executions_of(&self, path: &str) -> usize {
        self.per_path
            .lock()
            .map(|m| m.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits until `n` slow handlers have started.
    pub async fn started(&self, n: usize) {
        loop {
            let notified = self.started.notified();
            if self.started_count.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Waits until `n` slow handlers have finished.
    pub async fn finished(&self, n: usize) {
        loop {
            let notified = self.finished.notified();
            if self.finished_count.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Lets waiting slow handlers go on.
    pub fn open_gate(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn count(&self, path: &str) -> usize {
        if let Ok(mut m) = self.per_path.lock() {
            *m.entry(path.to_owned()).or_default() += 1;
        }
        self.executions.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Serves one request.
    pub async fn handle(&self, req: SuiteRequest) -> SuiteResponse {
        let path = req.uri.split('?').next().unwrap_or("").to_owned();
        if req.method == "GET" || req.method == "HEAD" {
            return text(200, "passed through");
        }
        if path == "/slow" {
            self.started_count.fetch_add(1, Ordering::SeqCst);
            self.started.notify_waiters();
            if let Ok(p) = self.gate.acquire().await {
                p.forget();
            }
            let res = self.created(&path, &req);
            self.finished_count.fetch_add(1, Ordering::SeqCst);
            self.finished.notify_waiters();
            return res;
        }
        if let Some(code) = path.strip_prefix("/status/") {
            self.count(&path);
            let status = code.parse().unwrap_or(500);
            return text(status, &format!("status {status}"));
        }
        if let Some(n) = path.strip_prefix("/big/") {
            self.count(&path);
            let n: usize = n.parse().unwrap_or(0);
            return SuiteResponse {
                status: 200,
                headers: vec![("content-type".into(), b"application/octet-stream".to_vec())],
                body: Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
            };
        }
        if path == "/panic" && self.executions_of(&path) == 0 {
            self.count(&path);
            panic!("the suite's /panic handler panics on its first run");
        }
        if path == "/flaky" && self.executions_of(&path) == 0 {
            self.count(&path);
            return text(500, "try again");
        }
        // Let concurrent duplicates interleave with this handler.
        tokio::task::yield_now().await;
        self.created(&path, &req)
    }

    fn created(&self, path: &str, req: &SuiteRequest) -> SuiteResponse {
        let n = self.count(path);
        SuiteResponse {
            status: 201,
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("location".into(), format!("/payments/{n}").into_bytes()),
                ("set-cookie".into(), b"session=a; HttpOnly".to_vec()),
                ("set-cookie".into(), b"tracking=b".to_vec()),
                ("link".into(), b"</payments?page=1>; rel=\"first\"".to_vec()),
                ("link".into(), b"</payments?page=2>; rel=\"next\"".to_vec()),
                ("date".into(), b"Thu, 26 Nov 2026 12:00:00 GMT".to_vec()),
                ("x-execution".into(), n.to_string().into_bytes()),
            ],
            body: Bytes::from(format!(
                "{{\"id\":\"pay_{n}\",\"path\":\"{path}\",\"request_bytes\":{}}}",
                req.body.len()
            )),
        }
    }
}

fn text(status: u16, body: &str) -> SuiteResponse {
    SuiteResponse {
        status,
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        body: Bytes::from(body.to_owned()),
    }
}

thread_local! {
    static PANICS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many panics this thread has seen since the suite's panic hook was
/// installed (by the first call). A case's runtime, and every task it
/// spawns, runs on the case's one thread, so a case counts its own panics.
/// The hook then calls the previous one, so panics still print.
pub fn panics_on_this_thread() -> usize {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|n| n.set(n.get() + 1));
            previous(info);
        }));
    });
    PANICS.with(std::cell::Cell::get)
}

/// The config every case starts from: the defaults, scoped by `authorization`.
pub fn config() -> idempotency_core::IdempotencyConfigBuilder {
    IdempotencyConfig::builder().scope_header("authorization")
}

/// A store whose every call fails (as a refused connection), for outage
/// cases.
pub fn failing_store() -> Hooked<MemoryStore> {
    Hooked::with_hook(MemoryStore::new(), |_| {
        Hook::fail("failing", "connection refused (simulated outage)")
    })
    .named("failing")
}

/// The memory store with every claim answered after `delay`, as a remote
/// store on a slow network: for a client that goes away while its claim is
/// on the wire.
pub fn slow_claim_store(delay: Duration) -> Hooked<MemoryStore> {
    Hooked::with_hook(MemoryStore::new(), move |op| match op {
        Op::Claim => Hook::Delay(delay),
        _ => Hook::Forward,
    })
    .named("slow-claim")
}

/// A store that never answers, for timeout cases. Its futures claim a
/// bound of their own far longer than any case's `store_timeout`, so the
/// engine must still arm its own timer (and the cases that use this store
/// would hang if it did not).
pub fn hanging_store() -> Hooked<MemoryStore> {
    Hooked::with_hook(MemoryStore::new(), |_| Hook::Hang).named("hanging")
}

/// Generates one `#[test]` per case for an adapter. `$rt` is the test
/// attribute that runs a current-thread runtime with tokio's test-util
/// (`tokio::test` for tower, `actix_web::test` for actix).
#[macro_export]
macro_rules! adapter_suite {
    ($adapter:ty, #[$rt:meta]) => {
        $crate::adapter_suite!(@cases $adapter, #[$rt],
            not_covered_methods_pass_through,
            missing_key_is_400,
            invalid_keys_are_400,
            quoted_and_bare_keys_are_the_same_key,
            body_over_limit_is_413,
            first_request_runs_once_and_retry_replays,
            replay_drops_cookies_and_keeps_repeated_headers_in_order,
            different_request_same_key_is_422,
            in_flight_duplicate_is_409_with_retry_after,
            in_flight_duplicate_can_wait_for_the_first,
            waiting_for_the_first_is_bounded,
            sixty_four_concurrent_duplicates_run_once,
            server_errors_and_transient_4xx_release_the_claim,
            a_handler_that_panics_releases_the_claim,
            client_errors_are_stored_and_replayed,
            response_over_storable_limit_reaches_client_and_is_never_rerun,
            client_disconnect_still_completes,
            client_disconnect_during_the_claim_still_completes,
            lease_takeover_after_a_crash,
            records_expire_after_ttl,
            scopes_never_meet,
            slow_handler_keeps_its_claim,
            store_outage_fails_closed,
            store_timeout_fails_closed,
            store_outage_fail_open_runs_handler,
            full_memory_store_is_503,
            a_body_that_never_ends_is_408,
            a_repeated_scope_header_is_400,
        );
    };
    (@cases $adapter:ty, #[$rt:meta], $($case:ident),* $(,)?) => {
        $(
            #[$rt]
            async fn $case() {
                // A broken build fails instead of hanging (under paused time
                // this fires as soon as everything is stuck).
                let limit = ::std::time::Duration::from_secs(30);
                if ::tokio::time::timeout(limit, $crate::cases::$case::<$adapter>()).await.is_err() {
                    panic!("{} did not finish within {limit:?}", stringify!($case));
                }
            }
        )*
    };
}
