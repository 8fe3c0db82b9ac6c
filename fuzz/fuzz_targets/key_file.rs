//! `EncryptionKeys::parse_key_file` of arbitrary text: never a panic; a
//! keyring read has valid, distinct ids, the last one current; an error
//! never quotes a key (no base64 run of 43 characters or more in its message, padded or not: ids are at most 32).
#![no_main]

use idempotency_core::EncryptionKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match EncryptionKeys::parse_key_file(text) {
        Ok(keys) => {
            let ids: Vec<&str> = keys.ids().collect();
            assert!(!ids.is_empty());
            assert_eq!(Some(&keys.current_id()), ids.last());
            for (i, id) in ids.iter().enumerate() {
                assert!((1..=32).contains(&id.len()), "{id:?}");
                assert!(
                    id.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                    "{id:?}"
                );
                assert!(!ids[..i].contains(id), "{id} twice");
                // Every id names a line `id:...` of the text.
                assert!(text.contains(id));
            }
        }
        Err(e) => {
            let message = e.to_string();
            let longest_base64_run = message
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
                .map(str::len)
                .max()
                .unwrap_or(0);
            assert!(longest_base64_run < 43, "a key may be quoted: {message}");
        }
    }
});
