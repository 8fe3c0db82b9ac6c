//! Embedded migrations, run the one way every SQL part of the workspace
//! runs them.
//!
//! - **PostgreSQL**: a part's tables live in a schema of its own, with its
//!   own `_sqlx_migrations`, so they never mix with the application's
//!   migrations. [`migrate_postgres`] takes one connection from the pool,
//!   holds a session advisory lock (one per schema, so instances starting
//!   at once take turns), creates the schema when missing, runs the
//!   migrations with the schema as the search path, resets it and unlocks.
//! - **SQLite**: one file, one `_sqlx_migrations` shared with the
//!   application's own migrator: a part's migration versions are dated far
//!   from a hand-numbered sequence, and versions the part does not know are
//!   ignored. [`migrate_sqlite`] retries (up to 6 times, backing off) an
//!   error that is not about the migration history: another process
//!   migrating the same file at once holds its lock, or did a step first.
//!
//! On an error, the PostgreSQL connection is closed, never returned to the
//! pool: its search path and its lock die with it. Migrations a newer
//! version of a part ran (on PostgreSQL) are refused with
//! `sqlx::Error::Migrate(VersionMissing)`.

#[cfg(any(feature = "postgres", feature = "sqlite"))]
use sqlx::migrate::Migrator;

/// A schema or table name this crate refuses: it must be a plain SQL
/// identifier (an ASCII letter or `_`, then letters, digits or `_`, at most
/// 63 bytes), so it can be spliced into statements safely.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a plain SQL identifier (a letter or `_`, then letters, digits or `_`, at most 63 bytes)")]
pub struct InvalidIdentifier(pub String);

/// Whether `name` is a plain SQL identifier (see [`InvalidIdentifier`]).
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// The advisory lock key of `schema`'s migrations (64-bit FNV-1a of its
/// name, tagged so it collides with no other lock of the workspace).
#[cfg(feature = "postgres")]
fn lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"migrate:".iter().chain(schema.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Runs `migrator` in `schema` (created when missing) on `pool`. Safe from
/// many instances at once.
///
/// # Errors
/// [`sqlx::Error::Configuration`] with [`InvalidIdentifier`] for a schema
/// that is not a plain identifier; the database's error; a migration error
/// (`sqlx::Error::Migrate`), including `VersionMissing` when a newer
/// version of the part migrated this schema.
#[cfg(feature = "postgres")]
pub async fn migrate_postgres(
    pool: &sqlx::PgPool,
    schema: &str,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    if !valid_identifier(schema) {
        return Err(sqlx::Error::Configuration(Box::new(InvalidIdentifier(
            schema.to_owned(),
        ))));
    }
    let mut conn = pool.acquire().await?;
    let result = async {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock_key(schema))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut *conn)
            .await?;
        // The migrator's bookkeeping table follows the search path.
        sqlx::query(&format!("SET search_path TO \"{schema}\""))
            .execute(&mut *conn)
            .await?;
        // `run_direct`: `run` makes this future not `Send` in generic contexts.
        migrator
            .run_direct(&mut *conn)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        sqlx::query("RESET search_path").execute(&mut *conn).await?;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key(schema))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        // Its search path or lock may be left behind: never pool it again.
        let _ = conn.close().await;
    }
    result
}

/// How many times [`migrate_sqlite`] tries while the file is locked.
#[cfg(feature = "sqlite")]
const SQLITE_ATTEMPTS: u32 = 6;

/// Runs `migrator` on `pool`, ignoring versions it does not know (the
/// application's own, or another part's), and retrying what may be a race
/// with another process migrating the same file.
///
/// # Errors
/// The last error: the database's, or a migration error
/// (`sqlx::Error::Migrate`).
#[cfg(feature = "sqlite")]
pub async fn migrate_sqlite(
    pool: &sqlx::SqlitePool,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    let migrator = Migrator {
        migrations: migrator.migrations.clone(),
        ignore_missing: true,
        locking: migrator.locking,
        no_tx: migrator.no_tx,
    };
    let mut attempt = 0;
    loop {
        match migrator.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = sqlx::Error::Migrate(Box::new(e));
                attempt += 1;
                if attempt >= SQLITE_ATTEMPTS || is_history(&e) {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
            }
        }
    }
}

/// Whether `e` is about the migration history itself (a version this
/// migrator does not know, a changed or failed migration): retrying cannot
/// help. Anything else may be a race with another process migrating the
/// same file (its lock, its version recorded first, its table created
/// first), which the next attempt sees as done.
#[cfg(feature = "sqlite")]
fn is_history(e: &sqlx::Error) -> bool {
    use sqlx::migrate::MigrateError;
    matches!(
        e,
        sqlx::Error::Migrate(m) if matches!(
            **m,
            MigrateError::VersionMissing(_)
                | MigrateError::VersionMismatch(_)
                | MigrateError::VersionTooOld(..)
                | MigrateError::VersionTooNew(..)
                | MigrateError::Dirty(_)
        )
    )
}

/// The database's own error in `e`, directly or inside a migration error.
#[cfg(feature = "sqlite")]
fn database_error(e: &sqlx::Error) -> Option<&dyn sqlx::error::DatabaseError> {
    match e {
        sqlx::Error::Migrate(m) => match &**m {
            sqlx::migrate::MigrateError::Execute(e)
            | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => e.as_database_error(),
            _ => None,
        },
        e => e.as_database_error(),
    }
}

/// Whether `e` is SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED` (any extended
/// code), directly or inside a migration error.
#[cfg(feature = "sqlite")]
pub fn is_locked(e: &sqlx::Error) -> bool {
    let Some(code) = database_error(e).and_then(|d| d.code()) else {
        return false;
    };
    matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain() {
        for ok in ["idempotency", "_t1", "A_b_9", &"a".repeat(63)] {
            assert!(valid_identifier(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a\"b", "a;drop", "é", &"a".repeat(64)] {
            assert!(!valid_identifier(bad), "{bad}");
        }
    }
}
