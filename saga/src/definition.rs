//! A saga definition: a name, a version, typed data and ordered steps, each
//! an action with an optional compensation.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;

/// What a saga's data must be: it is stored as JSON between transitions.
pub trait SagaData: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> SagaData for T {}

/// Which way an instance is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Running its steps in order.
    Forward,
    /// Undoing its completed steps in reverse order.
    Compensate,
}

impl Phase {
    /// `forward` or `compensate`, as headers and history spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensate => "compensate",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "forward" => Some(Phase::Forward),
            "compensate" => Some(Phase::Compensate),
            _ => None,
        }
    }
}

/// What an action knows of where it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The saga's name.
    pub saga: &'static str,
    /// The instance id.
    pub instance: String,
    /// The action's name (a step's, or its compensation's).
    pub action: &'static str,
    /// Forward, or compensating.
    pub phase: Phase,
    /// Which attempt of this action (1 for the first).
    pub attempt: u32,
}

impl StepContext {
    /// The idempotency key of this action, the same on every attempt:
    /// `<saga>-<instance>-<action>` (for example `order-42-charge`), so a
    /// call retried after a crash or an uncertain answer is the same request.
    pub fn idempotency_key(&self) -> String {
        format!("{}-{}-{}", self.saga, self.instance, self.action)
    }
}

/// A command a message step sends through the outbox, in the transition's
/// transaction.
#[derive(Debug, Clone)]
pub struct Command {
    pub(crate) destination: String,
    pub(crate) payload: Bytes,
    pub(crate) headers: Vec<(String, String)>,
}

impl Command {
    /// A command to `destination` (the outbox destination: a queue, a
    /// subject) with `payload`.
    pub fn new(destination: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            destination: destination.into(),
            payload: payload.into(),
            headers: Vec::new(),
        }
    }

    /// A JSON command.
    pub fn json(destination: impl Into<String>, payload: &impl Serialize) -> Self {
        let body = serde_json::to_vec(payload).unwrap_or_default();
        Self::new(destination, body).with_header("content-type", "application/json")
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A reply to a message step, as the inbox delivered it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub(crate) payload: Bytes,
}

impl Reply {
    /// A reply with this payload (tests build replies this way).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
        }
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload as JSON.
    ///
    /// # Errors
    /// [`ReplyError::Undecodable`] with serde's message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ReplyError> {
        serde_json::from_slice(&self.payload).map_err(|e| ReplyError::Undecodable(e.to_string()))
    }
}

/// Why a reply does not complete its step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A definite failure (the service refused): the saga compensates (a
    /// compensation's failure is retried).
    #[error("the step failed: {0}")]
    Failed(String),
    /// The reply cannot be read: it is dead-lettered with this reason and
    /// changes nothing; the step keeps waiting (and times out).
    #[error("the reply cannot be read: {0}")]
    Undecodable(String),
}

impl ReplyError {
    /// A definite failure.
    pub fn failed(reason: impl Into<String>) -> Self {
        ReplyError::Failed(reason.into())
    }
}

/// What a call step's call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome<D> {
    /// It took effect: the data, updated with what it answered.
    Done(D),
    /// It definitely did not take effect (a 402, a refusal): the saga
    /// compensates (a compensation's failure is retried).
    Failed(String),
    /// Nobody knows (a timeout, a refused connection, a 5xx): the call is
    /// retried with the same idempotency key until the answer is definite.
    /// It never compensates.
    Uncertain(String),
}

pub(crate) type LocalFn<D> = Arc<
    dyn for<'t> Fn(
            &'t mut D,
            &'t mut PgConnection,
            StepContext,
        ) -> BoxFuture<'t, Result<(), String>>
        + Send
        + Sync,
>;
pub(crate) type CommandFn<D> = Arc<dyn Fn(&D, &StepContext) -> Command + Send + Sync>;
pub(crate) type ReplyFn<D> = Arc<dyn Fn(&mut D, &Reply) -> Result<(), ReplyError> + Send + Sync>;
pub(crate) type CallFn<D> =
    Arc<dyn Fn(D, StepContext) -> BoxFuture<'static, CallOutcome<D>> + Send + Sync>;

/// What an action does.
pub(crate) enum Action<D> {
    /// Runs inside the transition's own transaction.
    Local(LocalFn<D>),
    /// Sends a command through the outbox; a reply through the inbox ends it.
    Message {
        command: CommandFn<D>,
        reply: Option<ReplyFn<D>>,
    },
    /// An async call outside the transaction (an HTTP request), retried
    /// with the same idempotency key while its outcome is uncertain.
    Call(CallFn<D>),
}

impl<D> Clone for Action<D> {
    fn clone(&self) -> Self {
        match self {
            Action::Local(f) => Action::Local(Arc::clone(f)),
            Action::Message { command, reply } => Action::Message {
                command: Arc::clone(command),
                reply: reply.clone(),
            },
            Action::Call(f) => Action::Call(Arc::clone(f)),
        }
    }
}

/// What a message step does when its reply does not come in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// Send the command again (a new attempt, the same command), at most
    /// this many attempts in all; then compensate.
    Retry {
        /// Attempts in all, the first included.
        attempts: u32,
    },
    /// Compensate at once, this step included (its command may have taken
    /// effect: its compensation must undo it or find nothing to undo).
    Compensate,
}

/// One action of a saga, a step's or a compensation's.
pub struct Step<D> {
    pub(crate) name: &'static str,
    pub(crate) action: Action<D>,
    pub(crate) compensation: Option<Box<Step<D>>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_timeout: OnTimeout,
}

impl<D> std::fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.action {
            Action::Local(_) => "local",
            Action::Message { .. } => "message",
            Action::Call(_) => "call",
        };
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("compensation", &self.compensation.as_ref().map(|c| c.name))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<D: SagaData> Step<D> {
    fn with(name: &'static str, action: Action<D>) -> Self {
        Self {
            name,
            action,
            compensation: None,
            timeout: None,
            on_timeout: OnTimeout::Compensate,
        }
    }

    /// A step that runs inside the transition's transaction: whatever it
    /// writes through the connection commits with the saga's state, or not
    /// at all. `Err` is a definite failure (the saga compensates).
    pub fn local<F>(name: &'static str, action: F) -> Self
    where
        F: for<'t> Fn(
                &'t mut D,
                &'t mut PgConnection,
                StepContext,
            ) -> BoxFuture<'t, Result<(), String>>
            + Send
            + Sync
            + 'static,
    {
        Self::with(name, Action::Local(Arc::new(action)))
    }

    /// A step that sends `command` through the outbox and waits for its
    /// reply (see [`on_reply`](Self::on_reply)), correlated to the instance
    /// and the step by the command's headers, which the service copies into
    /// its reply ([`reply_headers`](crate::reply_headers)).
    pub fn message<F>(name: &'static str, command: F) -> Self
    where
        F: Fn(&D, &StepContext) -> Command + Send + Sync + 'static,
    {
        Self::with(
            name,
            Action::Message {
                command: Arc::new(command),
                reply: None,
            },
        )
    }

    /// A step that makes an async call outside the transaction, handed a
    /// stable idempotency key ([`StepContext::idempotency_key`]).
    pub fn call<F, Fut>(name: &'static str, call: F) -> Self
    where
        F: Fn(D, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CallOutcome<D>> + Send + 'static,
    {
        Self::with(
            name,
            Action::Call(Arc::new(move |d, ctx| Box::pin(call(d, ctx)))),
        )
    }

    /// What a reply to a message step means: `Ok` completes the step (the
    /// handler may update the data), [`ReplyError::Failed`] compensates,
    /// [`ReplyError::Undecodable`] dead-letters the reply.
    #[must_use]
    pub fn on_reply<F>(mut self, reply: F) -> Self
    where
        F: Fn(&mut D, &Reply) -> Result<(), ReplyError> + Send + Sync + 'static,
    {
        if let Action::Message { reply: slot, .. } = &mut self.action {
            *slot = Some(Arc::new(reply));
        }
        self
    }

    /// The action that undoes this step, run when a later step fails. It
    /// must be idempotent: it is retried (with backoff) until it succeeds or
    /// the saga's compensation attempts run out (the instance is then
    /// `failed`).
    #[must_use]
    pub fn compensate(mut self, compensation: Step<D>) -> Self {
        self.compensation = Some(Box::new(compensation));
        self
    }

    /// How long a message step waits for its reply, and what then.
    /// Without it, the saga's default step timeout applies.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration, then: OnTimeout) -> Self {
        self.timeout = Some(timeout);
        self.on_timeout = then;
        self
    }
}

/// Why a definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// A saga needs at least one step.
    #[error("saga `{0}` has no steps")]
    NoSteps(&'static str),
    /// Two actions share a name (names key idempotency and history).
    #[error("saga `{saga}` names two actions `{action}`")]
    DuplicateName {
        /// The saga.
        saga: &'static str,
        /// The name.
        action: &'static str,
    },
    /// A message step without [`Step::on_reply`].
    #[error("saga `{saga}`: message step `{action}` has no reply handler (on_reply)")]
    NoReplyHandler {
        /// The saga.
        saga: &'static str,
        /// The step.
        action: &'static str,
    },
    /// A name that cannot travel in a header or a key.
    #[error("saga `{saga}`: `{name}` is not a valid name (ASCII letters, digits, `_` and `-`)")]
    InvalidName {
        /// The saga.
        saga: &'static str,
        /// The name.
        name: &'static str,
    },
}

/// How a saga retries what can be retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The first delay.
    pub first: Duration,
    /// The longest delay (each doubles the previous).
    pub max: Duration,
}

impl Retry {
    /// The delay before attempt `attempt + 1`, `attempt` (1-based) having
    /// failed: `first * 2^(attempt-1)`, capped at `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max)
    }
}

/// A saga definition: a name, a version, typed data and ordered steps.
///
/// See the crate docs for one that reads like the business process.
pub struct Saga<D> {
    pub(crate) name: &'static str,
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step<D>>,
    pub(crate) step_timeout: Duration,
    pub(crate) call_retry: Retry,
    pub(crate) compensation_retry: Retry,
    pub(crate) compensation_attempts: u32,
}

impl<D> std::fmt::Debug for Saga<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<D: SagaData> Saga<D> {
    /// A new definition: `name` and `version` are stored with each instance,
    /// which keeps running with the version it started with.
    pub fn builder(name: &'static str, version: u32) -> SagaBuilder<D> {
        SagaBuilder {
            saga: Saga {
                name,
                version,
                steps: Vec::new(),
                step_timeout: Duration::from_secs(30),
                call_retry: Retry {
                    first: Duration::from_millis(200),
                    max: Duration::from_secs(10),
                },
                compensation_retry: Retry {
                    first: Duration::from_millis(500),
                    max: Duration::from_secs(30),
                },
                compensation_attempts: 10,
            },
        }
    }

    /// The name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The version.
    pub fn version(&self) -> u32 {
        self.version
    }
}

/// Builds a [`Saga`].
pub struct SagaBuilder<D> {
    saga: Saga<D>,
}

impl<D> std::fmt::Debug for SagaBuilder<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.saga.fmt(f)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl<D: SagaData> SagaBuilder<D> {
    /// The next step.
    #[must_use]
    pub fn step(mut self, step: Step<D>) -> Self {
        self.saga.steps.push(step);
        self
    }

    /// How long a message step waits for its reply unless it says otherwise
    /// (default 30 s).
    #[must_use]
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.saga.step_timeout = timeout;
        self
    }

    /// The backoff of a call whose outcome is uncertain (default 200 ms
    /// doubling up to 10 s; it is retried until it is definite).
    #[must_use]
    pub fn call_retry(mut self, first: Duration, max: Duration) -> Self {
        self.saga.call_retry = Retry { first, max };
        self
    }

    /// The backoff of a failing compensation (default 500 ms doubling up to
    /// 30 s) and how many attempts it gets (default 10) before the instance
    /// is `failed`.
    #[must_use]
    pub fn compensation_retry(mut self, first: Duration, max: Duration, attempts: u32) -> Self {
        self.saga.compensation_retry = Retry { first, max };
        self.saga.compensation_attempts = attempts.max(1);
        self
    }

    /// The definition.
    ///
    /// # Errors
    /// [`DefinitionError`] says what is wrong.
    pub fn build(self) -> Result<Saga<D>, DefinitionError> {
        let saga = self.saga;
        if !valid_name(saga.name) {
            return Err(DefinitionError::InvalidName {
                saga: saga.name,
                name: saga.name,
            });
        }
        if saga.steps.is_empty() {
            return Err(DefinitionError::NoSteps(saga.name));
        }
        let mut names = HashSet::new();
        let actions = saga
            .steps
            .iter()
            .flat_map(|s| std::iter::once(s).chain(s.compensation.as_deref()));
        for action in actions {
            if !valid_name(action.name) {
                return Err(DefinitionError::InvalidName {
                    saga: saga.name,
                    name: action.name,
                });
            }
            if !names.insert(action.name) {
                return Err(DefinitionError::DuplicateName {
                    saga: saga.name,
                    action: action.name,
                });
            }
            if let Action::Message { reply: None, .. } = action.action {
                return Err(DefinitionError::NoReplyHandler {
                    saga: saga.name,
                    action: action.name,
                });
            }
        }
        Ok(saga)
    }
}
