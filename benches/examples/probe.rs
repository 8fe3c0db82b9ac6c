//! A profiling probe for the in-process HTTP overhead: runs exactly `N`
//! requests of one path through one adapter, so that a profiler sees only
//! them (criterion's statistics would drown them).
//!
//! ```text
//! cargo build --release -p benches --example probe
//! # time per request, natively:
//! target/release/examples/probe actix fresh layer 1000000
//! # instructions per request: the difference of two runs, divided by the
//! # difference of their N (the set-up cancels out):
//! valgrind --tool=callgrind target/release/examples/probe actix fresh layer 20000
//! valgrind --tool=callgrind target/release/examples/probe actix fresh layer 40000
//! ```
//!
//! Under valgrind `sha2` takes its portable path (valgrind does not emulate
//! the SHA extensions), so subtract `sha2::sha256::compress256`: natively
//! the 1 KiB body's hash is about 0.6 µs.
//!
//! Arguments: `actix|axum`, `fresh|replay`, `bare|layer`, `N`, then
//! optionally the store's capacity (default: the store's default, 100 000
//! records; a smaller one fills, and starts evicting, sooner under
//! callgrind) and the fresh records' ttl in seconds (default 1, as in the
//! benches; under valgrind a store fills only with a longer one).
//!
//! `PROBE_METRICS=prometheus` installs a Prometheus recorder first (the
//! metrics' cost with a recorder); by default none is installed, and the
//! metrics cost what the facade costs without one.
//!
//! `--encrypt` (anywhere among the arguments) encrypts the stored responses
//! at rest (`IdempotencyConfigBuilder::encryption`, one AES-256-GCM key):
//! a fresh request seals its response, a replay opens it. Its cost is the
//! difference from the same run without it:
//!
//! ```text
//! valgrind --tool=callgrind target/release/examples/probe axum replay layer 20000 --encrypt
//! ```

use actix_web::{test, web, App};
use axum::routing::post;
use axum::Router;
use benches::{handler, json_body, request, send};
use bytes::Bytes;
use idempotency_core::{EncryptionKeys, Idempotency, IdempotencyConfig, MemoryStore};
use std::time::{Duration, Instant};

async fn run_actix<S, B>(app: &S, n: u64, key: impl Fn(u64) -> String, body: &Bytes) -> Duration
where
    S: actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: actix_web::body::MessageBody,
{
    let start = Instant::now();
    for i in 0..n {
        benches::actix::send(app, benches::actix::request(&key(i), body)).await;
    }
    start.elapsed()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let encrypt = args.iter().any(|a| a == "--encrypt");
    args.retain(|a| a != "--encrypt");
    let [adapter, path, which, n, rest @ ..] = args.as_slice() else {
        eprintln!("usage: probe actix|axum fresh|replay bare|layer N [capacity [ttl]] [--encrypt]");
        std::process::exit(2);
    };
    let n: u64 = n.parse().expect("N is a number");
    let capacity = rest
        .first()
        .map_or(idempotency_core::DEFAULT_CAPACITY, |c| {
            c.parse().expect("capacity is a number")
        });
    // Fresh records live 1 s by default, as in the benches: natively the
    // store is full within that second. Under valgrind, 1 s is a few
    // thousand requests, so give a longer ttl to reach a full store.
    let fresh_ttl = rest
        .get(1)
        .map_or(1, |t| t.parse().expect("ttl is a number of seconds"));
    if std::env::var("PROBE_METRICS").is_ok_and(|v| v == "prometheus") {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("a recorder");
        idempotency_core::metrics::describe();
    }
    let fresh = path == "fresh";
    let layer = which == "layer";
    let mut config = IdempotencyConfig::builder().ttl(Duration::from_secs(if fresh {
        fresh_ttl
    } else {
        86_400
    }));
    if encrypt {
        config = config.encryption(EncryptionKeys::new("probe", [0x42; 32]).expect("a key"));
    }
    let engine = Idempotency::new(
        MemoryStore::with_capacity(capacity),
        config.build().expect("valid config"),
    );
    let body = json_body();
    let key = |i: u64| {
        if fresh {
            format!("k-{i}")
        } else {
            "replayed".to_owned()
        }
    };
    let elapsed = match adapter.as_str() {
        "actix" => {
            let system = actix_web::rt::System::new();
            let app = || App::new().route("/payments", web::post().to(benches::actix::handler));
            if layer {
                let app = app().wrap(idempotency_actix::IdempotencyMiddleware::new(engine));
                system.block_on(async {
                    run_actix(&test::init_service(app).await, n, key, &body).await
                })
            } else {
                system.block_on(async {
                    run_actix(&test::init_service(app()).await, n, key, &body).await
                })
            }
        }
        "axum" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let router = Router::new().route("/payments", post(handler));
            let router = if layer {
                router.layer(idempotency_tower::IdempotencyLayer::new(engine))
            } else {
                router
            };
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..n {
                    send(&router, request(&key(i), &body)).await;
                }
                start.elapsed()
            })
        }
        other => panic!("unknown adapter {other}"),
    };
    println!(
        "{adapter} {path} {which}{}: {n} requests, {:.0} ns each",
        if encrypt { " encrypted" } else { "" },
        elapsed.as_nanos() as f64 / n as f64
    );
}
