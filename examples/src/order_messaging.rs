//! What `order-saga` and `inventory-service` share (DESIGN section 7, "The
//! order saga"): the broker flags, the names of the queues, streams and
//! subjects (all under `--prefix`), the messages between them, the relay of
//! each one's outbox, and the consume loop in front of each one's inbox.
//!
//! An outbox event's destination is the queue's name: `<prefix>inventory`
//! (commands) or `<prefix>orders` (replies). On RabbitMQ it is published to
//! the default exchange, so it lands in the durable queue of that name; on
//! NATS it goes to the subject `<prefix>inventory.commands` (stream
//! `<prefix>INVENTORY`, subjects `<prefix>inventory.>`) or
//! `<prefix>orders.replies` (stream `<prefix>ORDERS`). Both binaries map
//! destinations the same way, so their relays may even share one outbox
//! table (one database). An event of any other destination found there is
//! not theirs to route: on RabbitMQ it goes to the queue of its name (and
//! dies after its attempts when there is none), on NATS it dies at once (no
//! subject for it), its reason kept either way. So give each service a
//! database of its own, or at least no other producer's events in it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use inbox_consumer::{InboxMessage, Outcome};
use outbox::nats::NatsPublisher;
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{Outgoing, PostgresRelay, PublishError, Publisher, RelayConfig};
use serde::{Deserialize, Serialize};

use crate::{redact_url, usage_error, ResultExt, StartError, CONNECT_TIMEOUT};

/// Where the messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// RabbitMQ: durable queues `<prefix>inventory` and `<prefix>orders`.
    Rabbitmq,
    /// NATS JetStream: streams `<prefix>INVENTORY` and `<prefix>ORDERS`.
    Nats,
}

/// The broker flags of `order-saga` and `inventory-service`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The broker.
    #[arg(long, value_enum, default_value = "rabbitmq")]
    pub broker: Broker,
    /// The RabbitMQ URL (`--broker rabbitmq`; `amqps://` for TLS).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    /// The NATS URL (`--broker nats`; `tls://` for TLS).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Prefixes every queue, stream and subject name (letters, digits, `_`
    /// and `-`), so that runs can be isolated from each other.
    #[arg(long, default_value = "")]
    pub prefix: String,
}

/// The names under a prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// The names under `prefix`.
    ///
    /// # Errors
    /// A usage error when `prefix` has characters a stream or subject name
    /// cannot hold.
    pub fn new(prefix: &str) -> Result<Self, StartError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if prefix.len() > 64 || !prefix.chars().all(valid) {
            return Err(usage_error(format!(
                "--prefix {prefix:?}: use at most 64 ASCII letters, digits, `_` and `-`"
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The commands' destination and queue: `<prefix>inventory`.
    pub fn inventory(&self) -> String {
        format!("{}inventory", self.prefix)
    }

    /// The replies' destination and queue: `<prefix>orders`.
    pub fn orders(&self) -> String {
        format!("{}orders", self.prefix)
    }

    /// The JetStream stream of `destination`: `<prefix>INVENTORY` or
    /// `<prefix>ORDERS`.
    fn stream(&self, destination: &str) -> String {
        let bare = destination
            .strip_prefix(&self.prefix)
            .unwrap_or(destination);
        format!("{}{}", self.prefix, bare.to_ascii_uppercase())
    }

    /// The subject a destination's messages are published to.
    fn subject(&self, destination: &str) -> Option<String> {
        if destination == self.inventory() {
            Some(format!("{destination}.commands"))
        } else if destination == self.orders() {
            Some(format!("{destination}.replies"))
        } else {
            None
        }
    }

    fn stream_config(&self, destination: &str) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: self.stream(destination),
            subjects: vec![format!("{destination}.>")],
            ..Default::default()
        }
    }
}

/// A command of the order saga to the inventory (JSON, `type` first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum InventoryCommand {
    /// Reserve `quantity` of `sku` for the order.
    Reserve {
        /// The order.
        order_id: String,
        /// What.
        sku: String,
        /// How many.
        quantity: i64,
    },
    /// Undo the order's reservation.
    Release {
        /// The order.
        order_id: String,
    },
    /// Ship the order's reservation.
    Ship {
        /// The order.
        order_id: String,
    },
}

/// The inventory's reply to a command (JSON, `type` first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum InventoryReply {
    /// `reserve`: reserved.
    Reserved {
        /// The order.
        order_id: String,
    },
    /// `reserve`: not enough stock; nothing changed.
    Rejected {
        /// The order.
        order_id: String,
    },
    /// `release`: nothing of the order is reserved any more.
    Released {
        /// The order.
        order_id: String,
    },
    /// `ship`: shipped.
    Shipped {
        /// The order.
        order_id: String,
    },
    /// `ship`: this SKU cannot be shipped.
    Unshippable {
        /// The order.
        order_id: String,
    },
}

/// The publisher of either broker.
enum AnyPublisher {
    Rabbitmq(RabbitMqPublisher),
    Nats(NatsPublisher),
}

impl Publisher for AnyPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        match self {
            Self::Rabbitmq(p) => p.publish(batch).await,
            Self::Nats(p) => p.publish(batch).await,
        }
    }
}

/// How long a JetStream consumer waits for an ack before it delivers a
/// message again (after a consumer was killed mid-message, say).
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Deliveries RabbitMQ sends ahead of the acks.
const PREFETCH: u16 = 32;

/// A process's link to the broker: its outbox's publisher, and its
/// subscriptions.
pub struct Messaging {
    args: BrokerArgs,
    names: Names,
    publisher: Arc<AnyPublisher>,
    js: Option<jetstream::Context>,
}

impl std::fmt::Debug for Messaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messaging")
            .field("broker", &self.args.broker)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Messaging {
    /// Connects to the broker (bounded by [`CONNECT_TIMEOUT`]) and makes
    /// sure both queues (RabbitMQ, durable) or both streams (NATS) exist.
    ///
    /// # Errors
    /// A sentence naming the broker and its URL (password redacted).
    pub async fn connect(args: &BrokerArgs) -> Result<Self, StartError> {
        let names = Names::new(&args.prefix)?;
        let destinations = [names.inventory(), names.orders()];
        match args.broker {
            Broker::Rabbitmq => {
                let publisher =
                    RabbitMqPublisher::connect_with_timeout(args.amqp.as_str(), CONNECT_TIMEOUT)
                        .await
                        .context(format!(
                            "could not connect to RabbitMQ at {} (--amqp)",
                            redact_url(&args.amqp)
                        ))?;
                for queue in &destinations {
                    publisher
                        .declare_queue(queue)
                        .await
                        .context(format!("could not declare the queue {queue}"))?;
                }
                Ok(Self {
                    args: args.clone(),
                    names,
                    publisher: Arc::new(AnyPublisher::Rabbitmq(publisher)),
                    js: None,
                })
            }
            Broker::Nats => {
                let client = crate::connect_nats(&args.nats).await?;
                let js = jetstream::new(client);
                for destination in &destinations {
                    let config = names.stream_config(destination);
                    let stream = config.name.clone();
                    tokio::time::timeout(CONNECT_TIMEOUT, js.get_or_create_stream(config))
                        .await
                        .map_err(|_| {
                            StartError::from(format!(
                                "NATS did not create or open the stream {stream} within \
                                 {CONNECT_TIMEOUT:?} (is JetStream enabled?)"
                            ))
                        })?
                        .context(format!("could not open or create the stream {stream}"))?;
                }
                let mapping = names.clone();
                let publisher = NatsPublisher::new(js.clone(), move |d| mapping.subject(d));
                Ok(Self {
                    args: args.clone(),
                    names,
                    publisher: Arc::new(AnyPublisher::Nats(publisher)),
                    js: Some(js),
                })
            }
        }
    }

    /// The names in use.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Relays the outbox of `pool` until `shutdown` resolves (the batch in
    /// hand is finished first); its metrics are labelled `relay=name`.
    ///
    /// # Errors
    /// When the relay cannot start.
    pub async fn relay(
        &self,
        pool: sqlx::PgPool,
        name: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let config = RelayConfig::builder()
            .poll_interval(Duration::from_millis(500))
            .build()
            .context("the relay settings are invalid")?;
        let relay = PostgresRelay::named(pool, Arc::clone(&self.publisher), config, name);
        relay
            .run(shutdown)
            .await
            .context("the outbox relay failed")?;
        let m = relay.metrics();
        tracing::info!(
            published = m.published,
            retried = m.retried,
            dead = m.dead,
            "the outbox relay stopped"
        );
        Ok(())
    }

    /// Consumes the messages of `destination` (a queue, or a stream's
    /// subjects) as `consumer`, one at a time through `process` (which
    /// calls the inbox), until `shutdown` resolves. A lost connection is
    /// reopened with backoff by the library's loop; the message in hand is
    /// settled first on shutdown.
    ///
    /// # Errors
    /// When the first subscription fails.
    pub async fn consume<F, Fut>(
        &self,
        destination: &str,
        consumer: &str,
        process: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError>
    where
        F: FnMut(InboxMessage) -> Fut,
        Fut: Future<Output = Outcome>,
    {
        match &self.js {
            None => {
                inbox_consumer::rabbitmq::Subscription::new(self.args.amqp.as_str(), destination)
                    .consumer_tag(consumer)
                    .prefetch(PREFETCH)
                    .declare_when_missing()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .run(process, shutdown)
                    .await
                    .context(format!(
                        "could not consume the queue {destination} (--amqp)"
                    ))
            }
            Some(js) => {
                let stream = self.names.stream(destination);
                inbox_consumer::nats::Subscription::new(js.clone(), &stream, consumer)
                    .create_stream_when_missing(self.names.stream_config(destination))
                    .consumer_config(jetstream::consumer::pull::Config {
                        durable_name: Some(consumer.to_owned()),
                        ack_wait: ACK_WAIT,
                        ..Default::default()
                    })
                    .run(process, shutdown)
                    .await
                    .context(format!("could not consume the stream {stream} (--nats)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_a_prefix() {
        let n = Names::new("t1_").unwrap();
        assert_eq!(n.inventory(), "t1_inventory");
        assert_eq!(n.orders(), "t1_orders");
        assert_eq!(n.stream(&n.inventory()), "t1_INVENTORY");
        assert_eq!(n.stream(&n.orders()), "t1_ORDERS");
        assert_eq!(
            n.subject(&n.inventory()).as_deref(),
            Some("t1_inventory.commands")
        );
        assert_eq!(n.subject(&n.orders()).as_deref(), Some("t1_orders.replies"));
        assert_eq!(n.subject("payments"), None);
        assert_eq!(n.stream_config(&n.orders()).subjects, ["t1_orders.>"]);
        let bare = Names::new("").unwrap();
        assert_eq!(bare.stream(&bare.inventory()), "INVENTORY");
        assert!(Names::new("a.b").is_err());
        assert!(Names::new("a b").is_err());
    }

    #[test]
    fn messages_as_the_design_spells_them() {
        let reserve = InventoryCommand::Reserve {
            order_id: "o1".into(),
            sku: "sku-1".into(),
            quantity: 2,
        };
        assert_eq!(
            serde_json::to_value(&reserve).unwrap(),
            serde_json::json!({"type": "reserve", "order_id": "o1", "sku": "sku-1", "quantity": 2})
        );
        let reply: InventoryReply =
            serde_json::from_str(r#"{"type": "unshippable", "order_id": "o1"}"#).unwrap();
        assert_eq!(
            reply,
            InventoryReply::Unshippable {
                order_id: "o1".into()
            }
        );
    }
}
