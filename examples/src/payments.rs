//! The payments API itself, written once for both frameworks: validation,
//! declines, refunds, the in-process ledger, table `payments` (and
//! `refunds`) of `--transactional`, and the event of `--outbox`. Each route's
//! logic returns an [`Answer`] (status, `Location`, JSON or problem body);
//! a binary only extracts the request and turns the answer into its
//! framework's response.

use std::sync::Mutex;
use std::time::Duration;

use idempotency_core::{Idempotency, IdempotencyConfig};
use serde::{Deserialize, Serialize};

use crate::{
    connect_store, error_chain, postgres_options, sqlite_options, ResultExt, StartError,
    UsageError, PROBLEM_JSON,
};

/// The body of `POST /payments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// The amount in minor units.
    pub amount: i64,
    /// The currency code.
    pub currency: String,
    /// The caller's reference (an order id, say), stored with the payment.
    #[serde(default)]
    pub reference: Option<String>,
}

/// A created payment, as `POST /payments` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    /// Unique id.
    pub id: String,
    /// The amount in minor units.
    pub amount: i64,
    /// The currency code.
    pub currency: String,
    /// The caller's reference; `null` when it gave none.
    pub reference: Option<String>,
}

/// A payment as `GET /payments` and `GET /payments/<id>` show it: as it was
/// created, and whether it has been refunded.
#[derive(Debug, Clone, Serialize)]
pub struct PaymentView {
    /// The payment.
    #[serde(flatten)]
    pub payment: Payment,
    /// Whether it has been refunded.
    pub refunded: bool,
}

/// A refund (of a whole payment), as `POST /payments/<id>/refunds` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refund {
    /// Unique id.
    pub id: String,
    /// The payment refunded.
    pub payment_id: String,
    /// Its amount.
    pub amount: i64,
}

/// What a refund came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refunded {
    /// Refunded now.
    Now(Refund),
    /// No such payment.
    Unknown,
    /// Refunded before (under another key).
    Already,
}

/// An answer of the payments API, whichever framework sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The `Location` header, on a 201.
    pub location: Option<String>,
    /// `application/json` or `application/problem+json`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Answer {
    fn json(status: u16, value: &impl Serialize) -> Self {
        Self {
            status,
            location: None,
            content_type: "application/json",
            body: serde_json::to_string(value).unwrap_or_default(),
        }
    }

    fn problem(status: u16, body: String) -> Self {
        Self {
            status,
            location: None,
            content_type: PROBLEM_JSON,
            body,
        }
    }

    fn created(payment: &Payment) -> Self {
        Self {
            location: Some(format!("/payments/{}", payment.id)),
            ..Self::json(201, payment)
        }
    }

    fn database(error: &(dyn std::error::Error + 'static)) -> Self {
        Self::problem(500, database_problem(error))
    }
}

/// The payments this process created (every mode but `--transactional`),
/// with their refunds.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<Vec<(Payment, Option<Refund>)>>,
}

impl Ledger {
    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<(Payment, Option<Refund>)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `payment`.
    pub fn insert(&self, payment: Payment) {
        self.entries().push((payment, None));
    }

    /// The payment `id`, if this process created it.
    pub fn get(&self, id: &str) -> Option<PaymentView> {
        let entries = self.entries();
        entries.iter().find(|(p, _)| p.id == id).map(view)
    }

    /// Every payment so far.
    pub fn list(&self) -> Vec<PaymentView> {
        self.entries().iter().map(view).collect()
    }

    /// Refunds the payment `id` as `refund_id`, at most once.
    pub fn refund(&self, id: &str, refund_id: String) -> Refunded {
        let mut entries = self.entries();
        match entries.iter_mut().find(|(p, _)| p.id == id) {
            None => Refunded::Unknown,
            Some((_, Some(_))) => Refunded::Already,
            Some((payment, slot)) => {
                let refund = Refund {
                    id: refund_id,
                    payment_id: payment.id.clone(),
                    amount: payment.amount,
                };
                *slot = Some(refund.clone());
                Refunded::Now(refund)
            }
        }
    }
}

fn view((payment, refund): &(Payment, Option<Refund>)) -> PaymentView {
    PaymentView {
        payment: payment.clone(),
        refunded: refund.is_some(),
    }
}

/// Where the payments live, and how they are taken.
#[derive(Debug)]
pub struct Payments {
    /// Without `--transactional`: this process's payments.
    pub ledger: Ledger,
    /// With `--transactional`: tables `payments` and `refunds` of the
    /// store's database.
    pub table: Option<PaymentsTable>,
    /// With `--outbox`: each payment's transaction also enqueues its event.
    pub outbox: bool,
    /// `--decline-above`: a payment above this amount is declined (402).
    pub decline_above: Option<i64>,
    /// `--handler-delay`: how long creating a payment sleeps.
    pub delay: Duration,
}

impl Payments {
    /// Payments in this process's ledger, none declined, no delay.
    pub fn in_memory() -> Self {
        Self {
            ledger: Ledger::default(),
            table: None,
            outbox: false,
            decline_above: None,
            delay: Duration::ZERO,
        }
    }

    /// A new payment from the body of `POST /payments`: `Err` is the 400
    /// of a malformed body, or the 402 of a declined amount.
    fn accept(&self, body: &[u8]) -> Result<Payment, Answer> {
        let payment = new_payment(body).map_err(|problem| Answer::problem(400, problem))?;
        match self.decline_above {
            Some(limit) if payment.amount > limit => {
                Err(Answer::problem(402, declined(payment.amount, limit)))
            }
            _ => Ok(payment),
        }
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    /// `POST /payments` into this process's ledger: sleeps the handler
    /// delay, then records the payment.
    pub async fn create(&self, body: &[u8]) -> Answer {
        let payment = match self.accept(body) {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        self.pause().await;
        self.ledger.insert(payment.clone());
        Answer::created(&payment)
    }

    /// `POST /payments` in transactional mode, through `conn`, the
    /// request's transaction: the row, with `--outbox` its event right
    /// after it, then the handler delay. The middleware commits it all with
    /// the idempotency record after this returns (a declined payment
    /// writes nothing, and its 402 is stored like any 4xx).
    pub async fn create_in<DB: PaymentsDatabase>(
        &self,
        conn: &mut DB::Connection,
        body: &[u8],
    ) -> Answer {
        let payment = match self.accept(body) {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        if let Err(problem) = record_payment::<DB>(conn, &payment, self).await {
            return Answer::problem(500, problem);
        }
        self.pause().await;
        Answer::created(&payment)
    }

    /// `POST /payments/<id>/refunds` on this process's ledger.
    pub fn refund(&self, id: &str) -> Answer {
        refunded(self.ledger.refund(id, new_id("ref")))
    }

    /// `POST /payments/<id>/refunds` in transactional mode, through
    /// `conn`, the request's transaction (a row of table `refunds`).
    pub async fn refund_in<DB: PaymentsDatabase>(
        &self,
        conn: &mut DB::Connection,
        id: &str,
    ) -> Answer {
        match DB::refund(conn, id, &new_id("ref")).await {
            Ok(outcome) => refunded(outcome),
            Err(e) => Answer::database(&e),
        }
    }

    /// `GET /payments`: every payment, the ledger's or the table's.
    pub async fn list(&self) -> Answer {
        match &self.table {
            Some(table) => match table.list().await {
                Ok(list) => Answer::json(200, &list),
                Err(e) => Answer::database(&e),
            },
            None => Answer::json(200, &self.ledger.list()),
        }
    }

    /// `GET /payments/<id>`: the payment as `POST /payments` returned it,
    /// and whether it has been refunded.
    pub async fn get(&self, id: &str) -> Answer {
        let found = match &self.table {
            Some(table) => table.get(id).await,
            None => Ok(self.ledger.get(id)),
        };
        match found {
            Ok(Some(view)) => Answer::json(200, &view),
            Ok(None) => Answer::problem(404, payment_not_found()),
            Err(e) => Answer::database(&e),
        }
    }
}

fn refunded(outcome: Refunded) -> Answer {
    match outcome {
        Refunded::Now(refund) => Answer::json(201, &refund),
        Refunded::Unknown => Answer::problem(404, payment_not_found()),
        Refunded::Already => Answer::problem(409, already_refunded()),
    }
}

/// A new id: `prefix_` and 96 random bits in hex.
fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:024x}", rand::random::<u128>() >> 32)
}

/// The longest reference a payment keeps.
const REFERENCE_MAX: usize = 200;

/// A payment with a new id from the body of `POST /payments`. `Err` is the
/// body of a 400 `application/problem+json` response.
pub fn new_payment(body: &[u8]) -> Result<Payment, String> {
    let new: NewPayment = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "expected JSON {{\"amount\": <integer>, \"currency\": \"<string>\", \
             \"reference\": \"<string>\" (optional)}}: {}",
            bounded(&e.to_string())
        ))
    })?;
    if new.amount <= 0 {
        return Err(invalid("amount must be a positive integer".into()));
    }
    if new.currency.is_empty() || new.currency.len() > 16 {
        return Err(invalid("currency must be 1 to 16 characters".into()));
    }
    if new
        .reference
        .as_ref()
        .is_some_and(|r| r.chars().count() > REFERENCE_MAX)
    {
        return Err(invalid(format!(
            "reference must be at most {REFERENCE_MAX} characters"
        )));
    }
    Ok(Payment {
        id: new_id("pay"),
        amount: new.amount,
        currency: new.currency,
        reference: new.reference,
    })
}

/// The longest piece of the client's input a problem detail quotes.
const QUOTED_MAX: usize = 64;

/// The longest detail of a 400.
const DETAIL_MAX: usize = 400;

/// `text` (a parser's message) with every piece of the client's input it
/// quotes (between backticks or double quotes, as serde_json quotes field
/// names and values) cut to [`QUOTED_MAX`] characters, and the whole cut to
/// [`DETAIL_MAX`]: a 400 must not echo a 1 MB field name back (nor store
/// it for every replay).
fn bounded(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(DETAIL_MAX + 8));
    let mut quote: Option<(char, usize)> = None;
    for c in text.chars() {
        match quote {
            Some((q, _)) if c == q => {
                quote = None;
                out.push(c);
            }
            Some((q, n)) => {
                if n < QUOTED_MAX {
                    out.push(c);
                } else if n == QUOTED_MAX {
                    out.push('…');
                }
                quote = Some((q, n + 1));
            }
            None => {
                if c == '`' || c == '"' {
                    quote = Some((c, 0));
                }
                out.push(c);
            }
        }
    }
    if out.chars().count() > DETAIL_MAX {
        out = out.chars().take(DETAIL_MAX).collect();
        out.push('…');
    }
    out
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

/// The problem `type` of a declined payment (402).
pub const DECLINED: &str = "urn:payments:problem:declined";

/// The problem `type` of a second refund (409).
pub const ALREADY_REFUNDED: &str = "urn:payments:problem:already-refunded";

fn declined(amount: i64, limit: i64) -> String {
    serde_json::json!({
        "type": DECLINED,
        "title": "Payment declined",
        "status": 402,
        "detail": format!("The amount {amount} is above the limit {limit} (--decline-above). Nothing was charged."),
    })
    .to_string()
}

fn already_refunded() -> String {
    serde_json::json!({
        "type": ALREADY_REFUNDED,
        "title": "Payment already refunded",
        "status": 409,
        "detail": "This payment is already refunded; a payment is refunded at most once.",
    })
    .to_string()
}

/// The body of the 500 `application/problem+json` response when the
/// payments table (or the outbox) fails (the cause is logged; a retry with
/// the same key runs again, since nothing was committed).
pub fn database_problem(error: &(dyn std::error::Error + 'static)) -> String {
    // The whole chain: the database's own message is often a cause.
    tracing::error!(
        error = %error_chain(error),
        "the payments table failed; the request's transaction rolls back"
    );
    serde_json::json!({
        "type": "urn:payments:problem:database",
        "title": "The payment could not be recorded",
        "status": 500,
        "detail": "Nothing was done. Retry with the same Idempotency-Key.",
    })
    .to_string()
}

/// The body of the 404 `application/problem+json` response for a payment
/// id that names no payment (the id is not echoed: it is the client's).
pub fn payment_not_found() -> String {
    serde_json::json!({
        "type": "urn:payments:problem:not-found",
        "title": "No such payment",
        "status": 404,
        "detail": "No payment has this id.",
    })
    .to_string()
}

/// Tables `payments` and `refunds` (`--transactional`), on the pool of the
/// store whose transactions insert their rows.
#[derive(Debug, Clone)]
pub enum PaymentsTable {
    /// In the PostgreSQL database, in the connection's schema (`public`
    /// unless the URL sets a `search_path`), not the records' `idempotency`.
    Postgres(sqlx::PgPool),
    /// In the SQLite file of the records.
    Sqlite(sqlx::SqlitePool),
}

/// Creates the tables on PostgreSQL (and adds `reference` to a table of an
/// older version), through [`crate::create_tables`].
const CREATE_POSTGRES: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL, \
     currency TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
    "ALTER TABLE payments ADD COLUMN IF NOT EXISTS reference TEXT",
    // One refund per payment: the unique payment_id is what makes a second
    // refund (under another key, even at the same moment) a 409.
    "CREATE TABLE IF NOT EXISTS refunds (id TEXT PRIMARY KEY, \
     payment_id TEXT NOT NULL UNIQUE REFERENCES payments (id), amount BIGINT NOT NULL)",
];

/// Creates the tables on SQLite (statements are serialized by its write lock).
const CREATE_SQLITE: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, \
     amount INTEGER NOT NULL, currency TEXT NOT NULL, \
     created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)), \
     reference TEXT)",
    "CREATE TABLE IF NOT EXISTS refunds (id TEXT PRIMARY KEY, \
     payment_id TEXT NOT NULL UNIQUE REFERENCES payments (id), amount INTEGER NOT NULL)",
];

/// Whether a SQLite `payments` table of an older version lacks `reference`.
const SQLITE_LACKS_REFERENCE: &str =
    "SELECT count(*) = 0 FROM pragma_table_info('payments') WHERE name = 'reference'";

/// One payment, in the request's transaction (both databases).
const INSERT: &str =
    "INSERT INTO payments (id, amount, currency, reference) VALUES ($1, $2, $3, $4)";

/// The refund of a whole payment, in the request's transaction: nothing
/// when the payment is unknown or refunded already (both databases; the
/// `WHERE` also keeps SQLite's parser from reading `ON` as a join's).
const REFUND: &str = "INSERT INTO refunds (id, payment_id, amount) \
     SELECT $1, id, amount FROM payments WHERE id = $2 \
     ON CONFLICT (payment_id) DO NOTHING RETURNING amount";

/// Whether payment `id` exists (both databases).
const EXISTS: &str = "SELECT count(*) FROM payments WHERE id = $1";

/// The columns of a [`PaymentView`] (both databases).
const VIEW: &str = "SELECT id, amount, currency, reference, \
     (SELECT count(*) FROM refunds r WHERE r.payment_id = p.id) AS refunds FROM payments p";

type ViewRow = (String, i64, String, Option<String>, i64);

fn from_row((id, amount, currency, reference, refunds): ViewRow) -> PaymentView {
    PaymentView {
        payment: Payment {
            id,
            amount,
            currency,
            reference,
        },
        refunded: refunds > 0,
    }
}

/// `--transactional` with a store that has no transactions to share.
fn no_transactions(scheme: &str) -> StartError {
    Box::new(UsageError(format!(
        "--transactional needs a postgres:// or sqlite:// store, where the payment and its \
         idempotency record commit in one transaction: the {scheme} store (--store) has no transactions"
    )))
}

impl PaymentsTable {
    /// The engine in transactional mode on the store named by `url`
    /// (`postgres://...` or `sqlite://PATH`), and its tables, created when
    /// missing. Any other store has no transactions to share: a usage
    /// error.
    pub(crate) async fn open(
        url: &str,
        config: IdempotencyConfig,
        pool_size: Option<u32>,
    ) -> Result<(Idempotency, Self), StartError> {
        use idempotency_connect::stores::{PostgresStore, SqliteStore};
        use idempotency_connect::ConnectError;
        let scheme = url.trim().split_once(':').map_or(url.trim(), |(s, _)| s);
        let failed = |backend| move |source| ConnectError::Store { backend, source };
        let what = "could not create the payments tables";
        match scheme {
            "postgres" | "postgresql" => {
                let store = PostgresStore::connect_with(url.trim(), postgres_options(pool_size))
                    .await
                    .map_err(failed("postgres"))?;
                let pool = store.pool().clone();
                crate::create_tables(&pool, &CREATE_POSTGRES, "the payments tables").await?;
                Ok((
                    Idempotency::transactional(store, config),
                    Self::Postgres(pool),
                ))
            }
            "sqlite" => {
                // Refuses a URL without a file, or of an in-memory database,
                // as every other mode does.
                drop(connect_store(url).await?);
                let store = SqliteStore::connect_with(url.trim(), sqlite_options(pool_size))
                    .await
                    .map_err(failed("sqlite"))?;
                let pool = store.pool().clone();
                for statement in CREATE_SQLITE {
                    sqlx::query(statement).execute(&pool).await.context(what)?;
                }
                let lacks: bool = sqlx::query_scalar(SQLITE_LACKS_REFERENCE)
                    .fetch_one(&pool)
                    .await
                    .context(what)?;
                if lacks {
                    let added = sqlx::query("ALTER TABLE payments ADD COLUMN reference TEXT")
                        .execute(&pool)
                        .await;
                    // Another process may have added it in between.
                    if let Err(e) = added {
                        if !e.to_string().contains("duplicate column") {
                            return Err(e).context(what);
                        }
                    }
                }
                Ok((
                    Idempotency::transactional(store, config),
                    Self::Sqlite(pool),
                ))
            }
            "memory" | "redis" | "rediss" | "redis+cluster" => Err(no_transactions(scheme)),
            _ => {
                // An unknown URL gets the usual sentence naming the valid ones.
                drop(connect_store(url).await?);
                Err(no_transactions(scheme))
            }
        }
    }

    /// Creates or updates the outbox table (`--outbox`) on this pool:
    /// `outbox.events` on PostgreSQL, `outbox_events` on SQLite.
    pub(crate) async fn migrate_outbox(&self) -> Result<(), StartError> {
        match self {
            Self::Postgres(pool) => outbox::migrate_postgres(pool).await,
            Self::Sqlite(pool) => outbox::migrate_sqlite(pool).await,
        }
        .context("could not create the outbox table (--outbox)")
    }

    /// The row of payment `id`, and whether it is refunded.
    pub async fn get(&self, id: &str) -> Result<Option<PaymentView>, sqlx::Error> {
        let sql = format!("{VIEW} WHERE p.id = $1");
        let row: Option<ViewRow> = match self {
            Self::Postgres(pool) => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?,
            Self::Sqlite(pool) => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?,
        };
        Ok(row.map(from_row))
    }

    /// Every row, oldest first.
    pub async fn list(&self) -> Result<Vec<PaymentView>, sqlx::Error> {
        let sql = format!("{VIEW} ORDER BY p.created_at, p.id");
        let rows: Vec<ViewRow> = match self {
            Self::Postgres(pool) => sqlx::query_as(&sql).fetch_all(pool).await?,
            Self::Sqlite(pool) => sqlx::query_as(&sql).fetch_all(pool).await?,
        };
        Ok(rows.into_iter().map(from_row).collect())
    }
}

/// A database whose request transactions hold payments: what the
/// transactional handlers are generic over (`sqlx::Postgres`, `sqlx::Sqlite`).
pub trait PaymentsDatabase: sqlx::Database {
    /// Inserts `payment` through `conn`, the request's transaction.
    fn insert<'c>(
        conn: &'c mut Self::Connection,
        payment: &'c Payment,
    ) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>>;

    /// Enqueues the event of `payment` ([`payment_event`]) to the outbox
    /// through `conn`, the request's transaction.
    fn enqueue<'c>(
        conn: &'c mut Self::Connection,
        payment: &'c Payment,
    ) -> futures_util::future::BoxFuture<'c, Result<(), outbox::OutboxError>>;

    /// Refunds payment `id` as `refund_id` through `conn`, the request's
    /// transaction: a row of `refunds`, at most one per payment.
    fn refund<'c>(
        conn: &'c mut Self::Connection,
        id: &'c str,
        refund_id: &'c str,
    ) -> futures_util::future::BoxFuture<'c, Result<Refunded, sqlx::Error>>;
}

/// The outbox event of a payment (`--outbox`): destination `payments`, a new
/// UUID v7 id, payload `{"account": "<payment id>", "amount": <amount>,
/// "currency": "<currency>", "reference": <reference or null>}` (the inbox
/// examples' ledger message, which reads the first two).
pub fn payment_event(payment: &Payment) -> outbox::Event {
    let payload = serde_json::json!({
        "account": payment.id,
        "amount": payment.amount,
        "currency": payment.currency,
        "reference": payment.reference,
    });
    outbox::Event::new("payments", payload.to_string().into_bytes())
        .with_header("content-type", "application/json")
}

/// What the transactional handler writes through `conn`, the request's
/// transaction: the payment's row, and with `--outbox` its event. `Err` is
/// the body of a 500 `application/problem+json` response (nothing commits).
pub async fn record_payment<DB: PaymentsDatabase>(
    conn: &mut DB::Connection,
    payment: &Payment,
    payments: &Payments,
) -> Result<(), String> {
    DB::insert(conn, payment)
        .await
        .map_err(|e| database_problem(&e))?;
    if payments.outbox {
        DB::enqueue(conn, payment)
            .await
            .map_err(|e| database_problem(&e))?;
    }
    Ok(())
}

macro_rules! payments_database {
    ($db:ty) => {
        impl PaymentsDatabase for $db {
            fn insert<'c>(
                conn: &'c mut Self::Connection,
                payment: &'c Payment,
            ) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query(INSERT)
                        .bind(&payment.id)
                        .bind(payment.amount)
                        .bind(&payment.currency)
                        .bind(&payment.reference)
                        .execute(conn)
                        .await?;
                    tracing::debug!(payment = %payment.id, "payment inserted in the request's transaction");
                    Ok(())
                })
            }

            fn enqueue<'c>(
                conn: &'c mut Self::Connection,
                payment: &'c Payment,
            ) -> futures_util::future::BoxFuture<'c, Result<(), outbox::OutboxError>> {
                Box::pin(async move {
                    let event = payment_event(payment);
                    outbox::enqueue(&mut *conn, &event).await?;
                    tracing::debug!(payment = %payment.id, event = %event.id(), "event enqueued in the request's transaction");
                    Ok(())
                })
            }

            fn refund<'c>(
                conn: &'c mut Self::Connection,
                id: &'c str,
                refund_id: &'c str,
            ) -> futures_util::future::BoxFuture<'c, Result<Refunded, sqlx::Error>> {
                Box::pin(async move {
                    let amount: Option<i64> = sqlx::query_scalar(REFUND)
                        .bind(refund_id)
                        .bind(id)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if let Some(amount) = amount {
                        return Ok(Refunded::Now(Refund {
                            id: refund_id.to_owned(),
                            payment_id: id.to_owned(),
                            amount,
                        }));
                    }
                    let exists: i64 = sqlx::query_scalar(EXISTS).bind(id).fetch_one(&mut *conn).await?;
                    Ok(if exists > 0 { Refunded::Already } else { Refunded::Unknown })
                })
            }
        }
    };
}

payments_database!(sqlx::Postgres);
payments_database!(sqlx::Sqlite);
