//! Stored outcomes encrypted at rest: the keyring ([`EncryptionKeys`]), the
//! sealed form of an outcome ([`SealedOutcome`]), the store wrapper that
//! seals on the way in and opens on the way out ([`Encrypted`]), and the key
//! file parser.
//!
//! A sealed outcome is one more kind of the stored encoding, so every store
//! persists it as it persists any outcome (the SQL stores' `bytea`/`BLOB`,
//! Redis's string, the memory store's struct), and none of them knows of
//! encryption. Its bytes:
//!
//! ```text
//! 0      1      2          3       4 .. 4+n   4+n .. 16+n   16+n .. len-16   len-16 .. len
//! ┌──────┬──────┬──────────┬───────┬──────────┬─────────────┬────────────────┬──────────────┐
//! │ 0x01 │ 0x03 │ 0x01     │ n     │ key id   │ nonce (96)  │ ciphertext     │ tag (128)    │
//! │ ver  │ kind │ AES-256- │ id    │ (n bytes)│ random per  │ of the outcome │ GCM          │
//! │      │ seal │ GCM      │ len   │          │ record      │ as encoded     │              │
//! └──────┴──────┴──────────┴───────┴──────────┴─────────────┴────────────────┴──────────────┘
//! associated data: the record id (32 bytes), then bytes 0 .. 4+n
//! ```
//!
//! The associated data binds the ciphertext to its record and to its header:
//! a sealed outcome copied to another record, or given another key id, does
//! not open.

use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use bytes::{Bytes, BytesMut};

use crate::fingerprint::RecordId;
use crate::record::{CorruptRecord, StoredOutcome, FORMAT_VERSION, KIND_SEALED};

mod key_file;
mod store;

pub use key_file::EncryptionKeyError;
pub use store::Encrypted;

/// The length of a key: AES-256 takes 32 bytes.
pub(crate) const KEY_LEN: usize = 32;

/// The longest key id, in bytes.
pub(crate) const MAX_KEY_ID_LEN: usize = 32;

/// The algorithm byte of a sealed outcome: AES-256-GCM, 96-bit nonce,
/// 128-bit tag.
const ALG_AES_256_GCM: u8 = 1;
/// Version, kind, algorithm, key id length.
const HEADER: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The shortest plaintext: a short record (version, kind, code).
const MIN_PLAINTEXT: usize = 4;

/// Whether `id` may name a key: 1 to 32 bytes of ASCII letters, digits,
/// `-`, `_` and `.` (it is written into every record, printed in errors,
/// and separated from the key by `:` in a key file). `Err` says what is
/// wrong.
pub(crate) fn check_key_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.len() > MAX_KEY_ID_LEN {
        return Err("is longer than 32 bytes");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("has a character other than an ASCII letter, a digit, `-`, `_` or `.`");
    }
    Ok(())
}

/// The keys that encrypt stored outcomes at rest, each under an id: the
/// **current** key (the last one added) encrypts every new record; every
/// key decrypts the records written with it. Cheap to clone; its `Debug`
/// shows the ids, never a key.
///
/// Turn encryption on with
/// [`IdempotencyConfigBuilder::encryption`](crate::IdempotencyConfigBuilder::encryption)
/// (the engine then wraps its store in [`Encrypted`], in both modes), or
/// wrap a store yourself with [`Encrypted::new`].
///
/// ```
/// use idempotency_core::EncryptionKeys;
///
/// // From a key file (the last key is current):
/// let keys: EncryptionKeys = "
///     ## retired 2025-01-31: remove it once its last records have expired (the ttl)
///     2024-12:Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=
///     2025-01:h5k2h7D3o3m0p6Lr1Oq4o7VdYp6f9rSg0xM2bA1cF3E=
/// ".parse()?;
/// assert_eq!(keys.current_id(), "2025-01");
///
/// // Or in code: `rotate` adds a new current key.
/// let keys = EncryptionKeys::new("2024-12", [7; 32])?.rotate("2025-01", [9; 32])?;
/// assert_eq!(keys.ids().collect::<Vec<_>>(), ["2024-12", "2025-01"]);
/// # Ok::<_, idempotency_core::EncryptionKeyError>(())
/// ```
///
/// # What it protects, and what not
///
/// Each response (its status, headers and body) is sealed with AES-256-GCM
/// under a fresh random 96-bit nonce, with the record id as associated
/// data. Someone who reads the store (a dump, a backup, a replica, an
/// operator's `GET`) learns neither the response nor its status, only that
/// a record exists, its size, its key id, its fingerprint (a SHA-256 of the
/// request) and its times. A sealed response that is changed, or moved to
/// another record, does not decrypt: the engine answers 503 (or the store
/// error), never a replay of it.
///
/// It does not protect against someone who holds a key (the service's
/// memory and its key file are as sensitive as the data), nor against
/// someone who can write the store: they can delete a record (the retry
/// runs the handler again), put back an older sealed response of the same
/// record, or write a record in clear that is not a response (a
/// not-replayable mark: 410). Records in flight hold no response.
///
/// # Rotation
///
/// Add the new key as the current one; keep the old ones for as long as
/// their records live (the ttl, 24 h by default), then remove them. A
/// record whose key was removed, or that does not decrypt, is
/// [`StoreError::Corrupt`](crate::StoreError::Corrupt) with a
/// [`DecryptError`] as its source. A key encrypts at most 2³² records
/// safely (random nonces): rotate before that (at 1 000 new records a
/// second, within 7 weeks).
#[derive(Clone)]
pub struct EncryptionKeys(Arc<Keyring>);

#[derive(Clone)]
struct Keyring {
    /// In the order they were added: the last is current.
    keys: Vec<Key>,
    allow_plaintext: bool,
}

#[derive(Clone)]
struct Key {
    id: Box<str>,
    cipher: Aes256Gcm,
}

impl fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKeys")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .field("current", &self.current_id())
            .field("allow_plaintext", &self.0.allow_plaintext)
            .finish()
    }
}

impl EncryptionKeys {
    /// A keyring of one key, which encrypts new records.
    ///
    /// # Errors
    /// [`EncryptionKeyError::BadId`] when `id` is not 1 to 32 ASCII letters, digits,
    /// `-`, `_` or `.`.
    pub fn new(id: &str, key: [u8; 32]) -> Result<Self, EncryptionKeyError> {
        let mut keys = Self(Arc::new(Keyring {
            keys: Vec::new(),
            allow_plaintext: false,
        }));
        keys.push(id, &key, None)?;
        Ok(keys)
    }

    /// This keyring with `key` added as the current one: new records are
    /// encrypted with it, and the records of the keys already here still
    /// decrypt.
    ///
    /// # Errors
    /// [`EncryptionKeyError::BadId`] for an id that is not valid,
    /// [`EncryptionKeyError::DuplicateId`] for one already in the keyring.
    pub fn rotate(mut self, id: &str, key: [u8; 32]) -> Result<Self, EncryptionKeyError> {
        self.push(id, &key, None)?;
        Ok(self)
    }

    /// Whether a response stored in clear (written before encryption was
    /// turned on) is read as it is (`true`) or refused as
    /// [`DecryptError::Plaintext`] (`false`, the default). Turn it on while
    /// the records written in clear still live (one ttl), then off: with
    /// it, someone who can write the store can plant a response in clear.
    /// Records that hold no response (not replayable, a mark) are read in
    /// clear either way.
    pub fn allow_plaintext(mut self, allow: bool) -> Self {
        Arc::make_mut(&mut self.0).allow_plaintext = allow;
        self
    }

    /// Whether responses in clear are read: see [`allow_plaintext`](Self::allow_plaintext).
    pub fn allows_plaintext(&self) -> bool {
        self.0.allow_plaintext
    }

    /// The id of the key that encrypts new records.
    pub fn current_id(&self) -> &str {
        &self.current().id
    }

    /// The ids of every key, oldest first (the last is current).
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.keys.iter().map(|k| &*k.id)
    }

    pub(crate) fn push(
        &mut self,
        id: &str,
        key: &[u8; KEY_LEN],
        line: Option<usize>,
    ) -> Result<(), EncryptionKeyError> {
        check_key_id(id).map_err(|why| EncryptionKeyError::BadId { line, why })?;
        if self.find(id).is_some() {
            return Err(EncryptionKeyError::DuplicateId {
                line,
                id: id.to_owned(),
            });
        }
        Arc::make_mut(&mut self.0).keys.push(Key {
            id: id.into(),
            cipher: Aes256Gcm::new(key.into()),
        });
        Ok(())
    }

    fn current(&self) -> &Key {
        // Every constructor adds a key.
        self.0.keys.last().expect("a keyring holds a key")
    }

    fn find(&self, id: &str) -> Option<&Key> {
        self.0.keys.iter().find(|k| *k.id == *id)
    }

    /// `outcome` encrypted with the current key for record `id`: a
    /// [`StoredOutcome::Sealed`] that only this record's id and a keyring
    /// holding that key [`open`](Self::open). An outcome sealed already is
    /// returned as it is. Every call draws a fresh random nonce.
    pub fn seal(&self, id: &RecordId, outcome: &StoredOutcome) -> StoredOutcome {
        if let StoredOutcome::Sealed(_) = outcome {
            return outcome.clone();
        }
        let key = self.current();
        let header = HEADER + key.id.len();
        let start = header + NONCE_LEN;
        let mut buf = Vec::with_capacity(start + outcome.encoded_len() + TAG_LEN);
        buf.extend_from_slice(&[
            FORMAT_VERSION,
            KIND_SEALED,
            ALG_AES_256_GCM,
            key.id.len() as u8,
        ]);
        buf.extend_from_slice(key.id.as_bytes());
        let nonce: [u8; NONCE_LEN] = rand::random();
        buf.extend_from_slice(&nonce);
        outcome.encode_into(&mut buf);
        let (ad, ad_len) = associated_data(id, &buf[..header]);
        match key.cipher.encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &ad[..ad_len],
            &mut buf[start..],
        ) {
            Ok(tag) => {
                buf.extend_from_slice(&tag);
                StoredOutcome::Sealed(SealedOutcome(Arc::new(Bytes::from(buf))))
            }
            // GCM refuses a plaintext of 64 GiB or more, which no response
            // in memory reaches; should one, its record says that it ran.
            Err(_) => {
                let status = match outcome {
                    StoredOutcome::Response(r) => r.status,
                    _ => 0,
                };
                self.seal(id, &StoredOutcome::NotReplayable { status })
            }
        }
    }

    /// What [`seal`](Self::seal) sealed for record `id`. An outcome in
    /// clear is returned as it is, but a response in clear only when
    /// [`allow_plaintext`](Self::allow_plaintext) is on.
    ///
    /// # Errors
    /// A [`DecryptError`]: the record's key is not in this keyring, the
    /// record does not authenticate (changed, moved to another record, or
    /// another key under the same id), it is a response in clear, or what
    /// it decrypts to is not a record.
    pub fn open(
        &self,
        id: &RecordId,
        outcome: StoredOutcome,
    ) -> Result<StoredOutcome, DecryptError> {
        let sealed = match outcome {
            StoredOutcome::Sealed(sealed) => sealed,
            StoredOutcome::Response(_) if !self.0.allow_plaintext => {
                return Err(DecryptError::Plaintext)
            }
            other => return Ok(other),
        };
        let key_id = sealed.key_id();
        let Some(key) = self.find(key_id) else {
            return Err(DecryptError::UnknownKey {
                key_id: key_id.to_owned(),
                configured: self.ids().collect::<Vec<_>>().join(", "),
            });
        };
        let bytes = sealed.as_bytes();
        let header = HEADER + key_id.len();
        let (nonce, rest) = bytes[header..].split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let (ad, ad_len) = associated_data(id, &bytes[..header]);
        let mut plain = BytesMut::from(ciphertext);
        key.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                &ad[..ad_len],
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| DecryptError::NotAuthentic {
                key_id: key_id.to_owned(),
            })?;
        match StoredOutcome::decode(plain.freeze()) {
            Ok(StoredOutcome::Sealed(_)) => Err(DecryptError::Decrypted(CorruptRecord::new(
                "a sealed record inside a sealed record",
            ))),
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(DecryptError::Decrypted(e)),
        }
    }
}

/// The associated data of a sealed outcome: the record id, then the
/// sealed header (version, kind, algorithm, key id), in a buffer on the stack.
fn associated_data(id: &RecordId, header: &[u8]) -> ([u8; 32 + HEADER + MAX_KEY_ID_LEN], usize) {
    let mut ad = [0u8; 32 + HEADER + MAX_KEY_ID_LEN];
    ad[..32].copy_from_slice(id.as_bytes());
    ad[32..32 + header.len()].copy_from_slice(header);
    (ad, 32 + header.len())
}

/// An outcome encrypted by [`EncryptionKeys::seal`]: opaque bytes, as
/// stored, whose header names the key. Only [`EncryptionKeys::open`], with
/// that key and the record's id, turns it back into what was sealed.
///
/// One pointer wide, so that [`StoredOutcome`] (and every claim's answer
/// that carries one) stays as small as without encryption: a wider variant
/// cost every replay 46 instructions of copies, encryption on or off.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedOutcome(Arc<Bytes>);

impl SealedOutcome {
    /// Checks the layout of stored bytes whose kind is sealed (the cipher
    /// is not run: that is [`EncryptionKeys::open`]'s).
    pub(crate) fn parse(bytes: Bytes) -> Result<Self, CorruptRecord> {
        let corrupt = CorruptRecord::new;
        if bytes.len() < HEADER {
            return Err(corrupt("truncated header"));
        }
        debug_assert!(bytes[0] == FORMAT_VERSION && bytes[1] == KIND_SEALED);
        if bytes[2] != ALG_AES_256_GCM {
            return Err(corrupt("unknown encryption algorithm"));
        }
        let n = usize::from(bytes[3]);
        if bytes.len() < HEADER + n + NONCE_LEN + MIN_PLAINTEXT + TAG_LEN {
            return Err(corrupt("truncated sealed record"));
        }
        let valid = std::str::from_utf8(&bytes[HEADER..HEADER + n])
            .ok()
            .is_some_and(|id| check_key_id(id).is_ok());
        if !valid {
            return Err(corrupt("the key id of a sealed record is not valid"));
        }
        Ok(Self(Arc::new(bytes)))
    }

    /// The id of the key it was sealed with.
    pub fn key_id(&self) -> &str {
        let n = usize::from(self.0[3]);
        // Checked by `parse`, and written from a `&str` by `seal`.
        std::str::from_utf8(&self.0[HEADER..HEADER + n]).unwrap_or_default()
    }

    /// The bytes as stored: header, nonce, ciphertext and tag.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SealedOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedOutcome")
            .field("key_id", &self.key_id())
            .field("len", &self.0.len())
            .finish()
    }
}

/// Why a stored outcome could not be decrypted. Stores report it as the
/// source of [`StoreError::Corrupt`](crate::StoreError::Corrupt): the engine
/// answers 503 (fail-closed) and leaves the record as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptError {
    /// The record was encrypted with a key that is not in the keyring.
    #[error("the record is encrypted with key `{key_id}`, which is not configured (configured: {configured}): add that key back to read it, or let the record expire")]
    UnknownKey {
        /// The record's key id.
        key_id: String,
        /// The ids of the keyring, comma-separated.
        configured: String,
    },
    /// The tag does not verify: the ciphertext or its header changed, the
    /// record was moved from another record id, or the key under this id
    /// is not the one it was encrypted with.
    #[error("the record does not decrypt with key `{key_id}`: its ciphertext or header was changed, it was moved from another record, or key `{key_id}` is not the key it was encrypted with")]
    NotAuthentic {
        /// The record's key id.
        key_id: String,
    },
    /// A response in clear, read with
    /// [`allow_plaintext`](EncryptionKeys::allow_plaintext) off.
    #[error("the record holds a response in clear, and encrypted records only are read (EncryptionKeys::allow_plaintext reads the records written before encryption was turned on)")]
    Plaintext,
    /// An encrypted record, read by an engine without keys.
    #[error("the record is encrypted (key `{key_id}`) and no encryption keys are configured: set IdempotencyConfigBuilder::encryption")]
    NoKeys {
        /// The record's key id.
        key_id: String,
    },
    /// It decrypted, to bytes that are not a record.
    #[error("the decrypted record is corrupt: {0}")]
    Decrypted(CorruptRecord),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StoredResponse;

    fn id(n: u8) -> RecordId {
        RecordId::from_parts(b"test", &[n])
    }

    fn response() -> StoredOutcome {
        StoredOutcome::response(StoredResponse {
            status: 201,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )],
            body: Bytes::from_static(b"{\"card\":\"4242 4242 4242 4242\"}"),
        })
    }

    fn keys() -> EncryptionKeys {
        EncryptionKeys::new("k1", [1; 32]).unwrap()
    }

    #[test]
    fn a_sealed_response_opens_for_its_record_only() {
        let keys = keys();
        let sealed = keys.seal(&id(1), &response());
        let StoredOutcome::Sealed(s) = &sealed else {
            panic!("not sealed: {sealed:?}")
        };
        assert_eq!(s.key_id(), "k1");
        let bytes = s.as_bytes();
        assert!(
            !bytes.windows(4).any(|w| w == b"4242"),
            "the body is in clear"
        );
        assert!(!bytes.windows(12).any(|w| w == b"content-type"));
        assert_eq!(keys.open(&id(1), sealed.clone()).unwrap(), response());
        assert_eq!(
            keys.open(&id(2), sealed),
            Err(DecryptError::NotAuthentic {
                key_id: "k1".into()
            })
        );
    }

    #[test]
    fn every_seal_draws_a_new_nonce() {
        let keys = keys();
        assert_ne!(
            keys.seal(&id(1), &response()),
            keys.seal(&id(1), &response())
        );
    }

    #[test]
    fn every_outcome_round_trips_through_the_encoding() {
        let keys = keys();
        for outcome in [
            response(),
            StoredOutcome::NotReplayable { status: 200 },
            StoredOutcome::Mark(u16::MAX),
        ] {
            let sealed = keys.seal(&id(3), &outcome);
            assert!(matches!(sealed, StoredOutcome::Sealed(_)));
            let stored = StoredOutcome::decode(Bytes::from(sealed.encode())).unwrap();
            assert_eq!(stored, sealed);
            assert_eq!(keys.seal(&id(3), &stored), stored, "sealed twice");
            assert_eq!(keys.open(&id(3), stored).unwrap(), outcome);
        }
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let keys = keys();
        let sealed = keys.seal(&id(1), &response()).encode();
        for i in 0..sealed.len() {
            let mut bytes = sealed.clone();
            bytes[i] ^= 0x01;
            match StoredOutcome::decode(Bytes::from(bytes)) {
                // The header no longer parses (or names another kind).
                Err(_) | Ok(StoredOutcome::NotReplayable { .. } | StoredOutcome::Mark(_)) => {}
                Ok(other) => assert!(
                    keys.open(&id(1), other).is_err(),
                    "byte {i} changed and opened"
                ),
            }
        }
    }

    #[test]
    fn a_key_removed_or_replaced_is_a_typed_error() {
        let sealed = keys().seal(&id(1), &response());
        let other = EncryptionKeys::new("k2", [1; 32]).unwrap();
        assert_eq!(
            other.open(&id(1), sealed.clone()).unwrap_err().to_string(),
            "the record is encrypted with key `k1`, which is not configured (configured: k2): add that key back to read it, or let the record expire"
        );
        let replaced = EncryptionKeys::new("k1", [2; 32]).unwrap();
        assert!(matches!(
            replaced.open(&id(1), sealed),
            Err(DecryptError::NotAuthentic { .. })
        ));
    }

    #[test]
    fn a_response_in_clear_is_refused_unless_allowed() {
        let keys = keys();
        assert_eq!(keys.open(&id(1), response()), Err(DecryptError::Plaintext));
        assert_eq!(
            keys.clone()
                .allow_plaintext(true)
                .open(&id(1), response())
                .unwrap(),
            response()
        );
        for clear in [
            StoredOutcome::NotReplayable { status: 201 },
            StoredOutcome::Mark(1),
        ] {
            assert_eq!(keys.open(&id(1), clear.clone()).unwrap(), clear);
        }
    }

    #[test]
    fn rotation_seals_with_the_newest_key_and_opens_with_any() {
        let old = keys();
        let before = old.seal(&id(1), &response());
        let both = old.clone().rotate("k2", [2; 32]).unwrap();
        assert_eq!(both.current_id(), "k2");
        let after = both.seal(&id(1), &response());
        let StoredOutcome::Sealed(s) = &after else {
            panic!()
        };
        assert_eq!(s.key_id(), "k2");
        assert_eq!(both.open(&id(1), before.clone()).unwrap(), response());
        assert_eq!(both.open(&id(1), after).unwrap(), response());
        // `old` is unchanged by the rotation of its clone.
        assert_eq!(old.ids().collect::<Vec<_>>(), ["k1"]);
        assert!(matches!(
            old.clone().rotate("k1", [3; 32]),
            Err(EncryptionKeyError::DuplicateId { .. })
        ));
    }

    #[test]
    fn debug_shows_ids_never_keys() {
        let keys = EncryptionKeys::new("k1", [0xab; 32]).unwrap();
        let debug = format!("{keys:?}");
        assert!(debug.contains("k1"), "{debug}");
        assert!(
            !debug.contains("171") && !debug.to_lowercase().contains("ab, "),
            "{debug}"
        );
    }

    #[test]
    fn malformed_sealed_headers_are_corrupt() {
        let keys = keys();
        let good = keys.seal(&id(1), &response()).encode();
        // Another algorithm, a key id of 0 bytes or of bad characters, truncation.
        let cases: [(usize, u8); 3] = [(2, 2), (3, 0), (4, b' ')];
        for (at, value) in cases {
            let mut bytes = good.clone();
            bytes[at] = value;
            assert!(
                StoredOutcome::decode(Bytes::from(bytes)).is_err(),
                "byte {at} = {value}"
            );
        }
        for cut in 0..HEADER + 2 + NONCE_LEN + MIN_PLAINTEXT + TAG_LEN {
            assert!(
                StoredOutcome::decode(Bytes::copy_from_slice(&good[..cut.min(good.len())]))
                    .is_err(),
                "{cut}"
            );
        }
    }
}
