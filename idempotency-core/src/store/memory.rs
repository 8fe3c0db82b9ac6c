//! The in-process store: one instance, bounded in entries and in bytes,
//! nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Claim, Store, StoreError, StoreFuture, Waiters, Watch};
use crate::clock::{Clock, SystemClock};
use crate::fingerprint::{Fingerprint, RecordId};
use crate::metrics::Eviction;
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};

/// The default capacity: 100 000 records.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// The default bound of the stored responses' bytes: 64 MiB.
///
/// At the default storable limit (1 MiB a response) 100 000 records could
/// hold about 100 GB; 64 MiB is what a laptop or a small container gives a
/// cache without noticing, and still holds 16 000 responses of 4 KiB.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// An in-process store for a single instance.
///
/// - `claim` is one step under one lock; no lock is ever held across an `.await`.
/// - It holds at most `capacity` records. When full, it first drops expired
///   records, then evicts the oldest *completed* records (counted in
///   [`evictions`](Self::evictions), and logged at `warn` on the 1st, 2nd,
///   4th, 8th, … eviction, so a store that stays full does not flood the logs). It never evicts an
///   in-flight record: when only those remain, `claim` fails with
///   [`StoreError::Full`], which the middleware turns into 503 (fail-closed)
///   or an unguarded run (fail-open).
/// - Its stored responses hold at most `max_bytes` (default
///   [`DEFAULT_MAX_BYTES`], 64 MiB), counted as their bodies, header names
///   and values and the bookkeeping of each (see [`bytes`](Self::bytes)).
///   A completion that would pass the bound first drops expired records,
///   then evicts the oldest completed ones until it fits (counted, and
///   logged, as above). A single response larger than the whole bound is
///   stored as not replayable, as a body over the storable limit is: the
///   retry gets 410 and never runs the handler again. In-flight records
///   hold no response and are never evicted for bytes.
/// - Every eviction is counted in the metric
///   [`idempotency_memory_evictions_total`](crate::metrics::MEMORY_EVICTIONS_TOTAL)
///   (`reason`: `capacity` or `bytes`).
/// - Clones share the same records.
///
/// ```
/// use idempotency_core::MemoryStore;
///
/// // 10 000 records and 16 MiB of responses at most.
/// let store = MemoryStore::builder().capacity(10_000).max_bytes(16 << 20).build();
/// assert_eq!(store.max_bytes(), 16 << 20);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    capacity: usize,
    max_bytes: usize,
    evictions: AtomicU64,
    /// The duplicates waiting for a record, woken on complete and release.
    waiters: Waiters,
}

/// Hashes a [`RecordId`] by taking the `u64` it writes: its bytes are
/// already SHA-256 output, so hashing them again (SipHash) buys nothing, and
/// no client can steer them into one bucket.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<RecordId, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The records: an index from id to slot, and the slots themselves.
///
/// The index holds 36 bytes per record (an id and a slot number): for
/// 100 000 records about 5 MB, which a last-level cache holds, where a map
/// of whole records (128 bytes each) took 17 MB and missed the cache on
/// every fresh claim. The slots are reused, the most recently vacated first,
/// so a fresh claim on a full store writes into the slot that its eviction
/// has just brought into cache. Measured with the actix fresh-key bench on a
/// full store of 100 000 records: 0.1–0.35 µs less per request.
#[derive(Default)]
struct Records {
    index: IdMap<u32>,
    slots: Vec<Slot>,
    /// Vacant slots, the most recently vacated last.
    free: Vec<u32>,
    /// The bytes of the completed records' outcomes ([`outcome_bytes`]).
    bytes: usize,
}

/// What a stored outcome counts against the byte bound: a response's body,
/// header names and values, and the structs that hold them (so that many
/// small headers count too), or a sealed one's bytes. A record's own slot and index entry are
/// bounded by the capacity instead.
fn outcome_bytes(outcome: &StoredOutcome) -> usize {
    match outcome {
        StoredOutcome::Response(r) => {
            std::mem::size_of::<crate::record::StoredResponse>()
                + r.body.len()
                + r.headers
                    .iter()
                    .map(|(n, v)| std::mem::size_of_val(&(n, v)) + n.len() + v.len())
                    .sum::<usize>()
        }
        StoredOutcome::Sealed(sealed) => {
            std::mem::size_of::<crate::SealedOutcome>() + sealed.as_bytes().len()
        }
        _ => 0,
    }
}

impl State {
    /// What this state counts against the byte bound.
    fn bytes(&self) -> usize {
        match self {
            State::Completed { outcome, .. } => outcome_bytes(outcome),
            _ => 0,
        }
    }
}

struct Slot {
    id: RecordId,
    fingerprint: Fingerprint,
    state: State,
    /// The generation: a new one for every claim that (re)starts a record
    /// and every completion; 0 once the slot is vacant.
    seq: u64,
}

impl Records {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn find(&self, id: &RecordId) -> Option<u32> {
        self.index.get(id).copied()
    }

    fn slot(&self, i: u32) -> &Slot {
        &self.slots[i as usize]
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.slots[i as usize]
    }

    /// Adds a record whose id is not in the store.
    fn insert(&mut self, slot: Slot) -> u32 {
        let id = slot.id;
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                // `MemoryStore::with_clock` bounds the capacity to u32 slots.
                let i = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(slot);
                i
            }
        };
        self.index.insert(id, i);
        i
    }

    /// Replaces the state of slot `i`, keeping the byte count.
    fn set_state(&mut self, i: u32, state: State) {
        let slot = &mut self.slots[i as usize];
        self.bytes = self.bytes - slot.state.bytes() + state.bytes();
        slot.state = state;
    }

    /// Removes the record in slot `i` (its response is dropped here).
    fn remove(&mut self, i: u32) {
        let slot = &self.slots[i as usize];
        if matches!(slot.state, State::Vacant) {
            return;
        }
        self.index.remove(&slot.id);
        self.set_state(i, State::Vacant);
        self.slots[i as usize].seq = 0;
        self.free.push(i);
    }

    /// Removes every record for which `keep` is false; returns how many.
    fn retain(&mut self, keep: impl Fn(&Slot) -> bool) -> usize {
        let mut removed = 0;
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !matches!(slot.state, State::Vacant) && !keep(slot) {
                // `i` < slots.len() <= u32::MAX + 1 (see `insert`).
                self.remove(i as u32);
                removed += 1;
            }
        }
        removed
    }
}

#[derive(Default)]
struct Inner {
    records: Records,
    /// Completed records in the order they completed, for eviction and
    /// sweeping, as (slot, generation): entries whose slot has moved on to
    /// another generation are stale and skipped.
    completed: VecDeque<(u32, u64)>,
    seq: u64,
}

enum State {
    Vacant,
    InFlight {
        token: LeaseToken,
        lease_until: u64,
        expires_at: u64,
    },
    Completed {
        outcome: StoredOutcome,
        expires_at: u64,
    },
}

impl State {
    fn expires_at(&self) -> u64 {
        match self {
            State::InFlight { expires_at, .. } | State::Completed { expires_at, .. } => *expires_at,
            State::Vacant => 0,
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.shared.capacity)
            .field("len", &self.len())
            .field("max_bytes", &self.shared.max_bytes)
            .field("bytes", &self.bytes())
            .field("evictions", &self.evictions())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Builds a [`MemoryStore`]: [`MemoryStore::builder`].
#[must_use]
pub struct MemoryStoreBuilder {
    capacity: usize,
    max_bytes: usize,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemoryStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStoreBuilder")
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl MemoryStoreBuilder {
    /// At most `capacity` records (default [`DEFAULT_CAPACITY`]; at least 1,
    /// at most `u32::MAX`).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// At most `bytes` of stored responses (default [`DEFAULT_MAX_BYTES`]);
    /// see [`MemoryStore`] for what is counted and what happens past it.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The clock (default the system's; tests use
    /// [`FakeClock`](crate::clock::FakeClock)).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The store. Its eviction counters are registered (at 0) with the
    /// metrics recorder installed now, if any.
    pub fn build(self) -> MemoryStore {
        crate::metrics::register_memory_evictions();
        MemoryStore {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                clock: self.clock,
                capacity: self.capacity.clamp(1, u32::MAX as usize),
                max_bytes: self.max_bytes,
                evictions: AtomicU64::new(0),
                waiters: Waiters::new(),
            }),
        }
    }
}

impl MemoryStore {
    /// A store of [`DEFAULT_CAPACITY`] records and [`DEFAULT_MAX_BYTES`] on
    /// the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to set the capacity, the byte bound and the clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            capacity: DEFAULT_CAPACITY,
            max_bytes: DEFAULT_MAX_BYTES,
            clock: Arc::new(SystemClock),
        }
    }

    /// A store of at most `capacity` records (at least 1, at most
    /// `u32::MAX`) and [`DEFAULT_MAX_BYTES`].
    pub fn with_capacity(capacity: usize) -> Self {
        Self::builder().capacity(capacity).build()
    }

    /// A store on an injected clock (tests use [`FakeClock`](crate::clock::FakeClock)).
    pub fn with_clock(capacity: usize, clock: impl Clock) -> Self {
        Self::builder().capacity(capacity).clock(clock).build()
    }

    /// The bytes its completed records' responses hold now, as counted
    /// against [`max_bytes`](Self::max_bytes): bodies, header names and
    /// values, and the structs that hold them.
    pub fn bytes(&self) -> usize {
        self.lock().records.bytes
    }

    /// The bound of [`bytes`](Self::bytes).
    pub fn max_bytes(&self) -> usize {
        self.shared.max_bytes
    }

    /// How many records it holds now (in flight, completed, and expired ones
    /// not yet swept).
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether it holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many completed records were evicted before their ttl to make
    /// room, for a record (capacity) or for a response (bytes).
    pub fn evictions(&self) -> u64 {
        self.shared.evictions.load(Ordering::Relaxed)
    }

    /// Removes every expired record now; returns how many. The store also does
    /// this by itself, a little on every claim and fully when it is full.
    pub fn sweep_expired(&self) -> usize {
        let now = self.shared.clock.now_millis();
        let mut inner = self.lock();
        let removed = inner.records.retain(|s| s.state.expires_at() > now);
        inner.compact_order();
        removed
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock cannot leave a record half-written (every
        // change is one insert or remove), so a poisoned lock is still usable.
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete_now(
        &self,
        id: &RecordId,
        token: LeaseToken,
        outcome: &StoredOutcome,
        ttl: Duration,
    ) -> TokenOutcome {
        self.with_token(id, token, |inner, i, now| {
            let outcome = self.make_room_for(inner, outcome, now);
            inner.seq += 1;
            let seq = inner.seq;
            inner.records.slot_mut(i).seq = seq;
            let completed = State::Completed {
                outcome,
                expires_at: now.saturating_add(millis(ttl)),
            };
            inner.records.set_state(i, completed);
            inner.completed.push_back((i, seq));
        })
    }

    /// Makes room within the byte bound for `outcome`, and returns what to
    /// store: the outcome, or, when it alone is larger than the bound, the
    /// same as a body over the storable limit (not replayable).
    fn make_room_for(&self, inner: &mut Inner, outcome: &StoredOutcome, now: u64) -> StoredOutcome {
        let size = outcome_bytes(outcome);
        let max = self.shared.max_bytes;
        if size > max {
            let status = match outcome {
                StoredOutcome::Response(r) => r.status,
                _ => 0,
            };
            tracing::warn!(
                bytes = size,
                max_bytes = max,
                status,
                "memory store: a response larger than the store's byte bound was stored as not replayable; a retry gets 410"
            );
            return StoredOutcome::NotReplayable { status };
        }
        inner.sweep_front(now);
        while inner.records.bytes + size > max {
            if !self.evict_oldest(inner, now, Eviction::Bytes) {
                break;
            }
        }
        outcome.clone()
    }

    /// Removes the oldest completed record, from the front of the
    /// completion order (O(1) amortized); an expired one is dropped, a live
    /// one counted as evicted for `reason`. False when none is left.
    fn evict_oldest(&self, inner: &mut Inner, now: u64, reason: Eviction) -> bool {
        while let Some((i, seq)) = inner.completed.pop_front() {
            // Stale queue entries (a newer generation, or vacant) stay.
            let slot = inner.records.slot(i);
            if slot.seq != seq || !matches!(slot.state, State::Completed { .. }) {
                continue;
            }
            let expired = slot.state.expires_at() <= now;
            inner.records.remove(i);
            if !expired {
                self.evicted(reason);
            }
            return true;
        }
        false
    }

    /// Counts a live record evicted before its ttl.
    fn evicted(&self, reason: Eviction) {
        crate::metrics::memory_eviction(reason);
        let n = self.shared.evictions.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged on the 1st, 2nd, 4th, 8th, ... eviction: a full store
        // under load evicts on every fresh request, and one line each would
        // flood the logs. `evictions()` and the metric count all.
        if n.is_power_of_two() {
            tracing::warn!(
                evictions = n,
                reason = reason.as_str(),
                capacity = self.shared.capacity,
                max_bytes = self.shared.max_bytes,
                "memory store full: evicted the oldest completed record before its ttl (logged at every power of two evictions)"
            );
        }
    }

    fn claim_now(
        &self,
        id: &RecordId,
        token: LeaseToken,
        req: Claim<'_>,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = self.shared.clock.now_millis();
        let lease_until = now.saturating_add(millis(req.lease));
        let fresh = || State::InFlight {
            token,
            lease_until,
            expires_at: lease_until.saturating_add(millis(req.ttl)),
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.sweep_front(now);
        let found = inner.records.find(id);
        if found.is_none() && inner.records.len() >= self.shared.capacity {
            self.make_room(inner, now)?;
        }
        let Inner { records, seq, .. } = inner;
        let Some(i) = found else {
            *seq += 1;
            records.insert(Slot {
                id: *id,
                fingerprint: *req.fingerprint,
                state: fresh(),
                seq: *seq,
            });
            return Ok(ClaimOutcome::Acquired(token));
        };
        let slot = records.slot(i);
        let expired = slot.state.expires_at() <= now;
        match &slot.state {
            _ if expired => {}
            State::InFlight {
                lease_until: held, ..
            } => {
                if *held > now || slot.fingerprint != *req.fingerprint {
                    return Ok(ClaimOutcome::InFlight {
                        fingerprint: slot.fingerprint,
                        lease_remaining: Duration::from_millis(held.saturating_sub(now)),
                    });
                }
                // Lease passed, same request: take over with the new token.
            }
            State::Completed { outcome, .. } => {
                return Ok(ClaimOutcome::Completed {
                    fingerprint: slot.fingerprint,
                    outcome: outcome.clone(),
                });
            }
            // `find` never returns a vacant slot.
            State::Vacant => {}
        }
        // A new generation: queue entries of the old one are now stale.
        *seq += 1;
        let slot = records.slot_mut(i);
        slot.seq = *seq;
        slot.fingerprint = *req.fingerprint;
        records.set_state(i, fresh());
        Ok(ClaimOutcome::Acquired(token))
    }

    fn make_room(&self, inner: &mut Inner, now: u64) -> Result<(), StoreError> {
        // Cheap first: expired and then the oldest completed records, from the
        // front of the completion order (O(1) amortized per claim).
        while inner.records.len() >= self.shared.capacity {
            if !self.evict_oldest(inner, now, Eviction::Capacity) {
                break;
            }
        }
        if inner.records.len() < self.shared.capacity {
            return Ok(());
        }
        // Only in-flight records are left: drop the abandoned ones (past lease
        // and ttl). A full scan, but only when the store is full of claims.
        inner.records.retain(|s| s.state.expires_at() > now);
        if inner.records.len() < self.shared.capacity {
            return Ok(());
        }
        Err(StoreError::Full {
            capacity: self.shared.capacity,
        })
    }

    /// Runs `change` on the record `id` (in slot `i`) if `token` holds its
    /// claim and it has not expired.
    fn with_token(
        &self,
        id: &RecordId,
        token: LeaseToken,
        change: impl FnOnce(&mut Inner, u32, u64),
    ) -> TokenOutcome {
        let now = self.shared.clock.now_millis();
        let mut inner = self.lock();
        let Some(i) = inner.records.find(id) else {
            return TokenOutcome::Fenced;
        };
        match inner.records.slot(i).state {
            State::InFlight {
                token: held,
                expires_at,
                ..
            } if held == token && expires_at > now => {
                change(&mut inner, i, now);
                TokenOutcome::Applied
            }
            _ => TokenOutcome::Fenced,
        }
    }
}

impl Inner {
    /// Drops expired completed records at the front of the completion order:
    /// a little amortized sweeping on every claim.
    fn sweep_front(&mut self, now: u64) {
        for _ in 0..4 {
            let Some(&(i, seq)) = self.completed.front() else {
                return;
            };
            let slot = self.records.slot(i);
            if slot.seq == seq {
                if slot.state.expires_at() > now {
                    return;
                }
                self.records.remove(i);
            }
            self.completed.pop_front();
        }
    }

    fn compact_order(&mut self) {
        let records = &self.records;
        self.completed
            .retain(|&(i, seq)| records.slot(i).seq == seq);
    }
}

impl Store for MemoryStore {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        StoreFuture::ready(self.claim_now(id, token, claim))
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let result = self.complete_now(id, token, outcome, ttl);
        if result == TokenOutcome::Applied {
            self.shared.waiters.wake(id);
        }
        StoreFuture::ready(Ok(result))
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let result = self.with_token(id, token, |inner, i, _| {
            inner.records.remove(i);
        });
        if result == TokenOutcome::Applied {
            self.shared.waiters.wake(id);
        }
        StoreFuture::ready(Ok(result))
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let result = self.with_token(id, token, |inner, i, now| {
            // In flight: no bytes change.
            if let State::InFlight {
                lease_until,
                expires_at,
                ..
            } = &mut inner.records.slot_mut(i).state
            {
                let ttl_after_lease = expires_at.saturating_sub(*lease_until);
                *lease_until = now.saturating_add(millis(lease));
                *expires_at = lease_until.saturating_add(ttl_after_lease);
            }
        });
        StoreFuture::ready(Ok(result))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    /// Registers the waiter in this process: `complete` and `release` wake it.
    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        StoreFuture::ready(Ok(Some(self.shared.waiters.watch(id))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use crate::record::StoredResponse;
    use bytes::Bytes;

    fn id(n: u8) -> RecordId {
        RecordId::from_parts(b"scope", &[n])
    }

    const FP: Fingerprint = Fingerprint::from_bytes([7; 32]);
    const HOUR: Duration = Duration::from_secs(3600);

    fn outcome() -> StoredOutcome {
        StoredOutcome::response(StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(b"ok"),
        })
    }

    fn claim(store: &MemoryStore, n: u8) -> Result<ClaimOutcome, StoreError> {
        let claim = Claim {
            fingerprint: &FP,
            lease: Duration::from_secs(30),
            ttl: HOUR,
        };
        store.claim_now(&id(n), LeaseToken::random(), claim)
    }

    async fn claim_and_complete(store: &MemoryStore, n: u8) {
        claim_and_complete_for(store, n, HOUR).await;
    }

    /// Claims `n` and completes it with `ttl`.
    async fn claim_and_complete_for(store: &MemoryStore, n: u8, ttl: Duration) {
        let Ok(ClaimOutcome::Acquired(token)) = claim(store, n) else {
            panic!("claim {n} not acquired")
        };
        let done = store
            .complete(&id(n), token, &outcome(), ttl)
            .await
            .expect("complete");
        assert_eq!(done, TokenOutcome::Applied);
    }

    #[tokio::test]
    async fn full_store_evicts_oldest_completed_first_and_counts() {
        let store = MemoryStore::with_clock(3, FakeClock::new());
        claim_and_complete(&store, 1).await;
        claim_and_complete(&store, 2).await;
        assert!(matches!(claim(&store, 3), Ok(ClaimOutcome::Acquired(_)))); // in flight
        assert_eq!(store.evictions(), 0);
        // Full: a new claim evicts record 1 (the oldest completed), not 3 (in flight).
        assert!(matches!(claim(&store, 4), Ok(ClaimOutcome::Acquired(_))));
        assert_eq!(store.evictions(), 1);
        assert!(
            matches!(claim(&store, 1), Ok(ClaimOutcome::Acquired(_))),
            "1 was evicted"
        );
        assert_eq!(store.evictions(), 2, "claiming 1 again evicted 2");
        assert!(
            matches!(claim(&store, 3), Ok(ClaimOutcome::InFlight { .. })),
            "3 was never evicted"
        );
        assert_eq!(store.len(), 3);
    }

    #[tokio::test]
    async fn a_record_restarted_in_its_slot_is_evicted_in_its_new_completion_order() {
        let clock = FakeClock::new();
        let store = MemoryStore::with_clock(3, clock.clone());
        let complete = |n, ttl| claim_and_complete_for(&store, n, ttl);
        // Completion order: 1 (lives 3 h), 2 (1 h), 3 (2 h).
        complete(1, 3 * HOUR).await;
        complete(2, HOUR).await;
        complete(3, 2 * HOUR).await;
        // 2 has expired, but 1 is live at the front of the completion order
        // (so the sweep stops there): claiming 2 again restarts it in its
        // own slot, and its first place in the order goes stale. Order now:
        // 1, 3, 2.
        clock.advance(HOUR + Duration::from_secs(30 * 60));
        complete(2, HOUR).await;
        assert_eq!(store.len(), 3);
        // Full: 4 evicts 1, then 5 evicts 3 (not 2, whose stale entry comes
        // first in the queue but whose record completed last).
        assert!(matches!(claim(&store, 4), Ok(ClaimOutcome::Acquired(_))));
        assert!(matches!(claim(&store, 5), Ok(ClaimOutcome::Acquired(_))));
        assert_eq!(store.evictions(), 2);
        assert!(
            matches!(claim(&store, 2), Ok(ClaimOutcome::Completed { .. })),
            "2 is kept"
        );
        assert_eq!(store.len(), 3);
        assert_eq!(store.evictions(), 2, "a replay evicts nothing");
        // 4 and 5 are in flight and 2 is the only completed record left:
        // 3 (evicted) comes back by evicting 2, exactly once.
        assert!(matches!(claim(&store, 3), Ok(ClaimOutcome::Acquired(_))));
        assert_eq!(store.evictions(), 3);
        assert!(matches!(claim(&store, 1), Err(StoreError::Full { .. })));
    }

    #[tokio::test]
    async fn full_of_in_flight_records_refuses_new_claims() {
        let store = MemoryStore::with_clock(2, FakeClock::new());
        claim(&store, 1).expect("1");
        claim(&store, 2).expect("2");
        assert!(matches!(
            claim(&store, 3),
            Err(StoreError::Full { capacity: 2 })
        ));
        assert_eq!(store.evictions(), 0);
        // The held records are untouched.
        assert!(matches!(
            claim(&store, 1),
            Ok(ClaimOutcome::InFlight { .. })
        ));
    }

    #[tokio::test]
    async fn expired_records_are_swept_before_anything_is_evicted() {
        let clock = FakeClock::new();
        let store = MemoryStore::with_clock(2, clock.clone());
        claim_and_complete(&store, 1).await;
        claim_and_complete(&store, 2).await;
        clock.advance(HOUR + Duration::from_secs(1));
        assert_eq!(store.sweep_expired(), 2);
        assert!(store.is_empty());
        claim_and_complete(&store, 3).await;
        claim_and_complete(&store, 4).await;
        clock.advance(HOUR + Duration::from_secs(1));
        assert!(matches!(claim(&store, 5), Ok(ClaimOutcome::Acquired(_))));
        assert_eq!(
            store.evictions(),
            0,
            "expired records made room, nothing live was evicted"
        );
    }

    fn large(n: usize) -> StoredOutcome {
        StoredOutcome::response(StoredResponse {
            status: 400,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )],
            body: Bytes::from(vec![b'x'; n]),
        })
    }

    /// Claims `n` and completes it with `outcome`.
    async fn complete_with(store: &MemoryStore, n: u8, outcome: &StoredOutcome) {
        let Ok(ClaimOutcome::Acquired(token)) = claim(store, n) else {
            panic!("claim {n} not acquired")
        };
        let done = store.complete(&id(n), token, outcome, HOUR).await;
        assert_eq!(done.expect("complete"), TokenOutcome::Applied);
    }

    #[tokio::test]
    async fn many_large_responses_stay_within_the_byte_bound() {
        const BODY: usize = 100 * 1024;
        let store = MemoryStore::builder()
            .max_bytes(1 << 20)
            .clock(FakeClock::new())
            .build();
        let each = outcome_bytes(&large(BODY));
        assert!(each > BODY && each < BODY + 1024, "{each}");
        for n in 0..=200u8 {
            complete_with(&store, n, &large(BODY)).await;
            assert!(
                store.bytes() <= 1 << 20,
                "{} bytes after {n}",
                store.bytes()
            );
        }
        let fit = (1 << 20) / each;
        assert_eq!(store.len(), fit, "as many responses as fit");
        assert_eq!(store.bytes(), fit * each);
        assert_eq!(store.evictions(), 201 - fit as u64);
        // The newest replay; the oldest were evicted.
        assert!(matches!(
            claim(&store, 200),
            Ok(ClaimOutcome::Completed { .. })
        ));
        assert!(matches!(claim(&store, 0), Ok(ClaimOutcome::Acquired(_))));
    }

    #[tokio::test]
    async fn expired_responses_make_room_before_live_ones_are_evicted() {
        let clock = FakeClock::new();
        let store = MemoryStore::builder()
            .max_bytes(3 * outcome_bytes(&large(1000)))
            .clock(clock.clone())
            .build();
        for n in 0..3 {
            complete_with(&store, n, &large(1000)).await;
        }
        clock.advance(HOUR + Duration::from_secs(1));
        for n in 3..6 {
            complete_with(&store, n, &large(1000)).await;
        }
        assert_eq!(store.evictions(), 0, "only expired records made room");
        assert_eq!(store.len(), 3);
        complete_with(&store, 6, &large(1000)).await;
        assert_eq!(store.evictions(), 1, "then the oldest live one");
        assert!(matches!(claim(&store, 3), Ok(ClaimOutcome::Acquired(_))));
    }

    #[tokio::test]
    async fn a_response_larger_than_the_bound_is_stored_as_not_replayable() {
        let store = MemoryStore::builder()
            .max_bytes(10_000)
            .clock(FakeClock::new())
            .build();
        complete_with(&store, 1, &large(100)).await;
        complete_with(&store, 2, &large(20_000)).await;
        assert!(matches!(
            claim(&store, 2),
            Ok(ClaimOutcome::Completed {
                outcome: StoredOutcome::NotReplayable { status: 400 },
                ..
            })
        ));
        assert_eq!(store.evictions(), 0, "nothing was evicted for it");
        assert!(matches!(
            claim(&store, 1),
            Ok(ClaimOutcome::Completed { .. })
        ));
        assert_eq!(store.bytes(), outcome_bytes(&large(100)));
    }

    #[tokio::test]
    async fn bytes_are_given_back_when_records_go() {
        let clock = FakeClock::new();
        let store = MemoryStore::with_clock(2, clock.clone());
        complete_with(&store, 1, &large(5000)).await;
        complete_with(&store, 2, &large(5000)).await;
        assert_eq!(store.bytes(), 2 * outcome_bytes(&large(5000)));
        // A capacity eviction gives its bytes back.
        complete_with(&store, 3, &large(10)).await;
        assert_eq!(
            store.bytes(),
            outcome_bytes(&large(5000)) + outcome_bytes(&large(10))
        );
        // An expired record restarted in its slot, and a sweep, too.
        clock.advance(HOUR + Duration::from_secs(1));
        assert!(matches!(claim(&store, 2), Ok(ClaimOutcome::Acquired(_))));
        assert!(store.bytes() <= outcome_bytes(&large(10)));
        store.sweep_expired();
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test]
    async fn abandoned_in_flight_records_expire_after_lease_plus_ttl() {
        let clock = FakeClock::new();
        let store = MemoryStore::with_clock(10, clock.clone());
        claim(&store, 1).expect("claim");
        clock.advance(Duration::from_secs(30) + HOUR + Duration::from_secs(1));
        assert_eq!(store.sweep_expired(), 1);
    }
}
