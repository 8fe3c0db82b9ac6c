//! The model-based property test of the store contract (DESIGN section 3)
//! on the memory store: the model and the machinery are
//! `test_support::model`'s, shared with the other stores' tests (in their
//! own crates).
//!
//! The memory store runs on a `FakeClock`, so an advance is exact and
//! instant: many long sequences, with durations chosen to land exactly on
//! lease and ttl boundaries. Mutants (wrappers around the memory store that
//! break fencing, takeover or expiry) show that the property fails when the
//! contract is broken.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, LeaseToken, MemoryStore, RecordId, Store, StoreError, StoreFuture,
    StoredOutcome, TokenOutcome,
};
use test_support::model::{check_memory, Coverage, TestError, MEMORY_CASES};

#[test]
fn memory_store_follows_the_model() {
    let coverage = Coverage::default();
    let started = std::time::Instant::now();
    let result = check_memory(
        MEMORY_CASES,
        |clock| MemoryStore::with_clock(64, clock),
        &coverage,
    );
    let seen = coverage.report("memory");
    eprintln!("memory: {MEMORY_CASES} cases in {:?}", started.elapsed());
    if let Err(e) = result {
        panic!("{e}");
    }
    // The sequences reach every rule of the model.
    for rule in [
        "claim: absent, acquired",
        "claim: expired, acquired",
        "claim: completed, replayed",
        "claim: completed, other fingerprint",
        "claim: in flight, lease held",
        "claim: lease passed, other fingerprint, in flight",
        "claim: lease passed, taken over",
        "complete: applied",
        "complete: applied (lease passed, not expired)",
        "complete: fenced, another token holds it",
        "complete: fenced, expired",
        "complete: fenced, never-acquired token",
        "release: applied",
        "release: fenced, completed",
        "extend: applied",
        "extend: applied (lease passed, not expired)",
        "extend: fenced, absent",
    ] {
        assert!(
            seen.get(rule).copied().unwrap_or(0) > 0,
            "the memory sequences never exercised `{rule}`"
        );
    }
}

// ---------------------------------------------------------------------------
// Mutants: the property must catch a broken store
// ---------------------------------------------------------------------------

/// How a [`Mutant`] breaks the memory store.
#[derive(Clone, Copy, Debug)]
enum Break {
    /// Fencing: `release` ignores the caller's token and releases with the
    /// latest token acquired for the record, so a stale holder (or anyone)
    /// deletes the current claim.
    ReleaseWithLatest,
    /// Fencing: `complete` ignores the caller's token likewise.
    CompleteWithLatest,
    /// Takeover: once the lease passed, a *different* request takes the
    /// record over (it should get `InFlight` until the record expires).
    DifferentRequestTakesOver,
    /// Expiry: an abandoned in-flight record is forgotten as its lease ends
    /// (the claim's ttl is dropped).
    NoTtlAfterLease,
}

/// The memory store, broken as `how` says.
struct Mutant {
    inner: MemoryStore,
    how: Break,
    /// The latest token acquired for each record.
    latest: Mutex<HashMap<RecordId, LeaseToken>>,
}

impl Mutant {
    fn new(inner: MemoryStore, how: Break) -> Self {
        Self {
            inner,
            how,
            latest: Mutex::default(),
        }
    }

    fn latest(&self, id: &RecordId) -> Option<LeaseToken> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn acquired(&self, id: &RecordId, outcome: &ClaimOutcome) {
        if let ClaimOutcome::Acquired(token) = outcome {
            self.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*id, *token);
        }
    }
}

impl Store for Mutant {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        StoreFuture::new(async move {
            let mut claim = claim;
            if let Break::NoTtlAfterLease = self.how {
                claim.ttl = Duration::ZERO;
            }
            let mut outcome = self.inner.claim(id, token, claim).await?;
            if let (
                Break::DifferentRequestTakesOver,
                ClaimOutcome::InFlight {
                    lease_remaining: Duration::ZERO,
                    ..
                },
            ) = (self.how, &outcome)
            {
                if let Some(held) = self.latest(id) {
                    let _ = self.inner.release(id, held).await?;
                    outcome = self.inner.claim(id, token, claim).await?;
                }
            }
            self.acquired(id, &outcome);
            Ok(outcome)
        })
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let token = match self.how {
            Break::CompleteWithLatest => self.latest(id).unwrap_or(token),
            _ => token,
        };
        self.inner.complete(id, token, outcome, ttl)
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let token = match self.how {
            Break::ReleaseWithLatest => self.latest(id).unwrap_or(token),
            _ => token,
        };
        self.inner.release(id, token)
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        self.inner.extend(id, token, lease)
    }

    fn backend(&self) -> &'static str {
        "mutant"
    }
}

impl fmt::Debug for Mutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutant").field("how", &self.how).finish()
    }
}

/// The property finds every mutant, and shrinks it to a short sequence.
#[test]
fn the_property_catches_broken_stores() {
    for how in [
        Break::ReleaseWithLatest,
        Break::CompleteWithLatest,
        Break::DifferentRequestTakesOver,
        Break::NoTtlAfterLease,
    ] {
        let coverage = Coverage::default();
        let result = check_memory(
            MEMORY_CASES,
            |clock| Mutant::new(MemoryStore::with_clock(64, clock), how),
            &coverage,
        );
        match result {
            Err(TestError::Fail(reason, minimal)) => {
                eprintln!(
                    "mutant {how:?}: caught; shrunk to {} steps: {minimal:?}\n  {reason}",
                    minimal.len()
                );
                assert!(
                    minimal.len() <= 4,
                    "mutant {how:?}: the counterexample did not shrink: {minimal:?}"
                );
            }
            Err(other) => panic!("mutant {how:?}: the runner stopped: {other}"),
            Ok(()) => panic!("mutant {how:?}: {MEMORY_CASES} cases did not catch it"),
        }
    }
}
