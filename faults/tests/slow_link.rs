//! Scenario 4 of issue 25: a slow link (100–500 ms a chunk each way, 5 %
//! of chunks lost and retransmitted 1 s later) between payments-axum
//! (`--transactional`, in its namespace) and its PostgreSQL, through
//! test-support's `SlowProxy` (netem does not exist on this kernel). Each
//! request answers 201, or 503 within a bound of the store's timeout;
//! once the link is fast again every request succeeds (no pool exhausted
//! for good); every key that got a 201 is one payment.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faults::{count, enabled, pool, Bin, Netns, Payment, Postgres, Services};
use test_support::{SlowProxy, Slowness};

/// The store's timeout a call (idempotency-core's default).
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Before,
    Slow,
    After,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_link_to_postgres_503_in_time_or_success_and_the_pool_recovers() {
    if !enabled("slow_link_to_postgres") {
        return;
    }
    let services = Services::new();
    let pg = Postgres::start(&services.postgres()).await;
    let proxy = SlowProxy::start(
        &format!("{}:5432", services.proxy()),
        format!("{}:5432", services.postgres()),
    )
    .await;
    let store = format!("postgres://postgres@{}/postgres", proxy.addr);
    let ns = Netns::new("api");
    let mut api = Bin::start(
        &ns,
        "payments-axum",
        &[
            "--listen",
            "0.0.0.0:3000",
            "--transactional",
            "--store",
            &store,
        ],
        "serving",
    )
    .await;
    let addr = format!("{}:3000", ns.addr());
    let phase = Arc::new(Mutex::new(Phase::Before));
    // (phase, status or 0 for no answer, latency)
    let seen: Arc<Mutex<Vec<(Phase, u16, Duration)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let slow_from = Duration::from_secs(4);
    let slow_until = Duration::from_secs(19);
    let end = Duration::from_secs(27);
    let mut i = 0;
    while started.elapsed() < end {
        let elapsed = started.elapsed();
        let now = if elapsed < slow_from {
            Phase::Before
        } else if elapsed < slow_until {
            Phase::Slow
        } else {
            Phase::After
        };
        let changed = {
            let mut p = phase.lock().unwrap();
            let changed = *p != now;
            *p = now;
            changed
        };
        if changed && now == Phase::Slow {
            proxy.set(Slowness {
                min: Duration::from_millis(100),
                max: Duration::from_millis(500),
                loss_percent: 5,
                retransmit: Duration::from_secs(1),
            });
        }
        if changed && now == Phase::After {
            proxy.set(Slowness::default());
        }
        let payment = Payment::new(i);
        i += 1;
        let (addr, seen) = (addr.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let answer = payment.send(&addr, Duration::from_secs(30)).await;
            let status = answer.as_ref().map(|a| a.status).unwrap_or(0);
            seen.lock().unwrap().push((now, status, sent.elapsed()));
            (payment, status)
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("a request"));
    }
    api.assert_running();
    let seen = seen.lock().unwrap().clone();
    let of = |phase: Phase| seen.iter().filter(move |(p, _, _)| *p == phase);
    let fig = |phase: Phase| {
        let n = of(phase).count();
        let ok = of(phase).filter(|(_, s, _)| *s == 201).count();
        let unavailable = of(phase).filter(|(_, s, _)| *s == 503).count();
        let max_503 = of(phase)
            .filter(|(_, s, _)| *s == 503)
            .map(|(_, _, d)| *d)
            .max()
            .unwrap_or_default();
        let mut ok_latency: Vec<Duration> = of(phase)
            .filter(|(_, s, _)| *s == 201)
            .map(|(_, _, d)| *d)
            .collect();
        ok_latency.sort();
        let median = ok_latency
            .get(ok_latency.len() / 2)
            .copied()
            .unwrap_or_default();
        (n, ok, unavailable, max_503, median)
    };
    let others: Vec<_> = seen
        .iter()
        .filter(|(_, s, _)| *s != 201 && *s != 503)
        .collect();
    assert!(
        others.is_empty(),
        "answers other than 201 and 503: {others:?}"
    );
    let (n_slow, ok_slow, u_slow, max_503, median_slow) = fig(Phase::Slow);
    // A request makes a few store calls, each bounded by the timeout.
    let bound = STORE_TIMEOUT * 3;
    assert!(
        max_503 <= bound,
        "a 503 took {max_503:?}, more than {bound:?} (3 store timeouts)"
    );
    let (n_before, ok_before, _, _, median_before) = fig(Phase::Before);
    assert_eq!(
        ok_before, n_before,
        "before the slowness every request succeeds"
    );
    // After: once the requests sent in the first 3 s after the link is fast
    // again are past, every request succeeds.
    let tail: Vec<_> = seen.iter().filter(|(p, _, _)| *p == Phase::After).collect();
    let settled = &tail[tail.len().min(60)..];
    assert!(!settled.is_empty());
    assert!(
        settled.iter().all(|(_, s, _)| *s == 201),
        "after the slowness, requests still fail: {:?}",
        settled
            .iter()
            .filter(|(_, s, _)| *s != 201)
            .take(5)
            .collect::<Vec<_>>()
    );
    let (n_after, ok_after, u_after, _, median_after) = fig(Phase::After);
    // Executions: every 201 is one row; a 503 left none behind (the
    // transaction rolled back).
    let db = pool(&pg.url("postgres")).await;
    let rows = count(&db, "SELECT count(*) FROM payments").await;
    let created = results.iter().filter(|(_, s)| *s == 201).count() as i64;
    assert_eq!(rows, created, "payments rows = keys answered 201");
    println!(
        "FIGURES | slow link API-PostgreSQL (100-500 ms a chunk, 5 % retransmitted after 1 s) | \
         requests {} ({n_before} before, {n_slow} slow, {n_after} after); slow: {ok_slow} 201, \
         {u_slow} 503 (slowest 503 {:.1} s, bound {:.0} s), median 201 {:.2} s vs {:.3} s before; \
         after: {ok_after} 201, {u_after} 503, every request from 3 s after on 201 (median {:.3} s); \
         rows = 201s = {rows} | {:.0} s in all",
        seen.len(),
        max_503.as_secs_f64(),
        bound.as_secs_f64(),
        median_slow.as_secs_f64(),
        median_before.as_secs_f64(),
        median_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(api);
    drop(ns);
}
