//! What the two sqlx stores share: durations as SQL milliseconds and the
//! `Store` impl over their fenced single statements.

use std::time::Duration;

use super::StoreError;
use crate::record::ClaimOutcome;

/// Durations are capped at about 31 years.
const MAX_MILLIS: u64 = 1_000_000_000_000;

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis().min(u128::from(MAX_MILLIS))).unwrap_or(i64::MAX)
}

/// How a sqlx error maps onto [`StoreError`]: a missing or mistyped column
/// or a migration history this version does not know is a configuration
/// problem, a value that does not decode is a corrupt record, anything else
/// is the database failing.
pub(super) fn error(backend: &'static str, e: sqlx::Error) -> StoreError {
    use sqlx::migrate::MigrateError;
    match e {
        sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::config(backend, e),
        sqlx::Error::Migrate(m)
            if matches!(
                *m,
                MigrateError::VersionMissing(_)
                    | MigrateError::VersionMismatch(_)
                    | MigrateError::VersionTooOld(..)
                    | MigrateError::VersionTooNew(..)
                    | MigrateError::Dirty(_)
            ) =>
        {
            StoreError::config(backend, sqlx::Error::Migrate(m))
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::corrupt(backend, e)
        }
        e => StoreError::backend(backend, e),
    }
}

/// The answer of a claim that did not acquire, from its row's
/// `fingerprint`, `outcome` (completed) and `remaining` (in flight) columns.
pub(super) fn existing<R>(backend: &'static str, row: &R) -> Result<ClaimOutcome, StoreError>
where
    R: sqlx::Row,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    let get = |e| error(backend, e);
    let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(get)?;
    let outcome: Option<Vec<u8>> = row.try_get("outcome").map_err(get)?;
    crate::record::from_columns(backend, fingerprint, outcome, || {
        row.try_get("remaining").map_err(get)
    })
}

/// Implements [`Store`](super::Store) for a sqlx store that has `claim_now`,
/// the `complete`/`release`/`extend` statements in `self.queries` (bound as
/// id, token, then the argument), and `fenced` to run one of them. Items in
/// an optional `{ ... }` after the type join the impl (`watch`).
macro_rules! sql_store {
    ($store:ty $(, { $($extra:tt)* })?) => {
        impl $crate::store::Store for $store {
            $($($extra)*)?

            fn claim<'a>(
                &'a self,
                id: &'a $crate::fingerprint::RecordId,
                token: $crate::record::LeaseToken,
                claim: $crate::store::Claim<'a>,
            ) -> $crate::store::StoreFuture<
                'a,
                Result<$crate::record::ClaimOutcome, $crate::store::StoreError>,
            > {
                $crate::store::StoreFuture::new(self.claim_now(id, token, claim))
            }

            fn complete<'a>(
                &'a self,
                id: &'a $crate::fingerprint::RecordId,
                token: $crate::record::LeaseToken,
                outcome: &'a $crate::record::StoredOutcome,
                ttl: std::time::Duration,
            ) -> $crate::store::StoreFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                $crate::store::StoreFuture::new(async move {
                    let query = sqlx::query(&self.queries.complete)
                        .bind(id.as_bytes().as_slice())
                        .bind(token.to_bytes().to_vec())
                        .bind(outcome.encode())
                        .bind($crate::store::sql::millis(ttl));
                    self.fenced(query).await
                })
            }

            fn release<'a>(
                &'a self,
                id: &'a $crate::fingerprint::RecordId,
                token: $crate::record::LeaseToken,
            ) -> $crate::store::StoreFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                $crate::store::StoreFuture::new(async move {
                    let query = sqlx::query(&self.queries.release)
                        .bind(id.as_bytes().as_slice())
                        .bind(token.to_bytes().to_vec());
                    self.fenced(query).await
                })
            }

            fn extend<'a>(
                &'a self,
                id: &'a $crate::fingerprint::RecordId,
                token: $crate::record::LeaseToken,
                lease: std::time::Duration,
            ) -> $crate::store::StoreFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                $crate::store::StoreFuture::new(async move {
                    let query = sqlx::query(&self.queries.extend)
                        .bind(id.as_bytes().as_slice())
                        .bind(token.to_bytes().to_vec())
                        .bind($crate::store::sql::millis(lease));
                    self.fenced(query).await
                })
            }

            fn backend(&self) -> &'static str {
                BACKEND
            }
        }
    };
}
pub(super) use sql_store;

/// What an open transaction of a sqlx store needs to finish: its slot (shared
/// with the handler), the record and token, and the `complete` statement.
/// `_lock` is dropped when the transaction ends (SQLite's in-process lock).
macro_rules! sql_open {
    ($name:ident, $db:ty, $variant:ident) => {
        pub(super) struct $name {
            slot: $crate::store::transaction::TxSlot<$db>,
            id: $crate::fingerprint::RecordId,
            token: $crate::record::LeaseToken,
            queries: std::sync::Arc<Queries>,
            _lock: Option<Box<dyn Send>>,
        }

        impl $crate::store::transaction::OpenTransaction for $name {
            fn handle(&self) -> $crate::engine::TxHandle {
                $crate::engine::TxHandle::$variant(self.slot.clone())
            }

            fn commit(
                self: Box<Self>,
                outcome: $crate::record::StoredOutcome,
                ttl: std::time::Duration,
                bound: std::time::Duration,
            ) -> $crate::store::BoxFuture<'static, Result<(), $crate::store::StoreError>> {
                Box::pin(async move {
                    let mut tx = self.slot.take(BACKEND, bound).await?;
                    let done = sqlx::query(&self.queries.complete)
                        .bind(self.id.as_bytes().as_slice())
                        .bind(self.token.to_bytes().to_vec())
                        .bind(outcome.encode())
                        .bind($crate::store::sql::millis(ttl))
                        .execute(&mut *tx)
                        .await
                        .map_err(backend)?;
                    if done.rows_affected() != 1 {
                        // Only this transaction could have changed the record.
                        return Err($crate::store::StoreError::backend(
                            BACKEND,
                            "the record left in flight by this transaction was not there to complete",
                        ));
                    }
                    tx.commit().await.map_err(backend)
                })
            }

            fn rollback(
                self: Box<Self>,
                bound: std::time::Duration,
            ) -> $crate::store::BoxFuture<'static, Result<(), $crate::store::StoreError>> {
                Box::pin(async move {
                    let tx = self.slot.take(BACKEND, bound).await?;
                    tx.rollback().await.map_err(backend)
                })
            }
        }
    };
}
pub(super) use sql_open;

/// `TransactionalStore::snapshot` of a sqlx store: its statement `$query`
/// (bound as id, fingerprint) answers a row with `takeable` and the columns
/// of [`existing`].
macro_rules! sql_snapshot {
    ($query:ident) => {
        fn snapshot<'a>(
            &'a self,
            id: &'a $crate::fingerprint::RecordId,
            fingerprint: &'a $crate::fingerprint::Fingerprint,
        ) -> $crate::store::BoxFuture<
            'a,
            Result<Option<$crate::record::ClaimOutcome>, $crate::store::StoreError>,
        > {
            Box::pin(async move {
                let row = sqlx::query(&self.queries.$query)
                    .bind(id.as_bytes().as_slice())
                    .bind(fingerprint.as_bytes().as_slice())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(backend)?;
                match row {
                    Some(row)
                        if !sqlx::Row::try_get::<bool, _>(&row, "takeable").map_err(backend)? =>
                    {
                        $crate::store::sql::existing(BACKEND, &row).map(Some)
                    }
                    _ => Ok(None),
                }
            })
        }
    };
}
pub(super) use sql_snapshot;
