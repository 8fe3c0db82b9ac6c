//! The relay through a real RabbitMQ (`AMQP_URL`) from PostgreSQL
//! (`DATABASE_URL`). Each test has its own database and queue.
#![cfg(all(feature = "rabbitmq", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::PgEnv;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{Event, PostgresRelay, RelayConfig};

async fn setup(test: &str) -> Option<(PgEnv, String, Connection, Channel, String)> {
    let amqp = common::service_url("AMQP_URL", test)?;
    let env = PgEnv::new(test).await?;
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    let queue = common::unique("outbox_q");
    Some((env, amqp, conn, ch, queue))
}

async fn declare(ch: &Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn delete(ch: &Channel, queue: &str) {
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

fn fast() -> outbox::RelayConfigBuilder {
    RelayConfig::builder()
        .poll_interval(Duration::from_millis(50))
        .outage_delay(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(50), Duration::from_millis(200))
}

#[tokio::test]
async fn rabbitmq_a_committed_event_is_published_once_with_its_id_payload_and_headers() {
    let Some((env, amqp, _conn, ch, queue)) =
        setup("rabbitmq_a_committed_event_is_published_once").await
    else {
        return;
    };
    declare(&ch, &queue).await;
    let gone = Event::new(queue.as_str(), &b"gone"[..]);
    let mut tx = env.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &gone).await.unwrap();
    tx.rollback().await.unwrap();
    let kept = Event::new(queue.as_str(), &br#"{"amount":5}"#[..])
        .with_ordering_key("acct-1")
        .with_header("content-type", "application/json")
        .with_header("x-trace", "t-1");
    env.enqueue(&kept).await;

    let publisher = RabbitMqPublisher::connect(amqp).await.unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), publisher, fast().build().unwrap());
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);

    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the event is in the queue");
    let props = &got.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        Some(kept.id().to_string())
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(got.delivery.data, br#"{"amount":5}"#);
    let headers = props.headers().as_ref().unwrap();
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("x-trace").as_deref(), Some("t-1"));
    // Once: nothing else in the queue.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let more = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(more.is_none());
    delete(&ch, &queue).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_two_relays_publish_1000_events_per_key_in_order() {
    let Some((env, amqp, _conn, ch, queue)) =
        setup("rabbitmq_two_relays_publish_1000_events_per_key_in_order").await
    else {
        return;
    };
    const N: usize = 1000;
    declare(&ch, &queue).await;
    let config = fast().batch_size(100).build().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut relays = Vec::new();
    for _ in 0..2 {
        let publisher = RabbitMqPublisher::connect(amqp.clone()).await.unwrap();
        let relay = PostgresRelay::new(env.pool.clone(), publisher, config.clone());
        let stop = stop.clone();
        let r = relay.clone();
        relays.push((
            relay,
            tokio::spawn(async move { r.run(async move { stop.notified().await }).await }),
        ));
    }
    let started = Instant::now();
    // Enqueued while the relays run, in transactions of 50.
    let events = common::keyed_events(&queue, N, 10);
    for chunk in events.chunks(50) {
        let mut tx = env.pool.begin().await.unwrap();
        for e in chunk {
            outbox::enqueue(&mut *tx, e).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut payloads = Vec::new();
    let mut ids = std::collections::HashSet::new();
    common::bounded("consume all", async {
        while ids.len() < N {
            let d = consumer.next().await.unwrap().unwrap();
            let id = d
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .to_owned();
            ids.insert(id);
            payloads.push(d.data.clone());
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    })
    .await;
    let took = started.elapsed();
    common::assert_per_key_order(&payloads, N);
    let expected: std::collections::HashSet<_> =
        events.iter().map(|e| e.id().to_string()).collect();
    assert_eq!(ids, expected);
    common::eventually("all marked", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;
    stop.notify_waiters();
    let mut published = 0;
    for (relay, h) in relays {
        common::bounded("relay stops", h).await.unwrap().unwrap();
        published += relay.metrics().published;
    }
    assert_eq!(published, N as u64);
    eprintln!(
        "rabbitmq, two relays: {N} events enqueued and consumed in {took:?} ({:.0}/s), {} deliveries",
        N as f64 / took.as_secs_f64(),
        payloads.len()
    );
    delete(&ch, &queue).await;
    env.finish().await;
}

#[tokio::test]
async fn rabbitmq_an_unroutable_event_is_retried_until_its_queue_exists() {
    let Some((env, amqp, _conn, ch, queue)) =
        setup("rabbitmq_an_unroutable_event_is_retried").await
    else {
        return;
    };
    let event = Event::new(queue.as_str(), &b"early"[..]);
    env.enqueue(&event).await;
    let publisher = RabbitMqPublisher::connect(amqp).await.unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), publisher, fast().build().unwrap());
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.retried), (1, 1), "{r:?}");
    let (attempts, dead, error, published) = env.state(event.id()).await;
    assert_eq!((attempts, dead, published), (1, false, false));
    assert!(
        error.as_deref().unwrap_or_default().contains("returned"),
        "{error:?}"
    );
    // The channel survived the return; once the queue exists, it goes out.
    declare(&ch, &queue).await;
    common::eventually("published", || async {
        relay.run_once().await.unwrap().published == 1
    })
    .await;
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("published");
    assert_eq!(got.delivery.data, b"early");
    delete(&ch, &queue).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_real_outage_holds_events_and_publishing_resumes_without_a_restart() {
    let Some((env, amqp, _conn, ch, queue)) = setup("rabbitmq_a_real_outage").await else {
        return;
    };
    declare(&ch, &queue).await;
    let proxy = common::Proxy::start(common::host_port(&amqp, 5672)).await;
    let publisher = RabbitMqPublisher::connect(common::via(&amqp, proxy.addr))
        .await
        .unwrap();
    let config = fast()
        .publish_timeout(Duration::from_secs(2))
        .max_attempts(2)
        .build()
        .unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), publisher, config);
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    let events = common::keyed_events(&queue, 40, 4);
    for e in &events[..10] {
        env.enqueue(e).await;
    }
    common::eventually("published before the outage", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;

    proxy.cut();
    for e in &events[10..] {
        env.enqueue(e).await;
    }
    common::eventually("the relay hit the outage", || async {
        relay.metrics().unavailable >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Waiting, not counted as attempts, not dead.
    assert_eq!(
        env.count("published_at IS NULL AND attempts = 0 AND dead_at IS NULL")
            .await,
        30
    );
    proxy.restore();
    common::eventually("published after the outage", || async {
        env.count("published_at IS NULL").await == 0
    })
    .await;
    stop.notify_waiters();
    common::bounded("relay stops", running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(relay.metrics().dead, 0);

    let mut payloads = Vec::new();
    while let Some(got) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        payloads.push(got.delivery.data.clone());
    }
    common::assert_per_key_order(&payloads, 40);
    delete(&ch, &queue).await;
    env.finish().await;
}

#[tokio::test]
async fn rabbitmq_amqps_sends_a_tls_client_hello_never_the_amqp_header() {
    let mut server = test_support::SilentServer::start().await;
    let url = format!("amqps://guest:guest@{}/%2f", server.addr);
    let connecting = tokio::spawn(async move {
        RabbitMqPublisher::connect_with_timeout(url, Duration::from_secs(2)).await
    });
    let first = server
        .first_bytes(Duration::from_secs(10))
        .await
        .expect("the publisher sent nothing");
    assert!(
        !first.starts_with(b"AMQP"),
        "an amqps:// URL went out as plaintext AMQP: {first:?}"
    );
    assert!(
        test_support::is_tls_client_hello(&first),
        "not a TLS ClientHello: {first:?}"
    );
    assert!(connecting.await.expect("connect panicked").is_err());
}

#[tokio::test]
async fn rabbitmq_a_broker_that_never_answers_is_an_error_within_the_connect_timeout() {
    let server = test_support::SilentServer::start().await;
    let url = format!("amqp://guest:guest@{}/%2f", server.addr);
    let started = Instant::now();
    let err = RabbitMqPublisher::connect_with_timeout(url, Duration::from_millis(300))
        .await
        .expect_err("a silent broker");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.to_string().contains("did not answer within 300ms"),
        "{err}"
    );
}
