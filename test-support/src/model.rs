//! The model of the store contract (DESIGN section 3) and the machinery
//! that checks a store against it, for the model-based property tests of
//! every store (`tests/model.rs` of idempotency-core, idempotency-redis and
//! idempotency-sqlx).
//!
//! A small reference model (a map of three record ids to their state, times
//! in milliseconds) runs random sequences of `claim`, `complete`, `release`,
//! `extend` and clock advances side by side with a real store, and every
//! answer is compared: the kind (`Acquired`, `InFlight`, `Completed`,
//! `Applied`, `Fenced`), the fingerprint, the stored outcome, and the lease
//! remaining (within a tolerance on a real clock).
//!
//! - The memory store runs on a [`FakeClock`], so an advance is exact and
//!   instant: many long sequences, with durations chosen to land exactly on
//!   lease and ttl boundaries ([`check_memory`]).
//! - SQLite (a temporary file), Redis (`REDIS_URL`) and PostgreSQL
//!   (`DATABASE_URL`) keep their own clocks, so an advance really waits
//!   ([`check_real`]).
//!   Their sequences are short and their times coarse: every operation runs
//!   at a multiple of [`Q`] ms after the case starts, and every lease and ttl
//!   ends half-way between two of them, so no answer depends on a few
//!   milliseconds of latency. A case whose operations ran late by more than
//!   [`DRIFT_LIMIT`] (a loaded machine) is discarded, not failed.
//! - Mutants (wrappers around the memory store that break fencing, takeover
//!   or expiry) show that the property fails when the contract is broken.
//!
//! Where the trait documentation leaves a point open, the model follows the
//! conformance suite and, where the suite is silent too, what every backend
//! does: a token holds its claim until the record expires (lease + ttl) or
//! another claim takes it over, not only until its lease passes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use idempotency_core::{
    Claim, ClaimOutcome, FakeClock, Fingerprint, LeaseToken, RecordId, Store, StoreError,
    StoredOutcome, StoredResponse, TokenOutcome,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

pub use proptest::test_runner::TestError;
/// How many record ids, fingerprints and outcomes a sequence draws from.
const IDS: u8 = 3;
const FPS: u8 = 2;
const OUTCOMES: u8 = 3;

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// One step of a sequence.
#[derive(Clone, Debug)]
pub enum Op {
    Claim {
        id: u8,
        fp: u8,
        lease: u64,
        ttl: u64,
    },
    Complete {
        at: At,
        tok: Pick,
        outcome: u8,
        ttl: u64,
    },
    Release {
        at: At,
        tok: Pick,
    },
    Extend {
        at: At,
        tok: Pick,
        lease: u64,
    },
    Advance {
        ms: u64,
    },
}

/// The token a token operation uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pick {
    /// The `k`-th most recently acquired token (0 = the latest), or the
    /// oldest when fewer were acquired (a token never acquired when none was).
    Recent(u8),
    /// A token never acquired.
    Never,
}

/// The record a token operation addresses.
#[derive(Clone, Copy, Debug)]
pub enum At {
    /// The record the token was acquired for (for a token never acquired,
    /// the record of the latest claim): mostly, so that many operations
    /// apply.
    Own,
    /// Any record, so that tokens are tried on records they never held.
    Id(u8),
}

/// The record ids and durations a strategy draws from.
struct Times {
    /// How many record ids (at most [`IDS`]).
    ids: u8,
    /// Claim leases and extend leases.
    lease: &'static [u64],
    /// Claim ttls (kept after the lease).
    claim_ttl: &'static [u64],
    /// Complete ttls (kept after completion).
    complete_ttl: &'static [u64],
    /// Clock advances.
    advance: &'static [u64],
}

/// Exact times for the fake clock: small values that share multiples of 100,
/// so that advances land exactly on lease and ttl boundaries (and a ttl of 0
/// expires at once).
const EXACT: Times = Times {
    ids: IDS,
    lease: &[0, 100, 200, 300],
    claim_ttl: &[0, 100, 200],
    complete_ttl: &[0, 100, 300],
    advance: &[0, 1, 99, 100, 101, 200, 300],
};

/// The quantum of a real clock's sequence: operations run at multiples of it.
pub const Q: u64 = 400;

/// Coarse times for a real clock: operations run at multiples of `Q`, and
/// every deadline (lease end, expiry) at an odd multiple of `Q / 2`, whatever
/// the sequence (leases and complete ttls are odd multiples of `Q / 2`, claim
/// ttls whole multiples of `Q`, and extend keeps the ttl after the lease), so
/// no deadline is nearer than `Q / 2` to any operation.
const COARSE: Times = Times {
    ids: 2,
    lease: &[Q / 2, 3 * Q / 2],
    claim_ttl: &[Q, 2 * Q],
    complete_ttl: &[Q / 2, 3 * Q / 2],
    advance: &[Q, Q, 2 * Q],
};

/// How late an operation may run after its nominal time on a real clock
/// before the case is discarded (must stay well below `Q / 2`).
pub const DRIFT_LIMIT: Duration = Duration::from_millis(100);

fn pick(values: &'static [u64]) -> impl Strategy<Value = u64> {
    proptest::sample::select(values)
}

fn claim_op(t: &'static Times) -> impl Strategy<Value = Op> {
    (0..t.ids, 0..FPS, pick(t.lease), pick(t.claim_ttl))
        .prop_map(|(id, fp, lease, ttl)| Op::Claim { id, fp, lease, ttl })
}

fn op(t: &'static Times) -> impl Strategy<Value = Op> {
    let at = prop_oneof![3 => Just(At::Own), 1 => (0..t.ids).prop_map(At::Id)];
    let tok = prop_oneof![4 => (0u8..4).prop_map(Pick::Recent), 1 => Just(Pick::Never)];
    prop_oneof![
        4 => claim_op(t),
        3 => (at.clone(), tok.clone(), 0..OUTCOMES, pick(t.complete_ttl))
            .prop_map(|(at, tok, outcome, ttl)| Op::Complete { at, tok, outcome, ttl }),
        2 => (at.clone(), tok.clone()).prop_map(|(at, tok)| Op::Release { at, tok }),
        2 => (at, tok, pick(t.lease)).prop_map(|(at, tok, lease)| Op::Extend { at, tok, lease }),
        3 => pick(t.advance).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// A sequence of up to `max` steps. It starts with a claim, so that the
/// short sequences of a real clock do not spend their steps on absent
/// records.
fn ops(t: &'static Times, max: usize) -> impl Strategy<Value = Vec<Op>> {
    (claim_op(t), proptest::collection::vec(op(t), 0..max)).prop_map(|(first, rest)| {
        let mut ops = Vec::with_capacity(rest.len() + 1);
        ops.push(first);
        ops.extend(rest);
        ops
    })
}

/// Greedily shortens a failing sequence further than proptest's shrinking
/// (which cannot drop a step once it simplified one, and whose token
/// indices move when a claim is dropped): drops single steps, names a
/// two steps, names a token's own record, more recent tokens or a
/// never-acquired one, merges advances, while `fails` holds.
fn minimize(mut ops: Vec<Op>, fails: impl Fn(&[Op]) -> bool) -> Vec<Op> {
    loop {
        let mut changed = false;
        let mut i = 0;
        while i < ops.len() {
            let mut shorter = ops.clone();
            shorter.remove(i);
            if !shorter.is_empty() && fails(&shorter) {
                ops = shorter;
                changed = true;
            } else {
                i += 1;
            }
        }
        // Two steps at once (a claim and the operation that uses its token).
        'pairs: for i in 0..ops.len() {
            for j in i + 1..ops.len() {
                let mut shorter = ops.clone();
                shorter.remove(j);
                shorter.remove(i);
                if !shorter.is_empty() && fails(&shorter) {
                    ops = shorter;
                    changed = true;
                    break 'pairs;
                }
            }
        }
        // Two advances in a row as one.
        let mut i = 0;
        while i + 1 < ops.len() {
            if let (Op::Advance { ms: a }, Op::Advance { ms: b }) = (&ops[i], &ops[i + 1]) {
                let mut merged = ops.clone();
                merged[i] = Op::Advance { ms: a + b };
                merged.remove(i + 1);
                if fails(&merged) {
                    ops = merged;
                    changed = true;
                    continue;
                }
            }
            i += 1;
        }
        for i in 0..ops.len() {
            let (at, tok) = match &ops[i] {
                Op::Complete { at, tok, .. }
                | Op::Release { at, tok }
                | Op::Extend { at, tok, .. } => (*at, *tok),
                _ => continue,
            };
            // Simpler first; the token itself last.
            let mut toks = vec![tok];
            if let Pick::Recent(k) = tok {
                toks.splice(0..0, (0..k).map(Pick::Recent).chain([Pick::Never]));
            }
            let mut tries: Vec<(At, Pick)> =
                toks[..toks.len() - 1].iter().map(|t| (at, *t)).collect();
            if let At::Id(_) = at {
                tries.extend(toks.iter().map(|t| (At::Own, *t)));
            }
            for (new_at, new_tok) in tries {
                let mut simpler = ops.clone();
                if let Op::Complete { at, tok, .. }
                | Op::Release { at, tok }
                | Op::Extend { at, tok, .. } = &mut simpler[i]
                {
                    (*at, *tok) = (new_at, new_tok);
                }
                if fails(&simpler) {
                    ops = simpler;
                    changed = true;
                    break;
                }
            }
        }
        if !changed {
            return ops;
        }
    }
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::from_bytes([fp + 1; 32])
}

fn outcome(n: u8) -> StoredOutcome {
    match n {
        0 => StoredOutcome::Mark(u16::from(n) + 7),
        1 => StoredOutcome::NotReplayable { status: 201 },
        _ => StoredOutcome::response(StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from(vec![n; 3]),
        }),
    }
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

/// A token as the model knows it: an index into the tokens acquired so far,
/// or [`NEVER`].
type Tok = usize;
const NEVER: Tok = usize::MAX;

#[derive(Clone, Debug)]
enum State {
    InFlight {
        token: Tok,
        lease_until: u64,
        expires_at: u64,
    },
    Completed {
        outcome: StoredOutcome,
        expires_at: u64,
    },
}

#[derive(Clone, Debug)]
struct Record {
    fingerprint: u8,
    state: State,
}

impl Record {
    fn expires_at(&self) -> u64 {
        match self.state {
            State::InFlight { expires_at, .. } | State::Completed { expires_at, .. } => expires_at,
        }
    }
}

/// What the model expects a claim to answer.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Acquired,
    InFlight {
        fingerprint: u8,
        remaining: u64,
    },
    Completed {
        fingerprint: u8,
        outcome: StoredOutcome,
    },
}

#[derive(Default)]
struct Model {
    now: u64,
    records: HashMap<u8, Record>,
}

impl Model {
    /// The record `id` unless it has expired (an expired record is absent).
    fn live(&self, id: u8) -> Option<&Record> {
        self.records.get(&id).filter(|r| r.expires_at() > self.now)
    }

    /// The claim's answer, the rule that gave it (for coverage), and the new
    /// state. `token` is the index the token gets if it acquires.
    fn claim(
        &mut self,
        id: u8,
        fp: u8,
        lease: u64,
        ttl: u64,
        token: Tok,
    ) -> (Expect, &'static str) {
        let now = self.now;
        let (expect, rule) = match self.records.get(&id) {
            None => (Expect::Acquired, "claim: absent, acquired"),
            Some(r) if r.expires_at() <= now => (Expect::Acquired, "claim: expired, acquired"),
            Some(r) => match &r.state {
                State::Completed { outcome, .. } => (
                    Expect::Completed {
                        fingerprint: r.fingerprint,
                        outcome: outcome.clone(),
                    },
                    if r.fingerprint == fp {
                        "claim: completed, replayed"
                    } else {
                        "claim: completed, other fingerprint"
                    },
                ),
                State::InFlight { lease_until, .. } if *lease_until > now => (
                    Expect::InFlight {
                        fingerprint: r.fingerprint,
                        remaining: lease_until - now,
                    },
                    "claim: in flight, lease held",
                ),
                State::InFlight { .. } if r.fingerprint != fp => (
                    Expect::InFlight {
                        fingerprint: r.fingerprint,
                        remaining: 0,
                    },
                    "claim: lease passed, other fingerprint, in flight",
                ),
                State::InFlight { .. } => (Expect::Acquired, "claim: lease passed, taken over"),
            },
        };
        if expect == Expect::Acquired {
            let lease_until = now + lease;
            self.records.insert(
                id,
                Record {
                    fingerprint: fp,
                    state: State::InFlight {
                        token,
                        lease_until,
                        expires_at: lease_until + ttl,
                    },
                },
            );
        }
        (expect, rule)
    }

    /// Whether `token` holds the claim on `id` now.
    fn holds(&self, id: u8, token: Tok) -> bool {
        matches!(
            self.live(id),
            Some(Record { state: State::InFlight { token: held, .. }, .. }) if *held == token
        )
    }

    /// Why a fenced operation was fenced (for coverage).
    fn why_fenced(&self, id: u8, token: Tok) -> &'static str {
        match self.records.get(&id) {
            None => "absent",
            Some(r) if r.expires_at() <= self.now => "expired",
            Some(Record {
                state: State::Completed { .. },
                ..
            }) => "completed",
            Some(_) if token == NEVER => "never-acquired token",
            Some(_) => "another token holds it",
        }
    }

    fn fenced_op(
        &mut self,
        op: &'static str,
        id: u8,
        token: Tok,
        apply: impl FnOnce(&mut Self),
    ) -> (TokenOutcome, String) {
        if self.holds(id, token) {
            let past_lease = matches!(
                self.records.get(&id),
                Some(Record { state: State::InFlight { lease_until, .. }, .. }) if *lease_until <= self.now
            );
            apply(self);
            let note = if past_lease {
                " (lease passed, not expired)"
            } else {
                ""
            };
            (TokenOutcome::Applied, format!("{op}: applied{note}"))
        } else {
            (
                TokenOutcome::Fenced,
                format!("{op}: fenced, {}", self.why_fenced(id, token)),
            )
        }
    }

    fn complete(
        &mut self,
        id: u8,
        token: Tok,
        outcome: StoredOutcome,
        ttl: u64,
    ) -> (TokenOutcome, String) {
        self.fenced_op("complete", id, token, |m| {
            let expires_at = m.now + ttl;
            let r = m.records.get_mut(&id).expect("held");
            r.state = State::Completed {
                outcome,
                expires_at,
            };
        })
    }

    fn release(&mut self, id: u8, token: Tok) -> (TokenOutcome, String) {
        self.fenced_op("release", id, token, |m| {
            m.records.remove(&id);
        })
    }

    /// The lease moves to `lease` from now; the time kept after the lease
    /// (the claim's ttl) moves with it.
    fn extend(&mut self, id: u8, token: Tok, lease: u64) -> (TokenOutcome, String) {
        self.fenced_op("extend", id, token, |m| {
            let now = m.now;
            let r = m.records.get_mut(&id).expect("held");
            if let State::InFlight {
                lease_until,
                expires_at,
                ..
            } = &mut r.state
            {
                let ttl = *expires_at - *lease_until;
                *lease_until = now + lease;
                *expires_at = *lease_until + ttl;
            }
        })
    }
}

// ---------------------------------------------------------------------------
// Running a sequence against a store and the model
// ---------------------------------------------------------------------------

/// How a case moves the store's time.
enum Time {
    /// The memory store's injected clock: exact and instant.
    Fake(FakeClock),
    /// The store's own clock: sleep until the nominal time, counted from the
    /// start of the case so that latency does not add up.
    Real { start: tokio::time::Instant },
}

/// What a run compares loosely.
#[derive(Clone, Copy)]
struct Tolerance {
    /// How far the store's `lease_remaining` may be from the model's.
    remaining: Duration,
}

const EXACTLY: Tolerance = Tolerance {
    remaining: Duration::ZERO,
};

/// Counts how often each rule of the model was exercised, and how late an
/// operation ran at most on a real clock.
#[derive(Default)]
pub struct Coverage {
    rules: Mutex<BTreeMap<String, u64>>,
    late: Mutex<Duration>,
}

impl Coverage {
    fn hit(&self, rule: &str) {
        *self
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rule.to_owned())
            .or_default() += 1;
    }

    fn late(&self, late: Duration) {
        let mut max = self.late.lock().unwrap_or_else(|p| p.into_inner());
        *max = (*max).max(late);
    }

    pub fn report(&self, what: &str) -> BTreeMap<String, u64> {
        let map = self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone();
        eprintln!("{what}: rules exercised:");
        for (rule, n) in &map {
            eprintln!("  {n:6}  {rule}");
        }
        let late = *self.late.lock().unwrap_or_else(|p| p.into_inner());
        if !late.is_zero() {
            eprintln!("{what}: an operation ran at most {late:?} after its nominal time");
        }
        map
    }
}

fn describe(tok: Tok, tokens: usize) -> String {
    if tok == NEVER {
        "a never-acquired token".to_owned()
    } else {
        format!("token #{tok} (of {tokens})")
    }
}

fn fail(trace: &[String], what: String) -> TestCaseError {
    TestCaseError::fail(format!("{what}\n  trace:\n    {}", trace.join("\n    ")))
}

fn kind(outcome: &ClaimOutcome) -> String {
    match outcome {
        ClaimOutcome::Acquired(_) => "Acquired".to_owned(),
        ClaimOutcome::InFlight {
            fingerprint,
            lease_remaining,
        } => format!(
            "InFlight {{ fp: {}, remaining: {lease_remaining:?} }}",
            fingerprint.as_bytes()[0] - 1
        ),
        ClaimOutcome::Completed {
            fingerprint,
            outcome,
        } => format!(
            "Completed {{ fp: {}, outcome: {outcome:?} }}",
            fingerprint.as_bytes()[0] - 1
        ),
        _ => format!("{outcome:?}"),
    }
}

/// Runs `ops` against `store` and the model, comparing every answer.
async fn run(
    store: &dyn Store,
    time: &Time,
    tolerance: Tolerance,
    ops: &[Op],
    coverage: &Coverage,
) -> Result<(), TestCaseError> {
    // Fresh ids for every case: cases may share a backend.
    let run: u128 = rand::random();
    let ids: Vec<RecordId> = (0..IDS)
        .map(|i| RecordId::from_parts(b"model", format!("{run:032x}-{i}").as_bytes()))
        .collect();
    let never = LeaseToken::random();
    // Every token acquired so far, with the record it was acquired for.
    let mut tokens: Vec<(LeaseToken, u8)> = Vec::new();
    let mut model = Model::default();
    let mut trace: Vec<String> = Vec::new();
    // The token `tok` names, as the model and the store know it, and the
    // record `at` names.
    let resolve = |tok: Pick, at: At, tokens: &[(LeaseToken, u8)]| -> (Tok, LeaseToken, u8) {
        let latest = tokens.last().map_or(0, |(_, id)| *id);
        let (ix, (token, own)) = match tok {
            Pick::Recent(k) if !tokens.is_empty() => {
                let ix = tokens.len() - 1 - usize::from(k).min(tokens.len() - 1);
                (ix, tokens[ix])
            }
            _ => (NEVER, (never, latest)),
        };
        match at {
            At::Own => (ix, token, own),
            At::Id(id) => (ix, token, id),
        }
    };
    let err = |e: StoreError| {
        TestCaseError::fail(format!(
            "{}: {e} ({:?})",
            store.backend(),
            std::error::Error::source(&e)
        ))
    };
    for (step, op) in ops.iter().enumerate() {
        let when = model.now;
        let (line, mismatch) = match *op {
            Op::Advance { ms } => {
                model.now += ms;
                match time {
                    Time::Fake(clock) => clock.advance(Duration::from_millis(ms)),
                    Time::Real { start } => {
                        tokio::time::sleep_until(*start + Duration::from_millis(model.now)).await;
                    }
                }
                (format!("advance {ms} ms (now {} ms)", model.now), None)
            }
            Op::Claim { id, fp, lease, ttl } => {
                let token = LeaseToken::random();
                let f = fingerprint(fp);
                let got = store
                    .claim(
                        &ids[usize::from(id)],
                        token,
                        Claim {
                            fingerprint: &f,
                            lease: Duration::from_millis(lease),
                            ttl: Duration::from_millis(ttl),
                        },
                    )
                    .await
                    .map_err(err)?;
                let (want, rule) = model.claim(id, fp, lease, ttl, tokens.len());
                coverage.hit(rule);
                let ok = match (&want, &got) {
                    (Expect::Acquired, ClaimOutcome::Acquired(held)) => {
                        if *held != token {
                            return Err(fail(
                                &trace,
                                format!(
                                    "step {step}: Acquired carries another token than the caller's"
                                ),
                            ));
                        }
                        tokens.push((token, id));
                        true
                    }
                    (
                        Expect::InFlight {
                            fingerprint,
                            remaining,
                        },
                        ClaimOutcome::InFlight {
                            fingerprint: got_fp,
                            lease_remaining,
                        },
                    ) => {
                        let want = Duration::from_millis(*remaining);
                        let off = want.max(*lease_remaining) - want.min(*lease_remaining);
                        *got_fp == self::fingerprint(*fingerprint) && off <= tolerance.remaining
                    }
                    (
                        Expect::Completed {
                            fingerprint,
                            outcome,
                        },
                        ClaimOutcome::Completed {
                            fingerprint: got_fp,
                            outcome: got_outcome,
                        },
                    ) => *got_fp == self::fingerprint(*fingerprint) && got_outcome == outcome,
                    _ => false,
                };
                let line = format!(
                    "claim(id {id}, fp {fp}, lease {lease}, ttl {ttl}) -> {}  [{rule}]",
                    kind(&got)
                );
                (line, (!ok).then(|| format!("model expects {want:?}")))
            }
            Op::Complete {
                at,
                tok,
                outcome: n,
                ttl,
            } => {
                let (ix, token, id) = resolve(tok, at, &tokens);
                let o = outcome(n);
                let got = store
                    .complete(&ids[usize::from(id)], token, &o, Duration::from_millis(ttl))
                    .await
                    .map_err(err)?;
                let (want, rule) = model.complete(id, ix, o, ttl);
                coverage.hit(&rule);
                let line = format!(
                    "complete(id {id}, {}, outcome {n}, ttl {ttl}) -> {got:?}  [{rule}]",
                    describe(ix, tokens.len())
                );
                (
                    line,
                    (got != want).then(|| format!("model expects {want:?}")),
                )
            }
            Op::Release { at, tok } => {
                let (ix, token, id) = resolve(tok, at, &tokens);
                let got = store
                    .release(&ids[usize::from(id)], token)
                    .await
                    .map_err(err)?;
                let (want, rule) = model.release(id, ix);
                coverage.hit(&rule);
                let line = format!(
                    "release(id {id}, {}) -> {got:?}  [{rule}]",
                    describe(ix, tokens.len())
                );
                (
                    line,
                    (got != want).then(|| format!("model expects {want:?}")),
                )
            }
            Op::Extend { at, tok, lease } => {
                let (ix, token, id) = resolve(tok, at, &tokens);
                let got = store
                    .extend(&ids[usize::from(id)], token, Duration::from_millis(lease))
                    .await
                    .map_err(err)?;
                let (want, rule) = model.extend(id, ix, lease);
                coverage.hit(&rule);
                let line = format!(
                    "extend(id {id}, {}, lease {lease}) -> {got:?}  [{rule}]",
                    describe(ix, tokens.len())
                );
                (
                    line,
                    (got != want).then(|| format!("model expects {want:?}")),
                )
            }
        };
        // On a real clock, an operation that ran too late may have crossed
        // a deadline the model did not: discard the case rather than judge it.
        if let Time::Real { start } = time {
            let late = start
                .elapsed()
                .saturating_sub(Duration::from_millis(model.now));
            coverage.late(late);
            if late > DRIFT_LIMIT {
                coverage.hit("(case discarded: ran late)");
                return Err(TestCaseError::reject(format!(
                    "step {step} ran {late:?} late"
                )));
            }
        }
        trace.push(format!("@{when:>5} ms  {line}"));
        if let Some(what) = mismatch {
            return Err(fail(
                &trace,
                format!("{}: step {step}: {what}", store.backend()),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------

fn config(cases: u32, max_shrink_iters: u32) -> Config {
    Config {
        cases,
        max_shrink_iters,
        // Never write regression files into the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// A current-thread runtime for the cases.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// How many cases a memory store runs.
pub const MEMORY_CASES: u32 = 256;
const MEMORY_STEPS: usize = 40;

/// Runs the property on memory stores (each case a fresh one on a fresh
/// fake clock, built by `make`) and returns the runner's result.
pub fn check_memory<S: Store>(
    cases: u32,
    make: impl Fn(FakeClock) -> S,
    coverage: &Coverage,
) -> Result<(), TestError<Vec<Op>>> {
    let rt = runtime();
    let case = |ops: &[Op], coverage: &Coverage| {
        let clock = FakeClock::new();
        let store = make(clock.clone());
        rt.block_on(run(&store, &Time::Fake(clock), EXACTLY, ops, coverage))
    };
    let mut runner = TestRunner::new(config(cases, 4096));
    match runner.run(&ops(&EXACT, MEMORY_STEPS), |ops| case(&ops, coverage)) {
        Err(TestError::Fail(_, shrunk)) => {
            let scratch = Coverage::default();
            let minimal = minimize(shrunk, |ops| case(ops, &scratch).is_err());
            let reason = match case(&minimal, &scratch) {
                Err(TestCaseError::Fail(reason)) => reason,
                other => panic!("the minimal sequence no longer fails: {other:?}"),
            };
            Err(TestError::Fail(reason, minimal))
        }
        other => other,
    }
}

/// Runs the property on a store with its own clock: short sequences of
/// coarse times, few cases. A backend that fails is shrunk only a little
/// (every try sleeps).
pub fn check_real(store: &dyn Store, rt: &tokio::runtime::Runtime, cases: u32) {
    let coverage = Coverage::default();
    let started = std::time::Instant::now();
    let tolerance = Tolerance {
        remaining: DRIFT_LIMIT + Duration::from_millis(5),
    };
    let mut runner = TestRunner::new(config(cases, 24));
    let result = runner.run(&ops(&COARSE, REAL_STEPS), |ops| {
        rt.block_on(async {
            let time = Time::Real {
                start: tokio::time::Instant::now(),
            };
            run(store, &time, tolerance, &ops, &coverage).await
        })
    });
    coverage.report(store.backend());
    eprintln!(
        "{}: {cases} cases in {:?}",
        store.backend(),
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{}: {e}", store.backend());
    }
}

/// How many cases a store with its own clock runs.
pub const REAL_CASES: u32 = 16;
const REAL_STEPS: usize = 12;
