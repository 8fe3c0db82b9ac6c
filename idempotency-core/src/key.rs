//! Parsing the `Idempotency-Key` request header.

use std::borrow::Cow;
use std::fmt;

/// The header that carries the client's key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1..=255 printable ASCII characters.
///
/// Both the draft's quoted Structured-Field string (`"abc"`) and Stripe's bare
/// form (`abc`) are accepted and mean the same key. A comma outside a quoted
/// string makes the value a list of keys (`a, b`; `"a", "b"`), refused like two
/// fields with [`KeyError::Multiple`]; `"a,b"` is the one key `a,b`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key as the client meant it (without Structured-Field quoting).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses one header value.
    ///
    /// # Errors
    /// [`KeyError`] says what is wrong with the value.
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        parse_value(value).map(|key| Self(key.into_owned()))
    }
}

/// Parses one header value; a bare key (the usual case) is borrowed, not copied.
fn parse_value(value: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    let value = trim_ows(value);
    if value.first() == Some(&b'"') {
        if has_comma_outside_strings(value) {
            return Err(KeyError::Multiple);
        }
        let item: sfv::Item = sfv::Parser::new(value)
            .parse()
            .map_err(|e| KeyError::MalformedQuoted(e.to_string()))?;
        if !item.params.is_empty() {
            return Err(KeyError::MalformedQuoted(
                "parameters are not allowed on the key".into(),
            ));
        }
        match item.bare_item {
            sfv::BareItem::String(s) => {
                validate(s.as_str())?;
                Ok(Cow::Owned(s.into()))
            }
            _ => Err(KeyError::MalformedQuoted("not a string".into())),
        }
    } else {
        if value.contains(&b',') {
            return Err(KeyError::Multiple);
        }
        let s = std::str::from_utf8(value).map_err(|_| KeyError::InvalidCharacter)?;
        validate(s)?;
        Ok(Cow::Borrowed(s))
    }
}

/// Whether `value` has a comma that is not inside a quoted string: then it is a
/// list of values, which is what a proxy makes of two fields (RFC 9110 §5.3),
/// and it means what two fields mean.
fn has_comma_outside_strings(value: &[u8]) -> bool {
    let mut in_string = false;
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' if in_string => {
                bytes.next();
            }
            b'"' => in_string = !in_string,
            b',' if !in_string => return true,
            _ => {}
        }
    }
    false
}

fn validate(s: &str) -> Result<(), KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    if s.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(s.len()));
    }
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(KeyError::InvalidCharacter);
    }
    Ok(())
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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

/// Why an `Idempotency-Key` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The request has no `Idempotency-Key` header and one is required.
    #[error("the Idempotency-Key header is required for this request")]
    Missing,
    /// The request has more than one `Idempotency-Key` field, or one field
    /// with a comma-separated list of keys (what a proxy makes of two fields).
    #[error(
        "the request has more than one Idempotency-Key (two fields, or a comma-separated list)"
    )]
    Multiple,
    /// The key is empty.
    #[error("the Idempotency-Key is empty")]
    Empty,
    /// The key is longer than 255 characters.
    #[error("the Idempotency-Key is {0} characters long; at most 255 are allowed")]
    TooLong(usize),
    /// The key has a character outside printable ASCII.
    #[error("the Idempotency-Key may only contain printable ASCII characters")]
    InvalidCharacter,
    /// The key starts with a quote but is not a valid Structured-Field string.
    #[error("the Idempotency-Key is not a valid quoted string: {0}")]
    MalformedQuoted(String),
}

/// Finds and parses the key among a request's header values.
///
/// `values` yields every value of the `Idempotency-Key` field. `Ok(None)` means
/// there was no such field.
///
/// # Errors
/// [`KeyError::Multiple`] for more than one field or a comma-separated list,
/// or the value's own error.
pub fn parse_key<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    Ok(parse_key_ref(values)?.map(|key| IdempotencyKey(key.into_owned())))
}

/// [`parse_key`], borrowing a bare key from the header instead of copying it.
pub(crate) fn parse_key_ref<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<Cow<'a, str>>, KeyError> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Multiple);
    }
    parse_value(first).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_and_quoted_mean_the_same_key() {
        let bare = IdempotencyKey::parse(b"abc-123").unwrap();
        let quoted = IdempotencyKey::parse(b"\"abc-123\"").unwrap();
        assert_eq!(bare, quoted);
        assert_eq!(bare.as_str(), "abc-123");
    }

    #[test]
    fn quoted_escapes_are_unescaped() {
        let k = IdempotencyKey::parse(br#""a\"b\\c""#).unwrap();
        assert_eq!(k.as_str(), r#"a"b\c"#);
    }

    #[test]
    fn length_limits() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        let max = "k".repeat(255);
        assert!(IdempotencyKey::parse(max.as_bytes()).is_ok());
        let long = "k".repeat(256);
        assert_eq!(
            IdempotencyKey::parse(long.as_bytes()),
            Err(KeyError::TooLong(256))
        );
    }

    #[test]
    fn non_printable_is_refused() {
        assert_eq!(
            IdempotencyKey::parse("ключ".as_bytes()),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::parse(b"a\x01b"),
            Err(KeyError::InvalidCharacter)
        );
    }

    #[test]
    fn malformed_quoted_is_refused() {
        for bad in [&b"\"abc"[..], b"\"a\"b", b"\"abc\";p=1", b"\"a\\x\""] {
            assert!(
                matches!(
                    IdempotencyKey::parse(bad),
                    Err(KeyError::MalformedQuoted(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn more_than_one_field_is_refused() {
        let v = [&b"a"[..], b"a"];
        assert_eq!(parse_key(v.into_iter()), Err(KeyError::Multiple));
        assert_eq!(parse_key(std::iter::empty()), Ok(None));
    }

    #[test]
    fn comma_joined_values_are_refused_as_multiple() {
        // What a proxy makes of two fields (RFC 9110 §5.3): the same 400 as two fields.
        for joined in [
            &b"c1, c2"[..],
            b"c1,c2",
            b"c1,",
            b",c1",
            b"\"a\", \"b\"",
            b"\"a\",\"b\"",
            b"\"a\", b",
            b"\"a\";p=1, \"b\"",
            b"\"a\", \"b",
        ] {
            assert_eq!(
                IdempotencyKey::parse(joined),
                Err(KeyError::Multiple),
                "{:?}",
                String::from_utf8_lossy(joined)
            );
            assert_eq!(parse_key(std::iter::once(joined)), Err(KeyError::Multiple));
        }
        // A comma inside a quoted string is part of one key.
        assert_eq!(IdempotencyKey::parse(b"\"a,b\"").unwrap().as_str(), "a,b");
        assert_eq!(
            IdempotencyKey::parse(br#""a\",b""#).unwrap().as_str(),
            "a\",b"
        );
        // An unterminated string is malformed, not two keys.
        assert!(matches!(
            IdempotencyKey::parse(b"\"a,b"),
            Err(KeyError::MalformedQuoted(_))
        ));
    }

    #[test]
    fn a_bare_key_is_borrowed_not_copied() {
        let value = &b"order-12345"[..];
        assert!(matches!(
            parse_key_ref(std::iter::once(value)),
            Ok(Some(Cow::Borrowed("order-12345")))
        ));
        assert!(matches!(
            parse_key_ref(std::iter::once(&b" order-12345 "[..])),
            Ok(Some(Cow::Borrowed("order-12345")))
        ));
    }
}
