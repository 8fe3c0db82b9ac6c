//! The SQL stores' row decoding (`idempotency-sqlx`'s `SqlStore::existing`, shared by
//! PostgreSQL and SQLite) over arbitrary column values, without a database.
//!
//! Input: byte 0 bit 0 set = the `outcome` column is not NULL; byte 1 = the
//! `fingerprint` column's length; bytes 2..10 = `remaining` (i64, big
//! endian); then the fingerprint's bytes; the rest is the `outcome` column.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use idempotency_sqlx::__fuzz::sql_existing;
use idempotency_core::{ClaimOutcome, StoreError, StoredOutcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [flags, fp_len, rest @ ..] = data else {
        return;
    };
    let Some((remaining, rest)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let remaining = i64::from_be_bytes(*remaining);
    let fp_len = usize::from(*fp_len).min(rest.len());
    let (fingerprint, outcome) = rest.split_at(fp_len);
    let outcome = (flags & 1 == 1).then(|| outcome.to_vec());

    let got = sql_existing(fingerprint.to_vec(), outcome.clone(), remaining);

    // Only a corrupt record is an error here (no database to fail).
    if let Err(e) = &got {
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    }
    if fingerprint.len() != 32 {
        assert!(
            got.is_err(),
            "a {}-byte fingerprint was accepted",
            fingerprint.len()
        );
        return;
    }
    match (got, outcome) {
        (
            Ok(ClaimOutcome::InFlight {
                fingerprint: fp,
                lease_remaining,
            }),
            None,
        ) => {
            assert_eq!(fp.as_bytes(), fingerprint);
            let ms = u64::try_from(remaining).unwrap_or(0);
            assert_eq!(lease_remaining, Duration::from_millis(ms));
        }
        (
            Ok(ClaimOutcome::Completed {
                fingerprint: fp,
                outcome,
            }),
            Some(bytes),
        ) => {
            assert_eq!(fp.as_bytes(), fingerprint);
            // What decodes is exactly the stored bytes.
            assert_eq!(outcome.encode(), bytes, "{outcome:?}");
        }
        (Err(_), Some(bytes)) => {
            assert!(
                StoredOutcome::decode(Bytes::from(bytes)).is_err(),
                "a record that decodes was refused"
            );
        }
        (got, outcome) => panic!("{got:?} for a row with outcome {outcome:?}"),
    }
});
