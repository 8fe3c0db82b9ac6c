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

    /// From 64 hex digits (either case), as [`to_hex`](Self::to_hex) writes
    /// them; `None` for anything else.
    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({}…)", &self.to_hex()[..12])
    }
}

/// SHA-256 over what makes two requests "the same": method, path, query,
/// content type and body.
///
/// The content type is compared as a media type (RFC 9110 §8.3.1): type,
/// subtype and parameter names case-insensitively, parameter values exactly
/// (a quoted-string the same as the token it quotes; `charset`'s value
/// case-insensitively), whitespace around `;` and `=` and the order of the
/// parameters ignored; a parameter given twice keeps its order. A value that
/// is not a media type is compared byte for byte. No Content-Type differs
/// from an empty one.
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
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        // Distinguish "no query" from "empty query" (`/a` vs `/a?`).
        h.update([u8::from(query.is_some())]);
        media_type::hash(content_type, &mut |bytes| h.update(bytes));
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

/// The content type's part of a fingerprint: a canonical form of the media
/// type, written straight into the hasher.
mod media_type {
    use std::cmp::Ordering;

    /// Tags: which of the three forms follows. Every form is self-delimiting.
    const ABSENT: u8 = 0;
    const MEDIA_TYPE: u8 = 1;
    const RAW: u8 = 2;

    /// Parameters kept on the stack; more spill to the heap.
    const INLINE_PARAMS: usize = 4;

    /// Writes `content_type`'s canonical form to `out`:
    ///
    /// - no Content-Type: `ABSENT`;
    /// - a media type: `MEDIA_TYPE`, the type and the subtype lowercased, the
    ///   number of parameters, then each parameter sorted by name (stable, so
    ///   a repeated name keeps its order): its name lowercased and its value
    ///   unquoted (and lowercased for `charset`);
    /// - anything else: `RAW` and the bytes as they are.
    ///
    /// Each string is prefixed by its length; counts and lengths are LEB128
    /// varints (one byte below 128), which keeps the usual content type within
    /// the SHA-256 blocks the raw value took.
    ///
    /// Allocates nothing unless there are more than [`INLINE_PARAMS`]
    /// parameters.
    pub(super) fn hash(content_type: Option<&[u8]>, out: &mut impl FnMut(&[u8])) {
        let mut batch = Batch::new(out);
        let Some(value) = content_type else {
            batch.push(ABSENT);
            batch.flush();
            return;
        };
        if let Some(slash) = canonical(value) {
            // Already in canonical form (`application/json`): the same bytes
            // as `parsed` writes (one-byte lengths), without parsing or
            // copying byte by byte.
            let (type_, subtype) = (&value[..slash], &value[slash + 1..]);
            (batch.out)(&[MEDIA_TYPE, type_.len() as u8]);
            (batch.out)(type_);
            (batch.out)(&[subtype.len() as u8]);
            (batch.out)(subtype);
            (batch.out)(&[0]);
            return;
        }
        parsed(value, batch);
    }

    /// What [`hash`] writes for a present Content-Type, always parsed (the
    /// fast path's tests compare against it).
    #[cfg(test)]
    pub(super) fn hash_parsed(value: &[u8], out: &mut impl FnMut(&[u8])) {
        parsed(value, Batch::new(out));
    }

    /// [`hash`] of a present Content-Type, parsed.
    fn parsed<O: FnMut(&[u8])>(value: &[u8], mut batch: Batch<'_, O>) {
        let mut params = Params::new();
        let Some((type_, subtype)) = parse(value, &mut params) else {
            batch.push(RAW);
            batch.varint(value.len());
            batch.flush();
            (batch.out)(value);
            return;
        };
        batch.push(MEDIA_TYPE);
        batch.string(type_, true);
        batch.string(subtype, true);
        let params = params.sorted();
        batch.varint(params.len());
        for param in params {
            batch.string(param.name, true);
            let lowercase = param.name.eq_ignore_ascii_case(b"charset");
            if param.quoted && param.value.contains(&b'\\') {
                let value = Unquoted(param.value.iter()).map(|b| {
                    if lowercase {
                        b.to_ascii_lowercase()
                    } else {
                        b
                    }
                });
                batch.varint(value.clone().count());
                value.for_each(|b| batch.push(b));
            } else {
                // A token, or a quoted-string with nothing escaped.
                batch.string(param.value, lowercase);
            }
        }
        batch.flush();
    }

    /// Where the `/` is, when `value` is a media type already in canonical
    /// form: lowercase token characters on both sides of one `/`, and no
    /// parameters or white space (the usual `application/json`).
    fn canonical(value: &[u8]) -> Option<usize> {
        let mut slash = None;
        for (i, &b) in value.iter().enumerate() {
            match b {
                b'/' if slash.is_none() && i > 0 => slash = Some(i),
                b'a'..=b'z'
                | b'0'..=b'9'
                | b'!'
                | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~' => {}
                _ => return None,
            }
        }
        // One-byte varints for both lengths (as `parsed` writes them).
        slash.filter(|&i| i + 1 < value.len() && value.len() < 128)
    }

    /// Gathers the canonical form's small pieces on the stack, so the hasher
    /// gets a few updates instead of one per piece.
    struct Batch<'o, O: FnMut(&[u8])> {
        out: &'o mut O,
        buf: [u8; 128],
        len: usize,
    }

    impl<'o, O: FnMut(&[u8])> Batch<'o, O> {
        fn new(out: &'o mut O) -> Self {
            Self {
                out,
                buf: [0; 128],
                len: 0,
            }
        }

        fn push(&mut self, b: u8) {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }

        /// `n` in LEB128: seven bits a byte, low bits first, the high bit set
        /// on every byte but the last.
        fn varint(&mut self, mut n: usize) {
            while n >= 0x80 {
                self.push(n as u8 | 0x80);
                n >>= 7;
            }
            self.push(n as u8);
        }

        /// The length of `bytes`, then `bytes`, ASCII-lowercased if `lowercase`.
        fn string(&mut self, bytes: &[u8], lowercase: bool) {
            self.varint(bytes.len());
            let mut rest = bytes;
            while !rest.is_empty() {
                if self.len == self.buf.len() {
                    self.flush();
                }
                let n = rest.len().min(self.buf.len() - self.len);
                let (head, tail) = rest.split_at(n);
                // A loop rather than `copy_from_slice` + `make_ascii_lowercase`:
                // these strings are short, and the call to `memcpy` cost more
                // (about 6 ns of 26 for `application/json`).
                for (to, &b) in self.buf[self.len..self.len + n].iter_mut().zip(head) {
                    *to = if lowercase { b.to_ascii_lowercase() } else { b };
                }
                self.len += n;
                rest = tail;
            }
        }

        fn flush(&mut self) {
            if self.len > 0 {
                (self.out)(&self.buf[..self.len]);
                self.len = 0;
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Param<'a> {
        name: &'a [u8],
        /// A token, or what is between a quoted-string's quotes (still escaped).
        value: &'a [u8],
        quoted: bool,
    }

    impl Param<'static> {
        const NONE: Self = Param {
            name: b"",
            value: b"",
            quoted: false,
        };
    }

    /// The first [`INLINE_PARAMS`] parameters on the stack; all of them on
    /// the heap once there are more.
    struct Params<'a> {
        len: usize,
        inline: [Param<'a>; INLINE_PARAMS],
        heap: Vec<Param<'a>>,
    }

    impl<'a> Params<'a> {
        const fn new() -> Self {
            Self {
                len: 0,
                inline: [Param::NONE; INLINE_PARAMS],
                heap: Vec::new(),
            }
        }

        fn push(&mut self, param: Param<'a>) {
            if self.len < INLINE_PARAMS {
                self.inline[self.len] = param;
            } else {
                if self.len == INLINE_PARAMS {
                    self.heap.reserve(2 * INLINE_PARAMS);
                    self.heap.extend_from_slice(&self.inline);
                }
                self.heap.push(param);
            }
            self.len += 1;
        }

        /// The parameters sorted by name, case-insensitively; stable.
        fn sorted(&mut self) -> &[Param<'a>] {
            if self.len > INLINE_PARAMS {
                self.heap.sort_by(by_name);
                return &self.heap;
            }
            let items = &mut self.inline[..self.len];
            // Insertion sort: a handful of items, and no scratch buffer.
            for i in 1..items.len() {
                let mut j = i;
                while j > 0 && by_name(&items[j - 1], &items[j]) == Ordering::Greater {
                    items.swap(j - 1, j);
                    j -= 1;
                }
            }
            items
        }
    }

    fn by_name(a: &Param<'_>, b: &Param<'_>) -> Ordering {
        let a = a.name.iter().map(u8::to_ascii_lowercase);
        a.cmp(b.name.iter().map(u8::to_ascii_lowercase))
    }

    /// A quoted-string's content with its quoted-pairs (`\x`) unescaped.
    #[derive(Clone)]
    struct Unquoted<'a>(std::slice::Iter<'a, u8>);

    impl Iterator for Unquoted<'_> {
        type Item = u8;

        fn next(&mut self) -> Option<u8> {
            match self.0.next() {
                // `parse` checked that a byte follows every backslash.
                Some(b'\\') => self.0.next().copied(),
                other => other.copied(),
            }
        }
    }

    /// `media-type = type "/" subtype *( OWS ";" OWS [ parameter ] )`,
    /// `parameter = token "=" ( token / quoted-string )` (RFC 9110 §8.3.1,
    /// §5.6.6), also allowing whitespace around `=`: the type and the
    /// subtype, the parameters pushed onto `params` (filled in place: it is
    /// a few hundred bytes). `None` if `value` is not a media type.
    fn parse<'a>(value: &'a [u8], params: &mut Params<'a>) -> Option<(&'a [u8], &'a [u8])> {
        let (type_, rest) = token(trim_ows(value))?;
        let (subtype, mut rest) = token(rest.strip_prefix(b"/")?)?;
        loop {
            rest = trim_ows(rest);
            if rest.is_empty() {
                break;
            }
            rest = trim_ows(rest.strip_prefix(b";")?);
            if rest.is_empty() || rest[0] == b';' {
                // An empty parameter.
                continue;
            }
            let (name, after) = token(rest)?;
            let after = trim_ows(trim_ows(after).strip_prefix(b"=")?);
            let (value, quoted, after) = if after.first() == Some(&b'"') {
                let (value, after) = quoted_string(after)?;
                (value, true, after)
            } else {
                let (value, after) = token(after)?;
                (value, false, after)
            };
            params.push(Param {
                name,
                value,
                quoted,
            });
            rest = after;
        }
        Some((type_, subtype))
    }

    /// Splits a non-empty token off the front of `v`.
    fn token(v: &[u8]) -> Option<(&[u8], &[u8])> {
        let len = v
            .iter()
            .position(|&b| !TCHAR[b as usize])
            .unwrap_or(v.len());
        (len > 0).then(|| v.split_at(len))
    }

    /// Splits a quoted-string off the front of `v` (which starts with `"`):
    /// what is between its quotes, and what follows it.
    fn quoted_string(v: &[u8]) -> Option<(&[u8], &[u8])> {
        let mut i = 1;
        while i < v.len() {
            match v[i] {
                b'"' => return Some((&v[1..i], &v[i + 1..])),
                // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
                b'\\' => match v.get(i + 1) {
                    Some(&(b'\t' | 0x20..=0x7e | 0x80..=0xff)) => i += 2,
                    _ => return None,
                },
                // qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
                b'\t' | 0x20..=0x7e | 0x80..=0xff => i += 1,
                _ => return None,
            }
        }
        None
    }

    /// Which bytes are `tchar`s.
    const TCHAR: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            table[b] = is_tchar(b as u8);
            b += 1;
        }
        table
    };

    const fn is_tchar(b: u8) -> bool {
        matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
                | b'0'..=b'9'
                | b'a'..=b'z'
                | b'A'..=b'Z'
        )
    }

    fn trim_ows(mut v: &[u8]) -> &[u8] {
        while let [b' ' | b'\t', rest @ ..] = v {
            v = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = v {
            v = rest;
        }
        v
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

    #[test]
    fn record_ids_read_back_from_their_hex() {
        let id = RecordId::from_parts(b"scope", b"key");
        assert_eq!(RecordId::from_hex(id.to_hex().as_bytes()), Some(id));
        assert_eq!(
            RecordId::from_hex(id.to_hex().to_uppercase().as_bytes()),
            Some(id)
        );
        let hex = id.to_hex();
        for bad in [
            String::new(),
            hex[..63].to_owned(),
            format!("{hex}0"),
            "00".repeat(31),
            format!("{}zz", "00".repeat(31)),
            format!("{}é", "0".repeat(62)),
            format!("+{}", "0".repeat(63)),
        ] {
            assert_eq!(RecordId::from_hex(bad.as_bytes()), None, "{bad:?}");
        }
    }

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

    fn with_ct(ct: &[u8]) -> Fingerprint {
        fp("POST", "/p", None, Some(ct), b"{}")
    }

    #[test]
    fn equivalent_media_types_fingerprint_the_same() {
        for group in [
            &[
                &b"application/json"[..],
                b"Application/JSON",
                b"APPLICATION/json",
                b" application/json\t",
                b"application/json;",
                b"application/json ; ",
            ][..],
            &[
                b"text/plain; charset=utf-8",
                b"text/plain;charset=utf-8",
                b"TEXT/Plain ; Charset = UTF-8",
                b"text/plain;CHARSET=\"utf-8\"",
                b"text/plain; charset=\"U\\TF-8\"",
                b"text/plain;;charset=utf-8;",
            ],
            &[
                b"multipart/form-data; boundary=AbC; charset=utf-8",
                b"multipart/form-data; charset=UTF-8; boundary=AbC",
                b"Multipart/Form-Data;BOUNDARY=\"AbC\";charset=utf-8",
            ],
            &[b"a/b; p=\"x y\"; q=1", b"a/b;Q=1;P=\"x\\ y\""],
            &[b"a/b; B=2; a=1", b"a/b; a=1; b=2"],
            // Four parameters (all inline), five (the first on the heap), six.
            &[b"a/b; d=4; c=3; b=2; a=1", b"a/b; a=1; b=2; c=3; d=4"],
            &[
                b"a/b; e=5; d=4; c=3; b=2; a=1",
                b"a/b; a=1; b=2; c=3; d=4; e=5",
            ],
            &[
                b"a/b; f=6; e=5; d=4; c=3; b=2; a=1",
                b"a/b; a=1; b=2; c=3; d=4; e=5; f=6",
                b"a/b;C=3;A=1;F=6;B=2;E=5;D=4",
            ],
        ] {
            let first = with_ct(group[0]);
            for other in &group[1..] {
                assert_eq!(
                    first,
                    with_ct(other),
                    "{:?} vs {:?}",
                    String::from_utf8_lossy(group[0]),
                    String::from_utf8_lossy(other)
                );
            }
        }
    }

    #[test]
    fn different_media_types_fingerprint_differently() {
        let all: &[&[u8]] = &[
            b"application/json",
            b"application/jsonx",
            b"application/xjson",
            b"text/json",
            b"application/json; charset=utf-8",
            b"application/json; charset=utf-16",
            b"application/json; charsetx=utf-8",
            // Only `charset` values are case-insensitive.
            b"multipart/form-data; boundary=abc",
            b"multipart/form-data; boundary=ABC",
            b"a/b; p=\"x y\"",
            b"a/b; p=\"x\"",
            b"a/b; p=\"\"",
            b"a/b; p=x; q=y",
            b"a/b; p=xq=y",
            b"a/b; p=x; p=y",
            // A repeated parameter keeps its order.
            b"a/b; p=y; p=x",
            b"a/bp=x",
            // Not media types: hashed as they are.
            b"application/json garbage",
            b"application/ json",
            b"application /json",
            b"application",
            b"application/json; p",
            b"application/json; p=",
            b"application/json; p=\"open",
            b"not a media type",
            b"Not a media type",
            b"",
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(
                    with_ct(a),
                    with_ct(b),
                    "{:?} vs {:?}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                );
            }
            assert_eq!(with_ct(a), with_ct(a), "deterministic");
        }
        assert_ne!(
            with_ct(b"application/json"),
            fp("POST", "/p", None, None, b"{}")
        );
    }

    #[test]
    fn the_fast_path_writes_what_parsing_writes() {
        for ct in [
            &b"application/json"[..],
            b"text/plain",
            b"application/vnd.api+json",
            b"a/b",
            b"x-custom/my_type.v2",
        ] {
            let mut parsed = Vec::new();
            media_type::hash_parsed(ct, &mut |b| parsed.extend_from_slice(b));
            assert_eq!(
                canonical(Some(ct)),
                parsed,
                "{}",
                String::from_utf8_lossy(ct)
            );
        }
        // Not canonical: parsed, and equal to their canonical spelling.
        for (ct, same) in [
            (&b"Application/JSON"[..], &b"application/json"[..]),
            (b"text/plain;charset=UTF-8", b"text/plain; charset=utf-8"),
            (b" application/json", b"application/json"),
        ] {
            assert_eq!(canonical(Some(ct)), canonical(Some(same)));
        }
        for raw in [&b"/json"[..], b"application/", b"application", b"a/b/c"] {
            let mut parsed = Vec::new();
            media_type::hash_parsed(raw, &mut |b| parsed.extend_from_slice(b));
            assert_eq!(
                canonical(Some(raw)),
                parsed,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// What the content type writes into the hasher.
    fn canonical(ct: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        media_type::hash(ct, &mut |b| out.extend_from_slice(b));
        out
    }

    /// A length or a count as the canonical form writes it (LEB128).
    fn varint(n: usize) -> Vec<u8> {
        match n {
            0..=127 => vec![n as u8],
            128..=16383 => vec![(n & 0x7f) as u8 | 0x80, (n >> 7) as u8],
            _ => unreachable!("no test part is that long"),
        }
    }

    /// The tag, then each part length-prefixed.
    fn encoded(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![tag];
        for part in parts {
            out.extend_from_slice(&varint(part.len()));
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn the_canonical_form_is_tagged_and_length_prefixed() {
        assert_eq!(canonical(None), [0]);
        assert_eq!(canonical(Some(b"")), encoded(2, &[b""]));
        assert_eq!(canonical(Some(b"a b")), encoded(2, &[b"a b"]));
        assert_eq!(varint(200), [0xc8, 0x01]);
        let long_raw = "x ".repeat(150);
        assert_eq!(
            canonical(Some(long_raw.as_bytes()))[..3],
            [2, 0xac, 0x02],
            "300 in LEB128"
        );
        let mut json = encoded(1, &[b"application", b"json"]);
        json.push(0);
        assert_eq!(canonical(Some(b"Application/JSON")), json);

        let mut text = encoded(1, &[b"text", b"plain"]);
        text.push(2);
        text.extend_from_slice(&encoded(0, &[b"charset", b"utf-8", b"q", b"A\"b"])[1..]);
        assert_eq!(
            canonical(Some(br#"Text/Plain; Q="A\"b"; Charset="UTF-8""#)),
            text
        );

        // Longer than the 64-byte chunks, and more parameters than fit inline.
        let long = "Xy".repeat(100);
        let value = format!("a/b; p5={long}; p4=4; p3=3; p2=2; p1=1; p0=\"{long}\"");
        let mut many = encoded(1, &[b"a", b"b"]);
        many.push(6);
        let parts: [&[u8]; 12] = [
            b"p0",
            long.as_bytes(),
            b"p1",
            b"1",
            b"p2",
            b"2",
            b"p3",
            b"3",
            b"p4",
            b"4",
            b"p5",
            long.as_bytes(),
        ];
        many.extend_from_slice(&encoded(0, &parts)[1..]);
        assert_eq!(canonical(Some(value.as_bytes())), many);

        // Four parameters: the inline array full.
        let mut four = encoded(1, &[b"a", b"b"]);
        four.push(4);
        four.extend_from_slice(&encoded(0, &[b"a", b"1", b"b", b"2", b"c", b"3", b"d", b"4"])[1..]);
        assert_eq!(canonical(Some(b"a/b; d=4; c=3; b=2; a=1")), four);

        // A repeated parameter keeps its place after sorting.
        let mut repeated = encoded(1, &[b"a", b"b"]);
        repeated.push(3);
        repeated.extend_from_slice(&encoded(0, &[b"p", b"2", b"p", b"1", b"q", b"0"])[1..]);
        assert_eq!(canonical(Some(b"a/b; q=0; p=2; P=1")), repeated);
        // Also among many (sorted on the heap).
        let names = ["b", "A", "a", "B", "c"];
        let value: String = (0..40)
            .map(|i| format!("; {}={i}", names[i % names.len()]))
            .collect();
        let mut expected = encoded(1, &[b"a", b"b"]);
        expected.push(40);
        for name in ["a", "b", "c"] {
            for i in (0..40).filter(|i| names[i % names.len()].eq_ignore_ascii_case(name)) {
                expected.extend_from_slice(
                    &encoded(0, &[name.as_bytes(), i.to_string().as_bytes()])[1..],
                );
            }
        }
        assert_eq!(canonical(Some(format!("a/b{value}").as_bytes())), expected);
    }

    #[test]
    fn the_grammar_is_rfc_9110s() {
        // obs-text and escaped characters are allowed; control characters are not.
        for ok in [
            &b"a/b; p=\"\xe9\""[..],
            b"a/b; p=\"\\\"\"",
            b"a/b; p=\"a\\\tb\"",
        ] {
            assert_eq!(
                canonical(Some(ok))[0],
                1,
                "{:?}",
                String::from_utf8_lossy(ok)
            );
        }
        for raw in [
            &b"a/b; p=\"\x01\""[..],
            b"a/b; p=\"\\\x01\"",
            b"a/b; p=\"\x7f\"",
            b"a/b; p=\"x\\\"",
            b"a/b; p=\"x\"y",
            b"a/b; p=x\"y\"",
            // Not tokens.
            b"text/pl@in",
            b"te(x)t/plain",
            b"text/plain; a=b{c}",
            b"text/plain; a\x01=b",
            b"text/plain; a=\xe9",
            b"text/plain; a=b c",
            b"text/plain; =b",
        ] {
            assert_eq!(canonical(Some(raw)), encoded(2, &[raw]));
        }
    }

    #[test]
    fn scope_and_key_cannot_collide_by_concatenation() {
        let a = RecordId::from_parts(b"ab", b"c");
        let b = RecordId::from_parts(b"a", b"bc");
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 64);
    }
}
