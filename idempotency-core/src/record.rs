//! What a store keeps: tokens, stored responses, and the answers of `claim`.

use bytes::{Buf, BufMut, Bytes};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::Fingerprint;

/// A random 128-bit token that fences `complete`, `release` and `extend`:
/// only the holder of the current claim can change the record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh random token (no global counter, so no hot key).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// From stored bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }

    /// The token as 16 big-endian bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// 32 lowercase hex characters.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// A stored header name: text that may share its record's buffer (so a
/// record's names, values and small body are one allocation).
///
/// Built from a `&'static str` or a `String`, or by
/// [`StoredOutcome::decode`] after checking that it is UTF-8; it always is.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct HeaderText(Bytes);

impl HeaderText {
    /// A name known at compile time.
    pub const fn from_static(name: &'static str) -> Self {
        Self(Bytes::from_static(name.as_bytes()))
    }

    /// `bytes` as text, when they are UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Option<Self> {
        std::str::from_utf8(&bytes).is_ok().then_some(Self(bytes))
    }

    /// Bytes taken from a `&str`.
    pub(crate) fn from_str_bytes(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Self(bytes)
    }

    /// The name's bytes, without checking again that they are UTF-8 (as
    /// [`as_str`](Self::as_str) does): what encoding a record writes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the name is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Every constructor checked (or was given) UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for HeaderText {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for HeaderText {
    fn from(name: &'static str) -> Self {
        Self::from_static(name)
    }
}

impl From<String> for HeaderText {
    fn from(name: String) -> Self {
        Self(Bytes::from(name))
    }
}

impl PartialEq<str> for HeaderText {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other.as_bytes()
    }
}

impl PartialEq<&str> for HeaderText {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == *other.as_bytes()
    }
}

impl fmt::Debug for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A response as stored for replay: status, headers in order (names
/// lowercase, repeated names kept), and the body.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Header names (lowercase) and raw values, in the order the handler set them.
    pub headers: Vec<(HeaderText, Bytes)>,
    /// The full body.
    pub body: Bytes,
}

impl StoredResponse {
    /// The headers of a replay, in order: the stored ones, then
    /// `content-length` (recomputed from the body) and `idempotent-replayed: true`.
    /// Every adapter sends exactly these.
    pub fn replay_headers(&self) -> ReplayHeaders<'_> {
        ReplayHeaders {
            stored: self.headers.iter(),
            added: [
                ("content-length", decimal(self.body.len())),
                (crate::IDEMPOTENT_REPLAYED, Bytes::from_static(b"true")),
            ]
            .into_iter(),
        }
    }
}

/// The headers of a replay: see [`StoredResponse::replay_headers`].
#[derive(Debug)]
pub struct ReplayHeaders<'a> {
    stored: std::slice::Iter<'a, (HeaderText, Bytes)>,
    added: std::array::IntoIter<(&'static str, Bytes), 2>,
}

impl<'a> Iterator for ReplayHeaders<'a> {
    type Item = (&'a str, Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        match self.stored.next() {
            Some((name, value)) => Some((name.as_str(), value.clone())),
            None => self.added.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.stored.len() + self.added.len();
        (n, Some(n))
    }
}

/// `n` in decimal ASCII, without the formatting machinery.
pub(crate) fn decimal(mut n: usize) -> Bytes {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Bytes::copy_from_slice(&digits[at..])
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// What a completed record holds. Cheap to clone: a response is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoredOutcome {
    /// The response, replayed to every retry.
    Response(Arc<StoredResponse>),
    /// The handler ran and answered `status`, but its body was larger than the
    /// storable limit. A retry gets a problem response and never re-runs the handler.
    NotReplayable {
        /// The status the handler answered.
        status: u16,
    },
    /// A mark that is not an HTTP response: a code of the caller's own (the
    /// inbox's lease mode marks messages done, dead or failed with it).
    Mark(u16),
    /// Any of the others, encrypted at rest by
    /// [`EncryptionKeys::seal`](crate::EncryptionKeys::seal): opaque until
    /// [`EncryptionKeys::open`](crate::EncryptionKeys::open) with its key
    /// and its record's id ([`Encrypted`](crate::Encrypted) does both).
    /// Every store keeps it as it keeps any outcome: it is a kind of the
    /// stored encoding.
    Sealed(crate::encryption::SealedOutcome),
}

pub(crate) const FORMAT_VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 0;
const KIND_NOT_REPLAYABLE: u8 = 1;
const KIND_MARK: u8 = 2;
pub(crate) const KIND_SEALED: u8 = 3;

impl StoredOutcome {
    /// A response to replay.
    pub fn response(response: StoredResponse) -> Self {
        Self::Response(Arc::new(response))
    }

    /// Encodes into the compact binary form every backend stores.
    ///
    /// A response the format cannot hold (a header name of 64 KiB or more, a
    /// header value of 4 GiB or more, or 2³² headers or more: see
    /// [`is_encodable`](Self::is_encodable)) is encoded as
    /// [`NotReplayable`](Self::NotReplayable) with its status, as a body over
    /// the storable limit is: a retry gets the not-replayable problem and
    /// never re-runs the handler, rather than a record whose lengths wrapped.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf
    }

    /// The length of [`encode`](Self::encode)'s bytes.
    pub(crate) fn encoded_len(&self) -> usize {
        match self {
            StoredOutcome::Response(r) if encodable(r) => {
                1 + 1
                    + 2
                    + 4
                    + r.headers
                        .iter()
                        .map(|(n, v)| 2 + n.len() + 4 + v.len())
                        .sum::<usize>()
                    + r.body.len()
            }
            StoredOutcome::Sealed(sealed) => sealed.as_bytes().len(),
            _ => 4,
        }
    }

    /// Appends [`encode`](Self::encode)'s bytes to `buf` (sealing encrypts
    /// them in place, in the buffer of the sealed record).
    pub(crate) fn encode_into(&self, buf: &mut Vec<u8>) {
        match self {
            StoredOutcome::Response(r) if !encodable(r) => {
                short(buf, KIND_NOT_REPLAYABLE, r.status)
            }
            StoredOutcome::Response(r) => {
                buf.put_u8(FORMAT_VERSION);
                buf.put_u8(KIND_RESPONSE);
                buf.put_u16(r.status);
                buf.put_u32(r.headers.len() as u32);
                for (name, value) in &r.headers {
                    buf.put_u16(name.len() as u16);
                    buf.put_slice(name.as_bytes());
                    buf.put_u32(value.len() as u32);
                    buf.put_slice(value);
                }
                buf.put_slice(&r.body);
            }
            StoredOutcome::NotReplayable { status } => short(buf, KIND_NOT_REPLAYABLE, *status),
            StoredOutcome::Mark(code) => short(buf, KIND_MARK, *code),
            StoredOutcome::Sealed(sealed) => buf.put_slice(sealed.as_bytes()),
        }
    }

    /// Whether [`encode`](Self::encode) keeps this outcome as it is: a short
    /// record always, a response when every header name is shorter than
    /// 64 KiB, every value shorter than 4 GiB, and there are fewer than 2³²
    /// headers (the widths of the format's length fields).
    pub fn is_encodable(&self) -> bool {
        match self {
            StoredOutcome::Response(r) => encodable(r),
            StoredOutcome::NotReplayable { .. }
            | StoredOutcome::Mark(_)
            | StoredOutcome::Sealed(_) => true,
        }
    }

    /// Decodes what [`encode`](Self::encode) wrote. Header names, values and
    /// the body share `bytes`' allocation, so nothing is copied.
    ///
    /// # Errors
    /// [`CorruptRecord`] when the bytes are not exactly one valid record
    /// (trailing bytes after a short record included); stores report it as
    /// the source of [`StoreError::Corrupt`](crate::StoreError::Corrupt).
    pub fn decode(bytes: Bytes) -> Result<Self, CorruptRecord> {
        if bytes.len() >= 2 && bytes[1] == KIND_SEALED && bytes[0] == FORMAT_VERSION {
            return crate::encryption::SealedOutcome::parse(bytes).map(StoredOutcome::Sealed);
        }
        let mut b = bytes;
        let corrupt = CorruptRecord::new;
        if b.remaining() < 4 {
            return Err(corrupt("truncated header"));
        }
        if b.get_u8() != FORMAT_VERSION {
            return Err(corrupt("unknown format version"));
        }
        let kind = b.get_u8();
        let status = b.get_u16();
        let short = |outcome: StoredOutcome| {
            if b.has_remaining() {
                Err(corrupt("trailing bytes after the record"))
            } else {
                Ok(outcome)
            }
        };
        match kind {
            KIND_NOT_REPLAYABLE => return short(StoredOutcome::NotReplayable { status }),
            KIND_MARK => return short(StoredOutcome::Mark(status)),
            KIND_RESPONSE => {}
            _ => return Err(corrupt("unknown kind")),
        }
        if b.remaining() < 4 {
            return Err(corrupt("truncated header count"));
        }
        let count = b.get_u32() as usize;
        let mut headers = Vec::with_capacity(count.min(256));
        for _ in 0..count {
            if b.remaining() < 2 {
                return Err(corrupt("truncated header name"));
            }
            let n = b.get_u16() as usize;
            if b.remaining() < n + 4 {
                return Err(corrupt("truncated header name"));
            }
            let name = HeaderText::from_utf8(b.copy_to_bytes(n))
                .ok_or_else(|| corrupt("header name is not UTF-8"))?;
            let v = b.get_u32() as usize;
            if b.remaining() < v {
                return Err(corrupt("truncated header value"));
            }
            headers.push((name, b.copy_to_bytes(v)));
        }
        Ok(StoredOutcome::response(StoredResponse {
            status,
            headers,
            body: b,
        }))
    }
}

/// Whether every length of `r` fits its field: a name's `u16`, a value's and
/// the header count's `u32`.
fn encodable(r: &StoredResponse) -> bool {
    u32::try_from(r.headers.len()).is_ok()
        && r.headers.iter().all(|(name, value)| {
            u16::try_from(name.len()).is_ok() && u32::try_from(value.len()).is_ok()
        })
}

/// A record of four bytes: version, kind, a 16-bit code.
fn short(buf: &mut Vec<u8>, kind: u8, code: u16) {
    buf.put_u8(FORMAT_VERSION);
    buf.put_u8(kind);
    buf.put_u16(code);
}

/// Why stored bytes are not a valid record. Stores report it as the source
/// of [`StoreError::Corrupt`](crate::StoreError::Corrupt), and leave the record untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptRecord(&'static str);

impl CorruptRecord {
    /// What is wrong with the stored bytes.
    pub const fn new(what: &'static str) -> Self {
        Self(what)
    }
}

/// The record's state after `claim`, from the caller's point of view.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The caller holds the claim: run the handler, then `complete` or `release`.
    Acquired(LeaseToken),
    /// Another request holds the claim.
    InFlight {
        /// The fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// When the holder's lease runs out, if it is not extended.
        lease_remaining: Duration,
    },
    /// The request completed before.
    Completed {
        /// The fingerprint of the request that completed.
        fingerprint: Fingerprint,
        /// What it left.
        outcome: StoredOutcome,
    },
}

/// What a fenced operation (`complete`, `release`, `extend`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum TokenOutcome {
    /// The token matched and the record changed.
    Applied,
    /// The record is held under another token (or gone): nothing changed.
    Fenced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_two_words_so_claims_copy_no_more_than_before_encryption() {
        assert_eq!(std::mem::size_of::<StoredOutcome>(), 16);
    }

    #[test]
    fn round_trips_binary_and_repeated_headers() {
        let r = StoredOutcome::response(StoredResponse {
            status: 201,
            headers: vec![
                ("link".into(), Bytes::from_static(b"</a>; rel=next")),
                ("link".into(), Bytes::from_static(b"</b>; rel=prev")),
                ("x-bin".into(), Bytes::from_static(&[0x80, 0xff, 0x09])),
            ],
            body: Bytes::from(vec![0u8, 1, 2, 255]),
        });
        assert_eq!(StoredOutcome::decode(Bytes::from(r.encode())).unwrap(), r);
        let n = StoredOutcome::NotReplayable { status: 200 };
        assert_eq!(StoredOutcome::decode(Bytes::from(n.encode())).unwrap(), n);
        let m = StoredOutcome::Mark(7);
        assert_eq!(StoredOutcome::decode(Bytes::from(m.encode())).unwrap(), m);
    }

    #[test]
    fn content_length_is_the_body_length_in_decimal() {
        for n in [0usize, 7, 10, 64, 1024, 99_999] {
            assert_eq!(decimal(n), n.to_string().as_bytes());
        }
    }

    #[test]
    fn truncated_input_is_a_typed_error() {
        let r = StoredOutcome::response(StoredResponse {
            status: 200,
            headers: vec![("a".into(), Bytes::from_static(b"b"))],
            body: Bytes::new(),
        })
        .encode();
        for cut in 0..r.len() - 1 {
            assert!(
                StoredOutcome::decode(Bytes::copy_from_slice(&r[..cut])).is_err(),
                "{cut}"
            );
        }
    }

    #[test]
    fn a_header_name_too_long_for_its_length_field_is_stored_as_not_replayable() {
        // The name's length is a u16: at 64 KiB it used to wrap (to 0 here),
        // and the record decoded as a different response, or not at all.
        let longest = StoredOutcome::response(StoredResponse {
            status: 201,
            headers: vec![(
                "a".repeat(u16::MAX as usize).into(),
                Bytes::from_static(b"v"),
            )],
            body: Bytes::from_static(b"body"),
        });
        assert!(longest.is_encodable());
        assert_eq!(
            StoredOutcome::decode(Bytes::from(longest.encode())).unwrap(),
            longest
        );

        for len in [1 << 16, (1 << 16) + 5] {
            let response = StoredOutcome::response(StoredResponse {
                status: 201,
                headers: vec![
                    ("x-ok".into(), Bytes::from_static(b"1")),
                    ("a".repeat(len).into(), Bytes::from_static(b"v")),
                ],
                body: Bytes::from_static(b"body"),
            });
            let encoded = response.encode();
            assert_eq!(
                StoredOutcome::decode(Bytes::from(encoded)),
                Ok(StoredOutcome::NotReplayable { status: 201 }),
                "a {len}-byte header name"
            );
            assert!(!response.is_encodable());
        }
    }

    #[test]
    fn trailing_bytes_after_a_short_record_are_corrupt() {
        // Found by fuzzing: `01 01 c8 00 00` decoded as NotReplayable { status: 200 }.
        for bytes in [&[1u8, 1, 0, 200, 0][..], &[1, 2, 0, 7, 0, 0]] {
            let err = StoredOutcome::decode(Bytes::copy_from_slice(bytes)).unwrap_err();
            assert_eq!(err.to_string(), "trailing bytes after the record");
        }
    }
}
