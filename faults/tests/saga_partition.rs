//! Scenario 5 of issue 25: the order saga under a partition. order-saga,
//! inventory-service and payments-axum run in namespaces of their own on a
//! private PostgreSQL and RabbitMQ; order-saga reaches the broker by a link
//! of its own, cut for 10 s while orders come in. Every order still ends
//! `completed` or `compensated` (a declined charge compensates), and no
//! process is restarted.

use std::time::{Duration, Instant};

use faults::{enabled, exchange, pool, Bin, Netns, Postgres, Rabbit, Services};
use test_support::SlowProxy;

const ORDERS: u32 = 60;
const DECLINE_ABOVE: i64 = 5000;
const CUT: Duration = Duration::from_secs(10);

/// How long orders may take to be final after the link returns.
const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_broker_cut_10s_every_order_completed_or_compensated() {
    if !enabled("saga_broker_cut") {
        return;
    }
    let services = Services::new();
    let pg = Postgres::start(&services.postgres()).await;
    let rabbit = Rabbit::start(&services.rabbitmq()).await;
    let admin = pool(&pg.url("postgres")).await;
    for db in ["orders", "inventory", "payments"] {
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE");
    }
    let (ns_pay, ns_inv, mut ns_saga) = (Netns::new("pay"), Netns::new("inv"), Netns::new("saga"));
    let broker_link = ns_saga.link_to(&[services.rabbitmq()]);
    let payments_db = pg.url("payments");
    let decline = DECLINE_ABOVE.to_string();
    let mut payments = Bin::start(
        &ns_pay,
        "payments-axum",
        &[
            "--listen",
            "0.0.0.0:3000",
            "--store",
            &payments_db,
            "--transactional",
            "--decline-above",
            &decline,
        ],
        "serving",
    )
    .await;
    let (inventory_db, amqp) = (pg.url("inventory"), rabbit.url());
    let mut inventory = Bin::start(
        &ns_inv,
        "inventory-service",
        &[
            "--database",
            &inventory_db,
            "--broker",
            "rabbitmq",
            "--amqp",
            &amqp,
        ],
        "inventory-service ready",
    )
    .await;
    let inventory_pool = pool(&inventory_db).await;
    sqlx::query("INSERT INTO inventory_stock (sku, available) VALUES ('fz-sku', 100000)")
        .execute(&inventory_pool)
        .await
        .expect("seeding the stock");
    // Namespaces reach each other only through the host, which does not
    // forward (ip_forward stays as it is): order-saga calls payments-axum
    // through a plain forwarder on the host, a SlowProxy left fast.
    let forwarder = SlowProxy::start(
        &format!("{}:3000", services.proxy()),
        format!("{}:3000", ns_pay.addr()),
    )
    .await;
    let (orders_db, payments_url) = (pg.url("orders"), format!("http://{}", forwarder.addr));
    let mut saga = Bin::start(
        &ns_saga,
        "order-saga",
        &[
            "--listen",
            "0.0.0.0:3100",
            "--database",
            &orders_db,
            "--broker",
            "rabbitmq",
            "--amqp",
            &amqp,
            "--payments-url",
            &payments_url,
            "--step-timeout",
            "120s",
        ],
        "order-saga serving",
    )
    .await;
    let orders_addr = format!("{}:3100", ns_saga.addr());

    let started = Instant::now();
    let mut ids = Vec::new();
    let mut cut_at = None;
    for i in 0..ORDERS {
        if i == 20 {
            ns_saga.link(broker_link).cut();
            cut_at = Some(Instant::now());
        }
        let amount = if i % 5 == 4 {
            DECLINE_ABOVE + 1
        } else {
            100 + i64::from(i)
        };
        let body =
            serde_json::json!({"sku": "fz-sku", "quantity": 1, "amount": amount}).to_string();
        let key = format!("fz-order-{}-{i}", std::process::id());
        let answer = exchange(
            &orders_addr,
            "POST",
            "/orders",
            &[
                ("Idempotency-Key", &key),
                ("Content-Type", "application/json"),
            ],
            &body,
            Duration::from_secs(10),
        )
        .await
        .expect("POST /orders");
        assert_eq!(answer.status, 202, "{}", answer.text());
        let id = answer.json()["id"].as_str().expect("an id").to_owned();
        ids.push((id, amount > DECLINE_ABOVE));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let cut_at = cut_at.expect("the cut");
    let left = CUT.saturating_sub(cut_at.elapsed());
    tokio::time::sleep(left).await;
    ns_saga.link(broker_link).restore();
    let restored = Instant::now();

    // Every order final, within 120 s of the link's return.
    let mut states = Vec::new();
    loop {
        states.clear();
        for (id, _) in &ids {
            let answer = exchange(
                &orders_addr,
                "GET",
                &format!("/orders/{id}"),
                &[],
                "",
                Duration::from_secs(10),
            )
            .await
            .expect("GET /orders/<id>");
            states.push(answer.json()["state"].as_str().unwrap_or("?").to_owned());
        }
        if states
            .iter()
            .all(|s| s == "completed" || s == "compensated" || s == "failed")
        {
            break;
        }
        assert!(
            restored.elapsed() < LIMIT,
            "orders not final {LIMIT:?} after the link returned: {:?}; saga log:\n{}\n\
             inventory log:\n{}\npayments log:\n{}",
            states,
            faults::tail(&saga.log(), 30),
            faults::tail(&inventory.log(), 15),
            faults::tail(&payments.log(), 10)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let final_after = restored.elapsed();
    for ((id, declined), state) in ids.iter().zip(&states) {
        let want = if *declined {
            "compensated"
        } else {
            "completed"
        };
        assert_eq!(state, want, "order {id}");
    }
    payments.assert_running();
    inventory.assert_running();
    saga.assert_running();
    let completed = states.iter().filter(|s| *s == "completed").count();
    let compensated = states.iter().filter(|s| *s == "compensated").count();
    println!(
        "FIGURES | order-saga cut from RabbitMQ for {:.0} s | orders {}, completed {completed}, \
         compensated {compensated}, failed 0, every order final {:.1} s after the link returned, \
         no process restarted | {:.0} s in all",
        CUT.as_secs_f64(),
        ids.len(),
        final_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(saga);
    drop(inventory);
    drop(payments);
    drop(ns_saga);
}
