//! Replays of dead messages an operator asked for (transactional mode).
//!
//! A failing message keeps its payload and headers with its attempt count.
//! Once it is dead, an operator can ask for a replay (`messaging-admin
//! inbox retry`): its dead mark and failures are cleared and `replay_at` is
//! set. The consumer then processes it **through the inbox**, with the same
//! handler as the broker's deliveries ([`Inbox::run_replays`]): a message
//! processed meanwhile is a duplicate and does not run again, a failing one
//! is counted and dies again after the maximum attempts.
//!
//! Why the inbox keeps the payload instead of the broker's dead-letter
//! queue: a queue declared without a dead-letter exchange (as the examples'
//! are) drops a rejected message, and a JetStream consumer never redelivers
//! a terminated one; the inbox's row is the one copy every broker leaves.

use std::future::Future;
use std::time::Duration;

use sql_foundation::{millis, Statement};

use crate::error::InboxError;
use crate::inbox::Inbox;
use crate::message::InboxMessage;
use crate::outcome::Outcome;
use crate::transactional::{InboxDatabase, Transactional};

/// How many replays one round of [`Inbox::run_replays`] takes.
pub const REPLAY_BATCH: u32 = 100;

impl<DB: InboxDatabase> Inbox<Transactional<DB>> {
    /// Up to `limit` messages of this consumer an operator asked to replay
    /// and that are due, oldest request first, each rebuilt from its kept
    /// payload and headers (marked redelivered). Hand each to the same
    /// handler as the broker's deliveries (one that calls
    /// [`process`](Self::process)), then report the outcome with
    /// [`replayed`](Self::replayed).
    ///
    /// # Errors
    /// [`InboxError::Database`].
    pub async fn replays(&self, limit: u32) -> Result<Vec<InboxMessage>, InboxError> {
        let rows = Statement::<DB>::new(DB::SQL.replays)
            .bind(self.consumer())
            .bind(i64::from(limit))
            .fetch_all(&self.backend.pool)
            .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = DB::get(row, "message_id")?;
            let payload: Vec<u8> = DB::get(row, "payload")?;
            let headers: Option<String> = DB::get(row, "headers")?;
            let headers: Vec<(String, String)> = headers
                .as_deref()
                .and_then(|h| serde_json::from_str(h).ok())
                .unwrap_or_default();
            let mut message = InboxMessage::new(Some(id), payload).redelivered(true);
            for (name, value) in headers {
                message = message.with_header(name, value);
            }
            messages.push(message);
        }
        Ok(messages)
    }

    /// Records what the replay of `message_id` came to: processed, a
    /// duplicate or dead again, the request is done; failed, it is tried
    /// again after the outcome's delay; the database unavailable, at the
    /// next round.
    ///
    /// # Errors
    /// [`InboxError::Database`]; the replay is then tried again, and the
    /// inbox makes a second run of a processed message a duplicate.
    pub async fn replayed(&self, message_id: &str, outcome: &Outcome) -> Result<(), InboxError> {
        let statement = match outcome {
            Outcome::Processed { .. } | Outcome::Duplicate | Outcome::Dead { .. } => {
                Statement::<DB>::new(DB::SQL.replayed)
                    .bind(self.consumer())
                    .bind(message_id)
            }
            Outcome::Failed { retry_after, .. } => Statement::<DB>::new(DB::SQL.replay_later)
                .bind(self.consumer())
                .bind(message_id)
                .bind(millis(*retry_after)),
            _ => return Ok(()),
        };
        statement.execute(&self.backend.pool).await?;
        Ok(())
    }

    /// Runs the replays operators ask for until `shutdown` resolves: every
    /// `poll_interval`, the due ones ([`replays`](Self::replays)) go through
    /// `handler`, the same handler as the broker's deliveries, and their
    /// outcomes are recorded ([`replayed`](Self::replayed)). Run it beside
    /// the subscription; database errors are logged and retried.
    pub async fn run_replays<H, Fut, S>(&self, mut handler: H, poll_interval: Duration, shutdown: S)
    where
        H: FnMut(InboxMessage) -> Fut,
        Fut: Future<Output = Outcome>,
        S: Future<Output = ()>,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let round = async {
                let messages = self.replays(REPLAY_BATCH).await?;
                let n = messages.len();
                for message in messages {
                    let id = message.id().unwrap_or_default().to_owned();
                    let outcome = handler(message).await;
                    tracing::info!(consumer = self.consumer(), message_id = %id,
                        outcome = outcome.name(), "inbox: replayed a message at an operator's request");
                    self.replayed(&id, &outcome).await?;
                }
                Ok::<_, InboxError>(n)
            };
            let pause = match round.await {
                Ok(n) if n == REPLAY_BATCH as usize => Duration::ZERO,
                Ok(_) => poll_interval,
                Err(e) => {
                    tracing::warn!(consumer = self.consumer(), error = %e, cause = ?std::error::Error::source(&e),
                        "inbox: reading the replays failed; retrying");
                    poll_interval
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
