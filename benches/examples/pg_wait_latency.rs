//! How soon duplicates that wait for a record in flight on PostgreSQL learn
//! that it completed, through `LISTEN`/`NOTIFY`, against a plain round trip
//! (`SELECT 1`) measured in the same run.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo run --release -p benches --example pg_wait_latency [ROUNDS] [WAITERS] [async]
//! ```
//!
//! (`async`: the stores commit with `synchronous_commit = off`, so that a
//! slow disk flush does not hide the notification's own latency.)
//!
//! Each round, a holder (one store, its own pool) claims a fresh record and
//! `WAITERS` tasks on a second store (another instance: its own pool and
//! listener) watch it. Once every watch is registered (and has marked the
//! row), the holder completes the record. Per waiter it records when its
//! watch resolved and when its claim after that returned the completed
//! record (what a waiting duplicate replays), both from the start of the
//! holder's `complete`. Reported: p50/p99 over all rounds and waiters.
//!
//! Without notification the waiters would poll every 25 ms: their wake-up
//! would be uniform over the 25 ms after the completion, plus a claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome, StoredResponse,
    TokenOutcome,
};
use idempotency_sqlx::postgres::{PostgresOptions, PostgresStore};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} p50 {:>8.1} µs   p99 {:>8.1} µs   (n = {})",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/test)");
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(300, |a| a.parse().expect("ROUNDS"));
    let waiters: usize = args.next().map_or(16, |a| a.parse().expect("WAITERS"));
    let durable = args.next().as_deref() != Some("async");
    let schema = format!("idem_wait_latency_{:08x}", rand_u32());
    let options = || {
        PostgresOptions::new()
            .schema(schema.clone())
            .max_connections(waiters.max(2) as u32)
            .synchronous_commit(durable)
    };
    let holder = PostgresStore::connect_with(&url, options())
        .await
        .expect("connect the holder");
    let waiting = Arc::new(
        PostgresStore::connect_with(&url, options())
            .await
            .expect("connect the waiters' instance"),
    );
    let fp = Fingerprint::compute("POST", "/latency", None, None, b"body");
    let claim = |fp| Claim {
        fingerprint: fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(300),
    };
    let outcome = StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    });

    let (mut wake, mut wake_after_ack, mut replay, mut complete, mut select1) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut early = 0usize;
    for round in 0..rounds + 5 {
        let id = RecordId::from_parts(b"latency", &round.to_le_bytes());
        let id = RecordId::from_parts(id.as_bytes(), schema.as_bytes());
        let ClaimOutcome::Acquired(token) = holder
            .claim(&id, LeaseToken::random(), claim(&fp))
            .await
            .expect("claim")
        else {
            panic!("not acquired");
        };
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(waiters);
        let tasks: Vec<_> = (0..waiters)
            .map(|_| {
                let (store, ready) = (Arc::clone(&waiting), ready_tx.clone());
                tokio::spawn(async move {
                    let watch = store
                        .watch(&id)
                        .await
                        .expect("watch")
                        .expect("the store notifies");
                    ready.send(()).await.expect("ready");
                    watch.await;
                    let woke = Instant::now();
                    let fp = Fingerprint::compute("POST", "/latency", None, None, b"body");
                    let got = store
                        .claim(
                            &id,
                            LeaseToken::random(),
                            Claim {
                                fingerprint: &fp,
                                lease: Duration::from_secs(30),
                                ttl: Duration::from_secs(300),
                            },
                        )
                        .await
                        .expect("claim");
                    let replayed = Instant::now();
                    assert!(
                        matches!(got, ClaimOutcome::Completed { .. }),
                        "woken before the completion was visible: {got:?}"
                    );
                    (woke, replayed)
                })
            })
            .collect();
        for _ in 0..waiters {
            ready_rx.recv().await.expect("a waiter");
        }
        let t0 = Instant::now();
        let done = holder
            .complete(&id, token, &outcome, Duration::from_secs(300))
            .await
            .expect("complete");
        let t1 = Instant::now();
        assert_eq!(done, TokenOutcome::Applied);
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("waiter"));
        }
        // The plain round trip, on the same pool, just after.
        let s = Instant::now();
        sqlx::query("SELECT 1")
            .execute(holder.pool())
            .await
            .expect("SELECT 1");
        let rtt = s.elapsed();
        if round < 5 {
            continue; // warm-up: connections, prepared statements, listener
        }
        complete.push(t1 - t0);
        select1.push(rtt);
        for (woke, replayed) in results {
            wake.push(woke.saturating_duration_since(t0));
            replay.push(replayed.saturating_duration_since(t0));
            match woke.checked_duration_since(t1) {
                Some(d) => wake_after_ack.push(d),
                None => {
                    early += 1;
                    wake_after_ack.push(Duration::ZERO);
                }
            }
        }
    }
    println!(
        "{rounds} rounds x {waiters} waiters (second instance), synchronous_commit = {}, PostgreSQL at {}",
        if durable { "on" } else { "off" },
        redact(&url)
    );
    report("baseline: SELECT 1 round trip", select1);
    report("holder's complete (call to return)", complete);
    report("waiter woken, from the complete call", wake);
    report("waiter woken, from complete's return", wake_after_ack);
    report("waiter has the replay, from the complete call", replay);
    println!("(wake-ups that came before complete returned: {early}, counted as 0 above)");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(holder.pool())
        .await
        .expect("drop schema");
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
