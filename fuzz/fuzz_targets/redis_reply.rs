//! The Redis store's reply decoders (private to `idempotency-redis`'s `reply` module) over
//! arbitrary `redis::Value`s: the claim script's reply, and the native
//! claim's (`SET ... NX GET`'s previous value and the `PTTL` after it).
//!
//! Input: byte 0 even = the script's reply, odd = the native claim's; then
//! one value (two for the native claim: previous, PTTL) in this format: a
//! tag byte, then
//! `0` nil; `1` an integer (8 bytes, big endian); `2` an integer (1 byte,
//! signed: the small ones, 1 among them); `3` a bulk string (2-byte big-endian
//! length, capped at what is left); `4` a bulk string that is the rest of the
//! input; `5` an array (count byte, mod 5, then the items); `6` a simple
//! string (like `3`, lossily UTF-8); `7` OK; `8` a double (8 bytes); `9` a
//! boolean (1 byte); `10` a map (count, then key/value pairs); `11` a set;
//! other tags are nil. Nesting stops at depth 4 (nil beyond).
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use idempotency_redis::__fuzz::{claim_reply as redis_claim_reply, native_reply as redis_native_reply, RedisValue as Value};
use idempotency_core::{ClaimOutcome, Fingerprint, LeaseToken, StoreError, StoredOutcome};
use libfuzzer_sys::fuzz_target;

/// Where the token starts in an in-flight record, and the kept time after it:
/// `i` .. fingerprint (32) .. token (16) .. decimal ms.
const TOKEN_AT: usize = 33;
const KEEP_AT: usize = 49;

fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(input.len());
    let (head, rest) = input.split_at(n);
    *input = rest;
    head
}

fn byte(input: &mut &[u8]) -> u8 {
    take(input, 1).first().copied().unwrap_or(0)
}

fn be8(input: &mut &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    let got = take(input, 8);
    out[..got.len()].copy_from_slice(got);
    out
}

fn bytes(input: &mut &[u8]) -> Vec<u8> {
    let len = u16::from_be_bytes([byte(input), byte(input)]);
    take(input, usize::from(len)).to_vec()
}

fn value(input: &mut &[u8], depth: u32) -> Value {
    if depth > 4 || input.is_empty() {
        return Value::Nil;
    }
    let items = |input: &mut &[u8]| {
        let n = byte(input) % 5;
        (0..n).map(|_| value(input, depth + 1)).collect::<Vec<_>>()
    };
    match byte(input) {
        1 => Value::Int(i64::from_be_bytes(be8(input))),
        2 => Value::Int(i64::from(byte(input) as i8)),
        3 => Value::BulkString(bytes(input)),
        4 => Value::BulkString(take(input, usize::MAX).to_vec()),
        5 => Value::Array(items(input)),
        6 => Value::SimpleString(String::from_utf8_lossy(&bytes(input)).into_owned()),
        7 => Value::Okay,
        8 => Value::Double(f64::from_be_bytes(be8(input))),
        9 => Value::Boolean(byte(input) & 1 == 1),
        10 => {
            let n = byte(input) % 5;
            Value::Map(
                (0..n)
                    .map(|_| (value(input, depth + 1), value(input, depth + 1)))
                    .collect(),
            )
        }
        11 => Value::Set(items(input)),
        _ => Value::Nil,
    }
}

fn assert_corrupt<T: std::fmt::Debug>(got: &Result<T, StoreError>, what: &str) {
    assert!(
        matches!(got, Err(StoreError::Corrupt { .. })),
        "{what}: {got:?}"
    );
}

/// A completed record: `c` .. fingerprint .. the stored outcome, exactly.
fn check_completed(record: &[u8], got: Result<ClaimOutcome, StoreError>) {
    let decodes = record.len() >= 33
        && record[0] == b'c'
        && StoredOutcome::decode(Bytes::copy_from_slice(&record[33..])).is_ok();
    match got {
        Ok(ClaimOutcome::Completed {
            fingerprint,
            outcome,
        }) => {
            assert!(decodes, "accepted {record:?}");
            let again = [&b"c"[..], fingerprint.as_bytes(), &outcome.encode()].concat();
            assert_eq!(
                again, record,
                "a completed record does not re-encode to itself"
            );
        }
        got => {
            assert!(!decodes, "refused a completed record: {got:?}");
            assert_corrupt(&got, "a record that is not one");
        }
    }
}

fn lease(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut input)) = data.split_first() else {
        return;
    };
    let token = LeaseToken::from_bytes([0x5a; 16]);
    let mine = Fingerprint::from_bytes([0x33; 32]);

    if mode & 1 == 0 {
        // The claim script's reply.
        let reply = value(&mut input, 0);
        let got = redis_claim_reply(reply.clone(), token);
        match reply {
            Value::Int(1) => {
                assert!(
                    matches!(got, Ok(ClaimOutcome::Acquired(t)) if t == token),
                    "{got:?}"
                )
            }
            Value::Array(items) => match (items.as_slice(), got) {
                (
                    [Value::BulkString(fp), Value::Int(ms)],
                    Ok(ClaimOutcome::InFlight {
                        fingerprint,
                        lease_remaining,
                    }),
                ) => {
                    assert_eq!(fingerprint.as_bytes(), fp.as_slice());
                    assert_eq!(lease_remaining, lease(*ms));
                }
                (_, got) => assert_corrupt(&got, "a malformed in-flight reply"),
            },
            Value::BulkString(record) => check_completed(&record, got),
            _ => assert_corrupt(&got, "an unexpected reply"),
        }
        return;
    }

    // The native claim's replies.
    let previous = value(&mut input, 0);
    let pttl = value(&mut input, 0);
    let got = redis_native_reply(previous.clone(), pttl.clone(), &mine, token);
    match previous {
        Value::Nil => {
            assert!(
                matches!(got, Ok(Some(ClaimOutcome::Acquired(t))) if t == token),
                "{got:?}"
            )
        }
        Value::BulkString(record) if matches!(record.first(), Some(b'i' | b'w')) => {
            let keep = std::str::from_utf8(record.get(KEEP_AT..).unwrap_or_default())
                .ok()
                .filter(|x| !x.is_empty())
                .and_then(|x| x.parse::<i64>().ok());
            match (keep, pttl, got) {
                (
                    Some(keep),
                    Value::Int(pttl),
                    Ok(Some(ClaimOutcome::InFlight {
                        fingerprint,
                        lease_remaining,
                    })),
                ) => {
                    let remaining = pttl.saturating_sub(keep);
                    assert_eq!(fingerprint.as_bytes(), &record[1..TOKEN_AT]);
                    assert!(remaining > 0 || fingerprint != mine);
                    assert_eq!(lease_remaining, lease(remaining));
                }
                (Some(keep), Value::Int(pttl), Ok(None)) => {
                    // Past its lease under this request's own fingerprint:
                    // the script decides the takeover.
                    assert!(pttl.saturating_sub(keep) <= 0);
                    assert_eq!(&record[1..TOKEN_AT], mine.as_bytes());
                }
                (Some(_), Value::Int(_), got) => panic!("an in-flight record: {got:?}"),
                (_, _, got) => assert_corrupt(&got, "a malformed in-flight record"),
            }
        }
        Value::BulkString(record) => check_completed(&record, got.map(|o| o.expect("an answer"))),
        _ => assert_corrupt(&got, "an unexpected previous value"),
    }
});
