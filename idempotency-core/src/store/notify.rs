//! Waking the duplicates that wait for a record (`wait_for_in_flight`) when
//! it completes or is released, instead of having them poll.
//!
//! A store that can notify returns a [`Watch`] from [`Store::watch`]. The
//! engine's wait, for a duplicate of a request in flight elsewhere, is:
//!
//! 1. `watch(id)`: the store registers the waiter (and, for a shared store,
//!    tells the holder's instance that someone waits);
//! 2. `claim` again: the record may have completed before the watch began;
//! 3. still in flight: wait for the watch, or a fallback poll interval,
//!    whichever comes first, then claim again.
//!
//! [`Waiters`] is the in-process half that every store shares: a map from
//! record to the tasks waiting for it. The memory store wakes it directly on
//! `complete` and `release`; the Redis and PostgreSQL stores wake it from
//! their listener (pub/sub, `LISTEN`).
//!
//! [`Store::watch`]: crate::Store::watch

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::Notify;

use crate::fingerprint::RecordId;

/// Resolves when the record it watches may have changed: it completed, was
/// released, or the store lost track (a listener reconnected). The waiter
/// then claims again to see what happened; a watch that never resolves is
/// covered by the waiter's fallback poll.
#[must_use = "a watch does nothing unless awaited"]
pub struct Watch {
    wake: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Watch {
    /// A watch that resolves when `wake` does.
    pub fn new(wake: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            wake: Box::pin(wake),
        }
    }
}

impl Future for Watch {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// The tasks of this process that wait for a record, by record. Cheap to
/// clone (clones share the map). When nobody waits, [`wake`](Self::wake)
/// costs one atomic load, so a store calls it on every `complete` and
/// `release`.
#[derive(Clone, Default)]
pub struct Waiters {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// How many watches are registered: `wake` locks nothing while it is 0.
    watching: AtomicUsize,
    records: Mutex<HashMap<RecordId, Entry>>,
}

struct Entry {
    notify: Arc<Notify>,
    watches: usize,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("watching", &self.shared.watching.load(Ordering::Relaxed))
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, Entry>> {
        // Every change under this lock is one insert, update or remove.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Waiters {
    /// An empty set of waiters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any task of this process watches a record now.
    pub fn is_watching(&self) -> bool {
        self.shared.watching.load(Ordering::Acquire) > 0
    }

    /// Registers a watch on `id`. It is registered when this returns (a
    /// [`wake`](Self::wake) from then on resolves it, even before it is
    /// first polled), and unregistered when dropped.
    pub fn watch(&self, id: &RecordId) -> Watch {
        let notify = {
            let mut records = self.shared.lock();
            let entry = records.entry(*id).or_insert_with(|| Entry {
                notify: Arc::new(Notify::new()),
                watches: 0,
            });
            entry.watches += 1;
            self.shared.watching.fetch_add(1, Ordering::AcqRel);
            Arc::clone(&entry.notify)
        };
        // Created now, so a `notify_waiters` from now on reaches it.
        let notified = notify.notified_owned();
        let registration = Registration {
            shared: Arc::clone(&self.shared),
            id: *id,
        };
        Watch::new(async move {
            let _registration = registration;
            notified.await;
        })
    }

    /// Wakes every watch on `id`. Costs one atomic load when nothing is
    /// watched.
    pub fn wake(&self, id: &RecordId) {
        if !self.is_watching() {
            return;
        }
        if let Some(entry) = self.shared.lock().get(id) {
            entry.notify.notify_waiters();
        }
    }

    /// Wakes every watch of every record (a listener that lost its
    /// connection, and may have missed notifications, calls this).
    pub fn wake_all(&self) {
        if !self.is_watching() {
            return;
        }
        for entry in self.shared.lock().values() {
            entry.notify.notify_waiters();
        }
    }
}

/// What a store's listener task is doing, as its watches see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    /// Connecting and subscribing for the first time.
    Starting,
    /// Subscribed: notifications arrive.
    Up,
    /// It lost its connection and is reconnecting; a watch now may miss its
    /// notification, and then waits for the engine's fallback poll.
    Down,
    /// The first subscription failed (why); the task has ended.
    Failed(Arc<str>),
}

/// How long after a failed start a watch tries to start the listener again
/// (meanwhile waiters poll).
const RESTART_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest pause between two reconnection attempts of a listener.
pub const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A shared store's notifications (Redis pub/sub, PostgreSQL `LISTEN`): the
/// waiters of this process, and the one listener task that wakes them,
/// started on the first watch, started again (at most every
/// second) when its first connection failed, and ended when this
/// is dropped. One per store, shared by its clones.
pub struct Listener {
    /// The waiters its task wakes.
    pub waiters: Waiters,
    slot: Mutex<Slot>,
}

enum Slot {
    Idle,
    Running {
        state: tokio::sync::watch::Receiver<Listening>,
        /// Ends the task when dropped.
        _task: Box<dyn Send>,
    },
    /// The last start failed; no new attempt before this instant.
    Failed(std::time::Instant),
}

impl Default for Listener {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Listener {
    /// A listener not yet started.
    pub fn new() -> Self {
        Self {
            waiters: Waiters::new(),
            slot: Mutex::new(Slot::Idle),
        }
    }

    /// Waits until the listener has subscribed once, starting it with
    /// `start` when it is not running. `start` spawns the task, which
    /// reports its state on the sender and wakes the waiters, and returns
    /// what ends the task when dropped. `Ok(false)`: a start failed
    /// recently (waiters poll); `Err(why)`: this start failed.
    pub async fn ready<G: Send + 'static>(
        &self,
        start: impl FnOnce(tokio::sync::watch::Sender<Listening>, Waiters) -> G,
    ) -> Result<bool, Arc<str>> {
        let mut state = {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            let running = match &*slot {
                Slot::Running { state, .. } if !matches!(*state.borrow(), Listening::Failed(_)) => {
                    Some(state.clone())
                }
                Slot::Running { .. } => {
                    *slot = Slot::Failed(std::time::Instant::now() + RESTART_AFTER);
                    None
                }
                _ => None,
            };
            match running {
                Some(state) => state,
                None => {
                    if let Slot::Failed(until) = &*slot {
                        if std::time::Instant::now() < *until {
                            return Ok(false);
                        }
                    }
                    let (tx, rx) = tokio::sync::watch::channel(Listening::Starting);
                    let task = start(tx, self.waiters.clone());
                    *slot = Slot::Running {
                        state: rx.clone(),
                        _task: Box::new(task),
                    };
                    rx
                }
            }
        };
        let ready = match state.wait_for(|s| *s != Listening::Starting).await {
            Ok(s) => match &*s {
                Listening::Failed(why) => Err(Arc::clone(why)),
                _ => Ok(true),
            },
            Err(_) => Err(Arc::from("the listener ended")),
        };
        ready
    }
}

/// Unregisters a watch when it is dropped (resolved or abandoned).
struct Registration {
    shared: Arc<Shared>,
    id: RecordId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut records = self.shared.lock();
        if let Some(entry) = records.get_mut(&self.id) {
            entry.watches -= 1;
            if entry.watches == 0 {
                records.remove(&self.id);
            }
        }
        self.shared.watching.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> RecordId {
        RecordId::from_bytes([n; 32])
    }

    #[tokio::test]
    async fn a_wake_reaches_every_watch_of_its_record_only() {
        let waiters = Waiters::new();
        let a1 = waiters.watch(&id(1));
        let a2 = waiters.watch(&id(1));
        let b = waiters.watch(&id(2));
        waiters.wake(&id(1));
        tokio::time::timeout(Duration::from_secs(5), async {
            a1.await;
            a2.await;
        })
        .await
        .expect("both watches of record 1 woke");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), b)
                .await
                .is_err(),
            "record 2 was not woken"
        );
        assert!(!waiters.is_watching(), "every watch unregistered on drop");
        assert!(waiters.shared.lock().is_empty());
    }

    #[tokio::test]
    async fn a_wake_before_the_first_poll_is_not_lost() {
        let waiters = Waiters::new();
        let watch = waiters.watch(&id(3));
        waiters.wake(&id(3));
        tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("woken although registered, not yet polled");
    }

    #[tokio::test]
    async fn wake_all_reaches_every_record() {
        let waiters = Waiters::new();
        let a = waiters.watch(&id(4));
        let b = waiters.watch(&id(5));
        waiters.wake_all();
        tokio::time::timeout(Duration::from_secs(5), async {
            a.await;
            b.await;
        })
        .await
        .expect("woken");
    }
}
