//! How long duplicates that wait for the first request
//! (`wait_for_in_flight`) take to get its response once it completes.
//!
//! ```text
//! cargo run --release -p benches --example wait_latency -- memory
//! cargo run --release -p benches --example wait_latency -- redis://127.0.0.1:6379
//! cargo run --release -p benches --example wait_latency -- postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! Each round claims a fresh key, starts 16 duplicates (each with its own
//! engine over the same store, as 16 instances would be), lets them wait
//! 30 ms, completes the first, and records, for each duplicate, the time
//! from the end of the completion to its replay. The baseline, measured in
//! the same run, is one replay of a completed record (one claim): the least
//! a waiter that is told at once must still spend. Arguments: the store URL,
//! then optionally the number of rounds (default 200).

use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_connect::connect;
use idempotency_core::Store;
use idempotency_core::{Decision, Idempotency, IdempotencyConfig, Inspection, StoredResponse};

const WAITERS: usize = 16;

fn request(key: &str) -> http::request::Parts {
    http::Request::post("/payments")
        .header("idempotency-key", key)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

async fn decide(engine: &Idempotency, key: &str) -> Decision {
    let parts = request(key);
    let Inspection::Pending(pending) = engine.inspect(&parts, || None) else {
        panic!("not covered");
    };
    engine.decide(pending, b"{\"amount\":1}").await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn show(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "{name:<28} p50 {:>9.3} ms   p99 {:>9.3} ms   max {:>9.3} ms   (n = {})",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.len()
    );
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "memory".to_owned());
    let rounds: usize = args.next().map_or(200, |n| n.parse().expect("rounds"));
    let store: Arc<dyn Store> = match connect(&url).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("wait_latency: {e}");
            std::process::exit(2);
        }
    };
    // Whether this store wakes waiters, or they poll.
    let probe =
        idempotency_core::RecordId::from_parts(b"wait-latency", &rand_suffix().to_be_bytes());
    match store.watch(&probe).await {
        Ok(Some(_)) => println!("{}: waiters are notified", store.backend()),
        Ok(None) => println!(
            "{}: waiters poll (the store cannot notify)",
            store.backend()
        ),
        Err(e) => println!(
            "{}: waiters poll (watch failed: {e}: {:?})",
            store.backend(),
            std::error::Error::source(&e).map(|s| s.to_string())
        ),
    }
    let config = IdempotencyConfig::builder()
        .wait_for_in_flight(Duration::from_secs(10))
        .build()
        .expect("config");
    let first_engine = Idempotency::new(store.clone(), config.clone());
    let engines: Vec<Idempotency> = (0..WAITERS)
        .map(|_| Idempotency::new(store.clone(), config.clone()))
        .collect();
    let run = format!("wait-latency-{}-{}", std::process::id(), rand_suffix());
    let response = StoredResponse {
        status: 201,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    };

    let mut waits = Vec::with_capacity(rounds * WAITERS);
    let mut replays = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let key = format!("{run}-{round}");
        let Decision::Execute(first) = decide(&first_engine, &key).await else {
            panic!("the first is not executed");
        };
        let waiters: Vec<_> = engines
            .iter()
            .map(|engine| {
                let engine = engine.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let decision = decide(&engine, &key).await;
                    let at = Instant::now();
                    assert!(
                        matches!(decision, Decision::Replay(_)),
                        "a waiter did not replay: {decision:?}"
                    );
                    at
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        first.complete(response.clone()).await;
        // The first's response leaves now.
        let completed = Instant::now();
        for waiter in waiters {
            let at = waiter.await.expect("waiter");
            waits.push(at.saturating_duration_since(completed));
        }
        // The baseline: one replay of the record just completed.
        let started = Instant::now();
        let decision = decide(&first_engine, &key).await;
        replays.push(started.elapsed());
        assert!(matches!(decision, Decision::Replay(_)));
    }
    println!(
        "store {}, {rounds} rounds of {WAITERS} waiters",
        store.backend()
    );
    let (_, base) = show("baseline: one replay", replays);
    let (_, p99) = show("completion -> waiter replay", waits);
    println!(
        "waiters' p99 = {:.2}x the p99 of one replay",
        p99.as_secs_f64() / base.as_secs_f64().max(1e-9)
    );
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
