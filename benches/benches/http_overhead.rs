//! In-process HTTP overhead of `idempotency-tower` on axum (memory store):
//! a bare handler vs the same handler behind the layer, with a 1 KiB JSON
//! body, on the fresh-key path and on the replay path. Prints the difference
//! of medians measured in the same run.

use axum::routing::post;
use axum::Router;
use benches::{handler, json_body, request, send};
use criterion::{BenchmarkId, Criterion};
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use idempotency_tower::IdempotencyLayer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    // One thread, as one request is served on one worker of a server.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let body = json_body();
    assert_eq!(body.len(), 1024);
    let bare = Router::new().route("/payments", post(handler));
    // The default store (100 000 records) with a 1 s ttl, so the run
    // measures a store in its steady state, not the heap growing (page
    // faults) for millions of records. At a few hundred thousand requests a
    // second the store is full within the first second, so each fresh
    // request also evicts the oldest record (freeing memory that is no
    // longer in cache), as a busy instance's store does. The actix bench
    // does the same.
    let engine = Idempotency::new(
        MemoryStore::new(),
        IdempotencyConfig::builder()
            .ttl(Duration::from_secs(1))
            .build()
            .expect("valid config"),
    );
    let layered = Router::new()
        .route("/payments", post(handler))
        .layer(IdempotencyLayer::new(engine));
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("axum");
    for (name, router) in [("bare", &bare), ("layer", &layered)] {
        group.bench_function(BenchmarkId::new("fresh", name), |b| {
            b.to_async(&rt).iter(|| {
                let key = format!("k-{}", counter.fetch_add(1, Ordering::Relaxed));
                send(router, request(&key, &body))
            });
        });
    }
    rt.block_on(send(&layered, request("replayed", &body)));
    for (name, router) in [("bare", &bare), ("layer", &layered)] {
        group.bench_function(BenchmarkId::new("replay", name), |b| {
            b.to_async(&rt)
                .iter(|| send(router, request("replayed", &body)));
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    benches::print_overhead("axum", &["fresh", "replay"]);
}
