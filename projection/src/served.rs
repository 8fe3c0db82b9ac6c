//! Which version of a projection is served.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::ProjectionError;

/// A version read, and when.
type Read = Option<(Instant, Option<u32>)>;

/// The channel a switch notifies (the payload is the projection's name).
pub const SWITCH_CHANNEL: &str = "projection";

/// The version of `name` served now (`None` before any version caught up),
/// read from the database.
///
/// # Errors
/// [`ProjectionError::Database`].
pub async fn served_version(pool: &PgPool, name: &str) -> Result<Option<u32>, ProjectionError> {
    let v: Option<i32> =
        sqlx::query_scalar("SELECT version FROM projection.served WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(v.and_then(|v| u32::try_from(v).ok()))
}

/// [`served_version`] for a request path: what it read is kept for a TTL
/// (and forgotten at once by [`forget`](Self::forget), which a projector
/// calls when its listener hears a switch), so a read costs a lock and a
/// clock read. After a switch every process serves the new version within
/// the TTL.
///
/// Cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct ServedVersion {
    pool: PgPool,
    name: Arc<str>,
    ttl: Duration,
    cached: Arc<Mutex<Read>>,
}

impl std::fmt::Debug for ServedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedVersion")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ServedVersion {
    /// The served version of `name`, kept for `ttl`.
    pub fn new(pool: PgPool, name: impl Into<Arc<str>>, ttl: Duration) -> Self {
        Self {
            pool,
            name: name.into(),
            ttl,
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// The version served, at most the TTL old.
    ///
    /// # Errors
    /// [`ProjectionError::Database`] when it had to read and could not.
    pub async fn get(&self) -> Result<Option<u32>, ProjectionError> {
        if let Some((at, v)) = *self.cached.lock().unwrap_or_else(PoisonError::into_inner) {
            if at.elapsed() < self.ttl {
                return Ok(v);
            }
        }
        self.refresh().await
    }

    /// Reads the version served now, and keeps it.
    ///
    /// # Errors
    /// [`ProjectionError::Database`].
    pub async fn refresh(&self) -> Result<Option<u32>, ProjectionError> {
        let v = served_version(&self.pool, &self.name).await?;
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), v));
        Ok(v)
    }

    /// Forgets what it read: the next [`get`](Self::get) reads.
    pub fn forget(&self) {
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}
