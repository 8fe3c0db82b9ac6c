//! Scenario 3 of issue 25: the link between a payments-axum instance and
//! its store cut for 5 s in the middle of requests (Redis store, PostgreSQL
//! store, PostgreSQL in transactional mode). The instance runs in a
//! namespace whose only way to the store is a link of its own, so the test
//! still talks to it while the store is unreachable. Requests answer 503 or
//! complete; after the link returns, every key has executed at most once
//! (the handler's executions are the payments the instance lists) and a
//! retry of every key replays its first answer.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faults::{
    count, created_ids, enabled, exchange, load, pool, Bin, Netns, Postgres, Redis, Services, Tally,
};

const PAYMENTS: u32 = 200;
const RATE: u32 = 40;
const CUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Debug)]
enum Store {
    Redis,
    Postgres,
    Transactional,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_cut_mid_requests() {
    if !enabled("redis_store_cut_mid_requests") {
        return;
    }
    store_cut(Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_cut_mid_requests() {
    if !enabled("postgres_store_cut_mid_requests") {
        return;
    }
    store_cut(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_postgres_cut_mid_requests() {
    if !enabled("transactional_postgres_cut_mid_requests") {
        return;
    }
    store_cut(Store::Transactional).await;
}

async fn store_cut(store: Store) {
    let services = Services::new();
    let (redis, pg) = match store {
        Store::Redis => (Some(Redis::start(&services.redis()).await), None),
        _ => (None, Some(Postgres::start(&services.postgres()).await)),
    };
    let (url, server_addr) = match (&redis, &pg) {
        (Some(r), _) => (r.url(), services.redis()),
        (_, Some(p)) => (p.url("postgres"), services.postgres()),
        _ => unreachable!(),
    };
    let mut ns = Netns::new("api");
    let store_link = ns.link_to(&[server_addr]);
    let mut args = vec![
        "--listen",
        "0.0.0.0:3000",
        "--store",
        &url,
        "--lease",
        "5s",
        "--handler-delay",
        "100ms",
    ];
    if store == Store::Transactional {
        args.push("--transactional");
    }
    let mut api = Bin::start(&ns, "payments-axum", &args, "serving").await;
    let addr = format!("{}:3000", ns.addr());

    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let traffic = tokio::spawn(load(
        addr.clone(),
        PAYMENTS,
        RATE,
        tally.clone(),
        Instant::now() + Duration::from_secs(90),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    ns.link(store_link).cut();
    let during = tally.lock().unwrap().clone();
    tokio::time::sleep(CUT).await;
    let at_cut_end = tally.lock().unwrap().clone();
    ns.link(store_link).restore();
    let restored = Instant::now();
    let created_before = tally.lock().unwrap().created;
    let recovery = loop {
        if tally.lock().unwrap().created > created_before {
            break restored.elapsed();
        }
        assert!(
            restored.elapsed() < Duration::from_secs(60),
            "no payment created within 60 s of the link's return; api:\n{}",
            faults::tail(&api.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let results = traffic.await.expect("the load");
    let ids = created_ids(&results);
    api.assert_running();

    // Executions: the payments the handler made.
    let executed: Vec<String> = match &pg {
        Some(pg) if store == Store::Transactional => {
            let db = pool(&pg.url("postgres")).await;
            let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM payments")
                .fetch_all(&db)
                .await
                .expect("the payments table");
            assert_eq!(
                count(&db, "SELECT count(*) FROM payments").await,
                rows.len() as i64
            );
            rows
        }
        _ => {
            let listed = exchange(&addr, "GET", "/payments", &[], "", Duration::from_secs(10))
                .await
                .expect("GET /payments");
            assert_eq!(listed.status, 200, "{}", listed.text());
            listed
                .json()
                .as_array()
                .expect("a JSON array")
                .iter()
                .map(|p| p["id"].as_str().expect("an id").to_owned())
                .collect()
        }
    };
    let executed_set: HashSet<&String> = executed.iter().collect();
    let created_set: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        executed.len(),
        ids.len(),
        "{store:?}: executions {} for {} keys: a key ran more than once (or a run was lost); \
         runs without a created answer: {:?}",
        executed.len(),
        ids.len(),
        executed_set
            .difference(&created_set)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        executed_set, created_set,
        "the executions are the created payments"
    );

    // Every retry replays the first answer; in lease mode, a key whose
    // `complete` failed through the cut (the record left in flight, the
    // client given its answer) runs again once its lease has passed, as
    // idempotency-core documents: those are counted, and only allowed there.
    let (mut replayed, mut ran_again) = (0, 0);
    for (payment, id) in &results {
        let answer = loop {
            let answer = payment
                .send(&addr, Duration::from_secs(10))
                .await
                .expect("a retry");
            if answer.status != 409 {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(answer.status, 201, "{}", answer.text());
        if answer.header("idempotent-replayed") == Some("true") {
            assert_eq!(
                answer.json()["id"].as_str(),
                id.as_deref(),
                "the same payment"
            );
            replayed += 1;
        } else {
            assert_ne!(
                store,
                Store::Transactional,
                "a retry ran the handler again in transactional mode: {}",
                answer.text()
            );
            ran_again += 1;
        }
    }
    let tally = tally.lock().unwrap().clone();
    assert!(
        tally.unexpected.is_empty(),
        "answers other than 201, 409 and 503: {:?}",
        tally.unexpected
    );
    println!(
        "FIGURES | {store:?} store cut {:.0} s mid-requests | keys {}, requests {}, 503s {} \
         ({} during the cut), 409s {}, no answer {}, executions {} = keys, retries replayed {}, \
         retries that ran again (lease mode: complete failed, lease passed) {}, first 201 {:.2} s after the link returned | {:.0} s in all",
        CUT.as_secs_f64(),
        ids.len(),
        tally.requests,
        tally.unavailable,
        at_cut_end.unavailable - during.unavailable,
        tally.conflicts,
        tally.errors,
        executed.len(),
        replayed,
        ran_again,
        recovery.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(api);
    drop(ns);
}
