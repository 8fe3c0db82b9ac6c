//! The store conformance suite (feature `test-util`): the same cases for
//! every [`Store`], this crate's and third-party ones.
//!
//! ```no_run
//! # async fn demo() {
//! use idempotency_core::conformance::Conformance;
//! use idempotency_core::{FakeClock, MemoryStore};
//!
//! // A store on its own clock: the suite sleeps (a few seconds in all).
//! # let my_store = MemoryStore::new();
//! Conformance::new(my_store).run_all().await;
//!
//! // A store on an injected clock: the suite moves it and never sleeps.
//! let clock = FakeClock::new();
//! Conformance::with_fake_clock(MemoryStore::with_clock(1000, clock.clone()), clock)
//!     .run_all()
//!     .await;
//! # }
//! ```
//!
//! A store that wakes waiting duplicates ([`Store::watch`]) also runs the
//! watch cases; give it a second instance ([`Conformance::with_peer`],
//! another connection to the same data) so that they settle records on one
//! instance and watch them on the other, as two service instances would. A
//! store with transactional mode runs [`TransactionalConformance`] as well.
//! [`Hooked`] wraps a store to count its calls, or to delay, fail or hang
//! them: the doubles of the workspace's own tests.
//!
//! Run it on a multi-threaded runtime (`#[tokio::test(flavor =
//! "multi_thread")]`): the concurrency cases spawn real concurrent claimers.
//! Every case uses fresh random record ids, so the suite may run in parallel
//! with other tests against the same backend. A failed case panics with a
//! message naming the store and the broken rule.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::FakeClock;
use crate::fingerprint::{Fingerprint, RecordId, Scope};
use crate::key::IdempotencyKey;
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, StoredResponse, TokenOutcome};
use crate::store::{Claim, Store};

mod encryption;
mod hooked;
mod transactional;
mod watch;

pub use encryption::EncryptionConformance;
pub use hooked::{Hook, Hooked, Op};
pub use transactional::TransactionalConformance;
pub use watch::decide;

/// How many claimers race for one record in the concurrency cases.
pub const CONCURRENT_CLAIMERS: usize = 64;

/// A long lease: never passes during a case.
const LONG: Duration = Duration::from_secs(60);

/// The store under test and how to move its time.
#[derive(Clone)]
pub struct Conformance {
    store: Arc<dyn Store>,
    /// Another instance of the store, for the watch cases.
    peer: Option<Arc<dyn Store>>,
    clock: Option<FakeClock>,
    short: Duration,
}

impl std::fmt::Debug for Conformance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conformance")
            .field("store", &self.store.backend())
            .field("peer", &self.peer.is_some())
            .field("fake_clock", &self.clock.is_some())
            .field("short", &self.short)
            .finish()
    }
}

impl Conformance {
    /// A store that keeps its own time: cases that need a lease or a ttl
    /// to pass sleep (leases of [`short`](Self::short_lease), default 600 ms).
    pub fn new(store: impl Store) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// As [`new`](Self::new), for a shared store.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            peer: None,
            clock: None,
            short: Duration::from_millis(600),
        }
    }

    /// A store that reads `clock`: the suite advances it instead of sleeping.
    pub fn with_fake_clock(store: impl Store, clock: FakeClock) -> Self {
        Self {
            store: Arc::new(store),
            peer: None,
            clock: Some(clock),
            short: Duration::from_millis(600),
        }
    }

    /// A second instance of the same store (another connection to the same
    /// data): the watch cases settle records on it and watch them on the
    /// store under test, as two service instances would.
    pub fn with_peer(mut self, peer: impl Store) -> Self {
        self.peer = Some(Arc::new(peer));
        self
    }

    /// The short lease and ttl the timing cases use (default 600 ms). Raise
    /// it for a slow backend: a case must be able to claim and look again
    /// well within it.
    pub fn short_lease(mut self, short: Duration) -> Self {
        self.short = short.max(Duration::from_millis(50));
        self
    }

    /// Runs every case. With a real clock the cases run concurrently (each on
    /// its own records); with a fake clock one after the other, since moving
    /// the clock would disturb the others.
    pub async fn run_all(&self) {
        let cases: Vec<crate::store::BoxFuture<'_, ()>> = vec![
            Box::pin(self.concurrent_claims_acquire_once()),
            Box::pin(self.concurrent_takeovers_acquire_once()),
            Box::pin(self.stale_token_is_fenced()),
            Box::pin(self.lease_takeover()),
            Box::pin(self.different_request_never_takes_over()),
            Box::pin(self.holder_keeps_its_token_until_a_takeover()),
            Box::pin(self.completed_is_never_taken_over()),
            Box::pin(self.extend_keeps_the_claim()),
            Box::pin(self.expiry()),
            Box::pin(self.release()),
            Box::pin(self.large_body_round_trips()),
            Box::pin(self.binary_and_repeated_headers_round_trip()),
            Box::pin(self.not_replayable_round_trips()),
            Box::pin(self.mark_round_trips()),
            Box::pin(self.scopes_never_meet()),
            Box::pin(self.a_watch_resolves_on_completion_and_on_release_of_its_record_only()),
            Box::pin(self.waiting_duplicates_are_woken()),
        ];
        if self.clock.is_some() {
            for case in cases {
                case.await;
            }
        } else {
            futures_util::future::join_all(cases).await;
        }
    }

    fn name(&self) -> &'static str {
        self.store.backend()
    }

    async fn pass(&self, by: Duration) {
        match &self.clock {
            Some(clock) => clock.advance(by),
            None => tokio::time::sleep(by).await,
        }
    }

    /// How long to wait for something of length `d` to have surely passed.
    fn beyond(&self, d: Duration) -> Duration {
        if self.clock.is_some() {
            d + Duration::from_millis(1)
        } else {
            d + self.short / 2
        }
    }

    async fn claim(
        &self,
        id: &RecordId,
        fp: &Fingerprint,
        lease: Duration,
        ttl: Duration,
    ) -> (LeaseToken, ClaimOutcome) {
        claim(&*self.store, id, fp, lease, ttl).await
    }

    async fn acquire(&self, id: &RecordId, fp: &Fingerprint, lease: Duration) -> LeaseToken {
        match self.claim(id, fp, lease, LONG).await {
            (token, ClaimOutcome::Acquired(held)) => {
                assert_eq!(
                    held,
                    token,
                    "{}: Acquired must carry the caller's token",
                    self.name()
                );
                token
            }
            (_, other) => panic!("{}: expected Acquired, got {other:?}", self.name()),
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: LeaseToken,
        outcome: &StoredOutcome,
        ttl: Duration,
    ) -> TokenOutcome {
        self.store
            .complete(id, token, outcome, ttl)
            .await
            .unwrap_or_else(|e| panic!("{}: complete failed: {e:?}", self.name()))
    }

    async fn expect_in_flight(
        &self,
        id: &RecordId,
        fp: &Fingerprint,
        holder: &Fingerprint,
        what: &str,
    ) {
        match self.claim(id, fp, LONG, LONG).await.1 {
            ClaimOutcome::InFlight {
                fingerprint,
                lease_remaining,
            } => {
                assert_eq!(
                    fingerprint,
                    *holder,
                    "{}: {what}: InFlight must name the holder's fingerprint",
                    self.name()
                );
                assert!(
                    lease_remaining <= LONG,
                    "{}: {what}: lease_remaining {lease_remaining:?}",
                    self.name()
                );
            }
            other => panic!("{}: {what}: expected InFlight, got {other:?}", self.name()),
        }
    }

    async fn expect_completed(
        &self,
        id: &RecordId,
        fp: &Fingerprint,
        want_fp: &Fingerprint,
        want: &StoredOutcome,
        what: &str,
    ) {
        match self.claim(id, fp, LONG, LONG).await.1 {
            ClaimOutcome::Completed {
                fingerprint,
                outcome,
            } => {
                assert_eq!(
                    fingerprint,
                    *want_fp,
                    "{}: {what}: wrong fingerprint",
                    self.name()
                );
                assert!(
                    outcome == *want,
                    "{}: {what}: the stored outcome changed",
                    self.name()
                );
            }
            other => panic!("{}: {what}: expected Completed, got {other:?}", self.name()),
        }
    }

    /// 64 concurrent claimers of one fresh record: exactly one `Acquired`,
    /// the others `InFlight` naming its fingerprint. Then, once completed, 64
    /// concurrent claimers all get `Completed`. Repeated on several records.
    pub async fn concurrent_claims_acquire_once(&self) {
        for round in 0..3 {
            let id = fresh_id();
            let fp = fingerprint(b"race");
            let (winners, answers) = race(&self.store, id, fp, LONG, LONG).await;
            assert_eq!(
                winners.len(),
                1,
                "{}: round {round}: {} of {CONCURRENT_CLAIMERS} concurrent claimers acquired",
                self.name(),
                winners.len()
            );
            for a in &answers {
                assert!(
                    matches!(a, ClaimOutcome::InFlight { fingerprint, .. } if *fingerprint == fp),
                    "{}: a losing claimer got {a:?}",
                    self.name()
                );
            }
            let outcome = response(201, b"raced");
            assert_eq!(
                self.complete(&id, winners[0], &outcome, LONG).await,
                TokenOutcome::Applied,
                "{}: the winner could not complete",
                self.name()
            );
            let (winners, answers) = race(&self.store, id, fp, LONG, LONG).await;
            assert!(
                winners.is_empty(),
                "{}: a completed record was acquired again",
                self.name()
            );
            for a in &answers {
                assert!(
                    matches!(a, ClaimOutcome::Completed { outcome: o, .. } if *o == outcome),
                    "{}: a claimer of a completed record got {a:?}",
                    self.name()
                );
            }
        }
    }

    /// 64 concurrent claimers of an in-flight record whose lease passed (the
    /// same request retried after a crash): exactly one takes it over.
    pub async fn concurrent_takeovers_acquire_once(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"takeover race");
        let crashed = self.acquire(&id, &fp, self.short).await;
        self.pass(self.beyond(self.short)).await;
        let (winners, _) = race(&self.store, id, fp, LONG, LONG).await;
        assert_eq!(
            winners.len(),
            1,
            "{}: {} of {CONCURRENT_CLAIMERS} concurrent takeovers acquired",
            self.name(),
            winners.len()
        );
        assert_ne!(winners[0], crashed);
        let r = self.store.release(&id, crashed).await.expect("release");
        assert_eq!(
            r,
            TokenOutcome::Fenced,
            "{}: the crashed holder released a taken-over claim",
            self.name()
        );
    }

    /// After a takeover, the old token's `complete`, `release` and `extend`
    /// are refused and change nothing; a token never issued is refused too.
    pub async fn stale_token_is_fenced(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"fencing");
        let stale = self.acquire(&id, &fp, self.short).await;
        self.pass(self.beyond(self.short)).await;
        let current = self.acquire(&id, &fp, LONG).await;
        assert_ne!(stale, current);
        let stale_outcome = response(200, b"stale writer");
        for token in [stale, LeaseToken::random()] {
            assert_eq!(
                self.complete(&id, token, &stale_outcome, LONG).await,
                TokenOutcome::Fenced,
                "{}: a stale complete was applied",
                self.name()
            );
            assert_eq!(
                self.store.extend(&id, token, LONG).await.expect("extend"),
                TokenOutcome::Fenced,
                "{}: a stale extend was applied",
                self.name()
            );
            assert_eq!(
                self.store.release(&id, token).await.expect("release"),
                TokenOutcome::Fenced,
                "{}: a stale release was applied",
                self.name()
            );
        }
        // Nothing changed: still in flight under `current`.
        self.expect_in_flight(&id, &fp, &fp, "after stale writes")
            .await;
        let outcome = response(201, b"current writer");
        assert_eq!(
            self.complete(&id, current, &outcome, LONG).await,
            TokenOutcome::Applied,
            "{}: the current holder was fenced",
            self.name()
        );
        // A completed record is fenced to every token, its own included.
        assert_eq!(
            self.complete(&id, current, &stale_outcome, LONG).await,
            TokenOutcome::Fenced,
            "{}: a second complete was applied",
            self.name()
        );
        assert_eq!(
            self.store.release(&id, current).await.expect("release"),
            TokenOutcome::Fenced,
            "{}: a completed record was released",
            self.name()
        );
        assert_eq!(
            self.store.extend(&id, current, LONG).await.expect("extend"),
            TokenOutcome::Fenced,
            "{}: a completed record was extended",
            self.name()
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "after fenced writes")
            .await;
    }

    /// An in-flight record holds until its lease passes; then the same
    /// request takes it over with a new token.
    pub async fn lease_takeover(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"takeover");
        let first = self.acquire(&id, &fp, self.short).await;
        self.expect_in_flight(&id, &fp, &fp, "before the lease passed")
            .await;
        self.pass(self.beyond(self.short)).await;
        let second = self.acquire(&id, &fp, LONG).await;
        assert_ne!(first, second);
        self.expect_in_flight(&id, &fp, &fp, "after the takeover")
            .await;
    }

    /// An in-flight record whose lease passed is NOT taken over by a
    /// different request (that is a key reuse, 422), until the record expires.
    pub async fn different_request_never_takes_over(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"original");
        let other = fingerprint(b"different body");
        let _held = match self.claim(&id, &fp, self.short, self.short * 3).await {
            (t, ClaimOutcome::Acquired(_)) => t,
            (_, o) => panic!("{}: expected Acquired, got {o:?}", self.name()),
        };
        self.pass(self.beyond(self.short)).await;
        self.expect_in_flight(&id, &other, &fp, "lease passed, different fingerprint")
            .await;
    }

    /// A holder whose lease passed, and whom nobody took over, still holds
    /// its token until the record expires: a slow handler's response is
    /// stored, not thrown away.
    pub async fn holder_keeps_its_token_until_a_takeover(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"slow holder");
        let token = match self.claim(&id, &fp, self.short, LONG).await {
            (t, ClaimOutcome::Acquired(_)) => t,
            (_, o) => panic!("{}: expected Acquired, got {o:?}", self.name()),
        };
        self.pass(self.beyond(self.short)).await;
        let outcome = response(201, b"late but mine");
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied,
            "{}: the holder completes after its lease passed, with no takeover",
            self.name()
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "completed late")
            .await;
    }

    /// A completed record is replayed, never taken over, whatever the lease
    /// and whoever asks, until its ttl passes.
    pub async fn completed_is_never_taken_over(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"done");
        let token = self.acquire(&id, &fp, self.short).await;
        let outcome = response(200, b"done");
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied
        );
        self.pass(self.beyond(self.short)).await;
        self.expect_completed(&id, &fp, &fp, &outcome, "after the lease passed")
            .await;
        self.expect_completed(
            &id,
            &fingerprint(b"other"),
            &fp,
            &outcome,
            "asked by another request",
        )
        .await;
    }

    /// `extend` keeps a claim past its original lease.
    pub async fn extend_keeps_the_claim(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"extend");
        let token = self.acquire(&id, &fp, self.short).await;
        assert_eq!(
            self.store.extend(&id, token, LONG).await.expect("extend"),
            TokenOutcome::Applied,
            "{}: the holder could not extend",
            self.name()
        );
        self.pass(self.beyond(self.short)).await;
        self.expect_in_flight(&id, &fp, &fp, "after extend, past the original lease")
            .await;
        let outcome = response(200, b"slow handler");
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied,
            "{}: an extended claim could not complete",
            self.name()
        );
    }

    /// A completed record is forgotten after its ttl; an abandoned in-flight
    /// record after its lease plus ttl. Then any request acquires, and the
    /// old token is fenced.
    pub async fn expiry(&self) {
        let fp = fingerprint(b"expiry");
        let other = fingerprint(b"a new request");
        // Completed, ttl passes.
        let id = fresh_id();
        let old = self.acquire(&id, &fp, LONG).await;
        let outcome = response(200, b"expires");
        assert_eq!(
            self.complete(&id, old, &outcome, self.short).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "before the ttl passed")
            .await;
        self.pass(self.beyond(self.short)).await;
        let _new = self.acquire(&id, &other, LONG).await;
        // In flight and abandoned: lease + ttl pass.
        let id = fresh_id();
        let abandoned = match self.claim(&id, &fp, self.short, self.short).await {
            (t, ClaimOutcome::Acquired(_)) => t,
            (_, o) => panic!("{}: expected Acquired, got {o:?}", self.name()),
        };
        self.pass(self.beyond(self.short * 2)).await;
        assert_eq!(
            self.complete(&id, abandoned, &outcome, LONG).await,
            TokenOutcome::Fenced,
            "{}: an expired claim completed",
            self.name()
        );
        let _new = self.acquire(&id, &other, LONG).await;
    }

    /// `release` deletes the claim, so the next request acquires at once; the
    /// released token is fenced afterwards.
    pub async fn release(&self) {
        let id = fresh_id();
        let fp = fingerprint(b"release");
        let token = self.acquire(&id, &fp, LONG).await;
        assert_eq!(
            self.store.release(&id, token).await.expect("release"),
            TokenOutcome::Applied,
            "{}: the holder could not release",
            self.name()
        );
        let next = self.acquire(&id, &fp, LONG).await;
        assert_eq!(
            self.store.release(&id, token).await.expect("release"),
            TokenOutcome::Fenced,
            "{}: a released token released again",
            self.name()
        );
        assert_eq!(
            self.complete(&id, token, &response(200, b"late"), LONG)
                .await,
            TokenOutcome::Fenced
        );
        let outcome = response(200, b"after release");
        assert_eq!(
            self.complete(&id, next, &outcome, LONG).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "after release and a new run")
            .await;
    }

    /// A 1 MiB body of every byte value round-trips exactly.
    pub async fn large_body_round_trips(&self) {
        let body: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let outcome = StoredOutcome::response(StoredResponse {
            status: 200,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/octet-stream"),
            )],
            body: Bytes::from(body),
        });
        let id = fresh_id();
        let fp = fingerprint(b"large");
        let token = self.acquire(&id, &fp, LONG).await;
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "1 MiB body")
            .await;
    }

    /// Header values with any bytes, repeated names in order, and empty
    /// values and body round-trip exactly.
    pub async fn binary_and_repeated_headers_round_trip(&self) {
        let outcome = StoredOutcome::response(StoredResponse {
            status: 207,
            headers: vec![
                ("link".into(), Bytes::from_static(b"</a>; rel=next")),
                (
                    "x-binary".into(),
                    Bytes::from((0..=255u8).collect::<Vec<u8>>()),
                ),
                ("link".into(), Bytes::from_static(b"</b>; rel=prev")),
                ("x-empty".into(), Bytes::new()),
                ("link".into(), Bytes::from_static(b"</c>; rel=last")),
                ("x-utf8".into(), Bytes::from("Grüße, 世界".as_bytes())),
            ],
            body: Bytes::new(),
        });
        let id = fresh_id();
        let fp = fingerprint(b"headers");
        let token = self.acquire(&id, &fp, LONG).await;
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "binary and repeated headers")
            .await;
    }

    /// A "not replayable" outcome round-trips.
    pub async fn not_replayable_round_trips(&self) {
        let outcome = StoredOutcome::NotReplayable { status: 201 };
        let id = fresh_id();
        let fp = fingerprint(b"not replayable");
        let token = self.acquire(&id, &fp, LONG).await;
        assert_eq!(
            self.complete(&id, token, &outcome, LONG).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&id, &fp, &fp, &outcome, "not replayable")
            .await;
    }

    /// A mark (an outcome that is not an HTTP response, as the inbox's lease
    /// mode stores) round-trips with its code, the extreme codes included.
    pub async fn mark_round_trips(&self) {
        let fp = fingerprint(b"mark");
        for code in [0, 7, 200, u16::MAX] {
            let outcome = StoredOutcome::Mark(code);
            let id = fresh_id();
            let token = self.acquire(&id, &fp, LONG).await;
            assert_eq!(
                self.complete(&id, token, &outcome, LONG).await,
                TokenOutcome::Applied,
                "{}: a mark could not complete",
                self.name()
            );
            self.expect_completed(&id, &fp, &fp, &outcome, "a mark")
                .await;
            self.expect_completed(
                &id,
                &fingerprint(b"other"),
                &fp,
                &outcome,
                "a mark, asked by another request",
            )
            .await;
        }
    }

    /// The same key in two scopes addresses two records that never meet:
    /// both acquire, each replays its own response.
    pub async fn scopes_never_meet(&self) {
        let key = IdempotencyKey::parse(format!("key-{:032x}", rand::random::<u128>()).as_bytes())
            .expect("a valid key");
        let alice = RecordId::new(&Scope::new(*b"alice"), &key);
        let bob = RecordId::new(&Scope::new(*b"bob"), &key);
        let global = RecordId::new(&Scope::GLOBAL, &key);
        assert!(alice != bob && alice != global && bob != global);
        let fp = fingerprint(b"same request");
        let a = self.acquire(&alice, &fp, LONG).await;
        let b = self.acquire(&bob, &fp, LONG).await;
        let g = self.acquire(&global, &fp, LONG).await;
        let (ra, rb, rg) = (
            response(201, b"alice"),
            response(201, b"bob"),
            response(201, b"global"),
        );
        assert_eq!(
            self.complete(&alice, a, &ra, LONG).await,
            TokenOutcome::Applied
        );
        assert_eq!(
            self.complete(&bob, b, &rb, LONG).await,
            TokenOutcome::Applied
        );
        assert_eq!(
            self.complete(&global, g, &rg, LONG).await,
            TokenOutcome::Applied
        );
        self.expect_completed(&alice, &fp, &fp, &ra, "alice's scope")
            .await;
        self.expect_completed(&bob, &fp, &fp, &rb, "bob's scope")
            .await;
        self.expect_completed(&global, &fp, &fp, &rg, "the global scope")
            .await;
        // One scope's token is fenced in another.
        let c = self
            .acquire(&RecordId::new(&Scope::new(*b"carol"), &key), &fp, LONG)
            .await;
        assert_eq!(
            self.store.release(&alice, c).await.expect("release"),
            TokenOutcome::Fenced
        );
    }
}

async fn claim(
    store: &dyn Store,
    id: &RecordId,
    fp: &Fingerprint,
    lease: Duration,
    ttl: Duration,
) -> (LeaseToken, ClaimOutcome) {
    let token = LeaseToken::random();
    let claim = Claim {
        fingerprint: fp,
        lease,
        ttl,
    };
    let outcome = store.claim(id, token, claim).await.unwrap_or_else(|e| {
        panic!(
            "{}: claim failed: {e:?} ({:?})",
            store.backend(),
            std::error::Error::source(&e)
        )
    });
    (token, outcome)
}

/// Spawns [`CONCURRENT_CLAIMERS`] tasks that claim `id` at once; returns the
/// tokens that acquired and the other answers.
async fn race(
    store: &Arc<dyn Store>,
    id: RecordId,
    fp: Fingerprint,
    lease: Duration,
    ttl: Duration,
) -> (Vec<LeaseToken>, Vec<ClaimOutcome>) {
    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT_CLAIMERS));
    let tasks: Vec<_> = (0..CONCURRENT_CLAIMERS)
        .map(|_| {
            let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                claim(&*store, &id, &fp, lease, ttl).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut others = Vec::new();
    for task in tasks {
        match task.await.expect("a claimer panicked") {
            (token, ClaimOutcome::Acquired(held)) => {
                assert_eq!(token, held);
                winners.push(token);
            }
            (_, other) => others.push(other),
        }
    }
    (winners, others)
}

fn fresh_id() -> RecordId {
    RecordId::from_parts(b"conformance", &rand::random::<[u8; 16]>())
}

fn fingerprint(body: &[u8]) -> Fingerprint {
    Fingerprint::compute(
        "POST",
        "/conformance",
        None,
        Some(b"application/json"),
        body,
    )
}

fn response(status: u16, body: &'static [u8]) -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Guarded, StoreFuture};
    use crate::MemoryStore;

    /// A broken store: every claim acquires (not atomic).
    struct AlwaysAcquires(MemoryStore);

    /// A broken store: `complete` claims success for any token (no fencing).
    struct IgnoresTokens(MemoryStore);

    macro_rules! delegate {
        ($t:ty, claim = $claim:expr, complete = $complete:expr) => {
            impl Store for $t {
                fn claim<'a>(
                    &'a self,
                    id: &'a RecordId,
                    token: LeaseToken,
                    claim: Claim<'a>,
                ) -> StoreFuture<'a, Result<ClaimOutcome, crate::StoreError>> {
                    let f: fn(ClaimOutcome, LeaseToken) -> ClaimOutcome = $claim;
                    let inner = self.0.claim(id, token, claim);
                    StoreFuture::new(async move { Ok(f(inner.await?, token)) })
                }
                fn complete<'a>(
                    &'a self,
                    id: &'a RecordId,
                    token: LeaseToken,
                    outcome: &'a StoredOutcome,
                    ttl: Duration,
                ) -> StoreFuture<'a, Result<TokenOutcome, crate::StoreError>> {
                    let f: fn(TokenOutcome) -> TokenOutcome = $complete;
                    let inner = self.0.complete(id, token, outcome, ttl);
                    StoreFuture::new(async move { Ok(f(inner.await?)) })
                }
                fn release<'a>(
                    &'a self,
                    id: &'a RecordId,
                    token: LeaseToken,
                ) -> StoreFuture<'a, Result<TokenOutcome, crate::StoreError>> {
                    self.0.release(id, token)
                }
                fn extend<'a>(
                    &'a self,
                    id: &'a RecordId,
                    token: LeaseToken,
                    lease: Duration,
                ) -> StoreFuture<'a, Result<TokenOutcome, crate::StoreError>> {
                    self.0.extend(id, token, lease)
                }
                fn backend(&self) -> &'static str {
                    "broken"
                }
            }
        };
    }

    delegate!(
        AlwaysAcquires,
        claim = |_, token| ClaimOutcome::Acquired(token),
        complete = |o| o
    );
    delegate!(
        IgnoresTokens,
        claim = |o, _| o,
        complete = |_| TokenOutcome::Applied
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[should_panic(expected = "concurrent claimers acquired")]
    async fn the_suite_catches_a_non_atomic_claim() {
        Conformance::new(AlwaysAcquires(MemoryStore::new()))
            .concurrent_claims_acquire_once()
            .await;
    }

    #[tokio::test]
    #[should_panic(expected = "a stale complete was applied")]
    async fn the_suite_catches_missing_fencing() {
        let clock = FakeClock::new();
        Conformance::with_fake_clock(
            IgnoresTokens(MemoryStore::with_clock(100, clock.clone())),
            clock,
        )
        .stale_token_is_fenced()
        .await;
    }

    /// Through `Guarded` (itself a `Store`): the same cases hold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_guarded_memory_store_conforms() {
        let clock = FakeClock::new();
        let inner: Arc<dyn Store> = Arc::new(MemoryStore::with_clock(10_000, clock.clone()));
        Conformance::with_fake_clock(Guarded::new(inner, Duration::from_secs(5)), clock)
            .run_all()
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory_store_on_a_fake_clock_conforms() {
        let clock = FakeClock::new();
        Conformance::with_fake_clock(MemoryStore::with_clock(10_000, clock.clone()), clock)
            .run_all()
            .await;
    }
}
