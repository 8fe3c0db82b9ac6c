//! The decoders of Redis's replies: the claim script's, and the native
//! claim's (`SET ... NX GET` and `PTTL`).

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use idempotency_core::{
    ClaimOutcome, CorruptRecord, Fingerprint, LeaseToken, StoreError, StoredOutcome,
};

use crate::store::BACKEND;

// A record is one string value:
//   in flight: 'i' .. fingerprint (32 bytes) .. token (16 bytes) .. x
//              ('w' instead of 'i' once a duplicate waits for it)
//   completed: 'c' .. fingerprint (32 bytes) .. encoded outcome
// where x (decimal ms) is how long an abandoned claim is kept after its
// lease. The key's own expiry is the clock: an in-flight key expires at lease
// end + x, so the lease remaining is `PTTL - x`; a completed key expires ttl
// after completion.

/// Where the token of an in-flight record starts, and where `x` starts.
const TOKEN_AT: usize = 33;
pub(crate) const KEEP_AT: usize = 49;

pub(crate) fn corrupt(what: &'static str) -> StoreError {
    StoreError::corrupt(BACKEND, CorruptRecord::new(what))
}

fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| corrupt("fingerprint is not 32 bytes"))?;
    Ok(Fingerprint::from_bytes(bytes))
}

/// Decodes the claim script's reply.
pub(crate) fn parse_claim(reply: Value, token: LeaseToken) -> Result<ClaimOutcome, StoreError> {
    match reply {
        Value::Int(1) => Ok(ClaimOutcome::Acquired(token)),
        Value::Array(items) => match items.as_slice() {
            [Value::BulkString(fp), Value::Int(ms)] => Ok(ClaimOutcome::InFlight {
                fingerprint: fingerprint(fp)?,
                lease_remaining: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
            }),
            _ => Err(corrupt("malformed in-flight reply")),
        },
        Value::BulkString(record) => parse_completed(record),
        _ => Err(corrupt("unexpected reply")),
    }
}

/// A completed record (`c` + fingerprint + outcome), or an error for
/// anything else.
fn parse_completed(record: Vec<u8>) -> Result<ClaimOutcome, StoreError> {
    match record.first() {
        Some(b'c') if record.len() >= 33 => {
            let fingerprint = fingerprint(&record[1..33])?;
            let outcome = Bytes::from(record).slice(33..);
            Ok(ClaimOutcome::Completed {
                fingerprint,
                outcome: StoredOutcome::decode(outcome)
                    .map_err(|e| StoreError::corrupt(BACKEND, e))?,
            })
        }
        _ => Err(corrupt("the key holds something this store did not write")),
    }
}

/// Decodes the native claim's replies: the key's previous value (`SET ...
/// NX GET`: nil when the claim was stored) and its `PTTL` just after.
/// `None` when the record is in flight past its lease under `mine` (a
/// takeover, for the claim script to decide).
pub(crate) fn parse_native(
    previous: Value,
    pttl: Value,
    mine: &Fingerprint,
    token: LeaseToken,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let record = match previous {
        Value::Nil => return Ok(Some(ClaimOutcome::Acquired(token))),
        Value::BulkString(record) => record,
        _ => return Err(corrupt("unexpected reply")),
    };
    if !matches!(record.first(), Some(b'i' | b'w')) {
        return parse_completed(record).map(Some);
    }
    let keep = std::str::from_utf8(record.get(KEEP_AT..).unwrap_or_default())
        .ok()
        .and_then(|x| x.parse::<i64>().ok())
        .filter(|_| record.len() > KEEP_AT)
        .ok_or_else(|| corrupt("the key holds something this store did not write"))?;
    let held = fingerprint(&record[1..TOKEN_AT])?;
    // -2: the key is gone since (released or expired); -1: it lost its
    // expiry. Both count as a passed lease, for the script to look at.
    let Value::Int(pttl) = pttl else {
        return Err(corrupt("unexpected PTTL reply"));
    };
    let remaining = pttl.saturating_sub(keep);
    if remaining > 0 || held != *mine {
        return Ok(Some(ClaimOutcome::InFlight {
            fingerprint: held,
            lease_remaining: Duration::from_millis(u64::try_from(remaining).unwrap_or(0)),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_replies_are_typed_errors() {
        let t = LeaseToken::random();
        for reply in [
            Value::Nil,
            Value::Int(0),
            Value::Array(vec![]),
            Value::Array(vec![Value::BulkString(vec![0; 32])]),
            Value::Array(vec![Value::BulkString(vec![0; 31]), Value::Int(5)]),
            Value::BulkString(vec![]),
            Value::BulkString(b"z".to_vec()),
            Value::BulkString(b"i-not-a-record".to_vec()),
            Value::BulkString([&b"c"[..], &[0; 31]].concat()),
            Value::BulkString([&b"c"[..], &[0; 32], &[9, 9]].concat()),
        ] {
            assert!(
                matches!(parse_claim(reply, t), Err(StoreError::Corrupt { .. })),
                "accepted a malformed reply"
            );
        }
    }

    #[test]
    fn well_formed_replies_parse() {
        let t = LeaseToken::random();
        assert!(matches!(
            parse_claim(Value::Int(1), t),
            Ok(ClaimOutcome::Acquired(got)) if got == t
        ));
        let in_flight = Value::Array(vec![Value::BulkString(vec![7; 32]), Value::Int(1500)]);
        assert!(matches!(
            parse_claim(in_flight, t),
            Ok(ClaimOutcome::InFlight { fingerprint, lease_remaining })
                if fingerprint == Fingerprint::from_bytes([7; 32])
                    && lease_remaining == Duration::from_millis(1500)
        ));
    }

    fn in_flight(fp: [u8; 32], keep: &str) -> Value {
        Value::BulkString([&b"i"[..], &fp, &[5; 16], keep.as_bytes()].concat())
    }

    #[test]
    fn native_replies_parse() {
        let t = LeaseToken::random();
        let mine = Fingerprint::from_bytes([7; 32]);
        assert!(matches!(
            parse_native(Value::Nil, Value::Int(-1), &mine, t),
            Ok(Some(ClaimOutcome::Acquired(got))) if got == t
        ));
        // In flight: the lease remaining is PTTL minus the time kept after it.
        assert!(matches!(
            parse_native(in_flight([7; 32], "60000"), Value::Int(61_500), &mine, t),
            Ok(Some(ClaimOutcome::InFlight { lease_remaining, .. }))
                if lease_remaining == Duration::from_millis(1500)
        ));
        // Past its lease: a takeover for the script, with the same fingerprint
        // (also when the key vanished since, -2, or lost its expiry, -1) ...
        for pttl in [60_000, 10, -1, -2] {
            assert!(matches!(
                parse_native(in_flight([7; 32], "60000"), Value::Int(pttl), &mine, t),
                Ok(None)
            ));
        }
        // ... and in flight for another request.
        assert!(matches!(
            parse_native(in_flight([8; 32], "60000"), Value::Int(10), &mine, t),
            Ok(Some(ClaimOutcome::InFlight { fingerprint, lease_remaining }))
                if fingerprint == Fingerprint::from_bytes([8; 32]) && lease_remaining.is_zero()
        ));
        let done = StoredOutcome::NotReplayable { status: 201 }.encode();
        let completed = Value::BulkString([&b"c"[..], &[7; 32], &done].concat());
        assert!(matches!(
            parse_native(completed, Value::Int(5), &mine, t),
            Ok(Some(ClaimOutcome::Completed { .. }))
        ));
    }

    #[test]
    fn malformed_native_replies_are_typed_errors() {
        let t = LeaseToken::random();
        let mine = Fingerprint::from_bytes([7; 32]);
        for (previous, pttl) in [
            (Value::Int(1), Value::Int(5)),
            (Value::Okay, Value::Int(5)),
            (Value::BulkString(vec![]), Value::Int(5)),
            (Value::BulkString(b"z".to_vec()), Value::Int(5)),
            (Value::BulkString(b"i-short".to_vec()), Value::Int(5)),
            (in_flight([7; 32], ""), Value::Int(5)),
            (in_flight([7; 32], "12x"), Value::Int(5)),
            (in_flight([7; 32], "100"), Value::Nil),
            (
                Value::BulkString([&b"c"[..], &[0; 31]].concat()),
                Value::Int(5),
            ),
        ] {
            assert!(
                matches!(
                    parse_native(previous, pttl, &mine, t),
                    Err(StoreError::Corrupt { .. })
                ),
                "accepted a malformed reply"
            );
        }
    }
}
