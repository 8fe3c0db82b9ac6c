//! `Idempotency-Key` parsing on arbitrary bytes.
//!
//! The input is split on `\n` (which no header value can hold) into 1–3
//! header values, so one run exercises both `parse_key` over the field's
//! values (several fields are `Multiple`) and `IdempotencyKey::parse` of each.
#![no_main]

use idempotency_core::{parse_key, MAX_KEY_LEN};
use idempotency_core::{IdempotencyKey, KeyError};
use libfuzzer_sys::fuzz_target;

const SEPARATOR: u8 = b'\n';

fn is_bare_char(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'"' | b',' | b';' | b'\\')
}

fn is_printable(b: u8) -> bool {
    matches!(b, 0x20..=0x7e)
}

/// `s` as a Structured-Field string: quoted, `"` and `\` escaped.
fn quote(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
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

fn check_value(value: &[u8]) {
    let parsed = IdempotencyKey::parse(value);
    match &parsed {
        Ok(key) => {
            let k = key.as_str().as_bytes();
            assert!(
                (1..=MAX_KEY_LEN).contains(&k.len()),
                "accepted a key of {} bytes from {value:?}",
                k.len()
            );
            assert!(
                k.iter().all(|&b| is_printable(b)),
                "accepted a non-printable key {k:?} from {value:?}"
            );
            // Quoted, it is always the same key.
            assert_eq!(
                IdempotencyKey::parse(&quote(k)).as_ref(),
                Ok(key),
                "the quoted form of {k:?} (from {value:?}) is not the same key"
            );
            // Bare, when it can be sent bare.
            if k.iter().all(|&b| is_bare_char(b)) {
                assert_eq!(
                    IdempotencyKey::parse(k).as_ref(),
                    Ok(key),
                    "the bare form of {k:?} (from {value:?}) is not the same key"
                );
            }
            // Whitespace around the value is not part of the key.
            let mut padded = b" \t".to_vec();
            padded.extend_from_slice(value);
            padded.extend_from_slice(b"\t ");
            assert_eq!(IdempotencyKey::parse(&padded).as_ref(), Ok(key));
            // A value that is not quoted is the key itself.
            let trimmed = trim_ows(value);
            if trimmed.first() != Some(&b'"') {
                assert_eq!(k, trimmed, "a bare value was changed");
            }
        }
        Err(KeyError::TooLong(n)) => assert!(*n > MAX_KEY_LEN, "TooLong({n}) for {value:?}"),
        Err(KeyError::Missing) => panic!("IdempotencyKey::parse said Missing for {value:?}"),
        Err(_) => {}
    }

    // The other direction: every string of the alphabet is accepted.
    if (1..=MAX_KEY_LEN).contains(&value.len()) && value.iter().all(|&b| is_printable(b)) {
        let quoted = IdempotencyKey::parse(&quote(value))
            .unwrap_or_else(|e| panic!("quoted {value:?} was refused: {e}"));
        assert_eq!(quoted.as_str().as_bytes(), value);
        if value.iter().all(|&b| is_bare_char(b)) {
            let bare = IdempotencyKey::parse(value)
                .unwrap_or_else(|e| panic!("bare {value:?} was refused: {e}"));
            assert_eq!(bare, quoted);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = data.splitn(3, |&b| b == SEPARATOR).collect();

    let all = parse_key(values.iter().copied());
    match values.as_slice() {
        [] => unreachable!("splitn yields at least one piece"),
        [one] => assert_eq!(all, IdempotencyKey::parse(one).map(Some)),
        _ => assert_eq!(all, Err(KeyError::Multiple)),
    }
    assert_eq!(parse_key(std::iter::empty()), Ok(None));

    for value in &values {
        check_value(value);
    }
});
