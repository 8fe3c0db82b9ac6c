//! The broker sources through the transactional inbox: RabbitMQ
//! (`AMQP_URL`) and NATS JetStream (`NATS_URL`), into PostgreSQL
//! (`DATABASE_URL`, a database per test). Each is skipped, saying so, when
//! its URL is unset. A duplicate delivery is applied once; a message that
//! cannot be applied is parked with its reason.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use common::{fast, model_totals, seen, Db, Payment, Totals};
use futures_util::StreamExt;
use inbox_consumer::{nats, rabbitmq, Disposition, Outcome};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use projection::{Projector, Source, VersionState};
use test_support::{bounded, service_url, unique};

fn projector(db: &Db, name: &str) -> Projector<Totals> {
    Projector::builder(db.pool.clone(), name, Totals::default())
        .source(Source::Inbox)
        .config(projection::ProjectorConfig {
            max_attempts: 2,
            ..fast()
        })
        .build()
        .unwrap()
}

fn payment() -> Vec<u8> {
    serde_json::to_vec(&Payment::new("acct-1", 42, "EUR")).unwrap()
}

#[tokio::test]
async fn rabbitmq_a_duplicate_delivery_applies_once() {
    let Some(amqp) = service_url("AMQP_URL", "rabbitmq_a_duplicate_delivery_applies_once") else {
        return;
    };
    let Some(db) = Db::new("rabbitmq_a_duplicate_delivery_applies_once").await else {
        return;
    };
    let p = projector(&db, "amqp_totals");
    let inbox = p.inbox().await.unwrap();
    assert_eq!(inbox.consumer(), "amqp_totals_v1");
    assert_eq!(p.state().await.unwrap(), VersionState::Building);

    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("projection_q");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // The same event twice (a publisher's retry), and one that cannot apply.
    for (id, body) in [
        ("evt-1", payment()),
        ("evt-1", payment()),
        ("evt-bad", b"not json".to_vec()),
    ] {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_message_id(id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "projection-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    bounded("the deliveries", async {
        // The first is processed and then requeued, as if its ack was lost:
        // its redelivery is a duplicate too.
        let mut requeued = false;
        while outcomes.len() < 4 {
            let delivery = consumer.next().await.expect("deliveries").unwrap();
            let message = rabbitmq::message(&delivery);
            let outcome = p.apply_message(&inbox, &message).await;
            if !requeued && matches!(outcome, Outcome::Processed { .. }) {
                requeued = true;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .unwrap();
            } else if outcome.disposition() == Disposition::Ack {
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                rabbitmq::settle(&delivery, &outcome).await.unwrap();
            }
            outcomes.push((message.id().unwrap_or_default().to_owned(), outcome.name()));
        }
    })
    .await;
    let processed = outcomes.iter().filter(|(_, o)| *o == "processed").count();
    let duplicates = outcomes.iter().filter(|(_, o)| *o == "duplicate").count();
    assert_eq!((processed, duplicates), (1, 2), "{outcomes:?}");
    assert!(
        outcomes.contains(&("evt-bad".to_owned(), "dead")),
        "{outcomes:?}"
    );

    assert_eq!(seen(&db.pool, p.version()).await, (1, 1));
    assert_eq!(
        model_totals(&db.pool, p.version()).await,
        [("EUR".to_owned(), (42, 1))].into_iter().collect()
    );
    let parked = p.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, "evt-bad");
    assert!(
        parked[0].reason.contains("permanent"),
        "{}",
        parked[0].reason
    );
    let m = p.metrics();
    assert_eq!((m.applied, m.parked), (1, 1), "{m:?}");
    assert_eq!(inbox.metrics().duplicate, 2);
    // A broker-fed version is switched to by the application.
    assert!(p.switch().await.unwrap());
    assert_eq!(p.served_version().await.unwrap(), Some(1));

    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    db.finish().await;
}

#[tokio::test]
async fn nats_a_duplicate_delivery_applies_once() {
    let Some(url) = service_url("NATS_URL", "nats_a_duplicate_delivery_applies_once") else {
        return;
    };
    let Some(db) = Db::new("nats_a_duplicate_delivery_applies_once").await else {
        return;
    };
    let p = projector(&db, "nats_totals");
    let inbox = p.inbox().await.unwrap();

    let js = jetstream::new(
        async_nats::connect(&url)
            .await
            .expect("NATS does not answer"),
    );
    let stream = unique("PROJ").to_uppercase();
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    for (id, body) in [("evt-1", payment()), ("evt-bad", b"not json".to_vec())] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(nats::MSG_ID_HEADER, id);
        js.publish_with_headers(format!("{stream}.payments"), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A durable consumer from the stream's start, named after the version.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(&stream)
        .await
        .unwrap()
        .get_or_create_consumer(
            p.consumer(),
            jetstream::consumer::pull::Config {
                durable_name: Some(p.consumer().to_owned()),
                ack_wait: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut outcomes = Vec::new();
    bounded("the deliveries", async {
        // The first is processed, then nak'ed as if its ack was lost: its
        // redelivery is a duplicate.
        let mut naked = false;
        while outcomes.len() < 3 {
            let msg = messages.next().await.expect("messages").unwrap();
            let message = nats::message(&msg);
            let outcome = p.apply_message(&inbox, &message).await;
            if !naked && matches!(outcome, Outcome::Processed { .. }) {
                naked = true;
                msg.ack_with(AckKind::Nak(None)).await.unwrap();
            } else {
                nats::settle(&msg, &outcome).await.unwrap();
            }
            outcomes.push((message.id().unwrap_or_default().to_owned(), outcome.name()));
        }
    })
    .await;
    assert!(
        outcomes.contains(&("evt-1".to_owned(), "processed")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("evt-1".to_owned(), "duplicate")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("evt-bad".to_owned(), "dead")),
        "{outcomes:?}"
    );
    assert_eq!(seen(&db.pool, p.version()).await, (1, 1));
    assert_eq!(
        model_totals(&db.pool, p.version()).await,
        [("EUR".to_owned(), (42, 1))].into_iter().collect()
    );
    assert_eq!(p.parked().await.unwrap().len(), 1);
    let _ = js.delete_stream(&stream).await;
    db.finish().await;
}

/// A broker-fed projection records the lag it reads from the broker: the
/// application must be able to make a `Lag` (it is `non_exhaustive`, so
/// without `Lag::new` nothing outside the crate could call `record_lag`).
#[tokio::test]
async fn a_broker_fed_projection_records_the_lag_it_measures() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://unused@127.0.0.1:1/unused")
        .unwrap();
    let p = Projector::builder(pool, "lag_totals", Totals::default())
        .source(Source::Inbox)
        .build()
        .unwrap();
    p.record_lag(projection::Lag::new(7, 1.5));
    let m = p.metrics();
    assert_eq!((m.events_behind, m.seconds_behind), (Some(7), Some(1.5)));
}

/// Batch mode from RabbitMQ: a batch holding a duplicate and an event that
/// cannot apply commits the others once, and parks the bad one.
#[tokio::test]
async fn rabbitmq_a_batch_applies_each_new_event_once_and_parks_the_bad_one() {
    const TEST: &str = "rabbitmq_a_batch_applies_each_new_event_once";
    let Some(amqp) = service_url("AMQP_URL", TEST) else {
        return;
    };
    let Some(db) = Db::new(TEST).await else {
        return;
    };
    let p = projector(&db, "amqp_batch_totals");
    let inbox = p.inbox().await.unwrap();
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("projection_batch_q");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let sent = [
        ("evt-1", payment()),
        ("evt-2", payment()),
        ("evt-1", payment()),
        ("evt-bad", b"not json".to_vec()),
        ("evt-3", payment()),
    ];
    for (id, body) in &sent {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_message_id((*id).into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let total = sent.len();
    let outcomes = std::sync::Mutex::new(Vec::new());
    let done = tokio::sync::Notify::new();
    let (p_ref, inbox_ref, outcomes_ref, done_ref) = (&p, &inbox, &outcomes, &done);
    bounded(
        "the batches",
        rabbitmq::Subscription::new(amqp.as_str(), queue.as_str())
            .batch(10, Duration::from_millis(200))
            .run_batch(
                |messages| async move {
                    let got = p_ref.apply_batch(inbox_ref, &messages).await;
                    let mut all = outcomes_ref.lock().unwrap();
                    for (m, o) in messages.iter().zip(&got) {
                        all.push((m.id().unwrap_or_default().to_owned(), o.name()));
                    }
                    if all.len() >= total {
                        done_ref.notify_one();
                    }
                    got
                },
                done.notified(),
            ),
    )
    .await
    .unwrap();
    let outcomes = outcomes.into_inner().unwrap();
    let named = |want: &str| outcomes.iter().filter(|(_, o)| *o == want).count();
    assert_eq!(
        (named("processed"), named("duplicate"), named("dead")),
        (3, 1, 1),
        "{outcomes:?}"
    );
    assert_eq!(
        model_totals(&db.pool, p.version()).await,
        [("EUR".to_owned(), (3 * 42, 3))].into_iter().collect()
    );
    assert_eq!(seen(&db.pool, p.version()).await, (3, 1));
    let parked = p.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, "evt-bad");
    let m = p.metrics();
    assert_eq!((m.applied, m.parked), (3, 1), "{m:?}");
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    db.finish().await;
}
