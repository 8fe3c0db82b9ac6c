//! The cases of encryption at rest over a store: what [`Encrypted`] writes
//! is sealed in the store itself, and a record that was changed, moved to
//! another record, or whose key is wrong or gone, is
//! [`StoreError::Corrupt`] with the [`DecryptError`] that says why, in
//! both modes. They need nothing of the store but its trait: the store
//! under test keeps the sealed bytes, and the cases read and write it
//! directly besides through [`Encrypted`].

use std::sync::Arc;

use bytes::Bytes;

use super::{claim, fingerprint, fresh_id, LONG};
use crate::encryption::{DecryptError, Encrypted, EncryptionKeys};
use crate::fingerprint::RecordId;
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, StoredResponse, TokenOutcome};
use crate::store::{Begun, Claim, Store, StoreError, TransactionalStore};

/// A body no sealed record may show in clear.
const SECRET: &[u8] = b"card=4242424242424242;name=Ada Lovelace";

/// The encryption cases for a store (the store itself, not wrapped: the
/// cases wrap it). Run the whole [`Conformance`](super::Conformance) suite
/// over `Encrypted::new(store, keys)` as well; these add what it cannot
/// see.
///
/// ```no_run
/// # async fn demo() {
/// use idempotency_core::conformance::EncryptionConformance;
/// use idempotency_core::MemoryStore;
///
/// EncryptionConformance::new(MemoryStore::new()).run_all().await;
/// # }
/// ```
pub struct EncryptionConformance {
    store: Arc<dyn Store>,
    transactional: Option<Arc<dyn TransactionalStore>>,
}

impl std::fmt::Debug for EncryptionConformance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionConformance")
            .field("store", &self.store.backend())
            .field("transactional", &self.transactional.is_some())
            .finish()
    }
}

/// A keyring of one fresh random key under `id`.
fn random_keys(id: &str) -> EncryptionKeys {
    EncryptionKeys::new(id, rand::random()).expect("a valid key id")
}

fn secret_response() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            (
                "x-account".into(),
                Bytes::from_static(b"DE89370400440532013000"),
            ),
        ],
        body: Bytes::from_static(SECRET),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl EncryptionConformance {
    /// The cases for `store`'s plain mode.
    pub fn new(store: impl Store) -> Self {
        Self {
            store: Arc::new(store),
            transactional: None,
        }
    }

    /// The cases for `store`'s plain and transactional modes.
    pub fn transactional<S: Store + TransactionalStore + Clone>(store: S) -> Self {
        Self {
            store: Arc::new(store.clone()),
            transactional: Some(Arc::new(store)),
        }
    }

    fn name(&self) -> &'static str {
        self.store.backend()
    }

    /// Runs every case, one after the other.
    pub async fn run_all(&self) {
        self.sealed_outcomes_round_trip().await;
        self.responses_are_sealed_at_rest().await;
        self.a_wrong_or_removed_key_is_corrupt().await;
        self.a_changed_record_is_corrupt().await;
        self.a_record_moved_to_another_id_is_corrupt().await;
        self.rotation_keeps_old_records_readable().await;
        if self.transactional.is_some() {
            self.commits_are_sealed_at_rest().await;
        }
    }

    /// Writes `outcome` into record `id` as it is, through the store
    /// itself (a sealed outcome, crafted or copied, lands as it is).
    async fn write_raw(&self, id: &RecordId, outcome: &StoredOutcome) {
        let fp = fingerprint(b"encrypted");
        let token = match claim(&*self.store, id, &fp, LONG, LONG).await {
            (token, ClaimOutcome::Acquired(_)) => token,
            (_, other) => panic!("{}: expected Acquired, got {other:?}", self.name()),
        };
        let done = self
            .store
            .complete(id, token, outcome, LONG)
            .await
            .unwrap_or_else(|e| panic!("{}: complete failed: {e:?}", self.name()));
        assert_eq!(done, TokenOutcome::Applied, "{}", self.name());
    }

    /// What the store itself holds for a completed record.
    async fn read_raw(&self, id: &RecordId) -> StoredOutcome {
        match claim(&*self.store, id, &fingerprint(b"encrypted"), LONG, LONG).await {
            (_, ClaimOutcome::Completed { outcome, .. }) => outcome,
            (_, other) => panic!("{}: expected Completed, got {other:?}", self.name()),
        }
    }

    /// What a claim through `keys` finds in record `id`.
    async fn read_with(
        &self,
        keys: &EncryptionKeys,
        id: &RecordId,
    ) -> Result<StoredOutcome, StoreError> {
        let encrypted = Encrypted::new(Arc::clone(&self.store), keys.clone());
        let fp = fingerprint(b"encrypted");
        let claimed = encrypted
            .claim(
                id,
                LeaseToken::random(),
                Claim {
                    fingerprint: &fp,
                    lease: LONG,
                    ttl: LONG,
                },
            )
            .await;
        match claimed {
            Ok(ClaimOutcome::Completed { outcome, .. }) => Ok(outcome),
            Ok(other) => panic!("{}: expected Completed, got {other:?}", self.name()),
            Err(e) => Err(e),
        }
    }

    /// Asserts that reading `id` with `keys` is `Corrupt` with a
    /// [`DecryptError`] that `matches`.
    async fn expect_corrupt(
        &self,
        keys: &EncryptionKeys,
        id: &RecordId,
        what: &str,
        matches: impl Fn(&DecryptError) -> bool,
    ) {
        match self.read_with(keys, id).await {
            Err(StoreError::Corrupt { backend, source }) => {
                assert_eq!(backend, self.name(), "{what}: the backend of the error");
                let cause = source.downcast_ref::<DecryptError>().unwrap_or_else(|| {
                    panic!(
                        "{}: {what}: the cause is not a DecryptError: {source}",
                        self.name()
                    )
                });
                assert!(matches(cause), "{}: {what}: {cause}", self.name());
            }
            other => panic!("{}: {what}: expected Corrupt, got {other:?}", self.name()),
        }
    }

    /// The store keeps a sealed outcome byte for byte, as every other kind
    /// of the encoding: a response's, a not-replayable mark's, a mark's.
    pub async fn sealed_outcomes_round_trip(&self) {
        let keys = random_keys("k");
        for outcome in [
            secret_response(),
            StoredOutcome::NotReplayable { status: 201 },
            StoredOutcome::Mark(7),
        ] {
            let id = fresh_id();
            let sealed = keys.seal(&id, &outcome);
            assert!(matches!(sealed, StoredOutcome::Sealed(_)));
            self.write_raw(&id, &sealed).await;
            assert!(
                self.read_raw(&id).await == sealed,
                "{}: a sealed outcome changed in the store",
                self.name()
            );
            assert_eq!(self.read_with(&keys, &id).await.expect("read"), outcome);
        }
    }

    /// A response completed through [`Encrypted`] is held sealed by the
    /// store (its body and headers appear nowhere in the stored bytes, which
    /// name the key) and is read back whole.
    pub async fn responses_are_sealed_at_rest(&self) {
        let keys = random_keys("conformance-1");
        let encrypted = Encrypted::new(Arc::clone(&self.store), keys.clone());
        let (id, fp) = (fresh_id(), fingerprint(b"encrypted"));
        let token = match claim(&encrypted, &id, &fp, LONG, LONG).await {
            (token, ClaimOutcome::Acquired(_)) => token,
            (_, other) => panic!("{}: expected Acquired, got {other:?}", self.name()),
        };
        let outcome = secret_response();
        let done = encrypted
            .complete(&id, token, &outcome, LONG)
            .await
            .unwrap_or_else(|e| panic!("{}: complete failed: {e:?}", self.name()));
        assert_eq!(done, TokenOutcome::Applied);
        match self.read_raw(&id).await {
            StoredOutcome::Sealed(sealed) => {
                assert_eq!(sealed.key_id(), "conformance-1");
                let bytes = sealed.as_bytes();
                assert!(
                    !contains(bytes, SECRET),
                    "{}: the body is in clear",
                    self.name()
                );
                assert!(
                    !contains(bytes, b"DE89370400440532013000"),
                    "{}: a header is in clear",
                    self.name()
                );
            }
            other => panic!(
                "{}: the store holds {other:?}, not a sealed outcome",
                self.name()
            ),
        }
        assert_eq!(
            self.read_with(&keys, &id).await.expect("read"),
            outcome,
            "{}: the response read back changed",
            self.name()
        );
    }

    /// A record read with another key under the same id does not
    /// authenticate; one read by a keyring without its key names the key.
    pub async fn a_wrong_or_removed_key_is_corrupt(&self) {
        let id = fresh_id();
        self.write_raw(&id, &random_keys("k").seal(&id, &secret_response()))
            .await;
        self.expect_corrupt(
            &random_keys("k"),
            &id,
            "another key under the same id",
            |e| matches!(e, DecryptError::NotAuthentic { key_id } if key_id == "k"),
        )
        .await;
        self.expect_corrupt(
            &random_keys("other"),
            &id,
            "a keyring without its key",
            |e| matches!(e, DecryptError::UnknownKey { key_id, .. } if key_id == "k"),
        )
        .await;
    }

    /// A sealed record with any changed byte of its ciphertext, nonce or
    /// tag is refused.
    pub async fn a_changed_record_is_corrupt(&self) {
        let keys = random_keys("k");
        let probe = keys.seal(&fresh_id(), &secret_response()).encode();
        // A byte of the nonce, of the ciphertext, and of the tag.
        let header = 4 + 1;
        for at in [header, header + 12 + 7, probe.len() - 1] {
            let id = fresh_id();
            let mut bytes = keys.seal(&id, &secret_response()).encode();
            bytes[at] ^= 0x20;
            let changed = StoredOutcome::decode(Bytes::from(bytes))
                .expect("a changed sealed record still parses");
            self.write_raw(&id, &changed).await;
            self.expect_corrupt(&keys, &id, &format!("byte {at} changed"), |e| {
                matches!(e, DecryptError::NotAuthentic { .. })
            })
            .await;
        }
    }

    /// A sealed record copied, as it is, into another record is refused
    /// there (the record id is its associated data), and still read where
    /// it was written.
    pub async fn a_record_moved_to_another_id_is_corrupt(&self) {
        let keys = random_keys("k");
        let (from, to) = (fresh_id(), fresh_id());
        self.write_raw(&from, &keys.seal(&from, &secret_response()))
            .await;
        let copied = self.read_raw(&from).await;
        self.write_raw(&to, &copied).await;
        self.expect_corrupt(&keys, &to, "a record moved to another id", |e| {
            matches!(e, DecryptError::NotAuthentic { .. })
        })
        .await;
        assert_eq!(
            self.read_with(&keys, &from).await.expect("read"),
            secret_response()
        );
    }

    /// Two keys: the old one's records still read, new ones use the new
    /// key; without the old key its records are refused, naming it.
    pub async fn rotation_keeps_old_records_readable(&self) {
        let old = random_keys("old");
        let (before, after) = (fresh_id(), fresh_id());
        self.write_raw(&before, &old.seal(&before, &secret_response()))
            .await;
        let new_key: [u8; 32] = rand::random();
        let both = old.clone().rotate("new", new_key).expect("rotate");
        assert_eq!(both.current_id(), "new");
        self.write_raw(&after, &both.seal(&after, &secret_response()))
            .await;
        match self.read_raw(&after).await {
            StoredOutcome::Sealed(sealed) => assert_eq!(sealed.key_id(), "new"),
            other => panic!("{}: not sealed: {other:?}", self.name()),
        }
        for id in [&before, &after] {
            assert_eq!(
                self.read_with(&both, id).await.expect("read"),
                secret_response(),
                "{}: with both keys",
                self.name()
            );
        }
        let only_new = EncryptionKeys::new("new", new_key).expect("key");
        assert_eq!(
            self.read_with(&only_new, &after).await.expect("read"),
            secret_response()
        );
        self.expect_corrupt(&only_new, &before, "the old key removed", |e| {
            matches!(e, DecryptError::UnknownKey { key_id, configured } if key_id == "old" && configured == "new")
        })
        .await;
    }

    /// Transactional mode: a commit through [`Encrypted`] writes the
    /// outcome sealed; its snapshot and a second `begin` open it, and with
    /// another key both are refused.
    pub async fn commits_are_sealed_at_rest(&self) {
        let Some(store) = &self.transactional else {
            return;
        };
        let keys = random_keys("tx");
        let encrypted = Encrypted::new(Arc::clone(store), keys.clone());
        let (id, fp) = (fresh_id(), fingerprint(b"encrypted"));
        let claim = Claim {
            fingerprint: &fp,
            lease: LONG,
            ttl: LONG,
        };
        let open = match encrypted.begin(&id, LeaseToken::random(), claim).await {
            Ok(Begun::Acquired(open)) => open,
            other => panic!("{}: begin: expected Acquired, got {other:?}", self.name()),
        };
        open.commit(secret_response(), LONG, std::time::Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{}: commit failed: {e:?}", self.name()));
        match store.snapshot(&id, &fp).await {
            Ok(Some(ClaimOutcome::Completed {
                outcome: StoredOutcome::Sealed(sealed),
                ..
            })) => {
                assert_eq!(sealed.key_id(), "tx");
                assert!(
                    !contains(sealed.as_bytes(), SECRET),
                    "{}: in clear",
                    self.name()
                );
            }
            other => panic!("{}: the committed record: {other:?}", self.name()),
        }
        match encrypted.snapshot(&id, &fp).await {
            Ok(Some(ClaimOutcome::Completed { outcome, .. })) => {
                assert_eq!(outcome, secret_response())
            }
            other => panic!("{}: the snapshot: {other:?}", self.name()),
        }
        match encrypted.begin(&id, LeaseToken::random(), claim).await {
            Ok(Begun::Existing(ClaimOutcome::Completed { outcome, .. })) => {
                assert_eq!(outcome, secret_response())
            }
            other => panic!("{}: a second begin: {other:?}", self.name()),
        }
        let wrong = Encrypted::new(Arc::clone(store), random_keys("tx"));
        for (what, found) in [
            ("snapshot", wrong.snapshot(&id, &fp).await.map(|_| ())),
            (
                "begin",
                wrong
                    .begin(&id, LeaseToken::random(), claim)
                    .await
                    .map(|_| ()),
            ),
        ] {
            match found {
                Err(StoreError::Corrupt { source, .. })
                    if matches!(
                        source.downcast_ref::<DecryptError>(),
                        Some(DecryptError::NotAuthentic { .. })
                    ) => {}
                other => panic!(
                    "{}: {what} with another key: expected Corrupt, got {other:?}",
                    self.name()
                ),
            }
        }
    }
}
