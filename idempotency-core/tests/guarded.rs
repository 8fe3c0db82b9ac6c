//! `Guarded`: every call bounded by its timeout (unless the store bounds the
//! call itself within it), and `hold`'s heartbeat keeping a claim alive while
//! slow work runs. On tokio's paused clock: nothing really sleeps.

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::Held;
use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, Guarded, LeaseToken, MemoryStore, RecordId, Store,
    StoreError, StoreFuture, StoredOutcome, TokenOutcome, TokioClock,
};
use test_support::{Hooked, Op};
use tokio::time::Instant;

/// How a [`Scripted`] store answers.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Never.
    Never,
    /// With `StoreFuture::ready`.
    Ready,
    /// After `delay`, with `StoreFuture::new`.
    Plain { delay: Duration },
    /// After `delay`, with `StoreFuture::bounded(.., bound)` (a store that
    /// says it bounds its calls; this one does not really, so that the test
    /// sees whether `Guarded` armed a timer of its own).
    Bounded { delay: Duration, bound: Duration },
}

/// A store whose every call answers `Ok` as its mode says.
struct Scripted(Mode);

impl Scripted {
    fn answer<'a, T: Send + 'a>(&self, value: T) -> StoreFuture<'a, Result<T, StoreError>> {
        match self.0 {
            Mode::Never => StoreFuture::new(std::future::pending()),
            Mode::Ready => StoreFuture::ready(Ok(value)),
            Mode::Plain { delay } => StoreFuture::new(async move {
                tokio::time::sleep(delay).await;
                Ok(value)
            }),
            Mode::Bounded { delay, bound } => StoreFuture::bounded(
                async move {
                    tokio::time::sleep(delay).await;
                    Ok(value)
                },
                bound,
            ),
        }
    }
}

impl Store for Scripted {
    fn claim<'a>(
        &'a self,
        _: &'a RecordId,
        token: LeaseToken,
        _: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        self.answer(ClaimOutcome::Acquired(token))
    }
    fn complete<'a>(
        &'a self,
        _: &'a RecordId,
        _: LeaseToken,
        _: &'a StoredOutcome,
        _: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(TokenOutcome::Applied)
    }
    fn release<'a>(
        &'a self,
        _: &'a RecordId,
        _: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(TokenOutcome::Applied)
    }
    fn extend<'a>(
        &'a self,
        _: &'a RecordId,
        _: LeaseToken,
        _: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.answer(TokenOutcome::Applied)
    }
    fn backend(&self) -> &'static str {
        "scripted"
    }
}

const FP: Fingerprint = Fingerprint::from_bytes([9; 32]);

fn id() -> RecordId {
    RecordId::from_parts(b"guarded", &rand::random::<[u8; 16]>())
}

fn claim(lease: Duration) -> Claim<'static> {
    Claim {
        fingerprint: &FP,
        lease,
        ttl: Duration::from_secs(3600),
    }
}

fn guarded(mode: Mode, timeout: Duration) -> Guarded {
    Guarded::new(Arc::new(Scripted(mode)), timeout)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn is_timeout<T: std::fmt::Debug>(result: &Result<T, StoreError>, after: Duration) -> bool {
    matches!(result, Err(StoreError::Timeout { backend: "scripted", timeout }) if *timeout == after)
}

/// A store that never answers: every call fails with `Timeout` once the
/// timeout has passed, not before, through the inherent methods and through
/// `Guarded` as a `Store`.
#[tokio::test(start_paused = true)]
async fn a_store_that_never_answers_times_out() {
    let timeout = ms(250);
    let guarded = guarded(Mode::Never, timeout);
    let (id, token) = (id(), LeaseToken::random());
    let done = StoredOutcome::Mark(1);

    let started = Instant::now();
    let r = guarded.claim(&id, token, claim(ms(1000))).await;
    assert!(is_timeout(&r, timeout), "{r:?}");
    assert_eq!(
        started.elapsed(),
        timeout,
        "exactly the timeout (paused clock)"
    );

    let started = Instant::now();
    let results = [
        guarded.complete(&id, token, &done, ms(1000)).await,
        guarded.release(&id, token).await,
        guarded.extend(&id, token, ms(1000)).await,
    ];
    for r in &results {
        assert!(is_timeout(r, timeout), "{r:?}");
    }
    assert_eq!(started.elapsed(), timeout * 3);

    // The same through the `Store` impl (how a caller holding only a
    // `dyn Store` sees it).
    let store: &dyn Store = &guarded;
    let started = Instant::now();
    let r = store.claim(&id, token, claim(ms(1000))).await;
    assert!(is_timeout(&r, timeout), "{r:?}");
    assert_eq!(started.elapsed(), timeout);
    assert_eq!(store.backend(), "scripted");
}

/// A store slower than the timeout times out; one within it answers.
#[tokio::test(start_paused = true)]
async fn a_plain_future_is_bounded_by_the_timeout() {
    let (id, token) = (id(), LeaseToken::random());
    let slow = guarded(Mode::Plain { delay: ms(300) }, ms(100));
    let started = Instant::now();
    let r = slow.claim(&id, token, claim(ms(1000))).await;
    assert!(is_timeout(&r, ms(100)), "{r:?}");
    assert_eq!(started.elapsed(), ms(100));

    let quick = guarded(Mode::Plain { delay: ms(30) }, ms(100));
    let started = Instant::now();
    let r = quick.claim(&id, token, claim(ms(1000))).await;
    assert!(
        matches!(r, Ok(ClaimOutcome::Acquired(t)) if t == token),
        "{r:?}"
    );
    assert_eq!(started.elapsed(), ms(30));
}

/// A store that bounds its call within Guarded's timeout is trusted: Guarded
/// arms no timer of its own (so this store, which does not really keep its
/// bound, answers after 300 ms under a 100 ms timeout). The same future
/// unbounded times out; bounded beyond the timeout, Guarded's timer runs.
#[tokio::test(start_paused = true)]
async fn a_store_bounded_within_the_timeout_gets_no_second_timer() {
    let (id, token) = (id(), LeaseToken::random());
    let delay = ms(300);
    let timeout = ms(100);

    let trusted = guarded(
        Mode::Bounded {
            delay,
            bound: ms(50),
        },
        timeout,
    );
    let started = Instant::now();
    let r = trusted.claim(&id, token, claim(ms(1000))).await;
    assert!(matches!(r, Ok(ClaimOutcome::Acquired(_))), "{r:?}");
    assert_eq!(started.elapsed(), delay, "awaited without Guarded's timer");
    // A bound equal to the timeout is within it too.
    let equal = guarded(
        Mode::Bounded {
            delay,
            bound: timeout,
        },
        timeout,
    );
    let r = equal.release(&id, token).await;
    assert!(matches!(r, Ok(TokenOutcome::Applied)), "{r:?}");

    let unbounded = guarded(Mode::Plain { delay }, timeout);
    let started = Instant::now();
    let r = unbounded.claim(&id, token, claim(ms(1000))).await;
    assert!(is_timeout(&r, timeout), "{r:?}");
    assert_eq!(started.elapsed(), timeout);

    let beyond = guarded(
        Mode::Bounded {
            delay,
            bound: ms(200),
        },
        timeout,
    );
    let started = Instant::now();
    let r = beyond.extend(&id, token, ms(1000)).await;
    assert!(is_timeout(&r, timeout), "{r:?}");
    assert_eq!(started.elapsed(), timeout);
}

/// An answer the store already has is returned as is, even with a zero
/// timeout: no timer is armed for it.
#[tokio::test(start_paused = true)]
async fn a_ready_answer_needs_no_timer() {
    let guarded = guarded(Mode::Ready, Duration::ZERO);
    let (id, token) = (id(), LeaseToken::random());
    let r = guarded.claim(&id, token, claim(ms(1000))).await;
    assert!(
        matches!(r, Ok(ClaimOutcome::Acquired(t)) if t == token),
        "{r:?}"
    );
    let store: &dyn Store = &guarded;
    let r = store.release(&id, token).await;
    assert!(matches!(r, Ok(TokenOutcome::Applied)), "{r:?}");
}

/// A memory store on tokio's (paused) clock, counting its calls, behind a
/// `Guarded`.
fn memory() -> (Guarded, Arc<Hooked<MemoryStore>>) {
    let counting = Arc::new(Hooked::new(MemoryStore::with_clock(100, TokioClock::new())));
    let store: Arc<dyn Store> = counting.clone();
    (Guarded::new(store, Duration::from_secs(1)), counting)
}

async fn acquire(guarded: &Guarded, id: &RecordId, lease: Duration) -> LeaseToken {
    let token = LeaseToken::random();
    match guarded.claim(id, token, claim(lease)).await {
        Ok(ClaimOutcome::Acquired(t)) if t == token => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn claim_again(guarded: &Guarded, id: &RecordId) -> ClaimOutcome {
    guarded
        .claim(id, LeaseToken::random(), claim(Duration::from_secs(1)))
        .await
        .expect("claim")
}

/// Work five times longer than the lease keeps its claim: the same request
/// retried meanwhile (which would take over a passed lease) gets InFlight,
/// the heartbeat extended it, and the holder completes at the end.
#[tokio::test(start_paused = true)]
async fn hold_keeps_the_claim_of_work_slower_than_the_lease() {
    let (guarded, counting) = memory();
    let (id, lease) = (id(), Duration::from_secs(1));
    let token = acquire(&guarded, &id, lease).await;
    let started = Instant::now();
    let work = async {
        let mut seen = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(lease).await;
            seen.push(claim_again(&guarded, &id).await);
        }
        seen
    };
    let (seen, held) = guarded.hold(&id, token, lease, work).await;
    assert_eq!(held, Held::Kept);
    assert_eq!(started.elapsed(), lease * 5);
    for (n, outcome) in seen.iter().enumerate() {
        assert!(
            matches!(outcome, ClaimOutcome::InFlight { fingerprint, .. } if *fingerprint == FP),
            "after {} lease(s): {outcome:?}",
            n + 1
        );
    }
    let extends = counting.calls(Op::Extend);
    assert!(
        (9..=10).contains(&extends),
        "one heartbeat every half lease: {extends}"
    );
    let done = StoredOutcome::Mark(3);
    assert_eq!(
        guarded
            .complete(&id, token, &done, Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Applied,
        "the holder kept its claim"
    );
    // No heartbeat runs once `hold` returned.
    tokio::time::sleep(lease * 3).await;
    assert_eq!(counting.calls(Op::Extend), extends);
}

/// Without `hold`, the same work loses its claim: the retry takes it over
/// once the lease has passed (what the heartbeat prevents above).
#[tokio::test(start_paused = true)]
async fn without_hold_a_passed_lease_is_taken_over() {
    let (guarded, _) = memory();
    let (id, lease) = (id(), Duration::from_secs(1));
    let _token = acquire(&guarded, &id, lease).await;
    tokio::time::sleep(lease + ms(1)).await;
    assert!(matches!(
        claim_again(&guarded, &id).await,
        ClaimOutcome::Acquired(_)
    ));
}

/// Work that answers on its first poll costs no heartbeat at all.
#[tokio::test(start_paused = true)]
async fn hold_of_ready_work_costs_no_store_call() {
    let (guarded, counting) = memory();
    let (id, lease) = (id(), Duration::from_secs(1));
    let token = acquire(&guarded, &id, lease).await;
    let (out, held) = guarded.hold(&id, token, lease, async { 42 }).await;
    assert_eq!((out, held), (42, Held::Kept));
    tokio::time::sleep(lease * 3).await;
    assert_eq!(counting.calls(Op::Extend), 0);
}

/// A claim taken over while the work runs (here: the claim's lease is shorter
/// than the heartbeat's period, as when the holder stalled) is reported as
/// `Lost`; the work still runs to its end, the heartbeat stops, and the old
/// token can no longer complete.
#[tokio::test(start_paused = true)]
async fn hold_reports_a_claim_taken_over_as_lost() {
    let (guarded, counting) = memory();
    let id = id();
    // Claimed for 1 s, but heartbeats every 2 s (half of 4 s).
    let token = acquire(&guarded, &id, Duration::from_secs(1)).await;
    let work = async {
        tokio::time::sleep(ms(1500)).await;
        // The lease passed: the retry of the same request takes over (for
        // longer than the rest of the test).
        let taken = guarded
            .claim(&id, LeaseToken::random(), claim(Duration::from_secs(60)))
            .await
            .expect("claim");
        tokio::time::sleep(Duration::from_secs(5)).await;
        taken
    };
    let (taken, held) = guarded.hold(&id, token, Duration::from_secs(4), work).await;
    let ClaimOutcome::Acquired(new_token) = taken else {
        panic!("the retry did not take over: {taken:?}");
    };
    assert_ne!(new_token, token);
    assert_eq!(held, Held::Lost);
    assert_eq!(
        counting.calls(Op::Extend),
        1,
        "the heartbeat stopped at its first fenced extend"
    );
    assert_eq!(
        guarded
            .complete(&id, token, &StoredOutcome::Mark(1), Duration::from_secs(60))
            .await
            .expect("complete"),
        TokenOutcome::Fenced
    );
    // The new holder is untouched.
    assert!(matches!(
        claim_again(&guarded, &id).await,
        ClaimOutcome::InFlight { .. }
    ));
    assert_eq!(
        guarded
            .complete(
                &id,
                new_token,
                &StoredOutcome::Mark(2),
                Duration::from_secs(60)
            )
            .await
            .expect("complete"),
        TokenOutcome::Applied
    );
}
