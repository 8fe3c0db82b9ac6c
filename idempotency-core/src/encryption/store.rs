//! [`Encrypted`]: any store, its outcomes sealed on the way in and opened
//! on the way out.

use std::time::Duration;

use super::EncryptionKeys;
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};
use crate::store::{
    Begun, BoxFuture, Claim, OpenTransaction, Store, StoreError, StoreFuture, TransactionalStore,
    TxHandle, Watch,
};

/// A store whose outcomes are encrypted at rest: [`complete`](Store::complete)
/// (and, in transactional mode, the commit) stores the outcome sealed with
/// the current key of its [`EncryptionKeys`], and every completed record that
/// [`claim`](Store::claim), [`snapshot`](TransactionalStore::snapshot) or
/// [`begin`](TransactionalStore::begin) finds is opened again. The store
/// inside persists the sealed outcome as it persists any other, so this
/// works over every store, this workspace's and third-party ones.
///
/// A record that does not open (its key is not in the keyring, it was
/// changed or moved to another record, it holds a response in clear) is
/// [`StoreError::Corrupt`] with a [`DecryptError`](super::DecryptError) as
/// its source, and is left as it is: the engine answers 503 (fail-closed),
/// never a replay of it.
///
/// The engine wraps its store in this when its config has keys
/// ([`IdempotencyConfigBuilder::encryption`](crate::IdempotencyConfigBuilder::encryption)),
/// in both modes; wrap a store yourself only for code that calls it
/// directly.
///
/// ```
/// use idempotency_core::{Encrypted, EncryptionKeys, MemoryStore, Store};
///
/// let keys = EncryptionKeys::new("k1", [42; 32])?;
/// let store = Encrypted::new(MemoryStore::new(), keys);
/// assert_eq!(store.backend(), "memory");
/// # Ok::<_, idempotency_core::EncryptionKeyError>(())
/// ```
#[derive(Clone)]
pub struct Encrypted<S> {
    inner: S,
    keys: EncryptionKeys,
}

impl<S> std::fmt::Debug for Encrypted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encrypted")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl<S> Encrypted<S> {
    /// `inner`, its outcomes sealed with `keys`.
    pub fn new(inner: S, keys: EncryptionKeys) -> Self {
        Self { inner, keys }
    }

    /// The store inside.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The keyring.
    pub fn keys(&self) -> &EncryptionKeys {
        &self.keys
    }
}

/// Opens the outcome of a completed record; any other answer passes.
fn open(
    keys: &EncryptionKeys,
    backend: &'static str,
    id: &RecordId,
    found: ClaimOutcome,
) -> Result<ClaimOutcome, StoreError> {
    match found {
        ClaimOutcome::Completed {
            fingerprint,
            outcome,
        } => match keys.open(id, outcome) {
            Ok(outcome) => Ok(ClaimOutcome::Completed {
                fingerprint,
                outcome,
            }),
            Err(e) => Err(StoreError::corrupt(backend, e)),
        },
        other => Ok(other),
    }
}

impl<S: Store> Store for Encrypted<S> {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        let backend = self.inner.backend();
        self.inner
            .claim(id, token, claim)
            .map(move |found| open(&self.keys, backend, id, found?))
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        let sealed = self.keys.seal(id, outcome);
        // The inner call borrows the sealed outcome, so both live in one
        // future (whose bound, if the inner store declares one, is not
        // known here: the caller's timeout applies).
        StoreFuture::new(async move { self.inner.complete(id, token, &sealed, ttl).await })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
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
        self.inner.backend()
    }

    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        self.inner.watch(id)
    }
}

impl<S: TransactionalStore> TransactionalStore for Encrypted<S> {
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>> {
        Box::pin(async move {
            match self.inner.snapshot(id, fingerprint).await? {
                Some(found) => open(&self.keys, self.inner.backend(), id, found).map(Some),
                None => Ok(None),
            }
        })
    }

    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>> {
        Box::pin(async move {
            Ok(match self.inner.begin(id, token, claim).await? {
                Begun::Acquired(open) => Begun::Acquired(Box::new(SealingTransaction {
                    inner: open,
                    keys: self.keys.clone(),
                    id: *id,
                })),
                Begun::Existing(found) => {
                    Begun::Existing(open(&self.keys, self.inner.backend(), id, found)?)
                }
                Begun::Locked => Begun::Locked,
            })
        })
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

/// The transaction of an [`Encrypted`] transactional store: its commit
/// writes the outcome sealed.
struct SealingTransaction {
    inner: Box<dyn OpenTransaction>,
    keys: EncryptionKeys,
    id: RecordId,
}

impl std::fmt::Debug for SealingTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingTransaction")
            .field("key", &self.keys.current_id())
            .finish_non_exhaustive()
    }
}

impl OpenTransaction for SealingTransaction {
    fn handle(&self) -> TxHandle {
        self.inner.handle()
    }

    fn commit(
        self: Box<Self>,
        outcome: StoredOutcome,
        ttl: Duration,
        bound: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let sealed = self.keys.seal(&self.id, &outcome);
        self.inner.commit(sealed, ttl, bound)
    }

    fn rollback(self: Box<Self>, bound: Duration) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.rollback(bound)
    }
}
