//! Batch mode of the transactional inbox: many messages, one transaction,
//! one commit.
//!
//! Per batch:
//! 1. `BEGIN`; insert the inbox rows of the batch's distinct ids with one
//!    plain multi-row insert (PostgreSQL), unless a dead mark or the attempt
//!    limit forbids it, as [`process`](Inbox::process) does; it returns
//!    only the ids with failures counted (normally none). A concurrent copy
//!    of one of them blocks on its primary key until the first transaction
//!    ends.
//! 2. An id recorded before makes that insert fail with a unique violation
//!    (PostgreSQL logs it as an error): `ROLLBACK`, `BEGIN`, and the batch
//!    is claimed with `INSERT ... ON CONFLICT DO NOTHING RETURNING` (always
//!    so on SQLite), plus one statement telling the dead ones from the
//!    duplicates when some were not inserted. After a unique violation the
//!    next batches go straight to `ON CONFLICT`, until one finds every id
//!    new: a stream of redeliveries costs no failed statement per batch.
//! 3. The handler runs once for the new messages, in the same transaction,
//!    then `COMMIT`.
//! 4. The handler failed or panicked, or the database refused a statement
//!    of the batch: `ROLLBACK`, and every new message is processed again on
//!    its own, as `process` would, so that only a failing message counts an
//!    attempt and the others commit without it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use idempotency_core::BoxFuture;
use sql_foundation::Statement;
use sqlx::Transaction;

use crate::error::InboxError;
use crate::inbox::{in_span, run_guarded, Inbox};
use crate::message::InboxMessage;
use crate::outcome::{DeadReason, HandlerError, Outcome};
use crate::transactional::{InboxDatabase, Transactional, UNAVAILABLE_RETRY};

/// A handler run on the new messages of a batch (or of one message, when
/// a batch falls back to one message at a time).
trait Handle<DB: InboxDatabase>: Send {
    fn run<'t>(
        &'t mut self,
        tx: &'t mut Transaction<'static, DB>,
        new: &'t [&'t InboxMessage],
    ) -> BoxFuture<'t, Result<(), HandlerError>>;
}

/// [`Inbox::process_batch`]'s handler: all the new messages at once (and
/// the consumer's name, for its span).
struct Whole<'c, F>(
    F,
    #[cfg_attr(not(feature = "trace"), allow(dead_code))] &'c str,
);

impl<DB, F> Handle<DB> for Whole<'_, F>
where
    DB: InboxDatabase,
    F: for<'t> FnMut(
            &'t mut Transaction<'static, DB>,
            &'t [&'t InboxMessage],
        ) -> BoxFuture<'t, Result<(), HandlerError>>
        + Send,
{
    fn run<'t>(
        &'t mut self,
        tx: &'t mut Transaction<'static, DB>,
        new: &'t [&'t InboxMessage],
    ) -> BoxFuture<'t, Result<(), HandlerError>> {
        #[cfg(feature = "trace")]
        {
            let span = crate::trace::batch_span(self.1, new);
            Box::pin(tracing::Instrument::instrument((self.0)(tx, new), span))
        }
        #[cfg(not(feature = "trace"))]
        {
            (self.0)(tx, new)
        }
    }
}

/// [`Inbox::process_each`]'s handler: one message after the other, in
/// the batch's transaction (and the consumer's name, for their spans).
struct Each<'c, F>(F, &'c str);

impl<DB, F> Handle<DB> for Each<'_, F>
where
    DB: InboxDatabase,
    F: for<'t> FnMut(
            &'t mut Transaction<'static, DB>,
            &'t InboxMessage,
        ) -> BoxFuture<'t, Result<(), HandlerError>>
        + Send,
{
    fn run<'t>(
        &'t mut self,
        tx: &'t mut Transaction<'static, DB>,
        new: &'t [&'t InboxMessage],
    ) -> BoxFuture<'t, Result<(), HandlerError>> {
        Box::pin(async move {
            for message in new {
                let id = message.id().unwrap_or_default();
                in_span(self.1, id, message, (self.0)(&mut *tx, message)).await?;
            }
            Ok(())
        })
    }
}

/// What the batch's statements decided: the ids inserted with their
/// attempt, and those not inserted because they are dead (the others not
/// inserted are duplicates).
struct Decided {
    inserted: HashMap<String, i64>,
    dead: HashSet<String>,
}

impl Decided {
    /// The outcome of an id the batch did not insert: dead, or a duplicate.
    fn known(&self, key: &str) -> Outcome {
        if self.dead.contains(key) {
            Outcome::Dead {
                reason: DeadReason::AlreadyDead,
            }
        } else {
            Outcome::Duplicate
        }
    }
}

/// What the batch's transaction came to.
enum Ran {
    /// Committed (or nothing to commit).
    Committed(Decided),
    /// The one new message failed: rolled back, its failure counted; its
    /// outcome. (With one message, the batch was what `process` does.)
    Single(Decided, Outcome),
    /// Rolled back: the new messages are to be processed one at a time.
    /// With what was decided, only the ids inserted; without, every id.
    /// (The ids not inserted were duplicates or dead all the same: the
    /// rows that said so were committed by others.)
    OneByOne(Option<Decided>),
    /// The database could not be reached: nothing was decided.
    Unavailable(sqlx::Error),
}

impl<DB: InboxDatabase> Inbox<Transactional<DB>> {
    /// Processes `messages` as one batch: the new ones (neither processed
    /// before nor dead, each id once) are handed together to `handler`,
    /// inside one transaction that also records them all, committed once.
    /// Returns one outcome per message, in order; ack each message only
    /// after this returns (see [`Outcome::disposition`]).
    ///
    /// - The inbox rows of the whole batch are inserted by **one
    ///   statement**, which returns the new ones.
    /// - An id that appears twice in the batch runs once: the first copy's
    ///   outcome is its own, the others are [`Outcome::Duplicate`].
    /// - A failing or panicking handler does not hold the batch back, nor
    ///   count an attempt against the others: the batch is rolled back and
    ///   every new message is processed again on its own, as
    ///   [`process`](Self::process) does (`handler` gets a one-message
    ///   slice), so that only the failing one is counted (and
    ///   dead-lettered after the maximum) and the others commit.
    /// - Keep the effect in the transaction: whatever `handler` does
    ///   outside it runs again for every message of a batch that falls
    ///   back.
    ///
    /// Like a spawned task, the handler's future may borrow only the
    /// transaction and the messages: move clones of anything else into it.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn run(inbox: inbox_consumer::PostgresInbox, messages: Vec<inbox_consumer::InboxMessage>) {
    /// use inbox_consumer::HandlerError;
    ///
    /// let outcomes = inbox
    ///     .process_batch(&messages, |tx, new| {
    ///         Box::pin(async move {
    ///             // One statement for the whole batch's effect.
    ///             let ids: Vec<&str> = new.iter().filter_map(|m| m.id()).collect();
    ///             sqlx::query("INSERT INTO seen (message_id) SELECT * FROM unnest($1::text[])")
    ///                 .bind(ids)
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok::<_, HandlerError>(())
    ///         })
    ///     })
    ///     .await;
    /// assert_eq!(outcomes.len(), messages.len());
    /// # }
    /// ```
    pub async fn process_batch<F>(&self, messages: &[InboxMessage], handler: F) -> Vec<Outcome>
    where
        F: for<'t> FnMut(
                &'t mut Transaction<'static, DB>,
                &'t [&'t InboxMessage],
            ) -> BoxFuture<'t, Result<(), HandlerError>>
            + Send,
    {
        self.batch(messages, Whole(handler, self.consumer())).await
    }

    /// [`process_batch`](Self::process_batch) with a per-message handler:
    /// `handler` runs for each new message in turn, inside the batch's one
    /// transaction. A handler written for [`process`](Self::process) works
    /// as it is (if it can be called more than once), and gains the batch's
    /// single commit.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn run(inbox: inbox_consumer::PostgresInbox, messages: Vec<inbox_consumer::InboxMessage>) {
    /// use inbox_consumer::HandlerError;
    ///
    /// let outcomes = inbox
    ///     .process_each(&messages, |tx, message| {
    ///         Box::pin(async move {
    ///             sqlx::query("INSERT INTO seen (message_id) VALUES ($1)")
    ///                 .bind(message.id())
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok::<_, HandlerError>(())
    ///         })
    ///     })
    ///     .await;
    /// # let _ = outcomes;
    /// # }
    /// ```
    pub async fn process_each<F>(&self, messages: &[InboxMessage], handler: F) -> Vec<Outcome>
    where
        F: for<'t> FnMut(
                &'t mut Transaction<'static, DB>,
                &'t InboxMessage,
            ) -> BoxFuture<'t, Result<(), HandlerError>>
            + Send,
    {
        self.batch(messages, Each(handler, self.consumer())).await
    }

    async fn batch<H: Handle<DB>>(
        &self,
        messages: &[InboxMessage],
        mut handler: H,
    ) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = messages.iter().map(|_| None).collect();
        let mut keys: Vec<Option<String>> = vec![None; messages.len()];
        // The index of each distinct key's first message, in message order.
        let mut first: HashMap<String, usize> = HashMap::with_capacity(messages.len());
        let mut distinct = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            match self.key_of(message) {
                Ok(key) => {
                    if !first.contains_key(&key) {
                        first.insert(key.clone(), i);
                        distinct.push(i);
                    }
                    keys[i] = Some(key);
                }
                Err(reason) => outcomes[i] = Some(Outcome::Dead { reason }),
            }
        }
        if !distinct.is_empty() {
            let ran = self
                .run_batch(messages, &keys, &distinct, &mut handler)
                .await;
            match ran {
                Ran::Committed(decided) => {
                    for (i, key) in keys.iter().enumerate() {
                        let Some(key) = key else { continue };
                        outcomes[i] = Some(match decided.inserted.get(key) {
                            Some(&attempt) if first[key] == i => Outcome::Processed {
                                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                            },
                            _ => decided.known(key),
                        });
                    }
                }
                Ran::Single(decided, outcome) => {
                    let mut outcome = Some(outcome);
                    for (i, key) in keys.iter().enumerate() {
                        let Some(key) = key else { continue };
                        outcomes[i] = Some(if !decided.inserted.contains_key(key) {
                            decided.known(key)
                        } else if first[key] == i {
                            outcome.take().unwrap_or(Outcome::Duplicate)
                        } else {
                            // A copy of the failed message: on its own.
                            self.one(key, &messages[i], &mut handler).await
                        });
                    }
                }
                Ran::OneByOne(decided) => {
                    for (i, key) in keys.iter().enumerate() {
                        let Some(key) = key else { continue };
                        outcomes[i] = Some(match &decided {
                            Some(decided) if !decided.inserted.contains_key(key) => {
                                decided.known(key)
                            }
                            _ => self.one(key, &messages[i], &mut handler).await,
                        });
                    }
                }
                Ran::Unavailable(error) => {
                    let error = Arc::new(error);
                    for (i, key) in keys.iter().enumerate() {
                        if key.is_some() {
                            outcomes[i] = Some(Outcome::Unavailable {
                                error: InboxError::Batch {
                                    messages: messages.len(),
                                    source: Arc::clone(&error),
                                },
                                retry_after: UNAVAILABLE_RETRY,
                            });
                        }
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .zip(&keys)
            .map(|(outcome, key)| {
                let outcome = outcome.unwrap_or(Outcome::Dead {
                    reason: DeadReason::MissingId,
                });
                self.finish(key.as_deref(), outcome)
            })
            .collect()
    }

    /// The batch's transaction: claims every distinct id with one
    /// statement, runs the handler on the new messages, commits.
    async fn run_batch<H: Handle<DB>>(
        &self,
        messages: &[InboxMessage],
        keys: &[Option<String>],
        distinct: &[usize],
        handler: &mut H,
    ) -> Ran {
        let consumer = self.consumer();
        let max = i64::from(self.config().max_attempts());
        let key = |i: usize| keys[i].as_deref().unwrap_or_default();
        let mut tx = match DB::begin_write(&self.backend.pool).await {
            Ok(tx) => tx,
            Err(e) => return Ran::Unavailable(e),
        };
        let ids = || json_array(distinct.iter().map(|&i| key(i)));
        let fresh = DB::SQL
            .claim_fresh_batch
            .filter(|_| !self.backend.seen_duplicates.load(Ordering::Relaxed));
        let mut decided = None;
        if let Some(fresh) = fresh {
            let claimed = Statement::<DB>::new(fresh)
                .bind(consumer)
                .bind(ids())
                .bind(max)
                .fetch_all(&mut tx)
                .await
                .and_then(failures_of::<DB>);
            match claimed {
                Ok(rows) => {
                    let mut d = Decided {
                        inserted: distinct.iter().map(|&i| (key(i).to_owned(), 1)).collect(),
                        dead: HashSet::new(),
                    };
                    for (id, failures, is_dead) in rows {
                        if is_dead || failures >= max {
                            d.inserted.remove(&id);
                            d.dead.insert(id);
                        } else {
                            d.inserted.insert(id, failures + 1);
                        }
                    }
                    decided = Some(d);
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    // Some id was recorded before: claim again, skipping
                    // the recorded ones, in a new transaction.
                    self.backend.seen_duplicates.store(true, Ordering::Relaxed);
                    if let Err(e) = tx.rollback().await {
                        return Ran::Unavailable(e);
                    }
                    tx = match DB::begin_write(&self.backend.pool).await {
                        Ok(tx) => tx,
                        Err(e) => return Ran::Unavailable(e),
                    };
                }
                Err(e) => return self.refused(e, "claiming", distinct.len()),
            }
        }
        let decided = match decided {
            Some(decided) => decided,
            None => match self.claim_known(&mut tx, keys, distinct).await {
                Ok(decided) => decided,
                Err(ran) => return ran,
            },
        };
        if decided.inserted.is_empty() {
            // Nothing new: nothing to run, nothing to commit (the
            // transaction rolls back when dropped).
            return Ran::Committed(decided);
        }
        let new_at: Vec<usize> = distinct
            .iter()
            .copied()
            .filter(|&i| decided.inserted.contains_key(key(i)))
            .collect();
        let new: Vec<&InboxMessage> = new_at.iter().map(|&i| &messages[i]).collect();
        if let Err(error) = run_guarded(handler.run(&mut tx, &new)).await {
            if let [i] = new_at[..] {
                // Alone, it is the one that failed: as `process` does.
                let attempt = decided.inserted[key(i)];
                let outcome = self
                    .conclude_one(key(i), &messages[i], tx, attempt, Err(error))
                    .await;
                return Ran::Single(decided, outcome);
            }
            if let Err(e) = tx.rollback().await {
                tracing::warn!(consumer, error = %e, "inbox: rollback failed");
            }
            tracing::debug!(consumer, messages = new.len(), error = %error,
                "inbox: the batch's handler failed; processing its messages one at a time");
            return Ran::OneByOne(Some(decided));
        }
        match tx.commit().await {
            Ok(()) => Ran::Committed(decided),
            // Refused by the database: not committed.
            Err(e @ sqlx::Error::Database(_)) => {
                tracing::warn!(consumer, messages = new.len(), error = %e,
                    "inbox: the batch's commit was refused; processing its messages one at a time");
                Ran::OneByOne(Some(decided))
            }
            // Committed or not, the redeliveries find out.
            Err(e) => Ran::Unavailable(e),
        }
    }

    /// Claims the batch's ids with `ON CONFLICT`, skipping those recorded
    /// before, then tells the dead ones from the duplicates among them. A
    /// batch that finds every id new lets the next ones try the plain
    /// insert again.
    async fn claim_known(
        &self,
        tx: &mut Transaction<'static, DB>,
        keys: &[Option<String>],
        distinct: &[usize],
    ) -> Result<Decided, Ran> {
        let consumer = self.consumer();
        let max = i64::from(self.config().max_attempts());
        let key = |i: usize| keys[i].as_deref().unwrap_or_default();
        let mut decided = Decided {
            inserted: HashMap::with_capacity(distinct.len()),
            dead: HashSet::new(),
        };
        let claimed = Statement::<DB>::new(DB::SQL.claim_batch)
            .bind(consumer)
            .bind(json_array(distinct.iter().map(|&i| key(i))))
            .bind(max)
            .fetch_all(&mut *tx)
            .await
            .and_then(|rows| {
                rows.iter()
                    .map(|row| {
                        Ok((
                            DB::get::<String>(row, "message_id")?,
                            DB::get::<i64>(row, "attempts")?,
                        ))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
            });
        match claimed {
            Ok(rows) => decided.inserted.extend(rows),
            Err(e) => return Err(self.refused(e, "claiming", distinct.len())),
        }
        if decided.inserted.len() == distinct.len() {
            self.backend.seen_duplicates.store(false, Ordering::Relaxed);
            return Ok(decided);
        }
        let others = distinct
            .iter()
            .map(|&i| key(i))
            .filter(|k| !decided.inserted.contains_key(*k));
        let known = Statement::<DB>::new(DB::SQL.failures_batch)
            .bind(consumer)
            .bind(json_array(others))
            .fetch_all(&mut *tx)
            .await
            .and_then(failures_of::<DB>);
        match known {
            Ok(rows) => decided.dead.extend(
                rows.into_iter()
                    .filter(|(_, failures, is_dead)| *is_dead || *failures >= max)
                    .map(|(id, _, _)| id),
            ),
            Err(e) => return Err(self.refused(e, "reading the attempts of", distinct.len())),
        }
        Ok(decided)
    }

    /// A statement of the batch failed (its transaction rolls back when
    /// dropped). Refused by the database (a deadlock, an id it cannot
    /// store): every message on its own. Anything else (the connection):
    /// the database is unavailable.
    fn refused(&self, error: sqlx::Error, doing: &str, ids: usize) -> Ran {
        if !matches!(error, sqlx::Error::Database(_)) {
            return Ran::Unavailable(error);
        }
        tracing::warn!(consumer = self.consumer(), messages = ids, %error,
            "inbox: {doing} a batch failed; processing its messages one at a time");
        Ran::OneByOne(None)
    }

    /// One message on its own, as [`process`](Self::process) does, with
    /// the batch's handler given a one-message slice.
    async fn one<H: Handle<DB>>(
        &self,
        key: &str,
        message: &InboxMessage,
        handler: &mut H,
    ) -> Outcome {
        let (mut tx, attempt) = match self.claim_one(key).await {
            Ok(claimed) => claimed,
            Err(outcome) => return outcome,
        };
        let single = [message];
        let result = run_guarded(handler.run(&mut tx, &single)).await;
        self.conclude_one(key, message, tx, attempt, result).await
    }
}

/// The rows `message_id, failures, dead` of ids with failures counted.
fn failures_of<DB: InboxDatabase>(
    rows: Vec<DB::Row>,
) -> Result<Vec<(String, i64, bool)>, sqlx::Error> {
    rows.iter()
        .map(|row| {
            Ok((
                DB::get::<String>(row, "message_id")?,
                DB::get::<i64>(row, "failures")?,
                DB::get::<bool>(row, "dead")?,
            ))
        })
        .collect()
}

/// `ids` as a JSON array of strings: one bound parameter, whatever the
/// batch's size, that PostgreSQL (`json_array_elements_text`) and SQLite
/// (`json_each`) both take apart.
pub(crate) fn json_array<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("[");
    for (n, id) in ids.into_iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push('"');
        for c in id.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::json_array;

    #[test]
    fn ids_are_a_json_array_of_strings_whatever_they_hold() {
        let ids = [
            "plain",
            "with \"quotes\"",
            "back\\slash",
            "new\nline\ttab\u{1}",
            "ünïcödé ✓",
            "",
            "123",
        ];
        let json = json_array(ids);
        let back: Vec<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ids);
        assert_eq!(json_array([]), "[]");
    }
}
