//! `StoredOutcome::decode` of arbitrary stored bytes, and `encode`/`decode`
//! of arbitrary outcomes; sealed (encrypted) records: `open` of arbitrary
//! stored bytes, and `seal`→`encode`→`decode`→`open` of arbitrary outcomes,
//! with one byte changed or another record's id.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use idempotency_core::{DecryptError, EncryptionKeys, RecordId, StoredOutcome, StoredResponse};
use libfuzzer_sys::fuzz_target;

/// The keyring of every case: an old key and the current one.
fn keys() -> &'static EncryptionKeys {
    static KEYS: OnceLock<EncryptionKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        EncryptionKeys::new("old", [7; 32])
            .and_then(|k| k.rotate("fuzz", [9; 32]))
            .expect("keys")
    })
}

/// A sealing: which record, the outcome, and which byte of the sealed
/// record to change, how.
#[derive(Arbitrary, Debug)]
struct Sealing {
    record: [u8; 4],
    other: [u8; 4],
    at: u16,
    xor: u8,
    outcome: Outcome,
}

#[derive(Arbitrary, Debug)]
enum Outcome {
    Response {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    },
    NotReplayable(u16),
    Mark(u16),
}

impl Outcome {
    fn build(self) -> StoredOutcome {
        match self {
            Outcome::Response {
                status,
                headers,
                body,
            } => StoredOutcome::response(StoredResponse {
                status,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n.into(), Bytes::from(v)))
                    .collect(),
                body: body.into(),
            }),
            Outcome::NotReplayable(status) => StoredOutcome::NotReplayable { status },
            Outcome::Mark(code) => StoredOutcome::Mark(code),
        }
    }
}

fn is_auth_failure(e: &DecryptError) -> bool {
    matches!(
        e,
        DecryptError::NotAuthentic { .. } | DecryptError::UnknownKey { .. }
    )
}

fuzz_target!(|data: &[u8]| {
    // 1. Stored bytes: never a panic; what decodes is exactly one record, so
    //    it re-encodes to the input byte for byte, and decodes again to itself.
    if let Ok(outcome) = StoredOutcome::decode(Bytes::copy_from_slice(data)) {
        let encoded = outcome.encode();
        assert_eq!(encoded, data, "decode is not exact: {outcome:?}");
        let again = StoredOutcome::decode(Bytes::from(encoded)).expect("re-encoded record");
        assert_eq!(again, outcome);
    }

    // 2. The same bytes as an outcome: encode, then decode, is the identity.
    //    (Header names are below 64 KiB here, as libFuzzer's inputs are 4 KiB:
    //    a response with a longer one is not `is_encodable` and is stored as
    //    not replayable, which `record`'s unit tests check.)
    if let Ok(outcome) = Outcome::arbitrary_take_rest(Unstructured::new(data)) {
        let outcome = outcome.build();
        let encoded = outcome.encode();
        let decoded = StoredOutcome::decode(Bytes::from(encoded))
            .unwrap_or_else(|e| panic!("{outcome:?} does not decode: {e}"));
        assert_eq!(decoded, outcome);
    }

    // 3. Stored bytes opened as an encrypted record: never a panic; a
    //    sealed record that is not one of these keys' (no forgery) is an
    //    authentication failure, a response in clear is refused, and
    //    anything else in clear passes as it is.
    let id = RecordId::from_parts(b"fuzz", b"record");
    if let Ok(outcome) = StoredOutcome::decode(Bytes::copy_from_slice(data)) {
        match (keys().open(&id, outcome.clone()), &outcome) {
            (Err(e), StoredOutcome::Sealed(_)) => {
                assert!(
                    is_auth_failure(&e) || matches!(e, DecryptError::Decrypted(_)),
                    "{e}"
                )
            }
            (Ok(opened), StoredOutcome::Sealed(_)) => {
                // Only a seed sealed with these keys for this record.
                assert!(!matches!(opened, StoredOutcome::Sealed(_)));
            }
            (Err(e), StoredOutcome::Response(_)) => assert_eq!(e, DecryptError::Plaintext),
            (Ok(opened), clear) => assert_eq!(&opened, clear),
            (Err(e), clear) => panic!("{clear:?} in clear refused: {e}"),
        }
    }

    // 4. An outcome sealed for a record: stored and read back, it opens to
    //    itself for that record only; with any one byte changed it never
    //    opens to anything.
    if let Ok(case) = Sealing::arbitrary_take_rest(Unstructured::new(data)) {
        let outcome = case.outcome.build();
        let record = RecordId::from_parts(b"fuzz", &case.record);
        let sealed = keys().seal(&record, &outcome);
        let StoredOutcome::Sealed(s) = &sealed else {
            panic!("not sealed: {sealed:?}")
        };
        assert_eq!(s.key_id(), "fuzz");
        let encoded = sealed.encode();
        let stored = StoredOutcome::decode(Bytes::from(encoded.clone())).expect("a sealed record");
        assert_eq!(stored, sealed);
        assert_eq!(
            keys().open(&record, stored.clone()).expect("opens"),
            outcome
        );
        if case.other != case.record {
            let other = RecordId::from_parts(b"fuzz", &case.other);
            let e = keys()
                .open(&other, stored)
                .expect_err("opened for another record");
            assert!(is_auth_failure(&e), "{e}");
        }
        if case.xor != 0 {
            let mut changed = encoded;
            let at = usize::from(case.at) % changed.len();
            changed[at] ^= case.xor;
            if let Ok(changed) = StoredOutcome::decode(Bytes::from(changed)) {
                match keys().open(&record, changed.clone()) {
                    Err(_) => {}
                    // The kind byte changed into a record in clear.
                    Ok(opened) => assert!(
                        !matches!(changed, StoredOutcome::Sealed(_)) && opened == changed,
                        "byte {at} changed and it opened: {opened:?}"
                    ),
                }
            }
        }
    }
});
