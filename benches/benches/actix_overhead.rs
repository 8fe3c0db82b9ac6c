//! In-process HTTP overhead of `idempotency-actix` on actix-web (memory
//! store): a bare handler vs the same handler behind the middleware, with a
//! 1 KiB JSON body, on the fresh-key path (a new key per iteration) and on
//! the replay path. Prints the difference of medians measured in the same run.
//!
//! Runs on actix's own runtime (`actix_web::rt::System`), which the
//! middleware needs for its spawned handler task; each sample is timed
//! inside one `block_on`, so the runtime's entry cost is not measured.

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{test, web, App};
use benches::actix::{handler, request, send};
use benches::json_body;
use criterion::{BenchmarkId, Criterion};
use idempotency_actix::IdempotencyMiddleware;
use idempotency_core::{Idempotency, IdempotencyConfig, MemoryStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Times `iters` requests made by `make` through `app`, on the actix runtime.
fn time<S, B>(
    system: &actix_web::rt::SystemRunner,
    app: &S,
    iters: u64,
    make: impl Fn() -> actix_http::Request,
) -> Duration
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    system.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            send(app, make()).await;
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let system = actix_web::rt::System::new();
    let body = json_body();
    assert_eq!(body.len(), 1024);
    // Fresh keys: the default store (100 000 records) with a 1 s ttl stays
    // full and evicts the oldest record per fresh request, the steady state
    // of a busy instance, instead of growing the heap for
    // the whole run, which would measure page faults, not the middleware.
    let fresh_engine = Idempotency::new(
        MemoryStore::new(),
        IdempotencyConfig::builder()
            .ttl(Duration::from_secs(1))
            .build()
            .expect("valid config"),
    );
    let replay_engine = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    let bare = system.block_on(test::init_service(
        App::new().route("/payments", web::post().to(handler)),
    ));
    let layered = |engine: Idempotency| {
        system.block_on(test::init_service(
            App::new()
                .wrap(IdempotencyMiddleware::new(engine))
                .route("/payments", web::post().to(handler)),
        ))
    };
    let fresh_layered = layered(fresh_engine);
    let replay_layered = layered(replay_engine);
    let counter = AtomicU64::new(0);
    let fresh = || {
        let key = format!("k-{}", counter.fetch_add(1, Ordering::Relaxed));
        request(&key, &body)
    };
    let replayed = || request("replayed", &body);
    let mut group = c.benchmark_group("actix");
    group.bench_function(BenchmarkId::new("fresh", "bare"), |b| {
        b.iter_custom(|iters| time(&system, &bare, iters, fresh));
    });
    group.bench_function(BenchmarkId::new("fresh", "layer"), |b| {
        b.iter_custom(|iters| time(&system, &fresh_layered, iters, fresh));
    });
    system.block_on(send(&replay_layered, replayed()));
    group.bench_function(BenchmarkId::new("replay", "bare"), |b| {
        b.iter_custom(|iters| time(&system, &bare, iters, replayed));
    });
    group.bench_function(BenchmarkId::new("replay", "layer"), |b| {
        b.iter_custom(|iters| time(&system, &replay_layered, iters, replayed));
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    benches::print_overhead("actix", &["fresh", "replay"]);
}
