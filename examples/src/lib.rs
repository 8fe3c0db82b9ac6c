//! What the example binaries share: the command line, the payment ledger, and
//! store selection. The framework-specific code lives in each binary.
#![forbid(unsafe_code)]

pub mod order_messaging;
mod payments;
pub mod payments_client;

pub use payments::{
    database_problem, new_payment, payment_event, payment_not_found, record_payment, Answer,
    Ledger, NewPayment, Payment, PaymentView, Payments, PaymentsDatabase, PaymentsTable, Refund,
    Refunded, ALREADY_REFUNDED, DECLINED,
};

use std::net::SocketAddr;
use std::time::Duration;

use idempotency_core::{Idempotency, IdempotencyConfig};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The payments API's command line (DESIGN section 7).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    about = "A payments API whose POST /payments is safe under retries",
    after_help = "Routes: POST /payments (Idempotency-Key required; JSON amount, currency and \
                  an optional reference), POST /payments/<id>/refunds (Idempotency-Key \
                  required; 409 when refunded already), GET /payments, GET /payments/<id> \
                  (with \"refunded\"), GET /healthz, and GET /metrics: Prometheus text of \
                  idempotency_requests_total{outcome} and the store metrics (outside the \
                  idempotency layer).\n\
                  Slow clients: request headers must arrive within 5 s (axum closes the \
                  connection, actix answers 408), a request body within 30 s (408)."
)]
pub struct PaymentsArgs {
    /// Where to serve: HOST:PORT, a host name (resolved; every address it
    /// resolves to is served) or an IP address (`[::1]:3000` for IPv6).
    #[arg(long, default_value = "127.0.0.1:3000", value_parser = parse_listen)]
    pub listen: String,
    /// The idempotency store: memory, sqlite://PATH, redis://..., postgres://...
    #[arg(long, default_value = "memory")]
    pub store: String,
    /// How long completed records replay (2s, 500ms, 24h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How long an in-flight claim holds without a heartbeat.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// The payment handler sleeps this long (to show in-flight conflicts).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub handler_delay: Duration,
    /// Decline (402 problem+json, stored like any 4xx) every payment whose
    /// amount is above this.
    #[arg(long, value_name = "AMOUNT")]
    pub decline_above: Option<i64>,
    /// Serve the same routes without the middleware (a baseline for load tests).
    #[arg(long)]
    pub no_idempotency: bool,
    /// Insert each payment as a row of table `payments` in the request's own
    /// transaction, committed with its idempotency record (needs a
    /// postgres:// or sqlite:// store).
    #[arg(long, conflicts_with = "no_idempotency")]
    pub transactional: bool,
    /// With --transactional: also enqueue one event per payment (destination
    /// `payments`, JSON `{"account": <payment id>, "amount": <amount>,
    /// "currency": <currency>, "reference": <reference or null>}`) to the
    /// transactional outbox, in the same transaction; run outbox-relay to
    /// publish it.
    #[arg(long)]
    pub outbox: bool,
    /// A duplicate waits up to this long for the first request and gets its
    /// response instead of 409 (off by default).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub wait_for_in_flight: Option<Duration>,
    /// The connection pool's size of a postgres:// or sqlite:// store
    /// (default: 10 for PostgreSQL, 4 for SQLite). With --transactional
    /// each covered request in flight holds one connection for its whole
    /// handler; a pool that cannot lend one within 1 s answers 503 and logs
    /// "pool exhausted (N connections)". Ignored by the other stores.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_size: Option<u32>,
    /// Encrypt stored responses at rest (AES-256-GCM) with the keys of this
    /// file: one `ID:BASE64-OF-32-BYTES` a line, the last one current (new
    /// records), the others still decrypting older ones; `#` comments and
    /// blank lines allowed. A record no configured key opens answers 503.
    #[arg(long, value_name = "PATH")]
    pub encryption_key_file: Option<std::path::PathBuf>,
}

/// `--listen`: `HOST:PORT` with a host name or an IP address (IPv6 in
/// brackets), resolved when the server starts.
fn parse_listen(value: &str) -> Result<String, String> {
    if value.parse::<SocketAddr>().is_ok() {
        return Ok(value.to_owned());
    }
    let usage = || {
        format!(
            "expected HOST:PORT (e.g. 127.0.0.1:3000, localhost:3000, [::1]:3000), got {value:?}"
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(usage)?;
    let name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if host.is_empty() || !host.chars().all(name) || port.parse::<u16>().is_err() {
        return Err(usage());
    }
    Ok(value.to_owned())
}

/// The addresses `--listen` names: its IP address, or every address its
/// host name resolves to.
pub async fn resolve_listen(listen: &str) -> Result<Vec<SocketAddr>, StartError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .context(format!("could not resolve {listen} (--listen)"))?
        .collect();
    if addrs.is_empty() {
        return Err(usage_error(format!(
            "{listen} (--listen) resolves to no address"
        )));
    }
    Ok(addrs)
}

/// How long a client may take to send a request's headers, and an idle
/// keep-alive connection's life: [`serve_axum`]'s bound, and actix's
/// (`payments-actix` answers 408 first).
pub use http_serve::HEADER_READ_TIMEOUT;

/// How long a request body may take to arrive: the engine's bound for
/// covered requests (`IdempotencyConfig::request_body_timeout`), and the
/// handler's own for `POST /payments` with `--no-idempotency`.
pub const BODY_READ_TIMEOUT: Duration = idempotency_core::DEFAULT_REQUEST_BODY_TIMEOUT;

/// The axum servers' serving loop (header read timeout, drain) and their
/// shutdown signal: one crate for every server of the workspace.
pub use http_serve::{serve_axum, shutdown_signal, DRAIN};

/// Runs each request in the span `request` (its method and path), the root
/// of the request's trace: with the `trace` feature (outbox's), a payment's
/// event is enqueued in it and carries its `traceparent` to the ledger.
/// payments-axum's outermost layer (`axum::middleware::from_fn`).
pub async fn in_request_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path()
    );
    next.run(request).instrument(span).await
}

/// The body of the 408 `application/problem+json` response when a request
/// body did not arrive within [`BODY_READ_TIMEOUT`] (`--no-idempotency`;
/// covered requests get the engine's 408).
pub fn body_timeout_problem() -> String {
    serde_json::json!({
        "type": "urn:payments:problem:request-timeout",
        "title": "Request body was not received in time",
        "status": 408,
        "detail": format!(
            "The request body did not arrive within {} s. Nothing was done.",
            BODY_READ_TIMEOUT.as_secs()
        ),
    })
    .to_string()
}

/// Why the example could not start (or stopped): any error, its causes
/// chained by `source()`. [`finish`] prints the whole chain.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// An error with a sentence saying what was being done when it happened.
#[derive(Debug)]
struct Context {
    what: String,
    source: StartError,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Adds what was being done to an error, e.g.
/// `bind(addr).await.context(format!("could not listen on {addr}"))?`.
pub trait ResultExt<T> {
    /// The error, as the cause of `what`.
    fn context(self, what: impl Into<String>) -> Result<T, StartError>;
}

impl<T, E: Into<StartError>> ResultExt<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, StartError> {
        self.map_err(|e| {
            Box::new(Context {
                what: what.into(),
                source: e.into(),
            }) as StartError
        })
    }
}

/// The end of every binary's `main`: nothing on success; else one line on
/// stderr, `BINARY: what failed: its cause: ...` (the whole `source()`
/// chain, never `Debug`), and exit code 2 when the flags or the
/// configuration are wrong, 1 when something failed at run time.
///
/// ```no_run
/// # async fn run() -> Result<(), examples::StartError> { Ok(()) }
/// # async fn main_() -> std::process::ExitCode {
/// // in a binary: `env!("CARGO_BIN_NAME")`
/// examples::finish("payments-axum", run().await)
/// # }
/// ```
pub fn finish(binary: &str, result: Result<(), StartError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {}", error_chain(&*e));
            std::process::ExitCode::from(if is_usage_error(&*e) { 2 } else { 1 })
        }
    }
}

/// The error and its causes, joined by `: `. A cause whose text its parent
/// already quotes is left out.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

/// Flags that cannot work together, in a sentence.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Flags that cannot work together: [`finish`] prints `what` and exits 2.
pub fn usage_error(what: impl Into<String>) -> StartError {
    Box::new(UsageError(what.into()))
}

/// Whether the chain says the flags or the configuration are wrong (so
/// retrying the same command cannot help).
fn is_usage_error(error: &(dyn std::error::Error + 'static)) -> bool {
    use idempotency_connect::ConnectError;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<idempotency_core::ConfigError>()
            || e.is::<inbox_consumer::ConfigError>()
            || e.is::<UsageError>()
        {
            return true;
        }
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return !matches!(c, ConnectError::Store { .. });
        }
        cause = e.source();
    }
    false
}

impl PaymentsArgs {
    /// The engine for these flags, connected to its store (`None` with
    /// `--no-idempotency`), and where the payments live: this process's
    /// ledger, or with `--transactional` table `payments` of the store's
    /// database, created when missing. The scope is the `Authorization`
    /// header's value.
    pub async fn open(&self) -> Result<(Option<Idempotency>, Payments), StartError> {
        let memory = || Payments {
            decline_above: self.decline_above,
            delay: self.handler_delay,
            ..Payments::in_memory()
        };
        if self.outbox && !self.transactional {
            return Err(Box::new(UsageError(
                "--outbox needs --transactional: the event is enqueued in the transaction that \
                 inserts the payment (with a postgres:// or sqlite:// store)"
                    .into(),
            )));
        }
        if self.no_idempotency {
            return Ok((None, memory()));
        }
        let mut config = IdempotencyConfig::builder()
            .ttl(self.ttl)
            .lease(self.lease)
            .scope_header("authorization");
        if let Some(bound) = self.wait_for_in_flight {
            config = config.wait_for_in_flight(bound);
        }
        if let Some(path) = &self.encryption_key_file {
            let keys = idempotency_core::EncryptionKeys::from_key_file(path).map_err(|e| {
                usage_error(format!("--encryption-key-file {}: {e}", path.display()))
            })?;
            config = config.encryption(keys);
        }
        let config = config
            .build()
            .context("the idempotency settings are invalid")?;
        if !self.transactional {
            let store = connect_store_sized(&self.store, self.pool_size).await?;
            return Ok((Some(Idempotency::from_arc(store, config)), memory()));
        }
        let (engine, table) = PaymentsTable::open(&self.store, config, self.pool_size).await?;
        if self.outbox {
            table.migrate_outbox().await?;
        }
        let payments = Payments {
            table: Some(table),
            outbox: self.outbox,
            ..memory()
        };
        Ok((Some(engine), payments))
    }
}

/// Connects the store named by `url`: `memory`, `sqlite://PATH`,
/// `redis://...` or `postgres://...` (migrations run on connect).
pub async fn connect_store(
    url: &str,
) -> Result<std::sync::Arc<dyn idempotency_core::Store>, StartError> {
    Ok(idempotency_connect::connect(url).await?)
}

/// [`connect_store`], with a pool of `pool_size` connections for a
/// `postgres://` or `sqlite://` store (`--pool-size`; ignored, with a
/// warning, by the others).
pub async fn connect_store_sized(
    url: &str,
    pool_size: Option<u32>,
) -> Result<std::sync::Arc<dyn idempotency_core::Store>, StartError> {
    use idempotency_connect::stores::{PostgresStore, SqliteStore};
    use idempotency_connect::ConnectError;
    let Some(size) = pool_size else {
        return connect_store(url).await;
    };
    let failed = |backend| move |source| ConnectError::Store { backend, source };
    match store_scheme(url) {
        "postgres" | "postgresql" => {
            let options = postgres_options(pool_size);
            let store = PostgresStore::connect_with(url.trim(), options)
                .await
                .map_err(failed("postgres"))?;
            Ok(std::sync::Arc::new(store))
        }
        "sqlite" => {
            // Refuses a URL without a file, or of an in-memory database.
            drop(connect_store(url).await?);
            let store = SqliteStore::connect_with(url.trim(), sqlite_options(pool_size))
                .await
                .map_err(failed("sqlite"))?;
            Ok(std::sync::Arc::new(store))
        }
        scheme => {
            tracing::warn!(
                pool_size = size,
                store = scheme,
                "--pool-size applies to postgres:// and sqlite:// stores only; ignored"
            );
            connect_store(url).await
        }
    }
}

/// The scheme of a store URL (`memory` has none).
fn store_scheme(url: &str) -> &str {
    let url = url.trim();
    url.split_once(':').map_or(url, |(s, _)| s)
}

fn postgres_options(pool_size: Option<u32>) -> idempotency_connect::stores::PostgresOptions {
    let options = idempotency_connect::stores::PostgresOptions::new();
    match pool_size {
        Some(n) => options.max_connections(n),
        None => options,
    }
}

fn sqlite_options(pool_size: Option<u32>) -> idempotency_connect::stores::SqliteOptions {
    let options = idempotency_connect::stores::SqliteOptions::new();
    match pool_size {
        Some(n) => options.max_connections(n),
        None => options,
    }
}

/// The content type of `GET /metrics`: Prometheus text.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The buckets of `idempotency_store_duration_seconds`, from a memory-fast
/// call to the default store timeout (2 s).
const STORE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

/// Installs the process's Prometheus recorder (before the engine, so that
/// its store series exist from the start) and registers every request
/// outcome at 0, so that a scrape right after startup lists all of them.
/// Serve [`PrometheusHandle::render`] on `GET /metrics`, outside the
/// idempotency layer. A thread drains the histograms every 5 s between
/// scrapes (the exporter's upkeep).
pub fn install_metrics() -> Result<PrometheusHandle, StartError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(idempotency_core::metrics::STORE_DURATION_SECONDS.to_owned()),
            &STORE_BUCKETS,
        )
        .context("the metrics settings are invalid")?
        .install_recorder()
        .context("could not install the metrics recorder")?;
    idempotency_core::metrics::describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .context("could not start the metrics upkeep thread")?;
    Ok(handle)
}

/// Logs to stderr; `RUST_LOG` filters (else `default_filter`, e.g. `info`).
/// Coloured only when stderr is a terminal and `NO_COLOR` is unset, so logs
/// redirected to a file or a pipe carry no escape codes. lapin's report of
/// each returned message is always left out: it carries the payload.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
        // Added last, so it wins over `RUST_LOG`: a payload may hold personal
        // data, and the publisher already reports the return without it.
        .add_directive(
            "lapin::returned_messages=off"
                .parse()
                .expect("a valid directive"),
        );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Whether to colour what goes to `stream`: a terminal, and no `NO_COLOR`
/// (<https://no-color.org>).
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// How long the messaging binaries wait for a broker or a database to
/// answer a connect (TCP, TLS, the protocol's handshake) before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// SIGTERM or Ctrl-C, watched from the start of `run` so that no signal is
/// lost during startup: every stage of startup runs [`during`](Self::during)
/// it, and the long-running loop gets [`requested`](Self::requested) as its
/// shutdown future.
#[derive(Debug, Clone)]
pub struct Shutdown {
    requested: tokio::sync::watch::Receiver<bool>,
}

impl Shutdown {
    /// Installs the handlers (in a task of their own).
    pub fn install() -> Result<Self, StartError> {
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("could not install the SIGTERM handler")?;
        let (tx, requested) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            #[cfg(unix)]
            let term = term.recv();
            #[cfg(not(unix))]
            let term = std::future::pending::<Option<()>>();
            let which = tokio::select! {
                _ = term => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
            };
            tracing::info!("{which}: shutting down");
            let _ = tx.send(true);
            // Keep the sender, so that receivers never see it dropped.
            std::future::pending::<()>().await;
        });
        Ok(Self { requested })
    }

    /// Resolves once a signal has arrived (at once if one already has).
    pub fn requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut requested = self.requested.clone();
        async move {
            if requested.wait_for(|r| *r).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs a stage of startup unless a signal comes first: `None` then, and
    /// the caller returns `Ok(())` (a clean shutdown exits 0).
    pub async fn during<T>(&self, stage: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.requested() => None,
            value = stage => Some(value),
        }
    }
}

/// A timeout as an error naming what did not answer (and its URL, password
/// redacted).
#[derive(Debug)]
struct NoAnswer(String);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoAnswer {}

/// A URL as it may appear in an error or a log line: without its password,
/// and for NATS without a bare token (`nats://TOKEN@host`).
pub fn redact_url(url: &str) -> String {
    let shown = idempotency_core::redact(url);
    match shown.split_once("://") {
        Some((scheme, rest)) if matches!(scheme, "nats" | "tls" | "ws" | "wss") => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if !userinfo.contains(':') => {
                    format!("{scheme}://***@{host}{path}")
                }
                _ => shown,
            }
        }
        _ => shown,
    }
}

/// Runs the `CREATE ... IF NOT EXISTS` statements of an example's own
/// tables in one transaction, under an advisory lock that every example
/// takes for its tables: two processes starting at once on a fresh database
/// would otherwise race, and PostgreSQL answers one of them with a unique
/// violation on its catalog (`pg_type_typname_nsp_index`). `what` names the
/// tables in the error (`"the ledger_entries table"`).
pub async fn create_tables(
    pool: &sqlx::PgPool,
    statements: &[&str],
    what: &str,
) -> Result<(), StartError> {
    let what = format!("could not create {what}");
    let mut tx = pool.begin().await.context(what.as_str())?;
    sqlx::query("SELECT pg_advisory_xact_lock(7355608112234)")
        .execute(&mut *tx)
        .await
        .context(what.as_str())?;
    for statement in statements {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .context(what.as_str())?;
    }
    tx.commit().await.context(what)
}

/// A PostgreSQL pool of `max_connections` on `url`, for the flag `what`
/// names (`"the ledger database (PostgreSQL, --database)"`). One connection is opened
/// first, bounded by [`CONNECT_TIMEOUT`], so that a refusal is reported
/// with its cause (the pool would retry it until its own timeout and report
/// only that); the pool's acquisitions are bounded by it too.
pub async fn connect_postgres(
    url: &str,
    what: &str,
    max_connections: u32,
) -> Result<sqlx::PgPool, StartError> {
    use sqlx::Connection as _;
    let shown = redact_url(url);
    let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|e| {
        usage_error(format!(
            "{what}: {shown} is not a PostgreSQL URL: {}",
            error_chain(&e)
        ))
    })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&options)).await {
        Ok(Ok(probe)) => {
            let _ = probe.close().await;
        }
        Ok(Err(e)) => return Err(e).context(format!("could not connect to {what} at {shown}")),
        Err(_) => {
            return Err(Box::new(NoAnswer(format!(
                "{what} at {shown} did not answer within {CONNECT_TIMEOUT:?}"
            ))))
        }
    }
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .context(format!("could not connect to {what} at {shown}"))
}

/// A NATS client of `url` (`nats://`, or `tls://` for TLS), the connect
/// bounded by [`CONNECT_TIMEOUT`]; async-nats reconnects by itself after.
pub async fn connect_nats(url: &str) -> Result<async_nats::Client, StartError> {
    let shown = redact_url(url);
    let connecting = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(url);
    // async-nats bounds each attempt; this bounds them all.
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::TimedOut => {
            Err(Box::new(NoAnswer(format!(
                "NATS at {shown} (--nats) did not answer within {CONNECT_TIMEOUT:?}"
            ))))
        }
        Ok(Err(e)) => Err(e).context(format!("could not connect to NATS at {shown} (--nats)")),
        Err(_) => Err(Box::new(NoAnswer(format!(
            "NATS at {shown} (--nats) did not answer within {:?}",
            CONNECT_TIMEOUT * 2
        )))),
    }
}

/// With `--metrics-listen ADDR`: installs the Prometheus recorder (call it
/// before creating the inbox or the relay, so that their series exist from
/// the start) and serves `GET /metrics` on `ADDR` (logs `serving metrics`
/// with the address). Nothing without the flag.
pub async fn serve_metrics(listen: Option<SocketAddr>) -> Result<(), StartError> {
    use axum::http::header;
    let Some(listen) = listen else {
        return Ok(());
    };
    let handle = install_metrics()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .context(format!("could not listen on {listen} (--metrics-listen)"))?;
    let local = listener
        .local_addr()
        .context("could not read the metrics address")?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = handle.render();
            async move { ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text) }
        }),
    );
    // With the servers' bounds (a scraper that never sends its headers
    // holds no connection), until the process ends.
    tokio::spawn(serve_axum(vec![listener], app, std::future::pending()));
    tracing::info!(listen = %local, "serving metrics on GET /metrics");
    Ok(())
}

/// What both inbox consumers share: the ledger table, its effect, and the
/// transactional inbox in front of it.
pub mod ledger {
    use std::time::Duration;

    use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage, PostgresInbox};
    use serde::Deserialize;
    use sqlx::{Postgres, Transaction};

    use super::{ResultExt, StartError};

    /// A ledger message: `{"account": "<string>", "amount": <integer>}`.
    #[derive(Debug, Deserialize)]
    pub struct LedgerMessage {
        /// The account.
        pub account: String,
        /// The amount in minor units.
        pub amount: i64,
    }

    /// Connects PostgreSQL, creates `ledger_entries` (no unique constraint of
    /// its own: the inbox alone prevents doubles) and the inbox of `consumer`,
    /// and purges processed inbox rows past the retention once an hour.
    pub async fn open(database: &str, consumer: &str) -> Result<PostgresInbox, StartError> {
        let config = InboxConfig::builder(consumer.to_owned())
            .build()
            .context("the inbox settings are invalid (--consumer)")?;
        open_with(database, config).await
    }

    /// [`open`] with the inbox's `config` (its consumer name, attempts and
    /// retry delays).
    pub async fn open_with(
        database: &str,
        config: InboxConfig,
    ) -> Result<PostgresInbox, StartError> {
        let what = "the ledger database (PostgreSQL, --database)";
        let pool = super::connect_postgres(database, what, 4).await?;
        super::create_tables(
            &pool,
            &["CREATE TABLE IF NOT EXISTS ledger_entries \
               (account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL)"],
            "the ledger_entries table",
        )
        .await?;
        let inbox = Inbox::postgres(pool, config)
            .await
            .context("could not set up the inbox")?;
        let purging = inbox.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                if let Err(e) = purging.purge().await {
                    tracing::warn!(error = %e, "purge failed");
                }
            }
        });
        Ok(inbox)
    }

    /// The effect of one message: one row in `ledger_entries`, written in the
    /// inbox's transaction, after sleeping `delay` (to widen crash windows).
    pub async fn record(
        tx: &mut Transaction<'static, Postgres>,
        message: &InboxMessage,
        delay: Duration,
    ) -> Result<(), HandlerError> {
        let entry: LedgerMessage =
            serde_json::from_slice(message.payload()).map_err(HandlerError::permanent)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        sqlx::query("INSERT INTO ledger_entries (account, amount, message_id) VALUES ($1, $2, $3)")
            .bind(entry.account)
            .bind(entry.amount)
            .bind(message.id())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The inbox's settings of the consumer binaries: `--consumer`,
    /// `--max-attempts`, and `--retry-delay` doubled after each further
    /// failure up to 60 s (or that delay when it is longer).
    pub fn config(
        consumer: &str,
        max_attempts: u32,
        retry_delay: Duration,
    ) -> Result<InboxConfig, StartError> {
        InboxConfig::builder(consumer.to_owned())
            .max_attempts(max_attempts)
            .retry_delay(retry_delay, retry_delay.max(Duration::from_secs(60)))
            .build()
            .map_err(|e| super::usage_error(format!("the inbox settings are invalid: {e}")))
    }

    /// Runs `consuming` (a subscription's run) and, beside it, the replays
    /// of dead messages an operator asked for (`messaging-admin inbox
    /// retry`), through the inbox with the same handler, looked for every
    /// `interval` until `shutdown`. Returns what `consuming` returns: once
    /// signalled, the delivery in hand is finished first.
    pub async fn consume_with_replays<T>(
        inbox: &PostgresInbox,
        consuming: impl std::future::Future<Output = T>,
        delay: Duration,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> T {
        let replays = inbox.run_replays(
            move |message| async move { process(inbox, &message, delay).await },
            interval,
            shutdown,
        );
        let (mut consuming, mut replays) = (std::pin::pin!(consuming), std::pin::pin!(replays));
        tokio::select! {
            consumed = &mut consuming => consumed,
            () = &mut replays => consuming.await,
        }
    }

    /// Processes one message through the inbox; settle (ack) only after this.
    pub async fn process(
        inbox: &PostgresInbox,
        message: &InboxMessage,
        delay: Duration,
    ) -> inbox_consumer::Outcome {
        inbox
            .process(message, move |tx, message| {
                Box::pin(record(tx, message, delay))
            })
            .await
    }

    /// Processes a batch through the inbox (`--batch N`): the same effect
    /// per message, every new message's row in one transaction, committed
    /// once; one outcome per message. Settle (ack) only after this.
    pub async fn process_batch(
        inbox: &PostgresInbox,
        messages: &[InboxMessage],
        delay: Duration,
    ) -> Vec<inbox_consumer::Outcome> {
        inbox
            .process_each(messages, move |tx, message| {
                Box::pin(record(tx, message, delay))
            })
            .await
    }
}
