//! Parsing the `Idempotency-Key` request header.

use std::borrow::Cow;
use std::fmt;

/// The header that carries the client's key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest key accepted, in characters (a key is ASCII, so also in bytes).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1..=255 printable ASCII characters.
///
/// Both the draft's quoted Structured-Field string (`"abc"`) and Stripe's bare
/// form (`abc`) are accepted and mean the same key:
///
/// - a **bare** key is 1..=255 visible ASCII characters (`0x21..=0x7E`) other
///   than `"`, `,`, `;` and `\`: no spaces, no parameters, nothing that would
///   need quoting. Whitespace around the value is not part of the key.
/// - a **quoted** key is a Structured-Field string (RFC 9651 §3.3.3) without
///   parameters: 1..=255 printable ASCII characters (`0x20..=0x7E`, space,
///   `,`, `;` included) once `\"` and `\\` are unescaped.
///
/// A key with a space, `"`, `,`, `;` or `\` has to be sent quoted.
///
/// The characters are checked before the length, so a value with a character
/// outside its form's alphabet is [`KeyError::InvalidCharacter`] whatever its
/// length, and [`KeyError::TooLong`] counts characters. A comma outside a quoted
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
                validate(s.as_str().as_bytes(), is_quoted_key_char)?;
                Ok(Cow::Owned(s.into()))
            }
            _ => Err(KeyError::MalformedQuoted("not a string".into())),
        }
    } else {
        if value.contains(&b',') {
            return Err(KeyError::Multiple);
        }
        validate(value, is_bare_key_char)?;
        // Only ASCII passes `validate`.
        let s = std::str::from_utf8(value).map_err(|_| KeyError::InvalidCharacter)?;
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

/// A bare key's alphabet: visible ASCII except `"`, `,`, `;` and `\`.
const fn is_bare_key_char(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'"' | b',' | b';' | b'\\')
}

/// A quoted key's alphabet (unescaped): printable ASCII, space included.
const fn is_quoted_key_char(b: u8) -> bool {
    matches!(b, 0x20..=0x7e)
}

/// Checks the characters first and the length second: only ASCII passes the
/// first check, so the length in bytes is the length in characters.
fn validate(key: &[u8], allowed: fn(u8) -> bool) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if !key.iter().all(|&b| allowed(b)) {
        return Err(KeyError::InvalidCharacter);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(key.len()));
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
    /// The key has a character outside its form's alphabet: printable ASCII
    /// for a quoted key; visible ASCII except `"`, `,`, `;` and `\` (so no
    /// space either) for a bare one.
    #[error(
        "the Idempotency-Key may only contain printable ASCII characters, and an unquoted key no space, '\"', ',', ';' or '\\' (send such a key as a quoted string)"
    )]
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
    fn bare_alphabet_is_visible_ascii_without_separators() {
        for b in 0x21..=0x7eu8 {
            let value = [b'k', b, b'k'];
            let got = IdempotencyKey::parse(&value);
            match b {
                b',' => assert_eq!(got, Err(KeyError::Multiple)),
                b'"' | b';' | b'\\' => {
                    assert_eq!(got, Err(KeyError::InvalidCharacter), "{:?}", b as char);
                }
                _ => assert_eq!(got.unwrap().as_str().as_bytes(), value),
            }
        }
        for bad in [
            &b"a;p=1"[..],
            b"a b",
            b"a\tb",
            b"a\"b",
            b"a\\b",
            b"abc\"",
            b"a\x7f",
        ] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(KeyError::InvalidCharacter),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Surrounding whitespace is not part of the key.
        assert_eq!(IdempotencyKey::parse(b" \tabc \t").unwrap().as_str(), "abc");
        assert_eq!(
            KeyError::InvalidCharacter.to_string(),
            r#"the Idempotency-Key may only contain printable ASCII characters, and an unquoted key no space, '"', ',', ';' or '\' (send such a key as a quoted string)"#
        );
        // A quoted key keeps the whole printable range, space included.
        for (quoted, key) in [
            (&br#"" a;b ""#[..], " a;b "),
            (br#""a\\b""#, "a\\b"),
            (br#""~!""#, "~!"),
        ] {
            assert_eq!(IdempotencyKey::parse(quoted).unwrap().as_str(), key);
        }
    }

    #[test]
    fn characters_are_checked_before_the_length() {
        // 300 bytes, 150 characters: the problem is the characters, not the length.
        let non_ascii = "é".repeat(150);
        assert_eq!(
            IdempotencyKey::parse(non_ascii.as_bytes()),
            Err(KeyError::InvalidCharacter)
        );
        let long_and_bad = format!("{} x", "k".repeat(300));
        assert_eq!(
            IdempotencyKey::parse(long_and_bad.as_bytes()),
            Err(KeyError::InvalidCharacter)
        );
        let quoted = format!("\"{}\"", "k".repeat(256));
        assert_eq!(
            IdempotencyKey::parse(quoted.as_bytes()),
            Err(KeyError::TooLong(256))
        );
        assert_eq!(
            KeyError::TooLong(256).to_string(),
            "the Idempotency-Key is 256 characters long; at most 255 are allowed"
        );
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
