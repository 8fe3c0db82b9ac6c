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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A payments API that answers each connection's request with the next
    /// of `answers` (`None`: closes the connection unanswered), keeping the
    /// requests it read.
    async fn fake(answers: Vec<Option<(u16, &'static str)>>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&seen);
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request).into_owned());
                if let Some((status, body)) = answer {
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
            }
        });
        (base, seen)
    }

    #[tokio::test]
    async fn a_charge_is_done_failed_or_uncertain_as_the_api_answers() {
        let (base, seen) = fake(vec![
            Some((201, r#"{"id": "pay_1", "amount": 300, "currency": "EUR"}"#)),
            Some((
                402,
                r#"{"type": "urn:payments:problem:declined", "detail": "above 1000"}"#,
            )),
            Some((409, r#"{"type": "urn:idempotency:problem:in-flight"}"#)),
            Some((500, r#"{"type": "urn:payments:problem:database"}"#)),
            Some((201, r#"{"no": "id"}"#)),
            None,
        ])
        .await;
        let client = PaymentsClient::new(&base).unwrap();
        let charge = || client.charge("o1", 300, "order-o1-charge");
        assert_eq!(charge().await, CallOutcome::Done("pay_1".to_owned()));
        assert!(matches!(charge().await, CallOutcome::Failed(why) if why.contains("above 1000")));
        for what in [
            "a 409 in flight",
            "a 500",
            "a 201 without an id",
            "no answer",
        ] {
            assert!(
                matches!(charge().await, CallOutcome::Uncertain(_)),
                "{what}"
            );
        }
        let first = seen.lock().unwrap()[0].clone();
        let lower = first.to_ascii_lowercase();
        assert!(first.starts_with("POST /payments HTTP/1.1"), "{first}");
        assert!(
            lower.contains("idempotency-key: order-o1-charge"),
            "{first}"
        );
        assert!(
            lower.contains("authorization: bearer order-saga"),
            "{first}"
        );
        let body = &first[first.find("\r\n\r\n").unwrap() + 4..];
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"amount": 300, "currency": "EUR", "reference": "order-o1"})
        );
    }

    #[tokio::test]
    async fn a_refund_is_done_when_made_or_made_before() {
        let (base, seen) = fake(vec![
            Some((
                201,
                r#"{"id": "ref_1", "payment_id": "pay_1", "amount": 300}"#,
            )),
            Some((409, r#"{"type": "urn:payments:problem:already-refunded"}"#)),
            Some((409, r#"{"type": "urn:idempotency:problem:in-flight"}"#)),
            Some((404, r#"{"type": "urn:payments:problem:not-found"}"#)),
        ])
        .await;
        let client = PaymentsClient::new(&base).unwrap();
        let refund = || client.refund("pay_1", "order-o1-refund");
        assert_eq!(refund().await, CallOutcome::Done(()));
        assert_eq!(refund().await, CallOutcome::Done(()), "refunded before");
        assert!(
            matches!(refund().await, CallOutcome::Uncertain(_)),
            "in flight"
        );
        assert!(
            matches!(refund().await, CallOutcome::Failed(_)),
            "no such payment"
        );
        let first = seen.lock().unwrap()[0].clone();
        assert!(
            first.starts_with("POST /payments/pay_1/refunds HTTP/1.1"),
            "{first}"
        );
        assert!(first
            .to_ascii_lowercase()
            .contains("idempotency-key: order-o1-refund"));
    }

    #[tokio::test]
    async fn a_refused_connection_is_uncertain_and_tls_is_refused_up_front() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = PaymentsClient::new(&format!("http://127.0.0.1:{port}/")).unwrap();
        assert!(matches!(
            client.charge("o1", 1, "k").await,
            CallOutcome::Uncertain(why) if why.starts_with("could not connect")
        ));
        assert!(PaymentsClient::new("https://payments.example").is_err());
    }
}
