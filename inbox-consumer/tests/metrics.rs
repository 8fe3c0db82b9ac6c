//! The inbox's counts through the `metrics` facade (seen by `metrics-util`'s
//! `DebuggingRecorder`): `inbox_messages_total{consumer,outcome}` for each
//! outcome and `inbox_lease_lost_total{consumer}`, equal to
//! `Inbox::metrics`, registered at 0 when the inbox is created.

mod common;

use std::future::Future;

use idempotency_core::metrics::{
    inbox_outcome, label, INBOX_LEASE_LOST_TOTAL, INBOX_MESSAGES_TOTAL,
};
use idempotency_core::MemoryStore;
use inbox_consumer::{
    BoxFuture, HandlerError, Inbox, InboxConfig, InboxMessage, InboxMetrics, Outcome,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use test_support::{Hook, Hooked, Op};

/// Runs `f` on a current-thread runtime with `recorder` as the thread's recorder.
fn recorded<F: Future>(recorder: &DebuggingRecorder, f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(recorder, || rt.block_on(f))
}

/// A counter's name, its labels, and its value.
type Series = (String, Vec<(String, String)>, u64);

/// Every counter the recorder saw.
fn counters(recorder: &DebuggingRecorder) -> Vec<Series> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let DebugValue::Counter(n) = value else {
                return None;
            };
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            Some((key.name().to_owned(), labels, n))
        })
        .collect()
}

/// The count of `outcome` for `consumer`, and of its lost leases.
fn count(seen: &[Series], consumer: &str, outcome: Option<&str>) -> Option<u64> {
    let mut want = vec![(label::CONSUMER.to_owned(), consumer.to_owned())];
    let name = match outcome {
        Some(o) => {
            want.push((label::OUTCOME.to_owned(), o.to_owned()));
            INBOX_MESSAGES_TOTAL
        }
        None => INBOX_LEASE_LOST_TOTAL,
    };
    seen.iter()
        .find(|(n, labels, _)| n == name && *labels == want)
        .map(|(_, _, v)| *v)
}

/// What a scripted store does differently from the memory store.
#[derive(Clone, Copy)]
enum Mode {
    /// Every claim fails.
    FailClaims,
    /// Every completion finds the claim taken over.
    FenceCompletions,
}

/// The memory store, but for its mode.
fn scripted(mode: Mode) -> Hooked<MemoryStore> {
    Hooked::with_hook(MemoryStore::new(), move |op| match (mode, op) {
        (Mode::FailClaims, Op::Claim) => Hook::fail("scripted", "down"),
        (Mode::FenceCompletions, Op::Complete) => Hook::Fenced,
        _ => Hook::Forward,
    })
    .named("scripted")
}

fn config(consumer: &str) -> InboxConfig {
    InboxConfig::builder(consumer)
        .max_attempts(2)
        .build()
        .expect("config")
}

fn msg(id: Option<&str>) -> InboxMessage {
    InboxMessage::new(id.map(Into::into), common::payment("acct", 10))
}

fn ok() -> impl for<'m> FnOnce(&'m InboxMessage) -> BoxFuture<'m, Result<(), HandlerError>> {
    |_| Box::pin(async { Ok(()) })
}

fn failing() -> impl for<'m> FnOnce(&'m InboxMessage) -> BoxFuture<'m, Result<(), HandlerError>> {
    |_| Box::pin(async { Err(HandlerError::transient("scripted")) })
}

#[test]
fn every_outcome_counts_through_the_facade() {
    let recorder = DebuggingRecorder::new();
    let name = common::unique("metrics");
    let (seen_here, snapshot) = recorded(&recorder, async {
        let store = MemoryStore::new();
        let inbox = Inbox::lease(store.clone(), config(&name));
        let other = Inbox::lease(store, config(&name));
        let mut seen = Vec::new();
        seen.push(inbox.process(&msg(Some("m-1")), ok()).await);
        for _ in 0..2 {
            seen.push(inbox.process(&msg(Some("m-1")), ok()).await);
        }
        seen.push(inbox.process(&msg(Some("m-2")), failing()).await);
        seen.push(inbox.process(&msg(Some("m-2")), failing()).await);
        seen.push(inbox.process(&msg(None), ok()).await);
        // A copy while the first is in its handler, on another instance.
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        let (m3, wait) = (msg(Some("m-3")), gate.clone());
        let first = inbox.process(&m3, move |_| {
            Box::pin(async move {
                wait.notified().await;
                Ok(())
            })
        });
        let (first, during) = tokio::join!(first, async {
            let during = other.process(&m3, ok()).await;
            gate.notify_one();
            during
        });
        seen.extend([first, during]);
        let down = Inbox::lease(scripted(Mode::FailClaims), config(&name));
        seen.push(down.process(&msg(Some("m-4")), ok()).await);
        let fenced = Inbox::lease(scripted(Mode::FenceCompletions), config(&name));
        seen.push(fenced.process(&msg(Some("m-5")), ok()).await);
        let mut total = InboxMetrics::default();
        for m in [
            inbox.metrics(),
            other.metrics(),
            down.metrics(),
            fenced.metrics(),
        ] {
            total.processed += m.processed;
            total.duplicate += m.duplicate;
            total.in_flight_elsewhere += m.in_flight_elsewhere;
            total.failed += m.failed;
            total.unavailable += m.unavailable;
            total.dead += m.dead;
            total.lease_lost += m.lease_lost;
        }
        (seen.iter().map(Outcome::name).collect::<Vec<_>>(), total)
    });
    assert_eq!(
        seen_here,
        [
            "processed",
            "duplicate",
            "duplicate",
            "failed",
            "dead",
            "dead",
            "processed",
            "in_flight_elsewhere",
            "unavailable",
            "processed",
        ]
    );
    let seen = counters(&recorder);
    let facade = inbox_outcome::ALL.map(|o| count(&seen, &name, Some(o)).unwrap_or(0));
    // processed, duplicate, in_flight_elsewhere, failed, unavailable, dead
    assert_eq!(facade, [3, 2, 1, 1, 1, 2]);
    assert_eq!(count(&seen, &name, None), Some(1), "the fenced completion");
    assert_eq!(
        facade,
        [
            snapshot.processed,
            snapshot.duplicate,
            snapshot.in_flight_elsewhere,
            snapshot.failed,
            snapshot.unavailable,
            snapshot.dead
        ],
        "the facade and Inbox::metrics agree"
    );
    assert_eq!(snapshot.lease_lost, 1);
}

#[test]
fn an_inbox_lists_its_series_at_zero_from_creation() {
    let recorder = DebuggingRecorder::new();
    let name = common::unique("metrics-zero");
    recorded(&recorder, async {
        let _inbox = Inbox::lease(MemoryStore::new(), config(&name));
    });
    let seen = counters(&recorder);
    for outcome in inbox_outcome::ALL {
        assert_eq!(count(&seen, &name, Some(outcome)), Some(0), "{outcome}");
    }
    assert_eq!(count(&seen, &name, None), Some(0));
}
