//! The cost of the metrics: the axum layer (memory store, 1 KiB JSON body)
//! with no recorder against the same layer with a Prometheus recorder, on
//! the fresh-key path and on the replay path. Prints the difference of
//! medians measured in the same run.
//!
//! The recorder is the thread's (`metrics::set_default_local_recorder`), so
//! that the run without one really has none; the runtime has one thread, so
//! every request records through it.

use axum::routing::post;
use axum::Router;
use benches::{handler, json_body, median_ns, request, send};
use criterion::{BenchmarkId, Criterion};
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use idempotency_tower::IdempotencyLayer;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const GROUP: &str = "metrics";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let body = json_body();
    // As in http_overhead: a full store that evicts on every fresh request.
    let engine = Idempotency::new(
        MemoryStore::new(),
        IdempotencyConfig::builder()
            .ttl(Duration::from_secs(1))
            .build()
            .expect("valid config"),
    );
    let router = Router::new()
        .route("/payments", post(handler))
        .layer(IdempotencyLayer::new(engine));
    let prometheus = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&prometheus, idempotency_core::metrics::describe);
    let recorders: [(&str, Option<&PrometheusRecorder>); 2] =
        [("none", None), ("prometheus", Some(&prometheus))];
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group(GROUP);
    for (name, recorder) in recorders {
        group.bench_function(BenchmarkId::new("fresh", name), |b| {
            let _guard = recorder.map(|r| metrics::set_default_local_recorder(r));
            b.to_async(&rt).iter(|| {
                let key = format!("k-{}", counter.fetch_add(1, Ordering::Relaxed));
                send(&router, request(&key, &body))
            });
        });
    }
    rt.block_on(send(&router, request("replayed", &body)));
    for (name, recorder) in recorders {
        group.bench_function(BenchmarkId::new("replay", name), |b| {
            let _guard = recorder.map(|r| metrics::set_default_local_recorder(r));
            b.to_async(&rt)
                .iter(|| send(&router, request("replayed", &body)));
        });
    }
    group.finish();
    // The recorder saw every request: the counts are not optimised away.
    let text = prometheus.handle().render();
    assert!(
        text.contains(r#"idempotency_requests_total{outcome="replayed"}"#),
        "{text}"
    );
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    println!("\n== {GROUP}: added by a Prometheus recorder (difference of medians) ==");
    for f in ["fresh", "replay"] {
        match (
            median_ns(GROUP, f, "none"),
            median_ns(GROUP, f, "prometheus"),
        ) {
            (Some(none), Some(prometheus)) => println!(
                "{GROUP}/{f}: no recorder {:.2} µs, Prometheus {:.2} µs, added {:.0} ns",
                none / 1000.0,
                prometheus / 1000.0,
                prometheus - none
            ),
            _ => println!("{GROUP}/{f}: not measured in this run"),
        }
    }
}
