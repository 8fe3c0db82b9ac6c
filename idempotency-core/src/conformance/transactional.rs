//! The cases of a store with transactional mode ([`TransactionalStore`]):
//! the record is claimed in a transaction of its own, a duplicate is
//! refused at once instead of waiting for it, a commit settles the record
//! and a rollback leaves nothing, and the handler's extractor finds the
//! transaction through the opaque [`TxHandle`](crate::TxHandle).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{fingerprint, fresh_id, response, CONCURRENT_CLAIMERS, LONG};
use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome};
use crate::store::{
    Begun, BoxFuture, Claim, OpenTransaction, Store, StoreError, TransactionalStore, TxGuard,
    TxUnavailable,
};

/// How long a duplicate may take to be refused: it must never wait for
/// the first request's transaction (which stays open for longer).
const REFUSED_WITHIN: Duration = Duration::from_secs(2);
/// How long a commit may wait for a handler that keeps its transaction.
const BOUND: Duration = Duration::from_secs(5);

/// The transactional cases for a store whose transactions are of type `T`
/// (what [`TxGuard<T>`] gives a handler: `sqlx::Transaction<'static, DB>`
/// for the SQL stores). Run it on a multi-threaded runtime.
///
/// ```no_run
/// # async fn demo<S, T>(my_store: S)
/// # where S: idempotency_core::Store + idempotency_core::TransactionalStore + Clone, T: Send + 'static {
/// use idempotency_core::conformance::TransactionalConformance;
/// TransactionalConformance::<T>::new(my_store).run_all().await;
/// # }
/// ```
pub struct TransactionalConformance<T> {
    store: Arc<dyn TransactionalStore>,
    plain: Arc<dyn Store>,
    short: Duration,
    _transaction: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TransactionalConformance<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalConformance")
            .field("store", &self.store.backend())
            .field("short", &self.short)
            .finish()
    }
}

impl<T: Send + 'static> TransactionalConformance<T> {
    /// The cases for `store` (which keeps its own time: the expiry case
    /// sleeps).
    pub fn new<S: Store + TransactionalStore + Clone>(store: S) -> Self {
        Self {
            store: Arc::new(store.clone()),
            plain: Arc::new(store),
            short: Duration::from_millis(600),
            _transaction: PhantomData,
        }
    }

    /// The short ttl the expiry case uses (default 600 ms).
    pub fn short_lease(mut self, short: Duration) -> Self {
        self.short = short.max(Duration::from_millis(50));
        self
    }

    /// Runs every case, concurrently (each on its own records).
    pub async fn run_all(&self) {
        let cases: Vec<BoxFuture<'_, ()>> = vec![
            Box::pin(self.commit_settles_the_record()),
            Box::pin(self.rollback_leaves_nothing()),
            Box::pin(self.a_duplicate_is_refused_at_once()),
            Box::pin(self.concurrent_begins_acquire_once()),
            Box::pin(self.the_handler_holds_the_transaction()),
            Box::pin(self.an_expired_record_is_claimed_again()),
        ];
        futures_util::future::join_all(cases).await;
    }

    fn name(&self) -> &'static str {
        self.store.backend()
    }

    fn claim<'a>(&self, fp: &'a Fingerprint, ttl: Duration) -> Claim<'a> {
        Claim {
            fingerprint: fp,
            lease: LONG,
            ttl,
        }
    }

    async fn begin(&self, id: &RecordId, fp: &Fingerprint, ttl: Duration) -> Begun {
        self.store
            .begin(id, LeaseToken::random(), self.claim(fp, ttl))
            .await
            .unwrap_or_else(|e| panic!("{}: begin failed: {e:?}", self.name()))
    }

    async fn acquire(
        &self,
        id: &RecordId,
        fp: &Fingerprint,
        ttl: Duration,
    ) -> Box<dyn OpenTransaction> {
        match self.begin(id, fp, ttl).await {
            Begun::Acquired(open) => open,
            other => panic!("{}: expected Acquired, got {other:?}", self.name()),
        }
    }

    async fn snapshot(&self, id: &RecordId, fp: &Fingerprint) -> Option<ClaimOutcome> {
        self.store
            .snapshot(id, fp)
            .await
            .unwrap_or_else(|e| panic!("{}: snapshot failed: {e:?}", self.name()))
    }

    async fn commit(&self, open: Box<dyn OpenTransaction>, outcome: &StoredOutcome, ttl: Duration) {
        open.commit(outcome.clone(), ttl, BOUND)
            .await
            .unwrap_or_else(|e| panic!("{}: commit failed: {e:?}", self.name()));
    }

    fn expect_completed(
        &self,
        found: Option<ClaimOutcome>,
        fp: &Fingerprint,
        want: &StoredOutcome,
        what: &str,
    ) {
        match found {
            Some(ClaimOutcome::Completed {
                fingerprint,
                outcome,
            }) => {
                assert_eq!(
                    fingerprint,
                    *fp,
                    "{}: {what}: wrong fingerprint",
                    self.name()
                );
                assert!(
                    outcome == *want,
                    "{}: {what}: the stored outcome changed",
                    self.name()
                );
            }
            other => panic!("{}: {what}: expected Completed, got {other:?}", self.name()),
        }
    }

    /// A fresh record: no snapshot; `begin` acquires; the commit writes the
    /// outcome, which the snapshot, a second `begin`, and the plain store's
    /// `claim` then all find, under the first request's fingerprint (so the
    /// engine answers another request 422).
    pub async fn commit_settles_the_record(&self) {
        let (id, fp, other) = (fresh_id(), fingerprint(b"tx"), fingerprint(b"other"));
        assert!(
            self.snapshot(&id, &fp).await.is_none(),
            "{}: a fresh record has no snapshot",
            self.name()
        );
        let open = self.acquire(&id, &fp, LONG).await;
        let outcome = response(201, b"committed");
        self.commit(open, &outcome, LONG).await;
        self.expect_completed(self.snapshot(&id, &fp).await, &fp, &outcome, "the snapshot");
        self.expect_completed(
            self.snapshot(&id, &other).await,
            &fp,
            &outcome,
            "another request's snapshot",
        );
        match self.begin(&id, &fp, LONG).await {
            Begun::Existing(found) => {
                self.expect_completed(Some(found), &fp, &outcome, "a second begin")
            }
            other => panic!(
                "{}: a second begin: expected Existing, got {other:?}",
                self.name()
            ),
        }
        let claimed = self
            .plain
            .claim(&id, LeaseToken::random(), self.claim(&fp, LONG))
            .await
            .unwrap_or_else(|e| panic!("{}: claim failed: {e:?}", self.name()));
        self.expect_completed(Some(claimed), &fp, &outcome, "the plain store's claim");
    }

    /// A rolled-back claim leaves nothing: no snapshot, and the next
    /// `begin` acquires at once (no lease to wait out).
    pub async fn rollback_leaves_nothing(&self) {
        let (id, fp) = (fresh_id(), fingerprint(b"rollback"));
        let open = self.acquire(&id, &fp, LONG).await;
        open.rollback(BOUND)
            .await
            .unwrap_or_else(|e| panic!("{}: rollback failed: {e:?}", self.name()));
        assert!(
            self.snapshot(&id, &fp).await.is_none(),
            "{}: a rolled-back claim left a record",
            self.name()
        );
        let again = self.acquire(&id, &fp, LONG).await;
        let _ = again.rollback(BOUND).await;
    }

    /// While a transaction holds a record, every duplicate `begin` is
    /// refused (`Locked`) at once, never waiting for it. (Whether a
    /// transaction on another record waits meanwhile is the database's
    /// business: SQLite has one writer at a time.)
    pub async fn a_duplicate_is_refused_at_once(&self) {
        let (id, fp) = (fresh_id(), fingerprint(b"locked"));
        let open = self.acquire(&id, &fp, LONG).await;
        for _ in 0..3 {
            let started = Instant::now();
            let begun = self.begin(&id, &fp, LONG).await;
            assert!(
                matches!(begun, Begun::Locked),
                "{}: a duplicate of a record in a transaction: expected Locked, got {begun:?}",
                self.name()
            );
            assert!(
                started.elapsed() < REFUSED_WITHIN,
                "{}: a duplicate waited {:?} to be refused",
                self.name(),
                started.elapsed()
            );
        }
        let _ = open.rollback(BOUND).await;
    }

    /// Concurrent `begin`s of one fresh record: exactly one acquires; every
    /// other is refused or, if it came after the commit, finds the record.
    pub async fn concurrent_begins_acquire_once(&self) {
        let (id, fp) = (fresh_id(), fingerprint(b"race"));
        let claimers = CONCURRENT_CLAIMERS / 2;
        let barrier = Arc::new(tokio::sync::Barrier::new(claimers));
        let tasks: Vec<_> = (0..claimers)
            .map(|_| {
                let (store, barrier, fp) = (Arc::clone(&self.store), Arc::clone(&barrier), fp);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let begun = store
                        .begin(
                            &id,
                            LeaseToken::random(),
                            Claim {
                                fingerprint: &fp,
                                lease: LONG,
                                ttl: LONG,
                            },
                        )
                        .await;
                    match begun {
                        // Held until every claimer has answered.
                        Ok(Begun::Acquired(open)) => Ok(Some(open)),
                        Ok(Begun::Locked | Begun::Existing(_)) => Ok(None),
                        Err(e) => Err(format!("{e:?}")),
                    }
                })
            })
            .collect();
        let mut acquired = Vec::new();
        for task in tasks {
            match task.await.expect("a claimer panicked") {
                Ok(Some(open)) => acquired.push(open),
                Ok(None) => {}
                Err(e) => panic!("{}: a concurrent begin failed: {e}", self.name()),
            }
        }
        assert_eq!(
            acquired.len(),
            1,
            "{}: {} concurrent begins acquired one record",
            self.name(),
            acquired.len()
        );
        let outcome = response(201, b"race");
        for open in acquired {
            self.commit(open, &outcome, LONG).await;
        }
        self.expect_completed(
            self.snapshot(&id, &fp).await,
            &fp,
            &outcome,
            "after the race",
        );
    }

    /// The handler's extractor finds the transaction through the handle
    /// (once: a second extractor is refused; another type is refused); a
    /// commit waits for the handler to let go and gives up after its bound,
    /// and the transaction then rolls back.
    pub async fn the_handler_holds_the_transaction(&self) {
        let (id, fp) = (fresh_id(), fingerprint(b"handler"));
        let open = self.acquire(&id, &fp, LONG).await;
        let handle = open.handle();
        assert!(
            matches!(TxGuard::<T>::acquire(None), Err(TxUnavailable::NotCovered)),
            "{}: no handle, no transaction",
            self.name()
        );
        assert!(
            matches!(
                TxGuard::<Unrelated>::acquire(Some(&handle)),
                Err(TxUnavailable::OtherDatabase)
            ),
            "{}: a handle gives no transaction of another type",
            self.name()
        );
        let guard = TxGuard::<T>::acquire(Some(&handle))
            .unwrap_or_else(|e| panic!("{}: the handler's extractor failed: {e}", self.name()));
        assert!(
            matches!(
                TxGuard::<T>::acquire(Some(&handle)),
                Err(TxUnavailable::InUse)
            ),
            "{}: a second extractor on one request is refused",
            self.name()
        );
        let commit = open.commit(response(201, b"held"), LONG, Duration::from_millis(200));
        match commit.await {
            Err(StoreError::Timeout { .. }) => {}
            other => panic!(
                "{}: a commit while the handler holds the transaction: expected a timeout, got {other:?}",
                self.name()
            ),
        }
        drop(guard);
        drop(handle);
        // Dropped, the transaction rolls back; the record comes free.
        let deadline = Instant::now() + BOUND;
        loop {
            match self.begin(&id, &fp, LONG).await {
                Begun::Acquired(open) => {
                    let _ = open.rollback(BOUND).await;
                    break;
                }
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!(
                    "{}: an abandoned transaction still holds its record: {other:?}",
                    self.name()
                ),
            }
        }
    }

    /// A committed record past its ttl is claimed again by `begin`.
    pub async fn an_expired_record_is_claimed_again(&self) {
        let (id, fp) = (fresh_id(), fingerprint(b"expiry"));
        let open = self.acquire(&id, &fp, self.short).await;
        self.commit(open, &response(201, b"short"), self.short)
            .await;
        tokio::time::sleep(self.short + self.short / 2).await;
        assert!(
            self.snapshot(&id, &fp).await.is_none(),
            "{}: an expired record is not in the snapshot",
            self.name()
        );
        let again = self.acquire(&id, &fp, LONG).await;
        let _ = again.rollback(BOUND).await;
    }
}

/// A transaction type no store uses.
struct Unrelated;
