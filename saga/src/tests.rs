//! The state machine in process, with no database and a simulated clock:
//! every path of the order saga.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{CallOutcome, Command, OnTimeout, Phase, Reply, ReplyError, Saga, Step};
use crate::machine::{Effects, Event, Ignored, Instance, Machine, State, Timer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    payment: Option<String>,
    log: Vec<String>,
}

fn kind(reply: &Reply) -> Result<String, ReplyError> {
    #[derive(Deserialize)]
    struct R {
        r#type: String,
    }
    Ok(reply.json::<R>()?.r#type)
}

/// The order saga of the example, with calls answered by the test.
fn order(retry_reserve: bool) -> Saga<Order> {
    let reserve = Step::message("reserve", |_: &Order, _| {
        Command::new("inventory", "reserve")
    })
    .on_reply(|o, r| match kind(r)?.as_str() {
        "reserved" => {
            o.log.push("reserved".into());
            Ok(())
        }
        "rejected" => Err(ReplyError::failed("out of stock")),
        other => Err(ReplyError::Undecodable(format!("unknown reply {other}"))),
    })
    .timeout(
        Duration::from_secs(30),
        if retry_reserve {
            OnTimeout::Retry { attempts: 2 }
        } else {
            OnTimeout::Compensate
        },
    )
    .compensate(
        Step::message("release", |_: &Order, _| {
            Command::new("inventory", "release")
        })
        .on_reply(|o, _| {
            o.log.push("released".into());
            Ok(())
        }),
    );
    // The calls' outcomes are fed by the tests; the closures are never run.
    let charge = Step::call("charge", |o: Order, _| async move { CallOutcome::Done(o) })
        .compensate(Step::call("refund", |o: Order, _| async move {
            CallOutcome::Done(o)
        }));
    let ship =
        Step::message("ship", |_: &Order, _| Command::new("inventory", "ship")).on_reply(|_, r| {
            match kind(r)?.as_str() {
                "shipped" => Ok(()),
                _ => Err(ReplyError::failed("unshippable")),
            }
        });
    Saga::builder("order", 1)
        .step(reserve)
        .step(charge)
        .step(ship)
        .compensation_retry(Duration::from_millis(100), Duration::from_secs(1), 3)
        .build()
        .expect("a valid definition")
}

/// One instance driven by a test, on a simulated clock: a timer set after
/// `d` fires when the clock passes it.
struct Harness {
    saga: Saga<Order>,
    inst: Instance<Order>,
    now: Duration,
    due: Option<Duration>,
    sent: Vec<String>,
    history: Vec<String>,
}

impl Harness {
    fn new(saga: Saga<Order>) -> Self {
        let inst = Instance {
            id: "42".into(),
            state: State::Running,
            step: 0,
            waiting: false,
            attempt: 0,
            data: Order {
                payment: None,
                log: Vec::new(),
            },
            failure: None,
        };
        let mut h = Self {
            saga,
            inst,
            now: Duration::ZERO,
            due: None,
            sent: Vec::new(),
            history: Vec::new(),
        };
        h.feed(Event::Start).expect("started");
        h
    }

    fn feed(&mut self, event: Event<'_, Order>) -> Result<(), Ignored> {
        let machine = Machine::new(&self.saga);
        let mut fx = Effects::default();
        machine.handle(&mut self.inst, event, &mut fx)?;
        self.effects(fx);
        Ok(())
    }

    fn effects(&mut self, fx: Effects) {
        for (command, ctx) in fx.commands {
            assert_eq!(ctx.instance, "42");
            self.sent.push(format!(
                "{}:{}#{}",
                String::from_utf8_lossy(&command.payload),
                ctx.phase.as_str(),
                ctx.attempt
            ));
        }
        match fx.timer {
            Timer::Keep => {}
            Timer::Clear => self.due = None,
            Timer::After(d) => self.due = Some(self.now + d),
        }
        self.history.extend(
            fx.history
                .into_iter()
                .map(|e| format!("{} {}", e.event, e.action.unwrap_or(""))),
        );
        assert!(fx.local.is_none(), "no local steps here");
    }

    fn reply(&mut self, action: &str, phase: Phase, body: &str) -> Result<(), Ignored> {
        let reply = Reply::new(format!(r#"{{"type":"{body}"}}"#));
        self.feed(Event::Reply {
            action,
            phase,
            reply: &reply,
        })
    }

    /// Moves the clock by `d`; fires the timer if it passed.
    fn advance(&mut self, d: Duration) -> Option<Result<(), Ignored>> {
        self.now += d;
        match self.due {
            Some(at) if at <= self.now => {
                self.due = None;
                Some(self.feed(Event::Due))
            }
            _ => None,
        }
    }

    /// A worker claims the call that is due and it comes to `outcome`.
    fn call(&mut self, outcome: CallOutcome<Order>) -> (String, u32) {
        assert_eq!(self.due, Some(self.now), "a call is due now");
        let machine = Machine::new(&self.saga);
        let mut fx = Effects::default();
        let ctx = machine
            .claim_call(&mut self.inst, Duration::from_secs(30), &mut fx)
            .expect("a call is due");
        self.effects(fx);
        let attempt = ctx.attempt;
        self.feed(Event::Called {
            attempt,
            phase: ctx.phase,
            outcome,
        })
        .expect("the call's outcome applies");
        (ctx.idempotency_key(), attempt)
    }

    fn paid(&self) -> Order {
        let mut o = self.inst.data.clone();
        o.payment = Some("pay_1".into());
        o
    }
}

#[test]
fn every_step_done_completes() {
    let mut h = Harness::new(order(false));
    assert_eq!(h.sent, ["reserve:forward#1"]);
    assert!(h.inst.waiting);
    assert_eq!(h.due, Some(Duration::from_secs(30)), "the reply's deadline");
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    let paid = h.paid();
    let (key, attempt) = h.call(CallOutcome::Done(paid));
    assert_eq!((key.as_str(), attempt), ("order-42-charge", 1));
    assert_eq!(h.sent.last().unwrap(), "ship:forward#1");
    h.reply("ship", Phase::Forward, "shipped").unwrap();
    assert_eq!(h.inst.state, State::Completed);
    assert_eq!(h.inst.data.payment.as_deref(), Some("pay_1"));
    assert_eq!(h.due, None, "the timer is cleared");
    assert_eq!(h.history.last().unwrap(), "completed ");
    // Anything after the end changes nothing.
    assert!(h.reply("ship", Phase::Forward, "shipped").is_err());
}

#[test]
fn a_rejected_first_step_compensates_nothing() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "rejected").unwrap();
    assert_eq!(h.inst.state, State::Compensated);
    assert_eq!(h.sent, ["reserve:forward#1"], "nothing to undo");
    assert_eq!(h.inst.failure.as_deref(), Some("out of stock"));
}

#[test]
fn a_declined_charge_releases_the_reservation() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    h.call(CallOutcome::Failed("402 declined".into()));
    assert_eq!(h.inst.state, State::Compensating);
    assert_eq!(h.sent.last().unwrap(), "release:compensate#1");
    h.reply("release", Phase::Compensate, "released").unwrap();
    assert_eq!(h.inst.state, State::Compensated);
    assert_eq!(h.inst.data.log, ["reserved", "released"]);
}

#[test]
fn an_uncertain_charge_is_retried_with_the_same_key_and_never_compensates() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(h.call(CallOutcome::Uncertain("timeout".into())));
        assert_eq!(h.inst.state, State::Running);
        // Backoff: not due at once, due after it.
        assert!(h.advance(Duration::from_millis(1)).is_none() || h.due.is_some());
        h.now = h.due.expect("a retry is due");
    }
    let paid = h.paid();
    keys.push(h.call(CallOutcome::Done(paid)));
    assert!(keys.iter().all(|(k, _)| k == "order-42-charge"), "{keys:?}");
    assert_eq!(
        keys.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "each attempt fenced by its own number"
    );
    assert_eq!(h.sent.last().unwrap(), "ship:forward#1");
}

#[test]
fn unshippable_undoes_the_charge_then_the_reservation() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    let paid = h.paid();
    h.call(CallOutcome::Done(paid));
    h.reply("ship", Phase::Forward, "unshippable").unwrap();
    assert_eq!(h.inst.state, State::Compensating);
    // The refund (a call) first, then the release.
    let paid = h.inst.data.clone();
    let (key, _) = h.call(CallOutcome::Done(paid));
    assert_eq!(key, "order-42-refund");
    assert_eq!(h.sent.last().unwrap(), "release:compensate#1");
    h.reply("release", Phase::Compensate, "released").unwrap();
    assert_eq!(h.inst.state, State::Compensated);
}

#[test]
fn a_timeout_racing_a_late_reply_exactly_one_wins() {
    // The timeout first: the late reply changes nothing.
    let mut h = Harness::new(order(false));
    h.advance(Duration::from_secs(31)).unwrap().unwrap();
    assert_eq!(h.inst.state, State::Compensating);
    assert_eq!(
        h.sent.last().unwrap(),
        "release:compensate#1",
        "the timed-out step itself is compensated"
    );
    assert!(matches!(
        h.reply("reserve", Phase::Forward, "reserved"),
        Err(Ignored::NotWaiting(_))
    ));
    h.reply("release", Phase::Compensate, "released").unwrap();
    assert_eq!(h.inst.state, State::Compensated);

    // The reply first: the timer then finds nothing to time out.
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    assert!(h.feed(Event::Due).is_err(), "a call is made, not timed out");
    assert_eq!(h.inst.state, State::Running);
}

#[test]
fn a_timeout_with_retry_sends_again_then_compensates() {
    let mut h = Harness::new(order(true));
    h.advance(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(h.sent, ["reserve:forward#1", "reserve:forward#2"]);
    assert_eq!(h.inst.state, State::Running);
    h.advance(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(h.inst.state, State::Compensating);
    assert_eq!(h.sent.last().unwrap(), "release:compensate#1");
}

#[test]
fn a_compensation_that_fails_twice_then_succeeds() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    let paid = h.paid();
    h.call(CallOutcome::Done(paid));
    h.reply("ship", Phase::Forward, "unshippable").unwrap();
    for _ in 0..2 {
        h.call(CallOutcome::Failed("refund refused".into()));
        assert_eq!(h.inst.state, State::Compensating);
        h.now = h.due.expect("retried after a backoff");
    }
    let paid = h.inst.data.clone();
    h.call(CallOutcome::Done(paid));
    h.reply("release", Phase::Compensate, "released").unwrap();
    assert_eq!(h.inst.state, State::Compensated);
}

#[test]
fn a_compensation_that_never_succeeds_fails_the_instance() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    h.call(CallOutcome::Failed("declined".into()));
    // The release never gets its reply: it times out, 3 attempts.
    for attempt in 1..=3 {
        assert_eq!(
            h.sent.last().unwrap(),
            &format!("release:compensate#{attempt}")
        );
        h.now = h.due.expect("a deadline");
        h.feed(Event::Due).unwrap();
        if attempt < 3 {
            h.now = h.due.expect("a retry");
            h.feed(Event::Due).unwrap();
        }
    }
    assert_eq!(h.inst.state, State::Failed);
    assert!(
        h.inst.failure.as_deref().unwrap().contains("release"),
        "{:?}",
        h.inst.failure
    );
    assert_eq!(h.due, None);
}

#[test]
fn duplicate_undecodable_and_stray_replies_change_nothing() {
    let mut h = Harness::new(order(false));
    let before = h.inst.clone();
    assert!(matches!(
        h.reply("reserve", Phase::Forward, "teleported"),
        Err(Ignored::Undecodable(_))
    ));
    assert!(matches!(
        h.reply("ship", Phase::Forward, "shipped"),
        Err(Ignored::NotWaiting(_))
    ));
    assert!(matches!(
        h.reply("reserve", Phase::Compensate, "reserved"),
        Err(Ignored::NotWaiting(_))
    ));
    assert_eq!(
        (h.inst.step, h.inst.waiting, h.inst.attempt, &h.inst.data),
        (before.step, before.waiting, before.attempt, &before.data)
    );
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    assert!(
        matches!(
            h.reply("reserve", Phase::Forward, "reserved"),
            Err(Ignored::NotWaiting(_))
        ),
        "a duplicate reply"
    );
}

#[test]
fn a_fenced_call_outcome_changes_nothing() {
    let mut h = Harness::new(order(false));
    h.reply("reserve", Phase::Forward, "reserved").unwrap();
    let machine = Machine::new(&h.saga);
    let mut fx = Effects::default();
    let first = machine
        .claim_call(&mut h.inst, Duration::from_secs(30), &mut fx)
        .unwrap();
    // Its lease passed; another worker claims again.
    let mut fx = Effects::default();
    let second = machine
        .claim_call(&mut h.inst, Duration::from_secs(30), &mut fx)
        .unwrap();
    let paid = h.paid();
    let late = h.feed(Event::Called {
        attempt: first.attempt,
        phase: first.phase,
        outcome: CallOutcome::Done(paid.clone()),
    });
    assert!(matches!(late, Err(Ignored::NotWaiting(_))));
    h.feed(Event::Called {
        attempt: second.attempt,
        phase: second.phase,
        outcome: CallOutcome::Done(paid),
    })
    .unwrap();
    assert_eq!(h.sent.last().unwrap(), "ship:forward#1");
}

#[test]
fn definitions_are_checked() {
    use crate::definition::DefinitionError;
    let no_reply = Saga::<Order>::builder("s", 1)
        .step(Step::message("a", |_: &Order, _| Command::new("d", "x")))
        .build();
    assert!(matches!(
        no_reply,
        Err(DefinitionError::NoReplyHandler { .. })
    ));
    let twice = Saga::<Order>::builder("s", 1)
        .step(Step::call("a", |o: Order, _| async move {
            CallOutcome::Done(o)
        }))
        .step(Step::call("a", |o: Order, _| async move {
            CallOutcome::Done(o)
        }))
        .build();
    assert!(matches!(twice, Err(DefinitionError::DuplicateName { .. })));
    assert!(matches!(
        Saga::<Order>::builder("s", 1).build(),
        Err(DefinitionError::NoSteps(_))
    ));
    assert!(matches!(
        Saga::<Order>::builder("bad name", 1)
            .step(Step::call("a", |o: Order, _| async move {
                CallOutcome::Done(o)
            }))
            .build(),
        Err(DefinitionError::InvalidName { .. })
    ));
}
