//! Helpers shared by the benches: reading criterion's medians back to print
//! differences and ratios measured in the same run.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The 1 KiB JSON body every HTTP bench sends.
pub fn json_body() -> Bytes {
    let mut s = String::from("{\"amount\":100,\"currency\":\"EUR\",\"note\":\"");
    while s.len() < 1022 {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s)
}

/// The bare axum handler: 201 with two headers and 64 bytes of the body.
pub async fn handler(
    body: Bytes,
) -> (
    http::StatusCode,
    [(http::HeaderName, &'static str); 2],
    Bytes,
) {
    (
        http::StatusCode::CREATED,
        [
            (http::header::CONTENT_TYPE, "application/json"),
            (http::header::LOCATION, "/payments/pay_1"),
        ],
        Bytes::copy_from_slice(&body[..64]),
    )
}

/// A `POST /payments` with `Idempotency-Key: key` and `body`.
pub fn request(key: &str, body: &Bytes) -> http::Request<Body> {
    http::Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .header("content-length", body.len())
        .body(Body::from(body.clone()))
        .expect("valid request")
}

/// Sends one request in process and reads the whole response.
pub async fn send(router: &Router, req: http::Request<Body>) {
    let res = router.clone().oneshot(req).await.expect("infallible");
    let body = res.into_body().collect().await.expect("body");
    std::hint::black_box(body);
}

/// The actix-web counterparts of [`handler`] and
/// [`request`].
pub mod actix {
    use actix_web::body::MessageBody;
    use actix_web::dev::{Service, ServiceResponse};
    use actix_web::http::header;
    use actix_web::{test, web, HttpResponse};
    use bytes::Bytes;

    /// The bare actix handler: 201 with two headers and 64 bytes of the body.
    pub async fn handler(body: web::Bytes) -> HttpResponse {
        HttpResponse::Created()
            .content_type("application/json")
            .insert_header((header::LOCATION, "/payments/pay_1"))
            .body(body.slice(..64))
    }

    /// A `POST /payments` with `Idempotency-Key: key` and `body`.
    pub fn request(key: &str, body: &Bytes) -> actix_http::Request {
        test::TestRequest::post()
            .uri("/payments")
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header(("idempotency-key", key))
            .set_payload(body.clone())
            .to_request()
    }

    /// Sends one request through an actix app in process and reads the whole
    /// response.
    pub async fn send<S, B>(app: &S, req: actix_http::Request)
    where
        S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
        B: MessageBody,
    {
        let res = app.call(req).await.expect("the app answers");
        assert!(res.status().is_success(), "{}", res.status());
        let body = actix_web::body::to_bytes(res.into_body()).await;
        std::hint::black_box(body.ok());
    }
}

/// criterion's output folder for this run.
pub fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// The median of one benchmark in nanoseconds, if it ran in this run.
pub fn median_ns(group: &str, function: &str, param: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join(param)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{...},"median":{"confidence_interval":{...},"point_estimate":123.4,...
    let median = &text[text.find("\"median\"")?..];
    let pe = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = pe.find([',', '}'])?;
    pe[..end].trim().parse().ok()
}

/// Prints `layer - bare` for each function of `group`.
pub fn print_overhead(group: &str, functions: &[&str]) {
    println!("\n== {group}: added by the middleware (difference of medians) ==");
    for f in functions {
        match (median_ns(group, f, "bare"), median_ns(group, f, "layer")) {
            (Some(bare), Some(layer)) => println!(
                "{group}/{f}: bare {:.2} µs, layer {:.2} µs, added {:.2} µs",
                bare / 1000.0,
                layer / 1000.0,
                (layer - bare) / 1000.0
            ),
            _ => println!("{group}/{f}: not measured in this run"),
        }
    }
}

/// Prints `subject / baseline` ratios.
pub fn print_ratio(group: &str, baseline: (&str, &str), subjects: &[(&str, &str)]) {
    let Some(base) = median_ns(group, baseline.0, baseline.1) else {
        println!(
            "{group}: baseline {}/{} not measured in this run",
            baseline.0, baseline.1
        );
        return;
    };
    println!(
        "\n== {group}: ratios to {}/{} ({:.1} µs) ==",
        baseline.0,
        baseline.1,
        base / 1000.0
    );
    for (f, p) in subjects {
        match median_ns(group, f, p) {
            Some(v) => println!("{group}/{f}/{p}: {:.1} µs = {:.2}×", v / 1000.0, v / base),
            None => println!("{group}/{f}/{p}: not measured in this run"),
        }
    }
}
