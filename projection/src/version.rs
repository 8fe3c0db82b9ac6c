//! A version of a projection, and where its tables live.

use std::fmt;
use std::sync::Arc;

/// The longest projection name: its versions' schemas, `<name>_v<version>`,
/// stay within PostgreSQL's 63 bytes.
pub const MAX_NAME_LEN: usize = 48;

/// One version of a projection: its name, its number, and the schema its
/// tables live in, `<name>_v<number>` (created by the projector before
/// [`Projection::setup`](crate::Projection::setup)). Versions of one
/// projection never share a table, so a new version builds while the old
/// one serves.
///
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version {
    name: Arc<str>,
    number: u32,
    schema: Arc<str>,
}

impl Version {
    /// Version `number` of the projection `name`: what a projector hands
    /// to [`Projection::apply`](crate::Projection::apply), made by hand (to
    /// test a projection's `apply`, or for a tool that reads a version's
    /// tables).
    ///
    /// # Panics
    /// When `name` is not a [`valid_name`] or `number` is 0.
    pub fn new(name: &str, number: u32) -> Self {
        assert!(valid_name(name), "`{name}` is not a projection name");
        assert!(number > 0, "versions count from 1");
        Self {
            name: name.into(),
            number,
            schema: format!("{name}_v{number}").into(),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version's number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The schema of its tables: `<name>_v<number>`, a plain identifier.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The qualified name of its table `table`, to splice into SQL:
    /// `<name>_v<number>.<table>`. `table` must be a plain lowercase
    /// identifier (it is spliced as is).
    ///
    /// # Panics
    /// When `table` is not one (a programming error, caught at the first
    /// call).
    pub fn table(&self, table: &str) -> String {
        assert!(
            valid_name(table),
            "`{table}` is not a plain lowercase SQL identifier"
        );
        format!("{}.{table}", self.schema)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.schema)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} version {}", self.name, self.number)
    }
}

/// Whether `name` is a plain lowercase SQL identifier of at most
/// [`MAX_NAME_LEN`] bytes: a lowercase ASCII letter or `_`, then lowercase
/// letters, digits or `_`. Projection names and table names must be.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_NAME_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_and_tables() {
        let v = Version::new("payment_totals", 2);
        assert_eq!(v.schema(), "payment_totals_v2");
        assert_eq!(v.table("totals"), "payment_totals_v2.totals");
        assert_eq!(v.to_string(), "payment_totals version 2");
        assert!(valid_name("a_1") && valid_name("_x"));
        for bad in ["", "1a", "A", "a-b", "a b", "a;drop", &"x".repeat(49)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    #[should_panic(expected = "not a plain lowercase")]
    fn a_table_name_is_checked() {
        let _ = Version::new("p", 1).table("totals; drop table x");
    }
}
