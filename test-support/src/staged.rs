//! A transactional store written against `idempotency-core`'s public API
//! only, as a store outside the workspace would be: records in memory, and
//! transactions that stage a handler's effects and apply them, with the
//! record, at commit. It shows that the transactional mode (the engine, the
//! conformance suite, the adapters' extractors) is open to any store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use idempotency_core::{
    Begun, BoxFuture, Claim, ClaimOutcome, Fingerprint, LeaseToken, OpenTransaction, RecordId,
    Store, StoreError, StoreFuture, StoredOutcome, TokenOutcome, TransactionalStore, TxHandle,
    TxSlot,
};

/// What a handler gets in transactional mode: the effects it stages, which
/// become visible ([`StagedStore::effects`]) only if the request commits.
#[derive(Debug, Default)]
pub struct Staged {
    /// The staged effects, in order.
    pub effects: Vec<String>,
}

impl std::ops::Deref for Staged {
    type Target = Vec<String>;
    fn deref(&self) -> &Vec<String> {
        &self.effects
    }
}

impl std::ops::DerefMut for Staged {
    fn deref_mut(&mut self) -> &mut Vec<String> {
        &mut self.effects
    }
}

enum State {
    InFlight {
        token: LeaseToken,
        lease_until: Instant,
    },
    Completed(StoredOutcome),
}

struct Record {
    fingerprint: Fingerprint,
    state: State,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    records: Mutex<HashMap<RecordId, Record>>,
    locked: Mutex<HashSet<RecordId>>,
    effects: Mutex<Vec<String>>,
}

/// The in-memory transactional store. Cheap to clone: clones share it.
#[derive(Clone, Default)]
pub struct StagedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StagedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedStore").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The record as a claim with `fingerprint` finds it: `None` when the claim
/// could take it (absent, expired, or in flight past its lease for the same
/// request).
fn existing(
    records: &HashMap<RecordId, Record>,
    id: &RecordId,
    fingerprint: &Fingerprint,
    now: Instant,
) -> Option<ClaimOutcome> {
    let record = records.get(id).filter(|r| r.expires > now)?;
    match &record.state {
        State::Completed(outcome) => Some(ClaimOutcome::Completed {
            fingerprint: record.fingerprint,
            outcome: outcome.clone(),
        }),
        State::InFlight { lease_until, .. }
            if *lease_until > now || record.fingerprint != *fingerprint =>
        {
            Some(ClaimOutcome::InFlight {
                fingerprint: record.fingerprint,
                lease_remaining: lease_until.saturating_duration_since(now),
            })
        }
        State::InFlight { .. } => None,
    }
}

impl StagedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every effect committed so far, in commit order.
    pub fn effects(&self) -> Vec<String> {
        lock(&self.inner.effects).clone()
    }

    fn records(&self) -> MutexGuard<'_, HashMap<RecordId, Record>> {
        lock(&self.inner.records)
    }

    /// Applies `change` if `token` holds the record in flight.
    fn fenced(
        &self,
        id: &RecordId,
        token: LeaseToken,
        change: impl FnOnce(&mut Record, Instant) -> bool,
    ) -> TokenOutcome {
        let now = Instant::now();
        let mut records = self.records();
        let Some(record) = records.get_mut(id) else {
            return TokenOutcome::Fenced;
        };
        let held = matches!(record.state, State::InFlight { token: held, .. } if held == token)
            && record.expires > now;
        if !held {
            return TokenOutcome::Fenced;
        }
        if !change(record, now) {
            records.remove(id);
        }
        TokenOutcome::Applied
    }
}

impl Store for StagedStore {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        let now = Instant::now();
        // One lock over the read and the write: atomic.
        let mut records = self.records();
        if let Some(found) = existing(&records, id, claim.fingerprint, now) {
            return StoreFuture::ready(Ok(found));
        }
        let lease_until = now + claim.lease;
        records.insert(
            *id,
            Record {
                fingerprint: *claim.fingerprint,
                state: State::InFlight { token, lease_until },
                expires: lease_until + claim.ttl,
            },
        );
        StoreFuture::ready(Ok(ClaimOutcome::Acquired(token)))
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::ready(Ok(self.fenced(id, token, |record, now| {
            record.state = State::Completed(outcome.clone());
            record.expires = now + ttl;
            true
        })))
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::ready(Ok(self.fenced(id, token, |_, _| false)))
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        StoreFuture::ready(Ok(self.fenced(id, token, |record, now| {
            if let State::InFlight { lease_until, .. } = &mut record.state {
                let keep = record.expires.saturating_duration_since(*lease_until);
                *lease_until = now + lease;
                record.expires = now + lease + keep;
            }
            true
        })))
    }

    fn backend(&self) -> &'static str {
        "staged"
    }
}

/// A record's transaction lock, released when dropped.
struct Locked {
    inner: Arc<Inner>,
    id: RecordId,
}

impl Drop for Locked {
    fn drop(&mut self) {
        lock(&self.inner.locked).remove(&self.id);
    }
}

impl TransactionalStore for StagedStore {
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>> {
        let found = existing(&self.records(), id, fingerprint, Instant::now());
        Box::pin(async move { Ok(found) })
    }

    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        _token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>> {
        let begun = (|| {
            if !lock(&self.inner.locked).insert(*id) {
                return Begun::Locked;
            }
            let held = Locked {
                inner: Arc::clone(&self.inner),
                id: *id,
            };
            if let Some(found) = existing(&self.records(), id, claim.fingerprint, Instant::now()) {
                return Begun::Existing(found);
            }
            Begun::Acquired(Box::new(Open {
                store: self.clone(),
                slot: TxSlot::new(Staged::default()),
                id: *id,
                fingerprint: *claim.fingerprint,
                _held: held,
            }))
        })();
        Box::pin(async move { Ok(begun) })
    }

    fn backend(&self) -> &'static str {
        "staged"
    }
}

/// A transaction: the staged effects (shared with the handler) and the
/// record's lock.
struct Open {
    store: StagedStore,
    slot: TxSlot<Staged>,
    id: RecordId,
    fingerprint: Fingerprint,
    _held: Locked,
}

impl OpenTransaction for Open {
    fn handle(&self) -> TxHandle {
        TxHandle::new(&self.slot)
    }

    fn commit(
        self: Box<Self>,
        outcome: StoredOutcome,
        ttl: Duration,
        bound: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let staged = self.slot.take("staged", bound).await?;
            let inner = &self.store.inner;
            // The record and the effects become visible together.
            let mut records = lock(&inner.records);
            let mut effects = lock(&inner.effects);
            records.insert(
                self.id,
                Record {
                    fingerprint: self.fingerprint,
                    state: State::Completed(outcome),
                    expires: Instant::now() + ttl,
                },
            );
            effects.extend(staged.effects);
            Ok(())
        })
    }

    fn rollback(self: Box<Self>, bound: Duration) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            // The staged effects are dropped with the transaction.
            self.slot.take("staged", bound).await.map(drop)
        })
    }
}
