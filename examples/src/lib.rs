//! What the example binaries share: the command line, the payment ledger, and
//! store selection. The framework-specific code lives in each binary.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use idempotency_core::{Idempotency, IdempotencyConfig};
use serde::{Deserialize, Serialize};

/// The payments API's command line (DESIGN section 7).
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "A payments API whose POST /payments is safe under retries")]
pub struct PaymentsArgs {
    /// Where to serve.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
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
    /// Serve the same routes without the middleware (a baseline for load tests).
    #[arg(long)]
    pub no_idempotency: bool,
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

/// Whether the chain says the flags or the configuration are wrong (so
/// retrying the same command cannot help).
fn is_usage_error(error: &(dyn std::error::Error + 'static)) -> bool {
    use idempotency_core::store::ConnectError;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<idempotency_core::ConfigError>() || e.is::<inbox_consumer::ConfigError>() {
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
    /// The engine for these flags, connected to its store; `None` with
    /// `--no-idempotency`. The scope is the `Authorization` header's value.
    pub async fn engine(&self) -> Result<Option<Idempotency>, StartError> {
        if self.no_idempotency {
            return Ok(None);
        }
        let config = IdempotencyConfig::builder()
            .ttl(self.ttl)
            .lease(self.lease)
            .scope_header("authorization")
            .build()
            .context("the idempotency settings are invalid")?;
        let store = connect_store(&self.store).await?;
        Ok(Some(Idempotency::from_arc(store, config)))
    }
}

/// Connects the store named by `url`: `memory`, `sqlite://PATH`,
/// `redis://...` or `postgres://...` (migrations run on connect).
pub async fn connect_store(
    url: &str,
) -> Result<std::sync::Arc<dyn idempotency_core::Store>, StartError> {
    Ok(idempotency_core::store::connect(url).await?)
}

/// Logs to stderr; `RUST_LOG` filters (else `default_filter`, e.g. `info`).
/// Coloured only when stderr is a terminal and `NO_COLOR` is unset, so logs
/// redirected to a file or a pipe carry no escape codes.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
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

/// The body of `POST /payments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// The amount in minor units.
    pub amount: i64,
    /// The currency code.
    pub currency: String,
}

/// A created payment.
#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    /// Unique id.
    pub id: String,
    /// The amount in minor units.
    pub amount: i64,
    /// The currency code.
    pub currency: String,
}

/// The payments this process created.
#[derive(Debug, Default)]
pub struct Ledger {
    payments: Mutex<Vec<Payment>>,
}

impl Ledger {
    /// Validates and records a payment. `Err` is the body of a 400
    /// `application/problem+json` response.
    pub fn create(&self, body: &[u8]) -> Result<Payment, String> {
        let new: NewPayment = serde_json::from_slice(body).map_err(|e| {
            invalid(format!(
                "expected JSON {{\"amount\": <integer>, \"currency\": \"<string>\"}}: {e}"
            ))
        })?;
        if new.amount <= 0 {
            return Err(invalid("amount must be a positive integer".into()));
        }
        if new.currency.is_empty() || new.currency.len() > 16 {
            return Err(invalid("currency must be 1 to 16 characters".into()));
        }
        let payment = Payment {
            id: format!("pay_{:024x}", rand::random::<u128>() >> 32),
            amount: new.amount,
            currency: new.currency,
        };
        self.payments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(payment.clone());
        Ok(payment)
    }

    /// Every payment so far, as JSON.
    pub fn list_json(&self) -> String {
        let list = self.payments.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&*list).unwrap_or_else(|_| "[]".into())
    }
}

fn invalid(detail: String) -> String {
    serde_json::json!({
        "type": "urn:payments:problem:invalid-payment",
        "title": "Invalid payment",
        "status": 400,
        "detail": detail,
    })
    .to_string()
}

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

/// What both inbox consumers share: the ledger table, its effect, and the
/// transactional inbox in front of it.
pub mod ledger {
    use std::time::Duration;

    use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage, PgInbox};
    use serde::Deserialize;
    use sqlx::postgres::PgPoolOptions;
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
    pub async fn open(database: &str, consumer: &str) -> Result<PgInbox, StartError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(database)
            .await
            .context("could not connect the ledger database (--database)")?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS ledger_entries \
             (account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .context("could not create the ledger_entries table")?;
        let config = InboxConfig::builder(consumer.to_owned())
            .build()
            .context("the inbox settings are invalid (--consumer)")?;
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

    /// Processes one message through the inbox; settle (ack) only after this.
    pub async fn process(
        inbox: &PgInbox,
        message: &InboxMessage,
        delay: Duration,
    ) -> inbox_consumer::Outcome {
        inbox
            .process(message, move |tx, message| {
                Box::pin(record(tx, message, delay))
            })
            .await
    }
}
