//! What an operator asks for: an area, an action, the items (by id or by
//! filter), and what comes back.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::AdminError;

/// Where stuck work lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    /// `outbox.events`: events waiting and dead.
    Outbox,
    /// `inbox_consumer.attempts`: failing and dead messages, per consumer.
    Inbox,
    /// `saga.instances`, by state.
    Saga,
    /// `idempotency.idempotency_records` in flight past their lease.
    Idempotency,
}

impl Area {
    /// Every area.
    pub const ALL: [Area; 4] = [Area::Outbox, Area::Inbox, Area::Saga, Area::Idempotency];

    /// As written on the command line and in the API's paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Area::Outbox => "outbox",
            Area::Inbox => "inbox",
            Area::Saga => "saga",
            Area::Idempotency => "idempotency",
        }
    }

    /// The area named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// What one item is called.
    pub fn item(self) -> &'static str {
        match self {
            Area::Outbox => "outbox event",
            Area::Inbox => "inbox message",
            Area::Saga => "saga instance",
            Area::Idempotency => "idempotency record",
        }
    }

    /// The states it lists, the default first.
    pub fn states(self) -> &'static [&'static str] {
        match self {
            Area::Outbox => &["dead", "pending", "discarded"],
            Area::Inbox => &["dead", "failing", "replaying"],
            Area::Saga => &[
                "failed",
                "pending",
                "running",
                "compensating",
                "completed",
                "compensated",
            ],
            Area::Idempotency => &["in-flight"],
        }
    }

    /// The actions it takes besides list and show.
    pub fn actions(self) -> &'static [Action] {
        match self {
            Area::Outbox | Area::Inbox => &[Action::Retry, Action::Discard, Action::Purge],
            Area::Saga => &[
                Action::Retry,
                Action::Resume,
                Action::Compensate,
                Action::Discard,
                Action::Purge,
            ],
            Area::Idempotency => &[Action::Discard, Action::Purge],
        }
    }

    /// `state`, checked against [`states`](Self::states); the default when
    /// `None`.
    ///
    /// # Errors
    /// [`AdminError::Usage`] naming the states there are.
    pub fn state(self, state: Option<&str>) -> Result<&str, AdminError> {
        match state {
            None => Ok(self.states()[0]),
            Some(s) if self.states().contains(&s) => Ok(s),
            Some(s) => Err(AdminError::Usage(format!(
                "{}: no state {s:?}; the states are {}",
                self.as_str(),
                self.states().join(", ")
            ))),
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator does to items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back through the normal path: the relay publishes an outbox event
    /// again, the consumer replays an inbox message through its inbox, a
    /// saga retries its current step.
    Retry,
    /// Put aside for good: a dead outbox event is marked discarded, a dead
    /// inbox message is settled as handled (a redelivery is a duplicate),
    /// an ended saga instance is deleted, an in-flight record is deleted.
    Discard,
    /// Delete what is finished, older than an age: discarded outbox events
    /// (never below a retention hold), processed inbox rows, ended sagas,
    /// expired idempotency records.
    Purge,
    /// Sagas: a failed one compensates again; a running one has its timer
    /// fire now.
    Resume,
    /// Sagas: compensation forced from the current step.
    Compensate,
}

impl Action {
    /// As written on the command line and in the API's paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Discard => "discard",
            Action::Purge => "purge",
            Action::Resume => "resume",
            Action::Compensate => "compensate",
        }
    }

    /// The action named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Action::Retry,
            Action::Discard,
            Action::Purge,
            Action::Resume,
            Action::Compensate,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which items a list or an action by filter takes. Each field narrows;
/// a field the area has not is a usage error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The state (the area's default when absent).
    #[serde(default)]
    pub state: Option<String>,
    /// Outbox: the destination.
    #[serde(default)]
    pub destination: Option<String>,
    /// Inbox: the consumer.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Saga: the saga's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The reason, exactly as listed (a group's cause).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Filter {
    /// The one narrowing field of `area` besides state and reason
    /// (destination, consumer, name), checking that no other is set.
    pub(crate) fn scope(&self, area: Area) -> Result<Option<&str>, AdminError> {
        let (own, others): (&Option<String>, [(&str, &Option<String>); 2]) = match area {
            Area::Outbox => (
                &self.destination,
                [("consumer", &self.consumer), ("name", &self.name)],
            ),
            Area::Inbox => (
                &self.consumer,
                [("destination", &self.destination), ("name", &self.name)],
            ),
            Area::Saga => (
                &self.name,
                [
                    ("destination", &self.destination),
                    ("consumer", &self.consumer),
                ],
            ),
            Area::Idempotency => {
                if let Some((field, _)) = [
                    ("destination", &self.destination),
                    ("consumer", &self.consumer),
                    ("name", &self.name),
                    ("reason", &self.reason),
                ]
                .into_iter()
                .find(|(_, v)| v.is_some())
                {
                    return Err(AdminError::Usage(format!(
                        "idempotency records have no {field} to filter on"
                    )));
                }
                return Ok(None);
            }
        };
        if let Some((field, _)) = others.into_iter().find(|(_, v)| v.is_some()) {
            return Err(AdminError::Usage(format!(
                "{area} items have no {field} to filter on"
            )));
        }
        Ok(own.as_deref())
    }

    /// How it reads in messages: `state=dead, destination=payments`.
    pub fn describe(&self) -> String {
        [
            ("state", &self.state),
            ("destination", &self.destination),
            ("consumer", &self.consumer),
            ("name", &self.name),
            ("reason", &self.reason),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v:?}")))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// The items an action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// These ids (for the inbox, message ids, of `consumer` when given).
    Ids {
        /// The ids.
        ids: Vec<String>,
        /// Inbox: the consumer, when the id alone is ambiguous.
        consumer: Option<String>,
    },
    /// Every item the filter matches now, in batches.
    Filter(Filter),
    /// Purge: what is finished and older than this.
    OlderThan {
        /// The age.
        age: Duration,
        /// Inbox: only this consumer's rows.
        consumer: Option<String>,
    },
}

/// Who acts, for the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The token's name (console) or `--as` (CLI).
    pub name: String,
    /// `console` or `cli`.
    pub via: &'static str,
}

/// What an action did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The area.
    pub area: String,
    /// The action.
    pub action: String,
    /// The audit rows' `action_id`.
    pub action_id: String,
    /// The items it changed.
    pub changed: Vec<String>,
    /// The ids given that it left alone, and why (unknown, or in a state
    /// the action does not apply to).
    pub skipped: Vec<Skipped>,
    /// The batches it ran (one transaction and one audit row each).
    pub batches: usize,
}

/// An id an action left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The id.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// Failures with one cause: the items of one area that share their reason
/// and their destination (outbox), consumer (inbox) or saga name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// The state its items are in.
    pub state: String,
    /// The destination, consumer or saga name.
    pub scope: Option<String>,
    /// The reason they share.
    pub reason: Option<String>,
    /// How many.
    pub count: i64,
    /// The filter that takes exactly this group ("retry all in this group").
    pub filter: Filter,
}
