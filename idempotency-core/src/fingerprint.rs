//! Fingerprints of requests and the addresses of records.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::key::IdempotencyKey;

/// The scope a key lives in: the authenticated principal or tenant.
///
/// Two clients that pick the same key in different scopes address different
/// records, so one client can never read another's stored response, nor block
/// its requests with a 409. Derive it from something the server trusts (the
/// principal an auth layer put in the request extensions), never from
/// something the client picks freely.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope(Vec<u8>);

impl Scope {
    /// The one scope every request shares when no scope is configured.
    pub const GLOBAL: Scope = Scope(Vec::new());

    /// A scope from any bytes (a user id, a tenant id, an API key).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The scope's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A scope may be a credential: show only its length.
        write!(f, "Scope(<{} bytes>)", self.0.len())
    }
}

/// The address of a record: SHA-256 over the scope and the key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordId([u8; 32]);

impl std::hash::Hash for RecordId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Already a uniform cryptographic hash: eight of its bytes are enough.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl RecordId {
    /// `H(scope, key)`, each length-prefixed so no two pairs collide by concatenation.
    pub fn new(scope: &Scope, key: &IdempotencyKey) -> Self {
        Self::from_parts(scope.as_bytes(), key.as_str().as_bytes())
    }

    /// The same hash from raw parts (the inbox uses `(consumer, message id)`).
    pub fn from_parts(scope: &[u8], key: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update((scope.len() as u64).to_be_bytes());
        h.update(scope);
        h.update((key.len() as u64).to_be_bytes());
        h.update(key);
        Self(h.finalize().into())
    }

    /// From stored bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters (used in Redis keys).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({}…)", &self.to_hex()[..12])
    }
}

/// SHA-256 over what makes two requests "the same": method, path, query,
/// content type and body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint. Each part is length-prefixed.
    pub fn compute(
        method: &str,
        path: &str,
        query: Option<&str>,
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Self {
        FingerprintBuilder::new(method, path, query, content_type).finish(body)
    }

    /// From stored bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({}…)", &hex(&self.0)[..12])
    }
}

/// A fingerprint whose head (method, path, query, content type) is hashed
/// already, waiting for the body.
#[derive(Clone)]
pub struct FingerprintBuilder(Sha256);

impl FingerprintBuilder {
    /// Hashes the request head.
    pub fn new(method: &str, path: &str, query: Option<&str>, content_type: Option<&[u8]>) -> Self {
        let mut h = Sha256::new();
        for part in [
            method.as_bytes(),
            path.as_bytes(),
            query.unwrap_or("").as_bytes(),
            content_type.unwrap_or(b""),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        // Distinguish "no query" from "empty query" (`/a` vs `/a?`), and no
        // Content-Type from an empty one.
        h.update([u8::from(query.is_some())]);
        h.update([u8::from(content_type.is_some())]);
        Self(h)
    }

    /// Adds the body and finishes.
    pub fn finish(mut self, body: &[u8]) -> Fingerprint {
        self.0.update((body.len() as u64).to_be_bytes());
        self.0.update(body);
        Fingerprint(self.0.finalize().into())
    }
}

impl fmt::Debug for FingerprintBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintBuilder")
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(m: &str, p: &str, q: Option<&str>, ct: Option<&[u8]>, b: &[u8]) -> Fingerprint {
        Fingerprint::compute(m, p, q, ct, b)
    }

    #[test]
    fn every_part_counts() {
        let base = fp("POST", "/p", Some("a=1"), Some(b"application/json"), b"{}");
        assert_eq!(
            base,
            fp("POST", "/p", Some("a=1"), Some(b"application/json"), b"{}")
        );
        assert_ne!(
            base,
            fp("PATCH", "/p", Some("a=1"), Some(b"application/json"), b"{}")
        );
        assert_ne!(
            base,
            fp("POST", "/q", Some("a=1"), Some(b"application/json"), b"{}")
        );
        assert_ne!(
            base,
            fp("POST", "/p", Some("a=2"), Some(b"application/json"), b"{}")
        );
        assert_ne!(
            base,
            fp("POST", "/p", None, Some(b"application/json"), b"{}")
        );
        assert_ne!(
            base,
            fp("POST", "/p", Some("a=1"), Some(b"text/plain"), b"{}")
        );
        assert_ne!(
            base,
            fp("POST", "/p", Some("a=1"), Some(b"application/json"), b"[]")
        );
        assert_ne!(
            fp("POST", "/p", None, None, b""),
            fp("POST", "/p", Some(""), None, b"")
        );
    }

    #[test]
    fn missing_and_empty_content_type_differ() {
        // An empty Content-Type is not the same request as none at all (422, not a replay).
        assert_ne!(
            fp("POST", "/p", None, None, b"{}"),
            fp("POST", "/p", None, Some(b""), b"{}")
        );
        assert_ne!(
            fp("POST", "/p", Some(""), None, b""),
            fp("POST", "/p", Some(""), Some(b""), b"")
        );
    }

    #[test]
    fn scope_and_key_cannot_collide_by_concatenation() {
        let a = RecordId::from_parts(b"ab", b"c");
        let b = RecordId::from_parts(b"a", b"bc");
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 64);
    }
}
