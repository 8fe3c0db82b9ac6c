//! The state machine of one instance, with no I/O: an event comes in, the
//! instance changes, and the effects come out (commands to enqueue, the
//! timer to set, history to write, a local action or a call to run). The
//! runtime ([`crate::Sagas`]) loads the instance, feeds it events inside one
//! transaction, and writes what comes out in that transaction.

use std::time::Duration;

use crate::definition::{
    Action, CallOutcome, Command, OnTimeout, Phase, Reply, ReplyError, Saga, SagaData, Step,
    StepContext,
};

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Running its steps.
    Running,
    /// Undoing its completed steps after a step failed.
    Compensating,
    /// Every step done.
    Completed,
    /// Every completed step undone.
    Compensated,
    /// A compensation kept failing past its attempts, or the instance
    /// cannot be run (its data does not decode): an operator decides.
    Failed,
}

impl State {
    /// As stored and shown: `running`, `compensating`, `completed`,
    /// `compensated`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Compensating => "compensating",
            State::Completed => "completed",
            State::Compensated => "compensated",
            State::Failed => "failed",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => State::Running,
            "compensating" => State::Compensating,
            "completed" => State::Completed,
            "compensated" => State::Compensated,
            "failed" => State::Failed,
            _ => return None,
        })
    }

    /// Whether it has ended (nothing more happens to it by itself).
    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::Compensated | State::Failed)
    }

    /// Every state.
    pub const ALL: [State; 5] = [
        State::Running,
        State::Compensating,
        State::Completed,
        State::Compensated,
        State::Failed,
    ];
}

/// An instance as the machine sees it.
#[derive(Debug, Clone)]
pub(crate) struct Instance<D> {
    pub(crate) id: String,
    pub(crate) state: State,
    /// Forward: the step running. Compensating: the step whose
    /// compensation is running.
    pub(crate) step: usize,
    /// A command is out and its reply awaited.
    pub(crate) waiting: bool,
    /// Attempts of the current action (a call's fencing token).
    pub(crate) attempt: u32,
    pub(crate) data: D,
    pub(crate) failure: Option<String>,
}

/// What a transition does to the timer (the instance's `due_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Leave it as it is.
    Keep,
    /// Nothing is due.
    Clear,
    /// Due this long after the transition commits.
    After(Duration),
}

/// One line of an instance's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) event: &'static str,
    pub(crate) action: Option<&'static str>,
    pub(crate) detail: Option<String>,
}

/// What a transition asks the runtime to do, in its transaction.
#[derive(Debug)]
pub(crate) struct Effects {
    pub(crate) commands: Vec<(Command, StepContext)>,
    pub(crate) timer: Timer,
    pub(crate) history: Vec<Entry>,
    /// A local action to run now, in the transaction; its result comes back
    /// as [`Event::Local`].
    pub(crate) local: Option<StepContext>,
    /// Whether the instance changed (an ignored event changes nothing).
    pub(crate) changed: bool,
    /// A step that ended (for its latency), and how.
    pub(crate) ended: Vec<(&'static str, &'static str)>,
}

impl Default for Effects {
    fn default() -> Self {
        Self {
            commands: Vec::new(),
            timer: Timer::Keep,
            history: Vec::new(),
            local: None,
            changed: false,
            ended: Vec::new(),
        }
    }
}

impl Effects {
    fn log(&mut self, event: &'static str, action: Option<&'static str>, detail: Option<String>) {
        self.history.push(Entry {
            event,
            action,
            detail,
        });
    }
}

/// What happens to an instance.
#[derive(Debug)]
pub(crate) enum Event<'a, D> {
    /// It was just created.
    Start,
    /// A reply to the message action `action`, in `phase`.
    Reply {
        action: &'a str,
        phase: Phase,
        reply: &'a Reply,
    },
    /// Its timer fired (not for a call: see [`Machine::call_due`]).
    Due,
    /// The call of attempt `attempt`, made in `phase`, came to `outcome`.
    Called {
        attempt: u32,
        phase: Phase,
        outcome: CallOutcome<D>,
    },
    /// The local action asked for ran.
    Local(Result<(), String>),
}

/// Why an event was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ignored {
    /// The instance is not waiting for this (another step, a reply that
    /// came twice or late, a fenced call): nothing changes.
    NotWaiting(String),
    /// The reply cannot be read: dead-letter it, nothing changes.
    Undecodable(String),
}

/// The machine of one saga definition.
pub(crate) struct Machine<'s, D> {
    pub(crate) saga: &'s Saga<D>,
}

impl<'s, D: SagaData> Machine<'s, D> {
    pub(crate) fn new(saga: &'s Saga<D>) -> Self {
        Self { saga }
    }

    /// The action the instance is on: a step's, or its compensation's.
    pub(crate) fn current(&self, inst: &Instance<D>) -> Option<&'s Step<D>> {
        let step = self.saga.steps.get(inst.step)?;
        match inst.state {
            State::Running => Some(step),
            State::Compensating => step.compensation.as_deref(),
            _ => None,
        }
    }

    fn phase(inst: &Instance<D>) -> Phase {
        if inst.state == State::Compensating {
            Phase::Compensate
        } else {
            Phase::Forward
        }
    }

    pub(crate) fn context(&self, inst: &Instance<D>, action: &Step<D>) -> StepContext {
        StepContext {
            saga: self.saga.name,
            instance: inst.id.clone(),
            action: action.name,
            phase: Self::phase(inst),
            attempt: inst.attempt,
        }
    }

    /// Claims the call that is due, if the instance's current action is a
    /// call: a new attempt (the call's fencing token), and the timer pushed
    /// out by `lease` so that no other worker makes it meanwhile. The
    /// runtime commits that, makes the call outside any transaction, then
    /// feeds [`Event::Called`] with the attempt.
    pub(crate) fn claim_call(
        &self,
        inst: &mut Instance<D>,
        lease: Duration,
        fx: &mut Effects,
    ) -> Option<StepContext> {
        if inst.state.is_final() {
            return None;
        }
        let action = self.current(inst)?;
        if !matches!(action.action, Action::Call(_)) {
            return None;
        }
        inst.attempt += 1;
        fx.timer = Timer::After(lease);
        fx.changed = true;
        fx.log(
            "calling",
            Some(action.name),
            Some(format!("attempt {}", inst.attempt)),
        );
        Some(self.context(inst, action))
    }

    /// Applies `event`. On `Err` nothing changed (and `fx` says so).
    pub(crate) fn handle(
        &self,
        inst: &mut Instance<D>,
        event: Event<'_, D>,
        fx: &mut Effects,
    ) -> Result<(), Ignored> {
        if inst.state.is_final() && !matches!(event, Event::Local(_)) {
            return Err(Ignored::NotWaiting(format!(
                "the instance has ended ({})",
                inst.state.as_str()
            )));
        }
        match event {
            Event::Start => {
                fx.log("started", None, None);
                self.start_action(inst, fx);
            }
            Event::Reply {
                action,
                phase,
                reply,
            } => self.reply(inst, action, phase, reply, fx)?,
            Event::Due => self.due(inst, fx)?,
            Event::Called {
                attempt,
                phase,
                outcome,
            } => self.called(inst, attempt, phase, outcome, fx)?,
            Event::Local(result) => match result {
                Ok(()) => self.complete_current(inst, fx),
                Err(reason) => self.fail_current(inst, reason, fx),
            },
        }
        fx.changed = true;
        Ok(())
    }

    fn reply(
        &self,
        inst: &mut Instance<D>,
        action: &str,
        phase: Phase,
        reply: &Reply,
        fx: &mut Effects,
    ) -> Result<(), Ignored> {
        let current = self.current(inst);
        let waiting_for =
            current.filter(|c| inst.waiting && c.name == action && Self::phase(inst) == phase);
        let Some(step) = waiting_for else {
            return Err(Ignored::NotWaiting(format!(
                "a reply to `{action}` ({}) while the instance {} ({})",
                phase.as_str(),
                match (current, inst.waiting) {
                    (Some(c), true) => format!("waits for `{}`", c.name),
                    (Some(c), false) => format!("is on `{}` and waits for no reply", c.name),
                    (None, _) => "waits for nothing".to_owned(),
                },
                inst.state.as_str(),
            )));
        };
        let Action::Message {
            reply: Some(handler),
            ..
        } = &step.action
        else {
            return Err(Ignored::NotWaiting(format!("`{action}` expects no reply")));
        };
        let mut data = inst.data.clone();
        match handler(&mut data, reply) {
            Ok(()) => {
                inst.data = data;
                self.complete_current(inst, fx);
            }
            Err(ReplyError::Failed(reason)) => self.fail_current(inst, reason, fx),
            Err(ReplyError::Undecodable(reason)) => return Err(Ignored::Undecodable(reason)),
        }
        Ok(())
    }

    fn due(&self, inst: &mut Instance<D>, fx: &mut Effects) -> Result<(), Ignored> {
        let Some(step) = self.current(inst) else {
            if inst.state == State::Compensating {
                // Compensating on a step without a compensation (an
                // operator forced the compensation there): the steps below.
                self.next_compensation(inst, inst.step, fx);
                return Ok(());
            }
            return Err(Ignored::NotWaiting("nothing is due".into()));
        };
        match (&step.action, inst.waiting) {
            (Action::Call(_), _) => {
                return Err(Ignored::NotWaiting("a call is made, not timed out".into()))
            }
            (Action::Message { .. }, true) => {
                inst.waiting = false;
                fx.log(
                    "timed out",
                    Some(step.name),
                    Some(format!("attempt {}", inst.attempt)),
                );
                fx.ended.push((step.name, "timeout"));
                match (Self::phase(inst), step.on_timeout) {
                    (Phase::Forward, OnTimeout::Retry { attempts }) if inst.attempt < attempts => {
                        self.start_action(inst, fx);
                    }
                    // Its command may have taken effect: compensate it too.
                    (Phase::Forward, _) => self.begin_compensation(
                        inst,
                        inst.step + 1,
                        format!("`{}` timed out", step.name),
                        fx,
                    ),
                    (Phase::Compensate, _) => {
                        self.fail_current(inst, format!("`{}` timed out", step.name), fx);
                    }
                }
            }
            // A retry that was waiting for its backoff.
            _ => self.start_action(inst, fx),
        }
        Ok(())
    }

    fn called(
        &self,
        inst: &mut Instance<D>,
        attempt: u32,
        phase: Phase,
        outcome: CallOutcome<D>,
        fx: &mut Effects,
    ) -> Result<(), Ignored> {
        let Some(step) = self.current(inst) else {
            return Err(Ignored::NotWaiting("the instance is on no call".into()));
        };
        // The phase too: an operator may force a compensation while a
        // forward call is out, and the compensation's call counts its
        // attempts from 1 again.
        if !matches!(step.action, Action::Call(_))
            || attempt != inst.attempt
            || phase != Self::phase(inst)
        {
            return Err(Ignored::NotWaiting(format!(
                "a fenced call (attempt {attempt}; the instance is on `{}` attempt {})",
                step.name, inst.attempt
            )));
        }
        match outcome {
            CallOutcome::Done(data) => {
                inst.data = data;
                self.complete_current(inst, fx);
            }
            CallOutcome::Failed(reason) => self.fail_current(inst, reason, fx),
            CallOutcome::Uncertain(reason) => {
                // Again after a backoff, under the same idempotency key.
                fx.log("uncertain", Some(step.name), Some(reason));
                fx.timer = Timer::After(self.saga.call_retry.delay(inst.attempt));
            }
        }
        Ok(())
    }

    /// Starts the current action: a local action asks to run, a message
    /// action sends its command and waits, a call is due at once.
    fn start_action(&self, inst: &mut Instance<D>, fx: &mut Effects) {
        let Some(step) = self.current(inst) else {
            return;
        };
        inst.waiting = false;
        match &step.action {
            Action::Local(_) => {
                inst.attempt += 1;
                fx.timer = Timer::Clear;
                fx.local = Some(self.context(inst, step));
            }
            Action::Message { command, .. } => {
                inst.attempt += 1;
                let ctx = self.context(inst, step);
                let command = command(&inst.data, &ctx);
                inst.waiting = true;
                fx.log(
                    "sent",
                    Some(step.name),
                    Some(format!("attempt {}", inst.attempt)),
                );
                fx.commands.push((command, ctx));
                fx.timer = Timer::After(step.timeout.unwrap_or(self.saga.step_timeout));
            }
            // The attempt is counted when a worker claims the call.
            Action::Call(_) => fx.timer = Timer::After(Duration::ZERO),
        }
    }

    /// The current action succeeded: the next step, or the next
    /// compensation.
    fn complete_current(&self, inst: &mut Instance<D>, fx: &mut Effects) {
        let Some(step) = self.current(inst) else {
            return;
        };
        inst.waiting = false;
        inst.attempt = 0;
        fx.log("done", Some(step.name), None);
        fx.ended.push((step.name, "done"));
        match inst.state {
            State::Running => {
                inst.step += 1;
                if inst.step == self.saga.steps.len() {
                    inst.state = State::Completed;
                    fx.timer = Timer::Clear;
                    fx.log("completed", None, None);
                } else {
                    self.start_action(inst, fx);
                }
            }
            State::Compensating => self.next_compensation(inst, inst.step, fx),
            _ => {}
        }
    }

    /// The current action definitely failed.
    fn fail_current(&self, inst: &mut Instance<D>, reason: String, fx: &mut Effects) {
        let Some(step) = self.current(inst) else {
            return;
        };
        inst.waiting = false;
        fx.log("failed", Some(step.name), Some(reason.clone()));
        fx.ended.push((step.name, "failed"));
        match inst.state {
            // It did not take effect: compensate the steps before it.
            State::Running => self.begin_compensation(inst, inst.step, reason, fx),
            State::Compensating if inst.attempt >= self.saga.compensation_attempts => {
                inst.state = State::Failed;
                inst.failure = Some(format!(
                    "compensation `{}` failed {} times: {reason}",
                    step.name, inst.attempt
                ));
                fx.timer = Timer::Clear;
                fx.log("failed", None, inst.failure.clone());
            }
            State::Compensating => {
                fx.timer = Timer::After(self.saga.compensation_retry.delay(inst.attempt));
            }
            _ => {}
        }
    }

    /// Compensates the completed steps below `upper` (exclusive), last first.
    fn begin_compensation(
        &self,
        inst: &mut Instance<D>,
        upper: usize,
        reason: String,
        fx: &mut Effects,
    ) {
        inst.state = State::Compensating;
        inst.failure = Some(reason.clone());
        fx.log("compensating", None, Some(reason));
        self.next_compensation(inst, upper, fx);
    }

    /// Starts the compensation of the nearest step below `upper` that has
    /// one; with none left, the instance is compensated.
    fn next_compensation(&self, inst: &mut Instance<D>, upper: usize, fx: &mut Effects) {
        inst.attempt = 0;
        inst.waiting = false;
        let next = (0..upper.min(self.saga.steps.len()))
            .rev()
            .find(|&i| self.saga.steps[i].compensation.is_some());
        match next {
            Some(i) => {
                inst.step = i;
                self.start_action(inst, fx);
            }
            None => {
                inst.state = State::Compensated;
                fx.timer = Timer::Clear;
                fx.log("compensated", None, None);
            }
        }
    }
}
