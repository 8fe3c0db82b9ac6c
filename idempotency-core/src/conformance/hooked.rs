//! A store that forwards every call to another, counts each, and lets a
//! test hook in: delay a call, fail it, hang it, or hide the store's
//! notifications. The one wrapper the workspace's tests build their
//! doubles from, instead of forwarding the trait's methods by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::{Fingerprint, RecordId};
use crate::record::{ClaimOutcome, LeaseToken, StoredOutcome, TokenOutcome};
use crate::store::{
    Begun, BoxFuture, Claim, Store, StoreError, StoreFuture, TransactionalStore, Watch,
};

/// A call of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Store::claim`].
    Claim,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::extend`].
    Extend,
    /// [`Store::watch`].
    Watch,
    /// [`TransactionalStore::begin`].
    Begin,
    /// [`TransactionalStore::snapshot`].
    Snapshot,
}

const OPS: usize = 7;

impl Op {
    fn index(self) -> usize {
        self as usize
    }
}

/// What a hook makes of one call.
#[derive(Clone)]
#[non_exhaustive]
pub enum Hook {
    /// Forward it to the inner store.
    Forward,
    /// Forward it after this long (a slow network: the call reaches the
    /// store only then).
    Delay(Duration),
    /// Answer this error at once, without calling the inner store.
    Fail(Arc<dyn Fn() -> StoreError + Send + Sync>),
    /// Never answer. The future declares a bound of an hour, so a caller
    /// must time it out itself.
    Hang,
    /// For [`Op::Watch`]: answer `None`, as a store that cannot notify
    /// (waiters poll).
    NoWatch,
    /// For [`Op::Complete`], [`Op::Release`] and [`Op::Extend`]: answer
    /// [`TokenOutcome::Fenced`] at once, as if the claim had been taken
    /// over.
    Fenced,
}

impl Hook {
    /// [`Hook::Fail`] with an error of `backend` whose message is `why`.
    pub fn fail(backend: &'static str, why: &'static str) -> Self {
        Hook::Fail(Arc::new(move || StoreError::backend(backend, why)))
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::Forward => f.write_str("Forward"),
            Hook::Delay(d) => f.debug_tuple("Delay").field(d).finish(),
            Hook::Fail(_) => f.write_str("Fail"),
            Hook::Hang => f.write_str("Hang"),
            Hook::NoWatch => f.write_str("NoWatch"),
            Hook::Fenced => f.write_str("Fenced"),
        }
    }
}

type HookFn = dyn Fn(Op) -> Hook + Send + Sync;

/// A store that forwards to `S`, counting every call by [`Op`], the claims
/// that acquired, and the watches that resolved (were woken, rather than dropped when the
/// waiter's fallback poll came first). A hook decides what becomes of each
/// call ([`Hooked::with_hook`]). It is transactional when `S` is.
pub struct Hooked<S> {
    inner: S,
    name: Option<&'static str>,
    hook: Box<HookFn>,
    calls: [AtomicU64; OPS],
    woken: Arc<AtomicU64>,
    acquired: Arc<AtomicU64>,
}

impl<S> std::fmt::Debug for Hooked<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooked")
            .field("calls", &self.calls)
            .field("woken", &self.woken)
            .finish_non_exhaustive()
    }
}

impl<S> Hooked<S> {
    /// Forwards every call to `inner`, counting.
    pub fn new(inner: S) -> Self {
        Self::with_hook(inner, |_| Hook::Forward)
    }

    /// Asks `hook` what to do with each call.
    pub fn with_hook(inner: S, hook: impl Fn(Op) -> Hook + Send + Sync + 'static) -> Self {
        Self {
            inner,
            name: None,
            hook: Box::new(hook),
            calls: Default::default(),
            woken: Arc::default(),
            acquired: Arc::default(),
        }
    }

    /// Hides the store's notifications: waiters poll, as with a store that
    /// cannot notify.
    pub fn polling(inner: S) -> Self {
        Self::with_hook(inner, |op| match op {
            Op::Watch => Hook::NoWatch,
            _ => Hook::Forward,
        })
    }

    /// Names it `backend` in logs, errors and metrics, instead of the inner
    /// store's name.
    pub fn named(mut self, backend: &'static str) -> Self {
        self.name = Some(backend);
        self
    }

    /// The store inside.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    /// How many claims were made.
    pub fn claims(&self) -> u64 {
        self.calls(Op::Claim)
    }

    /// How many claims answered `Acquired` (what the store decided, where
    /// [`calls`](Self::calls) counts what was asked).
    pub fn acquired(&self) -> u64 {
        self.acquired.load(Ordering::SeqCst)
    }

    /// How many watches resolved.
    pub fn woken(&self) -> u64 {
        self.woken.load(Ordering::SeqCst)
    }

    /// Counts `op` and asks the hook about it.
    fn hook(&self, op: Op) -> Hook {
        self.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        (self.hook)(op)
    }
}

/// `call` as `hook` says.
fn hooked<'a, T: Send + 'a>(
    hook: Hook,
    call: impl FnOnce() -> StoreFuture<'a, Result<T, StoreError>> + Send + 'a,
) -> StoreFuture<'a, Result<T, StoreError>> {
    match hook {
        Hook::Forward | Hook::NoWatch | Hook::Fenced => call(),
        // The call goes out after the delay, as on a slow link.
        Hook::Delay(delay) => StoreFuture::new(async move {
            tokio::time::sleep(delay).await;
            call().await
        }),
        Hook::Fail(error) => StoreFuture::ready(Err(error())),
        Hook::Hang => StoreFuture::bounded(std::future::pending(), Duration::from_secs(3600)),
    }
}

/// A fenced call (`complete`, `release`, `extend`) as `hook` says.
fn fenced<'a>(
    hook: Hook,
    call: impl FnOnce() -> StoreFuture<'a, Result<TokenOutcome, StoreError>> + Send + 'a,
) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
    match hook {
        Hook::Fenced => StoreFuture::ready(Ok(TokenOutcome::Fenced)),
        hook => hooked(hook, call),
    }
}

impl<S: Store> Store for Hooked<S> {
    fn claim<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> StoreFuture<'a, Result<ClaimOutcome, StoreError>> {
        let acquired = Arc::clone(&self.acquired);
        let count = move |outcome: &Result<ClaimOutcome, StoreError>| {
            if matches!(outcome, Ok(ClaimOutcome::Acquired(_))) {
                acquired.fetch_add(1, Ordering::SeqCst);
            }
        };
        let call = hooked(self.hook(Op::Claim), move || {
            self.inner.claim(id, token, claim)
        });
        // An answer that is ready stays ready (no box), and a store's own
        // bound stays declared, so a wrapped store keeps its timing.
        let bound = call.bound();
        match call.into_ready() {
            Ok(outcome) => {
                count(&outcome);
                StoreFuture::ready(outcome)
            }
            Err(call) => {
                let counted = async move {
                    let outcome = call.await;
                    count(&outcome);
                    outcome
                };
                match bound {
                    Some(bound) => StoreFuture::bounded(counted, bound),
                    None => StoreFuture::new(counted),
                }
            }
        }
    }

    fn complete<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        outcome: &'a StoredOutcome,
        ttl: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        fenced(self.hook(Op::Complete), move || {
            self.inner.complete(id, token, outcome, ttl)
        })
    }

    fn release<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        fenced(self.hook(Op::Release), move || {
            self.inner.release(id, token)
        })
    }

    fn extend<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        lease: Duration,
    ) -> StoreFuture<'a, Result<TokenOutcome, StoreError>> {
        fenced(self.hook(Op::Extend), move || {
            self.inner.extend(id, token, lease)
        })
    }

    fn backend(&self) -> &'static str {
        self.name.unwrap_or_else(|| self.inner.backend())
    }

    fn watch<'a>(&'a self, id: &'a RecordId) -> StoreFuture<'a, Result<Option<Watch>, StoreError>> {
        let hook = self.hook(Op::Watch);
        if matches!(hook, Hook::NoWatch) {
            return StoreFuture::ready(Ok(None));
        }
        let woken = Arc::clone(&self.woken);
        hooked(hook, move || {
            StoreFuture::new(async move {
                Ok(self.inner.watch(id).await?.map(|watch| {
                    Watch::new(async move {
                        watch.await;
                        woken.fetch_add(1, Ordering::SeqCst);
                    })
                }))
            })
        })
    }
}

impl<S: TransactionalStore> TransactionalStore for Hooked<S> {
    fn snapshot<'a>(
        &'a self,
        id: &'a RecordId,
        fingerprint: &'a Fingerprint,
    ) -> BoxFuture<'a, Result<Option<ClaimOutcome>, StoreError>> {
        let call = hooked(self.hook(Op::Snapshot), move || {
            StoreFuture::new(self.inner.snapshot(id, fingerprint))
        });
        Box::pin(call)
    }

    fn begin<'a>(
        &'a self,
        id: &'a RecordId,
        token: LeaseToken,
        claim: Claim<'a>,
    ) -> BoxFuture<'a, Result<Begun, StoreError>> {
        let call = hooked(self.hook(Op::Begin), move || {
            StoreFuture::new(self.inner.begin(id, token, claim))
        });
        Box::pin(call)
    }

    fn backend(&self) -> &'static str {
        self.name
            .unwrap_or_else(|| TransactionalStore::backend(&self.inner))
    }
}
