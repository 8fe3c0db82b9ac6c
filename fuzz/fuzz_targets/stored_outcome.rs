//! `StoredOutcome::decode` of arbitrary stored bytes, and `encode`/`decode`
//! of arbitrary outcomes.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use idempotency_core::{StoredOutcome, StoredResponse};
use libfuzzer_sys::fuzz_target;

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
});
