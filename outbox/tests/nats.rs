//! The relay through a real NATS JetStream (`NATS_URL`) from PostgreSQL
//! (`DATABASE_URL`). Each test has its own database and stream.
#![cfg(all(feature = "nats", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use common::PgEnv;
use futures_util::StreamExt;
use outbox::nats::NatsPublisher;
use outbox::{Event, PostgresRelay, RelayConfig};

struct Nats {
    js: jetstream::Context,
    stream: String,
}

impl Nats {
    async fn new(url: &str) -> Self {
        let client = async_nats::connect(url)
            .await
            .expect("NATS does not answer");
        let js = jetstream::new(client);
        let stream = common::unique("OUTBOX").to_uppercase();
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        Self { js, stream }
    }

    /// `payments` → `<stream>.payments.created`; other destinations unmapped.
    fn publisher(&self) -> NatsPublisher {
        let stream = self.stream.clone();
        NatsPublisher::new(self.js.clone(), move |d| {
            (d == "payments").then(|| format!("{stream}.payments.created"))
        })
    }

    async fn consumer(&self) -> PullConsumer {
        self.js
            .get_stream(&self.stream)
            .await
            .unwrap()
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("check".into()),
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn stored(&self) -> u64 {
        self.js
            .get_stream(&self.stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }

    async fn cleanup(&self) {
        let _ = self.js.delete_stream(&self.stream).await;
    }
}

async fn setup(test: &str) -> Option<(PgEnv, Nats)> {
    let url = common::service_url("NATS_URL", test)?;
    let env = PgEnv::new(test).await?;
    Some((env, Nats::new(&url).await))
}

fn fast() -> outbox::RelayConfigBuilder {
    RelayConfig::builder()
        .poll_interval(Duration::from_millis(50))
        .outage_delay(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(50), Duration::from_millis(200))
}

#[tokio::test]
async fn nats_a_committed_event_is_published_once_with_its_msg_id_payload_and_headers() {
    let Some((env, nats)) = setup("nats_a_committed_event_is_published_once").await else {
        return;
    };
    let gone = Event::new("payments", &b"gone"[..]);
    let mut tx = env.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &gone).await.unwrap();
    tx.rollback().await.unwrap();
    let kept = Event::new("payments", &br#"{"amount":5}"#[..])
        .with_ordering_key("acct-1")
        .with_header("content-type", "application/json")
        .with_header("x-trace", "t-1");
    env.enqueue(&kept).await;

    let relay = PostgresRelay::new(env.pool.clone(), nats.publisher(), fast().build().unwrap());
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.published), (1, 1), "{r:?}");
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    assert_eq!(nats.stored().await, 1);

    let mut messages = nats.consumer().await.messages().await.unwrap();
    let m = common::bounded("the message", messages.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.subject.as_str(),
        format!("{}.payments.created", nats.stream)
    );
    assert_eq!(&m.payload[..], br#"{"amount":5}"#);
    let headers = m.headers.as_ref().unwrap();
    let id = kept.id().to_string();
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        headers.get("content-type").map(|v| v.as_str()),
        Some("application/json")
    );
    assert_eq!(headers.get("x-trace").map(|v| v.as_str()), Some("t-1"));
    m.ack().await.unwrap();
    nats.cleanup().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_two_relays_publish_1000_events_per_key_in_order() {
    let Some((env, nats)) = setup("nats_two_relays_publish_1000_events_per_key_in_order").await
    else {
        return;
    };
    const N: usize = 1000;
    let config = fast().batch_size(100).build().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut relays = Vec::new();
    for _ in 0..2 {
        let relay = PostgresRelay::new(env.pool.clone(), nats.publisher(), config.clone());
        let (r, stop) = (relay.clone(), stop.clone());
        relays.push((
            relay,
            tokio::spawn(async move { r.run(async move { stop.notified().await }).await }),
        ));
    }
    let started = Instant::now();
    let events = common::keyed_events("payments", N, 10);
    for chunk in events.chunks(50) {
        let mut tx = env.pool.begin().await.unwrap();
        for e in chunk {
            outbox::enqueue(&mut *tx, e).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let mut messages = nats.consumer().await.messages().await.unwrap();
    let mut payloads = Vec::new();
    let mut ids = std::collections::HashSet::new();
    common::bounded("consume all", async {
        while ids.len() < N {
            let m = messages.next().await.unwrap().unwrap();
            let id = m
                .headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .as_str()
                .to_owned();
            ids.insert(id);
            payloads.push(m.payload.to_vec());
            m.ack().await.unwrap();
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
    for (_, h) in relays {
        common::bounded("relay stops", h).await.unwrap().unwrap();
    }
    eprintln!(
        "nats, two relays: {N} events enqueued and consumed in {took:?} ({:.0}/s), {} deliveries",
        N as f64 / took.as_secs_f64(),
        payloads.len()
    );
    nats.cleanup().await;
    env.finish().await;
}

#[tokio::test]
async fn nats_an_unmapped_destination_dies_and_a_missing_stream_is_retried() {
    let Some((env, nats)) = setup("nats_an_unmapped_destination_dies").await else {
        return;
    };
    let unmapped = Event::new("refunds", &b"x"[..]);
    env.enqueue(&unmapped).await;
    let relay = PostgresRelay::new(env.pool.clone(), nats.publisher(), fast().build().unwrap());
    let r = relay.run_once().await.unwrap();
    assert_eq!((r.claimed, r.dead), (1, 1), "{r:?}");
    let (_, dead, error, _) = env.state(unmapped.id()).await;
    assert!(dead);
    assert!(error.unwrap().contains("no subject"));

    // A subject no stream takes: refused, counted, retried.
    nats.cleanup().await;
    let orphan = Event::new("payments", &b"y"[..]);
    env.enqueue(&orphan).await;
    let r = relay.run_once().await.unwrap();
    assert_eq!(r.claimed, 1, "{r:?}");
    let (attempts, dead, error, published) = env.state(orphan.id()).await;
    assert_eq!((attempts, dead, published), (1, false, false), "{error:?}");
    assert!(error.unwrap().contains("no stream"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_real_outage_holds_events_and_publishing_resumes_without_a_restart() {
    let Some((env, nats)) = setup("nats_a_real_outage").await else {
        return;
    };
    let url = std::env::var("NATS_URL").unwrap();
    let proxy = common::Proxy::start(common::host_port(&url, 4222)).await;
    let client = async_nats::connect(common::via(&url, proxy.addr))
        .await
        .unwrap();
    let stream = nats.stream.clone();
    let publisher = NatsPublisher::new(jetstream::new(client), move |d| {
        (d == "payments").then(|| format!("{stream}.payments.created"))
    });
    let config = fast()
        .publish_timeout(Duration::from_secs(1))
        .max_attempts(2)
        .build()
        .unwrap();
    let relay = PostgresRelay::new(env.pool.clone(), publisher, config);
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(async move { stop.notified().await }).await })
    };
    let events = common::keyed_events("payments", 40, 4);
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
    // JetStream dropped the copies by Nats-Msg-Id: each event once, in order.
    assert_eq!(nats.stored().await, 40);
    let mut messages = nats.consumer().await.messages().await.unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 40 {
        let m = common::bounded("a message", messages.next())
            .await
            .unwrap()
            .unwrap();
        payloads.push(m.payload.to_vec());
        m.ack().await.unwrap();
    }
    common::assert_per_key_order(&payloads, 40);
    nats.cleanup().await;
    env.finish().await;
}
