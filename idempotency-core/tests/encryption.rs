//! Encryption at rest, on the stores of this crate's tests (the memory
//! store, and `test_support::StagedStore` for transactional mode): the
//! conformance suites over encrypted stores, and through the engine in both
//! modes a replay of a sealed record, and 503 (the handler not run, nothing
//! replayed) for a record read with the wrong key, changed, moved to
//! another record, whose key was removed, sealed for an engine without
//! keys, or in clear for one with keys. The other backends run the suites
//! in their own crates' tests.
#![cfg(feature = "test-util")]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use idempotency_core::conformance::{Conformance, EncryptionConformance, TransactionalConformance};
use idempotency_core::{
    Answer, Chunks, Claim, ClaimOutcome, Encrypted, EncryptionKeys, FakeClock, Fingerprint,
    Idempotency, IdempotencyConfig, IdempotencyKey, Inspection, LeaseToken, MemoryStore, RecordId,
    Reply, Scope, Store, StoredOutcome, TokenOutcome,
};
use test_support::{Staged, StagedStore};

/// The short lease of the suites on a real clock: unoptimised (a test
/// build), AES-GCM takes about 250 ms a MiB, and the 1 MiB case runs
/// beside the timing cases.
const SLOW: Duration = Duration::from_secs(2);

fn keys(id: &str) -> EncryptionKeys {
    EncryptionKeys::new(id, rand::random()).expect("a key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_memory_store_conforms() {
    let clock = FakeClock::new();
    let store = Encrypted::new(MemoryStore::with_clock(10_000, clock.clone()), keys("k1"));
    Conformance::with_fake_clock(store, clock).run_all().await;
    Conformance::new(Encrypted::new(MemoryStore::new(), keys("k1")))
        .short_lease(SLOW)
        .run_all()
        .await;
    EncryptionConformance::new(MemoryStore::new())
        .run_all()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_transactional_store_conforms_in_both_modes() {
    Conformance::new(Encrypted::new(StagedStore::new(), keys("k1")))
        .short_lease(SLOW)
        .run_all()
        .await;
    TransactionalConformance::<Staged>::new(Encrypted::new(StagedStore::new(), keys("k1")))
        .short_lease(SLOW)
        .run_all()
        .await;
    EncryptionConformance::transactional(StagedStore::new())
        .run_all()
        .await;
}

/// A body held in memory.
struct Full(Option<Bytes>);

impl Chunks for Full {
    type Error = std::convert::Infallible;

    fn poll_chunk(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(self.get_mut().0.take().map(Ok))
    }
}

/// What a request got.
#[derive(Debug, PartialEq)]
enum Got {
    /// The handler ran (its run number).
    Ran(usize),
    /// A replay of this body.
    Replayed(Bytes),
    /// A problem with this status.
    Refused(u16),
}

/// The payment the handler answers, which no record may hold in clear.
fn payment(run: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"run":{run},"card":"4242424242424242","holder":"Ada Lovelace"}}"#
    ))
}

/// One store behind engines in either mode.
#[derive(Clone)]
enum Backing {
    Memory(MemoryStore),
    Staged(StagedStore),
}

impl Backing {
    fn both() -> [Backing; 2] {
        [
            Backing::Memory(MemoryStore::new()),
            Backing::Staged(StagedStore::new()),
        ]
    }

    /// A new, empty store of the same kind.
    fn fresh(&self) -> Backing {
        match self {
            Backing::Memory(_) => Backing::Memory(MemoryStore::new()),
            Backing::Staged(_) => Backing::Staged(StagedStore::new()),
        }
    }

    fn mode(&self) -> &'static str {
        match self {
            Backing::Memory(_) => "plain",
            Backing::Staged(_) => "transactional",
        }
    }

    /// The store itself, unwrapped.
    fn raw(&self) -> Arc<dyn Store> {
        match self {
            Backing::Memory(s) => Arc::new(s.clone()),
            Backing::Staged(s) => Arc::new(s.clone()),
        }
    }

    fn engine(&self, keys: Option<EncryptionKeys>) -> Idempotency {
        let mut config = IdempotencyConfig::builder().ttl(Duration::from_secs(3600));
        if let Some(keys) = keys {
            config = config.encryption(keys);
        }
        let config = config.build().expect("config");
        match self {
            Backing::Memory(s) => Idempotency::new(s.clone(), config),
            Backing::Staged(s) => Idempotency::transactional(s.clone(), config),
        }
    }

    /// What the store itself holds in the completed record of `key`.
    async fn read_raw(&self, key: &str) -> (Fingerprint, StoredOutcome) {
        let fp = Fingerprint::compute("GET", "/", None, None, b"");
        let claim = Claim {
            fingerprint: &fp,
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(60),
        };
        match self
            .raw()
            .claim(&record_id(key), LeaseToken::random(), claim)
            .await
        {
            Ok(ClaimOutcome::Completed {
                fingerprint,
                outcome,
            }) => (fingerprint, outcome),
            other => panic!("{}: the record of {key}: {other:?}", self.mode()),
        }
    }

    /// Writes `outcome` as it is into the record of `key`, under `fingerprint`.
    async fn write_raw(&self, key: &str, fingerprint: &Fingerprint, outcome: &StoredOutcome) {
        let store = self.raw();
        let id = record_id(key);
        let claim = Claim {
            fingerprint,
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(3600),
        };
        let token = LeaseToken::random();
        assert!(matches!(
            store.claim(&id, token, claim).await,
            Ok(ClaimOutcome::Acquired(_))
        ));
        assert_eq!(
            store
                .complete(&id, token, outcome, Duration::from_secs(3600))
                .await
                .expect("complete"),
            TokenOutcome::Applied
        );
    }
}

/// The record id of `key` in the anonymous scope (no scope function).
fn record_id(key: &str) -> RecordId {
    RecordId::new(
        &Scope::GLOBAL,
        &IdempotencyKey::parse(key.as_bytes()).expect("a key"),
    )
}

/// `POST /payments` with `key` through `engine`; the handler counts its
/// runs in `runs` and answers 201 with [`payment`].
async fn post(engine: &Idempotency, key: &str, runs: &AtomicUsize) -> Got {
    let (head, ()) = http::Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(())
        .expect("request")
        .into_parts();
    let Inspection::Pending(pending) = engine.inspect(&head, || None) else {
        panic!("a POST with a key is covered")
    };
    let body = Full(Some(Bytes::from_static(br#"{"amount":100}"#)));
    let reply = engine
        .respond(pending, body, |_| async {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let (head, ()) = http::Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(())
                .expect("response")
                .into_parts();
            Ok::<_, std::convert::Infallible>((head, Full(Some(payment(run)))))
        })
        .await
        .expect("infallible");
    match reply {
        Reply::Answer(Answer::Replay(replay)) => {
            assert_eq!(replay.status, 201);
            Got::Replayed(replay.body.clone())
        }
        Reply::Answer(Answer::Problem(problem)) => Got::Refused(problem.status()),
        Reply::Handler(head, _) => {
            assert_eq!(head.status, 201);
            Got::Ran(runs.load(Ordering::SeqCst))
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_engine_with_keys_replays_a_response_it_stored_sealed() {
    for backing in Backing::both() {
        let mode = backing.mode();
        let engine = backing.engine(Some(keys("k1")));
        let runs = AtomicUsize::new(0);
        assert_eq!(post(&engine, "pay-1", &runs).await, Got::Ran(1), "{mode}");
        assert_eq!(
            post(&engine, "pay-1", &runs).await,
            Got::Replayed(payment(1)),
            "{mode}"
        );
        let (_, stored) = backing.read_raw("pay-1").await;
        let StoredOutcome::Sealed(sealed) = stored else {
            panic!("{mode}: stored in clear: {stored:?}")
        };
        assert_eq!(sealed.key_id(), "k1");
        assert!(!contains(sealed.as_bytes(), b"4242424242424242"), "{mode}");
        assert!(!contains(sealed.as_bytes(), b"application/json"), "{mode}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{mode}");
    }
}

#[tokio::test]
async fn a_wrong_key_a_changed_record_and_a_moved_one_answer_503_and_run_nothing() {
    for backing in Backing::both() {
        let mode = backing.mode();
        let k1 = keys("k1");
        let runs = AtomicUsize::new(0);
        let writer = backing.engine(Some(k1.clone()));
        assert_eq!(post(&writer, "pay", &runs).await, Got::Ran(1));
        let (fingerprint, stored) = backing.read_raw("pay").await;

        // Another key under the same id.
        let wrong = backing.engine(Some(EncryptionKeys::new("k1", [9; 32]).expect("key")));
        assert_eq!(
            post(&wrong, "pay", &runs).await,
            Got::Refused(503),
            "{mode}: wrong key"
        );

        // A changed byte of the ciphertext, in the same record of another store.
        let mut bytes = stored.encode();
        let last = bytes.len() - 20;
        bytes[last] ^= 0x01;
        let changed = StoredOutcome::decode(Bytes::from(bytes)).expect("still parses");
        let other = backing.fresh();
        other.write_raw("pay", &fingerprint, &changed).await;
        let reader = other.engine(Some(k1.clone()));
        assert_eq!(
            post(&reader, "pay", &runs).await,
            Got::Refused(503),
            "{mode}: changed"
        );

        // The sealed record, unchanged, moved to another key's record.
        other.write_raw("pay-moved", &fingerprint, &stored).await;
        assert_eq!(
            post(&reader, "pay-moved", &runs).await,
            Got::Refused(503),
            "{mode}: moved"
        );

        // None of them ran the handler; the record itself still replays.
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{mode}");
        assert_eq!(post(&writer, "pay", &runs).await, Got::Replayed(payment(1)));
    }
}

#[tokio::test]
async fn rotation_replays_old_records_seals_new_ones_with_the_new_key_and_removing_the_old_key_refuses_its_records(
) {
    for backing in Backing::both() {
        let mode = backing.mode();
        let runs = AtomicUsize::new(0);
        let old_key: [u8; 32] = rand::random();
        let new_key: [u8; 32] = rand::random();
        let old = EncryptionKeys::new("2025-01", old_key).expect("key");
        assert_eq!(
            post(&backing.engine(Some(old.clone())), "before", &runs).await,
            Got::Ran(1)
        );

        let rotated = old.rotate("2025-02", new_key).expect("rotate");
        let engine = backing.engine(Some(rotated));
        assert_eq!(
            post(&engine, "before", &runs).await,
            Got::Replayed(payment(1)),
            "{mode}: an old record replays"
        );
        assert_eq!(post(&engine, "after", &runs).await, Got::Ran(2));
        match backing.read_raw("after").await.1 {
            StoredOutcome::Sealed(sealed) => assert_eq!(sealed.key_id(), "2025-02"),
            other => panic!("{mode}: {other:?}"),
        }
        match backing.read_raw("before").await.1 {
            StoredOutcome::Sealed(sealed) => assert_eq!(sealed.key_id(), "2025-01"),
            other => panic!("{mode}: {other:?}"),
        }

        let only_new = EncryptionKeys::new("2025-02", new_key).expect("key");
        let engine = backing.engine(Some(only_new));
        assert_eq!(
            post(&engine, "before", &runs).await,
            Got::Refused(503),
            "{mode}: the old key removed"
        );
        assert_eq!(
            post(&engine, "after", &runs).await,
            Got::Replayed(payment(2))
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{mode}");
    }
}

#[tokio::test]
async fn a_sealed_record_without_keys_and_a_response_in_clear_with_keys_answer_503() {
    for backing in Backing::both() {
        let mode = backing.mode();
        let runs = AtomicUsize::new(0);
        assert_eq!(
            post(&backing.engine(Some(keys("k1"))), "sealed", &runs).await,
            Got::Ran(1)
        );
        assert_eq!(
            post(&backing.engine(None), "sealed", &runs).await,
            Got::Refused(503),
            "{mode}: a sealed record read without keys"
        );

        assert_eq!(
            post(&backing.engine(None), "clear", &runs).await,
            Got::Ran(2)
        );
        assert_eq!(
            post(&backing.engine(Some(keys("k1"))), "clear", &runs).await,
            Got::Refused(503),
            "{mode}: a response in clear read with keys"
        );
        let migrating = keys("k1").allow_plaintext(true);
        assert_eq!(
            post(&backing.engine(Some(migrating)), "clear", &runs).await,
            Got::Replayed(payment(2)),
            "{mode}: allow_plaintext reads it"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{mode}");
    }
}

#[tokio::test]
async fn fail_open_runs_the_handler_rather_than_replay_a_record_that_does_not_decrypt() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let writer = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .encryption(keys("k1"))
            .build()
            .expect("config"),
    );
    assert_eq!(post(&writer, "open", &runs).await, Got::Ran(1));
    let reader = Idempotency::new(
        store,
        IdempotencyConfig::builder()
            .encryption(keys("k1"))
            .failure_mode(idempotency_core::FailureMode::Open)
            .build()
            .expect("config"),
    );
    assert_eq!(post(&reader, "open", &runs).await, Got::Ran(2));
}

#[test]
fn the_config_shows_the_key_ids_and_never_a_key() {
    let keys = EncryptionKeys::new("k1", [0x5a; 32]).expect("key");
    let config = IdempotencyConfig::builder()
        .encryption(keys)
        .build()
        .expect("config");
    assert_eq!(config.encryption().map(|k| k.current_id()), Some("k1"));
    let debug = format!("{config:?}");
    assert!(debug.contains("\"k1\""), "{debug}");
    assert!(
        !debug.contains("90, 90"),
        "a key (0x5a = 90) is shown: {debug}"
    );
}
