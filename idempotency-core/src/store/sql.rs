//! What the two sqlx stores share: durations as SQL milliseconds and the
//! `Store` impl over their fenced single statements.

use std::time::Duration;

/// Durations are capped at about 31 years.
const MAX_MILLIS: u64 = 1_000_000_000_000;

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis().min(u128::from(MAX_MILLIS))).unwrap_or(i64::MAX)
}

/// Implements [`Store`](super::Store) for a sqlx store that has `claim_now`,
/// the `complete`/`release`/`extend` statements in `self.queries` (bound as
/// id, token, then the argument), and `fenced` to run one of them.
macro_rules! sql_store {
    ($store:ty) => {
        impl $crate::store::Store for $store {
            fn claim<'a>(
                &'a self,
                req: $crate::store::ClaimRequest<'a>,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<$crate::record::ClaimOutcome, $crate::store::StoreError>,
            > {
                Box::pin(self.claim_now(req))
            }

            fn complete<'a>(
                &'a self,
                id: &'a $crate::fingerprint::RecordId,
                token: $crate::record::LeaseToken,
                outcome: std::sync::Arc<$crate::record::StoredOutcome>,
                ttl: std::time::Duration,
            ) -> $crate::store::BoxFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                Box::pin(async move {
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
            ) -> $crate::store::BoxFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                Box::pin(async move {
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
            ) -> $crate::store::BoxFuture<
                'a,
                Result<$crate::record::TokenOutcome, $crate::store::StoreError>,
            > {
                Box::pin(async move {
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
