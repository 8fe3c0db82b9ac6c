//! One trace across every hop (feature `trace`; DESIGN section 6d), with
//! OpenTelemetry's in-memory exporter behind tracing-opentelemetry's layer:
//!
//! - `POST /payments` (payments-axum's route, middleware and request span,
//!   `--transactional --outbox` on PostgreSQL, in this process) enqueues its
//!   event with the request's `traceparent`; the outbox relay publishes it
//!   to a real RabbitMQ queue in a span of that trace (`outbox.publish`),
//!   whose context the header carries; the ledger's inbox handles it in a
//!   child span of that, and writes the ledger row there.
//! - An order saga started in a request span: every step's span (a local
//!   step, a command through the outbox to a participant's inbox and its
//!   reply through the saga's inbox, a call) is in the starter's trace.
//!
//! Skipped, saying so, without `DATABASE_URL` (and `AMQP_URL` for the
//! first).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use clap::Parser as _;
use examples::{Payments, PaymentsArgs};
use idempotency_tower::{IdempotencyLayer, Transaction};
use inbox_consumer::{HandlerError, Inbox, InboxConfig, InboxMessage, Outcome};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox::{Event, Outgoing, PublishError, Publisher, RelayConfig};
use saga::{reply_headers, CallOutcome, Command, SagaConfig, Sagas, State as SagaState, Step};
use serde::{Deserialize, Serialize};
use test_support::{bounded, eventually, service_url, unique, PgDatabase};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// The exporter every span of this test binary goes to (one global
/// subscriber: the relay, the consumer and the workers run on the
/// runtime's threads). Tests tell their spans apart by trace id.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("examples"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("the only global subscriber");
            (exporter, provider)
        })
        .0
}

/// The finished spans of trace `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the exporter's spans")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// The value of attribute `key` of `span`, as a string.
fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The trace id of a stored `traceparent`.
fn trace_of(traceparent: &str) -> TraceId {
    TraceId::from_hex(&traceparent[3..35]).expect("a traceparent")
}

/// payments-axum's `--transactional` `POST /payments` handler.
async fn create_payment(
    State(app): State<Arc<Payments>>,
    mut tx: Transaction<sqlx::Transaction<'static, sqlx::Postgres>>,
    body: Bytes,
) -> Response {
    let answer = app.create_in::<sqlx::Postgres>(&mut tx, &body).await;
    let status = StatusCode::from_u16(answer.status).expect("a status");
    (status, answer.body).into_response()
}

/// Destination `payments` goes to the test's own queue (as outbox-relay's
/// `--queue` does), headers and all.
struct Renamed<P> {
    inner: P,
    to: String,
}

impl<P: Publisher> Publisher for Renamed<P> {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let renamed: Vec<Outgoing> = batch
            .iter()
            .map(|o| {
                let e = o.event();
                let event = e.headers().iter().fold(
                    Event::new(self.to.as_str(), e.payload().clone()).with_id(e.id()),
                    |event, (name, value)| event.with_header(name.as_str(), value.as_str()),
                );
                Outgoing::new(o.seq(), o.attempt(), event)
            })
            .collect();
        self.inner.publish(&renamed).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_post_payments_through_the_broker_to_the_ledger_row() {
    let test = "trace_payments";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    exporter();
    let queue = unique("trace_payments");
    let consumer = unique("ledger");

    // The app: payments-axum's route behind its middleware, request span
    // outermost, --transactional --outbox on PostgreSQL.
    let args = PaymentsArgs::parse_from([
        "payments-axum",
        "--store",
        &db.url,
        "--transactional",
        "--outbox",
    ]);
    let (engine, payments) = args.open().await.expect("the payments app");
    let router = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(payments))
        .layer(IdempotencyLayer::new(engine.expect("an engine")))
        .layer(axum::middleware::from_fn(examples::in_request_span));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let server = tokio::spawn(examples::serve_axum(
        vec![listener],
        router,
        until_stopped(),
    ));

    // The relay, to RabbitMQ.
    let publisher = outbox::rabbitmq::RabbitMqPublisher::connect(amqp.as_str())
        .await
        .expect("RabbitMQ");
    publisher.declare_queue(&queue).await.expect("the queue");
    let relay = outbox::PostgresRelay::new(
        db.pool.clone(),
        Renamed {
            inner: publisher,
            to: queue.clone(),
        },
        RelayConfig::default(),
    );
    let relaying = tokio::spawn({
        let shutdown = until_stopped();
        async move { relay.run(shutdown).await }
    });

    // The ledger's inbox on that queue.
    let inbox = examples::ledger::open(&db.url, &consumer)
        .await
        .expect("the ledger inbox");
    let consuming = tokio::spawn({
        let inbox = inbox.clone();
        let subscription = inbox_consumer::rabbitmq::Subscription::new(amqp.as_str(), &queue);
        let shutdown = until_stopped();
        async move {
            subscription
                .run(
                    move |message| {
                        let inbox = inbox.clone();
                        async move {
                            examples::ledger::process(&inbox, &message, Duration::ZERO).await
                        }
                    },
                    shutdown,
                )
                .await
        }
    });

    // POST /payments.
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/payments"))
        .header("idempotency-key", unique("key"))
        .header("authorization", "Bearer trace")
        .header("content-type", "application/json")
        .body(r#"{"amount": 1250, "currency": "EUR"}"#)
        .send()
        .await
        .expect("POST /payments");
    assert_eq!(response.status(), 201);
    let payment: serde_json::Value =
        serde_json::from_str(&response.text().await.expect("the body")).expect("the payment");
    let payment_id = payment["id"].as_str().expect("an id").to_owned();

    // The event carries the request's trace context.
    let traceparent: String = sqlx::query_scalar(
        "SELECT traceparent FROM outbox.events \
             WHERE convert_from(payload, 'UTF8')::jsonb->>'account' = $1",
    )
    .bind(&payment_id)
    .fetch_one(&db.pool)
    .await
    .expect("the event, with a traceparent");
    let trace = trace_of(&traceparent);

    // The ledger row.
    eventually("the ledger row", || async {
        db.count(&format!(
            "SELECT count(*) FROM ledger_entries WHERE account = '{payment_id}'"
        ))
        .await
            == 1
    })
    .await;
    eventually("the inbox's span to end", || async {
        spans_of(trace).iter().any(|s| s.name == "inbox.handle")
    })
    .await;

    let spans = spans_of(trace);
    let request = spans
        .iter()
        .find(|s| s.name == "request")
        .expect("the request span, in the event's trace");
    assert_eq!(attribute(request, "path").as_deref(), Some("/payments"));
    assert_eq!(
        request.parent_span_id,
        SpanId::INVALID,
        "the request span is the root"
    );
    let handled = spans
        .iter()
        .find(|s| s.name == "inbox.handle")
        .expect("the ledger's span, in the request's trace");
    assert_eq!(attribute(handled, "consumer"), Some(consumer.clone()));
    assert!(
        handled.parent_span_is_remote,
        "the inbox continues the trace from the message's header"
    );
    let published = spans
        .iter()
        .find(|s| s.name == "outbox.publish")
        .expect("the relay's span, in the request's trace");
    assert_eq!(
        handled.parent_span_id,
        published.span_context.span_id(),
        "the inbox's span is a child of the relay's: the header is the relay's context"
    );
    let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    assert!(
        ids.contains(&published.parent_span_id),
        "the relay's parent is the request's span (or one inside it) that enqueued the event"
    );

    stop.send(true).unwrap();
    bounded("the app, relay and consumer to stop", async {
        server.await.unwrap();
        relaying.await.unwrap().expect("the relay");
        consuming.await.unwrap().expect("the consumer");
    })
    .await;
    db.finish().await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    sku: String,
    noted: bool,
    payment: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_starting_an_order_saga_through_every_step() {
    let test = "trace_saga";
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    exporter();
    let pool = db.pool.clone();
    outbox::migrate_postgres(&pool).await.expect("outbox");
    saga::migrate(&pool).await.expect("saga");
    let inventory = unique("inventory");
    let name: &'static str = Box::leak(unique("order").into_boxed_str());
    let definition = {
        let inventory = inventory.clone();
        saga::Saga::builder(name, 1)
            .step(Step::local("note", |order: &mut Order, _, _| {
                Box::pin(async move {
                    order.noted = true;
                    Ok(())
                })
            }))
            .step(
                Step::message("reserve", move |order: &Order, _| {
                    Command::json(
                        inventory.clone(),
                        &serde_json::json!({"type": "reserve", "sku": order.sku}),
                    )
                })
                .on_reply(|_, _| Ok(())),
            )
            .step(Step::call("charge", |mut order: Order, ctx| async move {
                order.payment = Some(format!("pay-{}", ctx.instance));
                CallOutcome::Done(order)
            }))
            .build()
            .expect("the saga")
    };
    let sagas = Sagas::builder(pool.clone())
        .register(definition)
        .config(SagaConfig {
            poll_interval: Duration::from_millis(20),
            ..SagaConfig::default()
        })
        .build();
    let replies = Inbox::postgres(
        pool.clone(),
        InboxConfig::builder(unique("orders")).build().unwrap(),
    )
    .await
    .expect("the saga's inbox");
    let participant = Inbox::postgres(
        pool.clone(),
        InboxConfig::builder(unique("inventory")).build().unwrap(),
    )
    .await
    .expect("the participant's inbox");

    // POST /orders: the saga starts in the request's span.
    let id = unique("ord");
    let request = tracing::info_span!("request", method = "POST", path = "/orders");
    {
        let mut tx = pool.begin().await.unwrap();
        let order = Order {
            sku: "sku-1".into(),
            noted: false,
            payment: None,
        };
        async { sagas.start(&mut tx, name, &id, &order).await }
            .instrument(request.clone())
            .await
            .expect("start");
        tx.commit().await.unwrap();
    }
    drop(request);
    let traceparent: String =
        sqlx::query_scalar("SELECT traceparent FROM saga.instances WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .expect("the instance keeps its starter's traceparent");
    let trace = trace_of(&traceparent);

    // The participant: the command as its inbox receives it (the relay
    // sends the stored traceparent as the header), its reply enqueued in
    // its handler's transaction, and that reply as the saga's inbox
    // receives it.
    let command = outbox_message(&pool, "destination = $1", &inventory).await;
    assert_eq!(command.header("saga-action"), Some("reserve"));
    let reply_id = outbox::Uuid::now_v7();
    let outcome = participant
        .process(&command, move |tx, command| {
            let reply = reply_headers(command).into_iter().fold(
                Event::new("orders", &br#"{"type": "reserved"}"#[..]).with_id(reply_id),
                |event, (name, value)| event.with_header(name, value),
            );
            Box::pin(async move {
                outbox::enqueue(&mut **tx, &reply)
                    .await
                    .map_err(HandlerError::transient)
            })
        })
        .await;
    assert!(matches!(outcome, Outcome::Processed { .. }), "{outcome:?}");
    let reply = outbox_message(&pool, "id = $1::uuid", &reply_id.to_string()).await;
    let outcome = sagas.process_reply(&replies, &reply).await;
    assert!(matches!(outcome, Outcome::Processed { .. }), "{outcome:?}");

    // The call, by a worker.
    bounded("the saga to complete", async {
        loop {
            let state = sagas.instance(&id).await.unwrap().expect("instance").state;
            if state == SagaState::Completed {
                break;
            }
            sagas.run_due().await.expect("a round");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let spans = spans_of(trace);
    let request = spans
        .iter()
        .find(|s| s.name == "request")
        .expect("the request span");
    assert_eq!(request.parent_span_id, SpanId::INVALID, "the root");
    let steps: Vec<String> = spans
        .iter()
        .filter(|s| s.name == "saga.step")
        .filter(|s| attribute(s, "saga.instance").as_deref() == Some(id.as_str()))
        .filter_map(|s| attribute(s, "action"))
        .collect();
    for step in ["note", "reserve", "charge"] {
        assert!(
            steps.iter().any(|s| s == step),
            "step {step} has a span in the starter's trace: {steps:?}"
        );
    }
    let handled: Vec<String> = spans
        .iter()
        .filter(|s| s.name == "inbox.handle")
        .filter_map(|s| attribute(s, "consumer"))
        .collect();
    assert_eq!(
        handled.len(),
        2,
        "the participant's and the saga's inbox continue the trace: {handled:?}"
    );
    db.finish().await;
}

/// The one outbox event matching `filter` (`$1` = `value`) as an inbox
/// receives it from a relay: its headers, with the stored `traceparent`
/// as the header of that name.
async fn outbox_message(pool: &sqlx::PgPool, filter: &str, value: &str) -> InboxMessage {
    let (id, headers, payload, traceparent): (String, String, Vec<u8>, Option<String>) =
        sqlx::query_as(&format!(
            "SELECT id::text, headers::text, payload, traceparent FROM outbox.events WHERE {filter}"
        ))
        .bind(value)
        .fetch_one(pool)
        .await
        .expect("the event");
    let headers: Vec<(String, String)> = serde_json::from_str(&headers).unwrap();
    let message = headers
        .into_iter()
        .fold(InboxMessage::new(Some(id), payload), |m, (n, v)| {
            m.with_header(n, v)
        });
    match traceparent {
        Some(traceparent) => message.with_header("traceparent", traceparent),
        None => message,
    }
}
