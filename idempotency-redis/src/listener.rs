//! The pub/sub listener that wakes this process's waiting duplicates when
//! a record they watch settles.

use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{Listener, Listening, RecordId, Waiters, RECONNECT_MAX};

use crate::store::{BACKEND, DEFAULT_RESPONSE_TIMEOUT};

/// The tasks of this process that wait for a record of this store, and the
/// subscriber that wakes them. One per store and prefix, shared by clones.
pub(crate) struct Notifier {
    pub(crate) listener: Listener,
    /// Where to subscribe: the server, or each seed node of a cluster.
    pub(crate) subscribers: Vec<redis::Client>,
}

impl Notifier {
    pub(crate) fn new(subscribers: Vec<redis::Client>) -> Self {
        Self {
            listener: Listener::new(),
            subscribers,
        }
    }

    /// Starts the subscriber on `channel`; dropping what it returns ends it.
    pub(crate) fn start(
        &self,
        channel: Vec<u8>,
    ) -> impl FnOnce(tokio::sync::watch::Sender<Listening>, Waiters) -> tokio::sync::watch::Sender<()>
    {
        let subscribers = self.subscribers.clone();
        move |state, waiters| {
            let (stop, stopped) = tokio::sync::watch::channel(());
            tokio::spawn(listen(subscribers, channel, waiters, state, stopped));
            stop
        }
    }
}

/// Subscribes to `channel` on the first of `subscribers` that answers.
async fn subscribe(
    subscribers: &[redis::Client],
    channel: &[u8],
) -> Result<redis::aio::PubSubStream, redis::RedisError> {
    let mut last = None;
    for client in subscribers {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, subscribed).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "SUBSCRIBE did not answer in time",
                )))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from(std::io::Error::other("no node to subscribe on"))
    }))
}

/// The record a notification names: its payload is the record's key,
/// `<prefix>{<64 hex digits>}`.
fn notified_record(payload: &[u8]) -> Option<RecordId> {
    let tag = payload.strip_suffix(b"}")?;
    let open = tag.len().checked_sub(65)?;
    if tag[open] != b'{' {
        return None;
    }
    RecordId::from_hex(&tag[open + 1..])
}

/// The listener task: subscribes to the store's channel and wakes the
/// waiters of each record published. After a lost connection it subscribes
/// again (on the next node that answers, backing off up to
/// [`RECONNECT_MAX`]) and wakes every waiter, since what was published
/// meanwhile is lost. Ends when the store and its clones are dropped, or
/// when its first subscription fails.
async fn listen(
    subscribers: Vec<redis::Client>,
    channel: Vec<u8>,
    waiters: Waiters,
    state: tokio::sync::watch::Sender<Listening>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    use futures_util::StreamExt;
    let mut stream = match subscribe(&subscribers, &channel).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(
                backend = BACKEND,
                error = &e as &dyn std::error::Error,
                "the idempotency listener could not SUBSCRIBE; waiting duplicates poll"
            );
            state.send_replace(Listening::Failed(Arc::from(e.to_string())));
            return;
        }
    };
    state.send_replace(Listening::Up);
    let mut pause = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            message = stream.next() => match message {
                Some(message) => match notified_record(message.get_payload_bytes()) {
                    Some(id) => waiters.wake(&id),
                    None => tracing::debug!(backend = BACKEND, "ignoring a notification that names no record"),
                },
                None => {
                    tracing::warn!(backend = BACKEND, "the idempotency listener lost its connection; subscribing again");
                    state.send_replace(Listening::Down);
                    waiters.wake_all();
                    stream = loop {
                        tokio::select! {
                            _ = stop.changed() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(RECONNECT_MAX);
                        match subscribe(&subscribers, &channel).await {
                            Ok(stream) => break stream,
                            Err(e) => tracing::debug!(
                                backend = BACKEND,
                                error = &e as &dyn std::error::Error,
                                "the idempotency listener could not subscribe yet"
                            ),
                        }
                    };
                    pause = Duration::from_millis(100);
                    state.send_replace(Listening::Up);
                    // Whatever settled while it was down.
                    waiters.wake_all();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_their_record_or_nothing() {
        let id = RecordId::from_parts(b"p", b"k");
        let key = |prefix: &str, hex: &str| format!("{prefix}{{{hex}}}").into_bytes();
        assert_eq!(notified_record(&key("pay:", &id.to_hex())), Some(id));
        assert_eq!(notified_record(&key("", &id.to_hex())), Some(id));
        for bad in [
            b"".to_vec(),
            b"}".to_vec(),
            key("pay:", &id.to_hex()[1..]),
            format!("pay:[{}}}", id.to_hex()).into_bytes(),
            format!("pay:{{{}", id.to_hex()).into_bytes(),
            key("pay:", &format!("{}zz", &id.to_hex()[2..])),
        ] {
            assert_eq!(notified_record(&bad), None, "{bad:?}");
        }
    }
}
