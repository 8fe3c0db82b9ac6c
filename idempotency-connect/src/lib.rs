//! A store for idempotent HTTP APIs from a URL, for services that choose
//! their store at run time (a flag, an environment variable):
//!
//! | URL | store | feature |
//! |---|---|---|
//! | `memory` | [`MemoryStore`] | always |
//! | `sqlite://PATH`, `sqlite:///ABSOLUTE/PATH` | [`SqliteStore`](stores::SqliteStore) | `sqlite` |
//! | `redis://...`, `rediss://...` | [`RedisStore`](stores::RedisStore) | `redis` |
//! | `redis+cluster://HOST:PORT[,HOST:PORT...]` | [`RedisStore`](stores::RedisStore) on a Redis Cluster | `redis` |
//! | `postgres://...`, `postgresql://...` | [`PostgresStore`](stores::PostgresStore) | `postgres` |
//!
//! The adapters (`idempotency-tower`, `idempotency-actix`) re-export
//! [`connect`] and [`stores`] and forward these features, so a service needs
//! one dependency line.
//!
//! # Quick start
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idempotency_core::{Idempotency, IdempotencyConfig};
//!
//! let url = std::env::var("STORE").unwrap_or_else(|_| "memory".into());
//! let store = idempotency_connect::connect(&url).await?;
//! let engine = Idempotency::from_arc(store, IdempotencyConfig::default());
//! # let _ = engine;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! [`connect`] adds none of its own: each store keeps the contract its crate
//! documents (concurrency, crashes, outages). It refuses what would start a
//! store that cannot keep it: an unknown scheme, a store whose feature is
//! off, a SQLite URL that names no file or an in-memory database (records
//! lost, or never shared, while it serves). Passwords never reach its
//! errors.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::sync::Arc;

use idempotency_core::{MemoryStore, Store, StoreError};

/// Every store of the workspace whose feature is on, in one place.
pub mod stores {
    pub use idempotency_core::MemoryStore;
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub use idempotency_redis::RedisStore;
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub use idempotency_sqlx::{
        postgres::{PostgresOptions, PostgresStore},
        PostgresTransaction,
    };
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub use idempotency_sqlx::{
        sqlite::{SqliteOptions, SqliteStore},
        SqliteTransaction,
    };
}

/// Why [`connect`] could not build a store from a URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL names no store this crate knows.
    #[error("unknown store URL `{url}`: use `memory`, `sqlite://PATH`, `redis://HOST:PORT`, `redis+cluster://HOST:PORT[,HOST:PORT...]` or `postgres://USER@HOST/DB`")]
    UnknownScheme {
        /// The URL, with any password removed.
        url: String,
    },
    /// A `sqlite:` URL without a file (`sqlite://`, `sqlite:`). SQLite would
    /// open a new, empty, private in-memory database for each pooled
    /// connection, so the store would start and then fail every request.
    #[error("the store URL `{url}` names no SQLite file: write `sqlite://PATH` with a relative path (e.g. `sqlite://payments.sqlite`) or `sqlite:///PATH` with an absolute one")]
    MissingPath {
        /// The URL, with any password removed.
        url: String,
    },
    /// A `sqlite:` URL of an in-memory database (`sqlite::memory:`,
    /// `sqlite://:memory:`, `mode=memory`): it lives only as long as the
    /// pool keeps a connection open (a private-cache one per connection),
    /// so records would vanish, or never be shared, while the store serves.
    #[error("the store URL `{url}` names an in-memory SQLite database, which lasts only while the pool holds its connections: use `memory` for records in this process, or a file such as `sqlite://payments.sqlite`")]
    InMemory {
        /// The URL, with any password removed.
        url: String,
    },
    /// The URL names a store whose cargo feature is not enabled.
    #[error("the store URL `{scheme}` needs the `{feature}` feature (of idempotency-connect, or of the adapter: idempotency-tower, idempotency-actix)")]
    FeatureDisabled {
        /// The URL's scheme (`redis`, `postgres`, `sqlite`).
        scheme: &'static str,
        /// The feature to enable.
        feature: &'static str,
    },
    /// The store could not connect (or migrate).
    #[error("could not connect the {backend} store")]
    Store {
        /// Which store.
        backend: &'static str,
        /// What failed.
        #[source]
        source: StoreError,
    },
}

/// Connects the store named by `url`:
///
/// - `memory`: a [`MemoryStore`] of the default capacity;
/// - `sqlite://PATH` (relative), `sqlite:///PATH` (absolute): a
///   [`SqliteStore`](stores::SqliteStore) (feature `sqlite`), the file created
///   and migrated when needed;
/// - `redis://...`, `rediss://...`: a [`RedisStore`](stores::RedisStore)
///   (feature `redis`), scripts loaded;
/// - `redis+cluster://HOST:PORT[,HOST:PORT...]`: a
///   [`RedisStore`](stores::RedisStore) on a Redis Cluster (feature `redis`),
///   from its seed nodes; a list without a usable node is refused with a
///   [`StoreError::Config`] that says what is wrong;
/// - `postgres://...`, `postgresql://...`: a
///   [`PostgresStore`](stores::PostgresStore) (feature `postgres`), schema
///   `idempotency`, migrated.
///
/// A `sqlite:` URL must name a file: `sqlite://`, `sqlite:` and in-memory
/// databases (`sqlite::memory:`, `mode=memory`) are refused, since each would
/// start a store that loses its records (or never shares them) while it
/// serves; use `memory` for an in-process store.
///
/// # Errors
/// [`ConnectError::UnknownScheme`], [`ConnectError::MissingPath`] and
/// [`ConnectError::InMemory`] for a `sqlite:` URL without a file,
/// [`ConnectError::FeatureDisabled`] when the scheme's feature is off, and
/// [`ConnectError::Store`] when the store cannot connect.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, ConnectError> {
    let url = url.trim();
    let scheme = match url.split_once(':') {
        _ if url == "memory" || url == "memory://" => "memory",
        Some(("sqlite", rest)) => {
            sqlite_file(url, rest)?;
            "sqlite"
        }
        Some(("redis" | "rediss", _)) => "redis",
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("redis+cluster") => "redis",
        Some(("postgres" | "postgresql", _)) => "postgres",
        _ => {
            return Err(ConnectError::UnknownScheme {
                url: idempotency_core::redact(url),
            })
        }
    };
    let store: Arc<dyn Store> =
        match scheme {
            #[cfg(feature = "sqlite")]
            "sqlite" => Arc::new(stores::SqliteStore::connect(url).await.map_err(|source| {
                ConnectError::Store {
                    backend: "sqlite",
                    source,
                }
            })?),
            #[cfg(feature = "redis")]
            "redis" => Arc::new(stores::RedisStore::connect(url).await.map_err(|source| {
                ConnectError::Store {
                    backend: "redis",
                    source,
                }
            })?),
            #[cfg(feature = "postgres")]
            "postgres" => Arc::new(stores::PostgresStore::connect(url).await.map_err(
                |source| ConnectError::Store {
                    backend: "postgres",
                    source,
                },
            )?),
            "memory" => Arc::new(MemoryStore::new()),
            other => {
                return Err(ConnectError::FeatureDisabled {
                    scheme: other,
                    feature: other,
                })
            }
        };
    Ok(store)
}

/// Refuses a `sqlite:` URL (`rest` is what follows `sqlite:`) that names no
/// file, or an in-memory database.
fn sqlite_file(url: &str, rest: &str) -> Result<(), ConnectError> {
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = database == ":memory:"
        || database.starts_with("file::memory:")
        || params
            .split('&')
            .any(|pair| pair.trim().eq_ignore_ascii_case("mode=memory"));
    if in_memory {
        return Err(ConnectError::InMemory {
            url: idempotency_core::redact(url),
        });
    }
    if database.trim().is_empty() || database == "/" {
        return Err(ConnectError::MissingPath {
            url: idempotency_core::redact(url),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_schemes_are_typed_errors() {
        for url in ["", "mysql://u:pw@h/db", "file:/x", "memoryx"] {
            let err = connect(url).await.err().expect(url);
            assert!(matches!(err, ConnectError::UnknownScheme { .. }), "{url}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
        let memory = connect("memory").await.expect("memory");
        assert_eq!(memory.backend(), "memory");
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_sqlite_url_without_a_file_is_refused() {
        for url in [
            "sqlite://",
            "sqlite:",
            " sqlite:// ",
            "sqlite:///",
            "sqlite://?mode=rwc",
        ] {
            let err = connect(url).await.err().expect(url);
            assert!(
                matches!(err, ConnectError::MissingPath { .. }),
                "{url}: {err}"
            );
            assert!(
                err.to_string().contains("sqlite://payments.sqlite"),
                "{err}"
            );
        }
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://?mode=memory",
            "sqlite://a.db?mode=memory&cache=shared",
            "sqlite://file::memory:?cache=shared",
        ] {
            let err = connect(url).await.err().expect(url);
            assert!(matches!(err, ConnectError::InMemory { .. }), "{url}: {err}");
            assert!(err.to_string().contains("use `memory`"), "{err}");
        }
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_sqlite_url_with_a_file_connects() {
        let dir = std::env::temp_dir().join(format!(
            "idempotency-connect-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("records.sqlite").display());
        let store = connect(&url).await.expect(&url);
        assert_eq!(store.backend(), "sqlite");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn a_disabled_feature_is_named() {
        let err = connect("redis://127.0.0.1").await.err().expect("redis");
        assert!(
            matches!(
                err,
                ConnectError::FeatureDisabled {
                    feature: "redis",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`redis` feature"), "{err}");
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn a_disabled_postgres_feature_is_named() {
        let err = connect("postgres://h/db").await.err().expect("postgres");
        assert!(matches!(
            err,
            ConnectError::FeatureDisabled {
                feature: "postgres",
                ..
            }
        ));
    }

    #[cfg(not(feature = "sqlite"))]
    #[tokio::test]
    async fn a_disabled_sqlite_feature_is_named() {
        let err = connect("sqlite://x.db").await.err().expect("sqlite");
        assert!(matches!(
            err,
            ConnectError::FeatureDisabled {
                feature: "sqlite",
                ..
            }
        ));
    }
}
