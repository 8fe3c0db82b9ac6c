//! The key file: one key a line, `id:base64-of-32-bytes`, the last one
//! current; blank lines and lines starting with `#` are skipped.
//!
//! ```text
//! # idempotency record keys: the last line encrypts new records.
//! 2024-12:Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=
//! 2025-01:h5k2h7D3o3m0p6Lr1Oq4o7VdYp6f9rSg0xM2bA1cF3E=
//! ```
//!
//! A key is 32 random bytes in standard base64 with padding, as
//! `openssl rand -base64 32` (or `head -c 32 /dev/urandom | base64`) prints.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use zeroize::{Zeroize, Zeroizing};

use super::{EncryptionKeys, KEY_LEN};

/// Why a key, or a key file, was refused. Never quotes a key; quotes an id
/// only once it is known to be one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncryptionKeyError {
    /// The key file could not be read.
    #[error("cannot read the key file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no key (only blank lines and comments, or nothing).
    #[error("the key file holds no key: write one line `id:base64-of-32-bytes` a key (the last one encrypts new records; `#` starts a comment line)")]
    NoKey,
    /// A line that is neither blank, a comment, nor `id:key`.
    #[error("line {line}: expected `id:base64-of-32-bytes`, found no `:`")]
    MissingSeparator {
        /// The line, from 1.
        line: usize,
    },
    /// An id that is empty, too long, or has a character other than an
    /// ASCII letter, a digit, `-`, `_` or `.`. (Not quoted: a line written
    /// the wrong way round would put a key there.)
    #[error("{}the key id {why} (an id is 1 to 32 ASCII letters, digits, `-`, `_` or `.`, before the `:`)", At(*line))]
    BadId {
        /// The line, from 1, when read from a file.
        line: Option<usize>,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key that is not base64.
    #[error("{}key `{id}` is not base64 (the standard alphabet with `=` padding, as `openssl rand -base64 32` prints)", At(*line))]
    BadBase64 {
        /// The line, from 1.
        line: Option<usize>,
        /// The key's id.
        id: String,
    },
    /// A key that is not 32 bytes long.
    #[error("{}key `{id}` is {len} bytes long; AES-256 takes exactly 32 (`openssl rand -base64 32` makes one)", At(*line))]
    WrongLength {
        /// The line, from 1.
        line: Option<usize>,
        /// The key's id.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Two keys under one id: a record names its key by id, so ids are unique.
    #[error("{}key id `{id}` is used twice; every key needs an id of its own", At(*line))]
    DuplicateId {
        /// The line of the second one, from 1.
        line: Option<usize>,
        /// The id.
        id: String,
    },
}

/// `line N: `, or nothing for a key given in code.
struct At(Option<usize>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, "line {line}: "),
            None => Ok(()),
        }
    }
}

impl EncryptionKeys {
    /// Reads a key file: one key a line, `id:base64-of-32-bytes`, the last
    /// one current; blank lines and lines starting with `#` are skipped,
    /// spaces around the id and the key are too. Its text and the decoded
    /// keys are wiped from memory once the ciphers are set up. Keep the file
    /// readable by the service alone (`chmod 600`).
    ///
    /// ```text
    /// # the last line encrypts new records
    /// 2024-12:Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=
    /// 2025-01:h5k2h7D3o3m0p6Lr1Oq4o7VdYp6f9rSg0xM2bA1cF3E=
    /// ```
    ///
    /// # Errors
    /// [`EncryptionKeyError::Read`] when the file cannot be read; otherwise as
    /// [`parse_key_file`](Self::parse_key_file).
    pub fn from_key_file(path: impl AsRef<Path>) -> Result<Self, EncryptionKeyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| EncryptionKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_key_file(&Zeroizing::new(text))
    }

    /// Parses the text of a key file (see
    /// [`from_key_file`](Self::from_key_file)). Also `text.parse()`.
    ///
    /// # Errors
    /// The first line that is wrong, with its number:
    /// [`EncryptionKeyError::MissingSeparator`], [`EncryptionKeyError::BadId`],
    /// [`EncryptionKeyError::BadBase64`], [`EncryptionKeyError::WrongLength`],
    /// [`EncryptionKeyError::DuplicateId`]; [`EncryptionKeyError::NoKey`] for a file without a key.
    pub fn parse_key_file(text: &str) -> Result<Self, EncryptionKeyError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut keys: Option<Self> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, encoded) = line
                .split_once(':')
                .ok_or(EncryptionKeyError::MissingSeparator { line: n })?;
            let (id, encoded) = (id.trim(), encoded.trim());
            super::check_key_id(id)
                .map_err(|why| EncryptionKeyError::BadId { line: Some(n), why })?;
            let decoded = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| EncryptionKeyError::BadBase64 {
                        line: Some(n),
                        id: id.to_owned(),
                    })?,
            );
            let mut key: [u8; KEY_LEN] =
                decoded
                    .as_slice()
                    .try_into()
                    .map_err(|_| EncryptionKeyError::WrongLength {
                        line: Some(n),
                        id: id.to_owned(),
                        len: decoded.len(),
                    })?;
            let added = match &mut keys {
                Some(keys) => keys.push(id, &key, Some(n)),
                None => Self::new(id, key).map(|first| keys = Some(first)),
            };
            key.zeroize();
            added?;
        }
        keys.ok_or(EncryptionKeyError::NoKey)
    }
}

impl std::str::FromStr for EncryptionKeys {
    type Err = EncryptionKeyError;

    /// [`EncryptionKeys::parse_key_file`].
    fn from_str(text: &str) -> Result<Self, EncryptionKeyError> {
        Self::parse_key_file(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "Sx7xzRqpmi+X1Ia0I2aElDXU7Nm7XcV6rJ4gwrEtkGg=";
    const K2: &str = "h5k2h7D3o3m0p6Lr1Oq4o7VdYp6f9rSg0xM2bA1cF3E=";

    fn parse(text: &str) -> Result<EncryptionKeys, EncryptionKeyError> {
        text.parse()
    }

    #[test]
    fn the_last_key_is_current_and_comments_and_blanks_are_skipped() {
        let text = format!(
            "\u{feff}# the record keys\n\n  old : {K1}  \r\n# rotated on 2025-01-31\n2025-01.b_x:{K2}\n\n"
        );
        let keys = parse(&text).unwrap();
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["old", "2025-01.b_x"]);
        assert_eq!(keys.current_id(), "2025-01.b_x");
        let one = parse(&format!("only:{K1}")).unwrap();
        assert_eq!(one.current_id(), "only");
    }

    #[test]
    fn the_same_bytes_give_the_same_key() {
        // A record sealed with a key given in code opens with the same key
        // read from a file.
        let from_file = parse(&format!("k:{K1}")).unwrap();
        let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(K1)
            .unwrap()
            .try_into()
            .unwrap();
        let in_code = EncryptionKeys::new("k", bytes).unwrap();
        let id = crate::RecordId::from_parts(b"s", b"k");
        let sealed = in_code.seal(&id, &crate::StoredOutcome::Mark(3));
        assert_eq!(
            from_file.open(&id, sealed).unwrap(),
            crate::StoredOutcome::Mark(3)
        );
    }

    #[test]
    fn an_empty_file_has_no_key() {
        for text in ["", "\n\n", "# only a comment\n   \n#another"] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, EncryptionKeyError::NoKey), "{text:?}: {e:?}");
        }
        assert_eq!(
            parse("").unwrap_err().to_string(),
            "the key file holds no key: write one line `id:base64-of-32-bytes` a key (the last one encrypts new records; `#` starts a comment line)"
        );
    }

    #[test]
    fn a_key_of_the_wrong_length_says_its_length() {
        let e = parse(&format!("a:{K1}\n# c\nshort:AAAAAAAAAAAAAAAAAAAAAA==\n")).unwrap_err();
        assert!(
            matches!(&e, EncryptionKeyError::WrongLength { line: Some(3), id, len: 16 } if id == "short"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "line 3: key `short` is 16 bytes long; AES-256 takes exactly 32 (`openssl rand -base64 32` makes one)"
        );
        let long = format!("long:{}", "A".repeat(64));
        assert!(matches!(
            parse(&long).unwrap_err(),
            EncryptionKeyError::WrongLength { len: 48, .. }
        ));
        assert!(matches!(
            parse("empty:").unwrap_err(),
            EncryptionKeyError::WrongLength { len: 0, .. }
        ));
    }

    #[test]
    fn a_bad_id_is_refused_without_quoting_it() {
        for (text, why) in [
            (format!(":{K1}"), "is empty"),
            (
                format!("{}:{K1}", "a".repeat(33)),
                "is longer than 32 bytes",
            ),
            (format!("my key:{K1}"), "has a character"),
            (format!("ключ:{K1}"), "has a character"),
            // Written the wrong way round: the key is where the id goes.
            (format!("{K1}:k1"), "is longer than 32 bytes"),
            (format!("{}:k1", &K1[..20]), "has a character"),
            // The same, unpadded, of letters and digits only (found by
            // fuzzing, when ids could be 64 bytes long: it was quoted).
            (
                format!("{}:k1", K2.trim_end_matches('=')),
                "is longer than 32 bytes",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(
                matches!(&e, EncryptionKeyError::BadId { line: Some(1), why: w } if w.starts_with(why)),
                "{text}: {e:?}"
            );
            let message = e.to_string();
            assert!(message.starts_with("line 1: the key id "), "{message}");
            assert!(
                !message.contains(&K1[..10]) && !message.contains(&K2[..10]),
                "a key was quoted: {message}"
            );
        }
        assert!(EncryptionKeys::new("", [0; 32]).is_err());
        assert_eq!(
            EncryptionKeys::new("a b", [0; 32]).unwrap_err().to_string(),
            "the key id has a character other than an ASCII letter, a digit, `-`, `_` or `.` (an id is 1 to 32 ASCII letters, digits, `-`, `_` or `.`, before the `:`)"
        );
    }

    #[test]
    fn bad_base64_a_missing_colon_and_a_duplicate_id_say_their_line() {
        let e = parse(&format!("a:{K1}\nb:not base64!\n")).unwrap_err();
        assert!(
            matches!(&e, EncryptionKeyError::BadBase64 { line: Some(2), id } if id == "b"),
            "{e:?}"
        );
        assert!(!e.to_string().contains("not base64!"), "{e}");
        // Unpadded base64 is refused too: one form, as the tools print it.
        let unpadded = K1.trim_end_matches('=');
        assert!(matches!(
            parse(&format!("a:{unpadded}")).unwrap_err(),
            EncryptionKeyError::BadBase64 { .. }
        ));

        let e = parse(&format!("\n{K1}\n")).unwrap_err();
        assert!(
            matches!(e, EncryptionKeyError::MissingSeparator { line: 2 }),
            "{e:?}"
        );
        assert!(!e.to_string().contains(&K1[..10]), "{e}");

        let e = parse(&format!("a:{K1}\nb:{K2}\na:{K2}\n")).unwrap_err();
        assert!(
            matches!(&e, EncryptionKeyError::DuplicateId { line: Some(3), id } if id == "a"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "line 3: key id `a` is used twice; every key needs an id of its own"
        );
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let path = std::env::temp_dir().join(format!("no-such-key-file-{}", rand::random::<u64>()));
        let e = EncryptionKeys::from_key_file(&path).unwrap_err();
        assert!(
            matches!(&e, EncryptionKeyError::Read { path: p, .. } if *p == path),
            "{e:?}"
        );
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    }

    #[test]
    fn a_key_file_is_read_from_disk() {
        let path = std::env::temp_dir().join(format!("key-file-{}", rand::random::<u64>()));
        std::fs::write(&path, format!("# keys\nk1:{K1}\nk2:{K2}\n")).unwrap();
        let keys = EncryptionKeys::from_key_file(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(keys.unwrap().current_id(), "k2");
    }
}
