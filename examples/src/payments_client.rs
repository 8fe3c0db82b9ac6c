//! The order saga's anti-corruption layer in front of the payments API
//! (`payments-axum` / `payments-actix`): the one place that knows that
//! API's routes, headers, JSON and status codes, and translates them into
//! the saga's own terms ([`CallOutcome`]). Nothing else in `order-saga`
//! sees the payments API's shapes; a change there is a change here.
//!
//! The translation:
//!
//! | the payments API says | the saga hears |
//! |---|---|
//! | charge: `201` with `{"id": ..}` | [`CallOutcome::Done`] with the payment id |
//! | charge: `402` (declined) | [`CallOutcome::Failed`]: compensate |
//! | refund: `201`, or `409` "already refunded" | [`CallOutcome::Done`]: the payment is refunded |
//! | refund: `404` (no such payment) | [`CallOutcome::Failed`]: retried, then `failed` |
//! | anything else: another status (a 409 of a request still in flight, a 5xx), a timeout, a refused or lost connection, a body that does not read | [`CallOutcome::Uncertain`]: the same request again, same `Idempotency-Key` |
//!
//! Every request carries the step's stable `Idempotency-Key`, so a retry
//! after an uncertain answer (an answer lost after payments committed, a
//! crash of either side) is the same request, and the payments API's
//! idempotency layer replays its first answer instead of charging twice.

use std::time::Duration;

use saga::CallOutcome;
use serde::Deserialize;

use crate::{ResultExt, StartError};

/// Who the saga is to the payments API (its `Authorization`, which that
/// API takes as the idempotency scope).
const AUTHORIZATION: &str = "Bearer order-saga";

/// The currency of every charge.
const CURRENCY: &str = "EUR";

/// How long one request may take, connect and answer included: well below
/// the saga's call lease, so that a call ends (uncertain) before another
/// worker may make it again.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle pooled connection is kept: below the payments
/// binaries' 5 s keep-alive, so the client does not reuse a connection the
/// server is closing (which would only cost an uncertain round).
const IDLE: Duration = Duration::from_secs(2);

/// The payments API as the saga sees it.
#[derive(Debug, Clone)]
pub struct PaymentsClient {
    http: reqwest::Client,
    base: String,
}

/// The parts of the payments API's answers the saga reads.
#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
struct Problem {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    detail: String,
}

impl PaymentsClient {
    /// A client of the payments API at `base_url` (`http://host:port`).
    ///
    /// # Errors
    /// When the URL is not `http://` (this client speaks no TLS), or the
    /// client cannot be built.
    pub fn new(base_url: &str) -> Result<Self, StartError> {
        let base = base_url.trim().trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(crate::usage_error(format!(
                "--payments-url {base_url}: expected http://HOST:PORT (this client speaks no TLS)"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(IDLE)
            // A redirect is an answer the saga does not expect: uncertain.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("could not build the payments client")?;
        Ok(Self { http, base })
    }

    /// Charges `amount` for order `order_id` under `idempotency_key`: the
    /// payment's id when it is made.
    pub async fn charge(
        &self,
        order_id: &str,
        amount: i64,
        idempotency_key: &str,
    ) -> CallOutcome<String> {
        let body = serde_json::json!({
            "amount": amount,
            "currency": CURRENCY,
            "reference": format!("order-{order_id}"),
        });
        let url = format!("{}/payments", self.base);
        let (status, bytes) = match self.post(&url, idempotency_key, Some(body)).await {
            Ok(answer) => answer,
            Err(uncertain) => return CallOutcome::Uncertain(uncertain),
        };
        match status {
            201 => match serde_json::from_slice::<Created>(&bytes) {
                Ok(created) => CallOutcome::Done(created.id),
                Err(e) => CallOutcome::Uncertain(format!("a 201 without a payment id: {e}")),
            },
            402 => CallOutcome::Failed(format!("declined: {}", problem(&bytes).detail)),
            other => CallOutcome::Uncertain(answered("charge", other, &bytes)),
        }
    }

    /// Refunds payment `payment_id` (whole) under `idempotency_key`.
    pub async fn refund(&self, payment_id: &str, idempotency_key: &str) -> CallOutcome<()> {
        let url = format!("{}/payments/{payment_id}/refunds", self.base);
        let (status, bytes) = match self.post(&url, idempotency_key, None).await {
            Ok(answer) => answer,
            Err(uncertain) => return CallOutcome::Uncertain(uncertain),
        };
        match status {
            201 => CallOutcome::Done(()),
            // Refunded already: what the compensation wants is true.
            409 if problem(&bytes).kind.ends_with("already-refunded") => CallOutcome::Done(()),
            404 => CallOutcome::Failed(format!("no payment {payment_id} to refund")),
            other => CallOutcome::Uncertain(answered("refund", other, &bytes)),
        }
    }

    /// One POST; `Err` (the reason) when no complete answer came.
    async fn post(
        &self,
        url: &str,
        idempotency_key: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), String> {
        let mut request = self
            .http
            .post(url)
            .header("idempotency-key", idempotency_key)
            .header("authorization", AUTHORIZATION);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| reason(&e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| reason(&e))?;
        Ok((status, bytes.to_vec()))
    }
}

fn problem(bytes: &[u8]) -> Problem {
    serde_json::from_slice(bytes).unwrap_or(Problem {
        kind: String::new(),
        detail: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
    })
}

/// An answer the saga cannot act on, in a sentence for the history.
fn answered(what: &str, status: u16, bytes: &[u8]) -> String {
    let p = problem(bytes);
    format!(
        "{what}: the payments API answered {status} {} {}",
        p.kind, p.detail
    )
    .trim_end()
    .to_owned()
}

/// Why a request got no answer: reqwest's error and its causes (a refused
/// connection, a timeout, a connection closed before the answer).
fn reason(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "no answer"
    };
    format!("{kind}: {}", crate::error_chain(error))
}
