//! The outbox relays' row decoding (`Event::from_row`, shared by the
//! PostgreSQL and the SQLite relay) over arbitrary column values.
//!
//! Input: the columns separated by `0x00` (which no TEXT column holds):
//! `id`, `destination`, `ordering_key` (empty: NULL, otherwise the value
//! after its first byte), `headers` (JSON), then the rest is `payload`. The
//! text columns must be UTF-8 (the database's TEXT), else the input is
//! skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox::__fuzz::{event_from_row, event_to_row};
use outbox::{OutboxError, Uuid};

fuzz_target!(|data: &[u8]| {
    let mut columns = data.splitn(5, |&b| b == 0);
    let (Some(id), Some(destination), Some(ordering_key), Some(headers)) = (
        columns.next(),
        columns.next(),
        columns.next(),
        columns.next(),
    ) else {
        return;
    };
    let payload = columns.next().unwrap_or_default().to_vec();
    let (Ok(id), Ok(destination), Ok(ordering_key), Ok(headers)) = (
        std::str::from_utf8(id),
        std::str::from_utf8(destination),
        std::str::from_utf8(ordering_key),
        std::str::from_utf8(headers),
    ) else {
        return;
    };
    let ordering_key = ordering_key
        .char_indices()
        .nth(1)
        .map(|(at, _)| ordering_key[at..].to_owned())
        .or_else(|| (!ordering_key.is_empty()).then(String::new));
    let parsed_headers = serde_json::from_str::<Vec<(String, String)>>(headers);

    match event_from_row(
        id,
        destination.to_owned(),
        ordering_key.clone(),
        headers,
        payload.clone(),
    ) {
        Ok(event) => {
            // The columns as they were.
            assert_eq!(Ok(event.id()), Uuid::parse_str(id));
            assert_eq!(event.destination(), destination);
            assert_eq!(event.ordering_key(), ordering_key.as_deref());
            assert_eq!(
                event.headers(),
                parsed_headers.expect("headers accepted").as_slice()
            );
            assert_eq!(event.payload().as_ref(), payload.as_slice());
            // What enqueue would write for it reads back as the same event.
            let (id2, destination2, key2, headers2, payload2) = event_to_row(&event);
            let again = event_from_row(&id2, destination2, key2, &headers2, payload2)
                .expect("a re-encoded row");
            assert_eq!(again, event);
            // Re-encoding is stable: enqueue's own form is a fixed point.
            let (id3, _, _, headers3, _) = event_to_row(&again);
            assert_eq!((id3, headers3), (id2, headers2));
        }
        Err(OutboxError::Corrupt(_)) => {
            assert!(
                Uuid::parse_str(id).is_err() || parsed_headers.is_err(),
                "a valid row was refused"
            );
        }
        Err(e) => panic!("not a corrupt-row error: {e:?}"),
    }
});
