//! The outbox source: one round of one partition. The proof that it skips
//! nothing is in the crate docs (`# The outbox tail`); the names below are
//! the ones it uses (`W`, `M`, `X`, `S1`, `S2`).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::event::{Event, OutboxRow};
use crate::metrics::Counters;
use crate::{ApplyError, Projection, ProjectionError, ProjectorConfig, Version};

/// The advisory lock class (with the partition's id) held by the
/// transaction that applies a partition: one applier per partition at a
/// time, across processes.
pub(crate) const PARTITION_LOCK_CLASS: i32 = 0x7072_6f01;

/// The lag is counted up to this many events per partition.
pub(crate) const LAG_CAP: i64 = 100_000;

/// One partition of a registered version.
#[derive(Debug, Clone)]
pub(crate) struct Partition {
    /// `projection.partitions.id`.
    pub(crate) id: i32,
    /// 0 to partitions - 1.
    pub(crate) index: i32,
    /// Its retention hold in the outbox.
    pub(crate) hold: String,
}

/// What one round of a partition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// Another transaction (another process) applies the partition now.
    Busy,
    /// Committed: `applied` and `parked` events; `more` when the partition
    /// should run again at once (a full batch, or work that may let the
    /// watermark move).
    Done {
        applied: u64,
        parked: u64,
        more: bool,
    },
    /// An event's `apply` failed: rolled back, the attempt counted; the
    /// partition waits `retry_after` before it tries again.
    Failed { retry_after: Duration },
    /// A newer version is served: this one stops.
    Superseded { served: u32 },
}

/// The statements of one projector's tail, built once (its partition count
/// and destination filter are spliced in).
#[derive(Debug)]
pub(crate) struct TailSql {
    /// `($1 partition id, $2 name, $3 batch[, $4 partition index][, $n destinations])`
    /// → the partition's state and snapshot, then its next events.
    scan: String,
    /// `($1 version id[, $2 destinations])` → `events`, `seconds`.
    lag: String,
    partitioned: bool,
    filtered: bool,
}

/// The partition of an event: `hashtext(ordering key, else id)` modulo the
/// partition count, so one key's events share a partition.
fn partition_filter(partitions: u32, index: &str) -> String {
    if partitions > 1 {
        format!(
            "AND ((hashtext(COALESCE(e.ordering_key, e.id::text)) & 2147483647) % {partitions}) = {index}"
        )
    } else {
        String::new()
    }
}

impl TailSql {
    pub(crate) fn new(partitions: u32, filtered: bool) -> Self {
        let partitioned = partitions > 1;
        let scan_part = partition_filter(partitions, "$4");
        let scan_dest = if filtered {
            format!(
                "AND e.destination = ANY(${}::text[])",
                if partitioned { 5 } else { 4 }
            )
        } else {
            String::new()
        };
        // One statement, one snapshot (S): the partition's state, xmin(S),
        // the highest seq visible in S, the version served, and the first
        // events of the partition above its watermark that are not applied,
        // with their failed attempts.
        let scan = format!(
            "SELECT p.watermark, p.candidate_seq, p.candidate_fence, \
               (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8) AS xmin, \
               (SELECT max(seq) FROM outbox.events) AS head, \
               (SELECT s.version FROM projection.served s WHERE s.name = $2) AS served, \
               e.seq, e.id, e.destination, e.ordering_key, e.headers, e.payload, e.created_at, \
               a.failures, a.permanent, a.last_error \
             FROM projection.partitions p \
             LEFT JOIN LATERAL ( \
               SELECT e.seq, e.id::text AS id, e.destination, e.ordering_key, \
                 e.headers::text AS headers, e.payload, \
                 EXTRACT(EPOCH FROM e.created_at)::float8 AS created_at \
               FROM outbox.events e \
               WHERE e.seq > p.watermark {scan_part} {scan_dest} \
                 AND NOT EXISTS (SELECT 1 FROM projection.applied m \
                                 WHERE m.partition_id = p.id AND m.seq = e.seq) \
               ORDER BY e.seq LIMIT $3) e ON true \
             LEFT JOIN projection.attempts a ON a.partition_id = p.id AND a.seq = e.seq \
             WHERE p.id = $1 \
             ORDER BY e.seq"
        );
        let lag_part = partition_filter(partitions, "p.partition");
        let lag_dest = if filtered {
            "AND e.destination = ANY($2::text[])"
        } else {
            ""
        };
        let lag = format!(
            "SELECT count(*)::int8 AS events, \
               COALESCE(EXTRACT(EPOCH FROM (clock_timestamp() - min(b.created_at))), 0)::float8 \
                 AS seconds \
             FROM projection.partitions p \
             CROSS JOIN LATERAL ( \
               SELECT e.created_at FROM outbox.events e \
               WHERE e.seq > p.watermark {lag_part} {lag_dest} \
                 AND NOT EXISTS (SELECT 1 FROM projection.applied m \
                                 WHERE m.partition_id = p.id AND m.seq = e.seq) \
               ORDER BY e.seq LIMIT {LAG_CAP}) b \
             WHERE p.version_id = $1"
        );
        Self {
            scan,
            lag,
            partitioned,
            filtered,
        }
    }
}

/// `($1 class, $2 partition id)`: tries the partition's lock (which assigns
/// no xid) and, when the partition has a candidate `(M, X)`, checks whether
/// a transaction of this database with an xid below X still runs (a
/// backend's or a prepared one; the 32-bit xids widened against this
/// statement's xmin, which no running xid is below). Being a statement
/// before the scan's, a transaction it finds ended has ended before S2.
/// The check is skipped (true) when xmin alone settles it, and is needed
/// when a transaction of another database holds xmin back.
const LOCK: &str = "SELECT pg_try_advisory_xact_lock($1, $2) AS locked, \
       p.candidate_fence AS fence, \
       CASE WHEN p.candidate_fence IS NULL THEN false \
            WHEN pg_snapshot_xmin(pg_current_snapshot())::text::int8 >= p.candidate_fence \
              THEN true \
            ELSE NOT EXISTS ( \
              SELECT 1 FROM ( \
                SELECT backend_xid::text::int8 AS x FROM pg_stat_activity \
                WHERE backend_xid IS NOT NULL \
                  AND datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                UNION ALL \
                SELECT transaction::text::int8 FROM pg_prepared_xacts \
                WHERE database = current_database()) r, \
              (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS base) b \
              WHERE b.base + ((r.x - b.base % 4294967296) % 4294967296 + 4294967296) \
                    % 4294967296 < p.candidate_fence) \
       END AS settled \
     FROM projection.partitions p WHERE p.id = $2";

/// Ends a round that applied or parked events, or moves the watermark: the
/// marks, the parked events, the partition's new state and its hold, in
/// the apply's transaction (one round trip). Marks at or below the new
/// watermark are forgotten, and the hold follows the watermark.
const FINISH: &str = "WITH marks AS ( \
       INSERT INTO projection.applied (partition_id, seq) SELECT $1, s FROM unnest($2::int8[]) s), \
     parked AS ( \
       INSERT INTO projection.parked (name, version, event_id, seq, ordering_key, attempts, reason) \
       SELECT $3, $4, u.id, u.seq, u.key, u.attempts, u.reason \
       FROM unnest($5::text[], $6::int8[], $7::text[], $8::int4[], $9::text[]) \
         AS u(id, seq, key, attempts, reason) \
       ON CONFLICT DO NOTHING), \
     cleared AS ( \
       DELETE FROM projection.attempts WHERE $10 AND partition_id = $1 AND seq = ANY($2::int8[])), \
     moved AS ( \
       UPDATE projection.partitions SET watermark = $11, candidate_seq = $12, \
         candidate_fence = CASE WHEN $13 THEN pg_current_xact_id()::text::int8 \
                                WHEN $12 IS NULL THEN NULL ELSE candidate_fence END, \
         updated_at = now() \
       WHERE id = $1), \
     forgotten AS ( \
       DELETE FROM projection.applied WHERE $14 AND partition_id = $1 AND seq <= $11), \
     held AS ( \
       UPDATE outbox.holds SET seq = GREATEST(seq, $11 + 1), updated_at = now() \
       WHERE $14 AND name = $15) \
     SELECT 1";

/// Counts a failed attempt of an event, after its transaction rolled back
/// → the failures so far.
const COUNT_FAILURE: &str = "INSERT INTO projection.attempts AS a \
       (partition_id, seq, failures, permanent, last_error) VALUES ($1, $2, 1, $3, $4) \
     ON CONFLICT (partition_id, seq) DO UPDATE SET failures = a.failures + 1, \
       permanent = a.permanent OR excluded.permanent, last_error = excluded.last_error, \
       updated_at = now() \
     RETURNING failures";

/// A partition's state and the scan's snapshot.
struct State {
    /// `W`: every event of the partition at or below it is applied (or
    /// parked), or will never exist.
    watermark: i64,
    /// `(M, X)`: the next watermark, and the xid that must be older than
    /// every running transaction before it may become one.
    candidate: Option<(i64, i64)>,
    /// `xmin(S)`: no transaction with a lower xid runs.
    xmin: i64,
    /// The highest seq visible in S.
    head: Option<i64>,
    served: Option<i32>,
}

/// An event the scan returned, with its failed attempts.
struct Scanned {
    seq: i64,
    id: String,
    ordering_key: Option<String>,
    /// The event, or why its row is not one.
    event: Result<Event, String>,
    failures: Option<(i32, bool, String)>,
}

fn state(row: &PgRow) -> Result<State, sqlx::Error> {
    let candidate_seq: Option<i64> = row.try_get("candidate_seq")?;
    let candidate_fence: Option<i64> = row.try_get("candidate_fence")?;
    Ok(State {
        watermark: row.try_get("watermark")?,
        candidate: candidate_seq.zip(candidate_fence),
        xmin: row.try_get("xmin")?,
        head: row.try_get("head")?,
        served: row.try_get("served")?,
    })
}

fn scanned(row: &PgRow) -> Result<Option<Scanned>, sqlx::Error> {
    let Some(seq) = row.try_get::<Option<i64>, _>("seq")? else {
        return Ok(None);
    };
    let id: String = row.try_get("id")?;
    let ordering_key: Option<String> = row.try_get("ordering_key")?;
    let headers: String = row.try_get("headers")?;
    let event = match serde_json::from_str::<Vec<(String, String)>>(&headers) {
        Ok(headers) => Ok(Event::from_outbox(OutboxRow {
            seq,
            id: id.clone(),
            destination: row.try_get("destination")?,
            ordering_key: ordering_key.clone(),
            headers,
            payload: row.try_get("payload")?,
            created_at: row.try_get("created_at")?,
        })),
        Err(e) => Err(format!(
            "unreadable row: the headers of event {id} are not name/value pairs: {e}"
        )),
    };
    let failures = match row.try_get::<Option<i32>, _>("failures")? {
        Some(n) => Some((
            n,
            row.try_get::<Option<bool>, _>("permanent")?
                .unwrap_or(false),
            row.try_get::<Option<String>, _>("last_error")?
                .unwrap_or_default(),
        )),
        None => None,
    };
    Ok(Some(Scanned {
        seq,
        id,
        ordering_key,
        event,
        failures,
    }))
}

/// What one projector's rounds need.
pub(crate) struct Tail<'a, P> {
    pub(crate) pool: &'a PgPool,
    pub(crate) projection: &'a P,
    pub(crate) version: &'a Version,
    pub(crate) config: &'a ProjectorConfig,
    pub(crate) sql: &'a TailSql,
    pub(crate) destinations: &'a [String],
    pub(crate) counters: &'a Counters,
}

/// Events parked in a round, as columns.
#[derive(Default)]
struct Parked {
    ids: Vec<String>,
    seqs: Vec<i64>,
    keys: Vec<Option<String>>,
    attempts: Vec<i32>,
    reasons: Vec<String>,
}

impl Parked {
    fn push(&mut self, e: &Scanned, attempts: i32, reason: String) {
        self.ids.push(e.id.clone());
        self.seqs.push(e.seq);
        self.keys.push(e.ordering_key.clone());
        self.attempts.push(attempts);
        self.reasons.push(reason);
    }
}

/// Runs `apply`, a panic counting as a failure.
pub(crate) async fn guarded<F>(apply: F) -> Result<(), ApplyError>
where
    F: std::future::Future<Output = Result<(), ApplyError>>,
{
    match AssertUnwindSafe(apply).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(ApplyError::transient(format!("apply panicked: {what}")))
        }
    }
}

impl<P: Projection> Tail<'_, P> {
    /// One round of `part`: lock it (or find it busy), scan, apply what the
    /// scan returned in `seq` order, park what used up its attempts, record
    /// it all and maybe move the watermark; one transaction.
    pub(crate) async fn round(&self, part: &Partition) -> Result<Round, ProjectionError> {
        let mut tx = self.pool.begin().await?;
        // No xid yet: the lock statement does not assign one, nor does the
        // scan, so the xid this transaction gets later is younger than S
        // (`X`).
        let lock = sqlx::query(LOCK)
            .bind(PARTITION_LOCK_CLASS)
            .bind(part.id)
            .fetch_one(&mut *tx)
            .await?;
        if !lock.try_get::<bool, _>("locked")? {
            tx.rollback().await?;
            return Ok(Round::Busy);
        }
        // The fence the database check was made for, if it passed.
        let settled_fence: Option<i64> = if lock.try_get("settled")? {
            lock.try_get("fence")?
        } else {
            None
        };
        let batch = i64::from(self.config.batch_size);
        let mut scan = sqlx::query(&self.sql.scan)
            .bind(part.id)
            .bind(self.version.name())
            .bind(batch);
        if self.sql.partitioned {
            scan = scan.bind(part.index);
        }
        if self.sql.filtered {
            scan = scan.bind(self.destinations);
        }
        let rows = scan.fetch_all(&mut *tx).await?;
        let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let st = state(first)?;
        if let Some(served) = st.served.and_then(|s| u32::try_from(s).ok()) {
            if served > self.version.number() {
                tx.rollback().await?;
                return Ok(Round::Superseded { served });
            }
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(e) = scanned(row)? {
                events.push(e);
            }
        }
        // Less than a batch: the scan returned every event of the partition
        // visible in S that is not applied.
        let complete = (events.len() as i64) < batch;

        let max_attempts = i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX);
        let mut done = Vec::with_capacity(events.len());
        let mut parked = Parked::default();
        let mut had_attempts = false;
        let mut applied = 0u64;
        let mut processed = 0;
        for (i, e) in events.iter().enumerate() {
            if let Some((failures, permanent, last_error)) = &e.failures {
                had_attempts = true;
                if *permanent || *failures >= max_attempts {
                    let reason = if *permanent {
                        format!("permanent failure: {last_error}")
                    } else {
                        format!("failed {failures} attempts, the maximum; last: {last_error}")
                    };
                    parked.push(e, *failures, reason);
                    done.push(e.seq);
                    processed = i + 1;
                    continue;
                }
                if i > 0 {
                    // A failing event runs at the head of a round of its
                    // own: what precedes it commits first.
                    break;
                }
            }
            match &e.event {
                Err(reason) => {
                    parked.push(e, 0, reason.clone());
                    done.push(e.seq);
                }
                Ok(event) => {
                    let result = guarded(self.projection.apply(&mut tx, self.version, event)).await;
                    if let Err(error) = result {
                        let _ = tx.rollback().await;
                        return Ok(self.failed(part, e, &error).await);
                    }
                    applied += 1;
                    done.push(e.seq);
                }
            }
            processed = i + 1;
        }

        // The watermark (see the crate docs). `covered(m)`: once this round
        // commits, every event of the partition at or below `m` visible in
        // S is applied or parked.
        let covered = |m: i64| {
            events.get(processed).is_none_or(|next| next.seq > m)
                && (complete || events.last().is_some_and(|last| last.seq >= m))
        };
        let mut watermark = st.watermark;
        let mut candidate = st.candidate;
        let mut advanced = false;
        if let Some((m, fence)) = candidate {
            // Every transaction older than X has ended (xmin(S2) >= X), or
            // every one of this database has, before S2 (the lock's check).
            let ended = st.xmin >= fence || settled_fence == Some(fence);
            if ended && covered(m) {
                advanced = m > watermark;
                watermark = watermark.max(m);
                candidate = None;
            }
        }
        let mut new_fence = false;
        if candidate.is_none() {
            // M: a seq visible in S, as high as this round allows.
            let m = if complete && processed == events.len() {
                st.head.unwrap_or(watermark)
            } else {
                done.last().copied().unwrap_or(watermark)
            };
            if m > watermark {
                // The fence X is this transaction's xid, assigned after S.
                candidate = Some((m, 0));
                new_fence = true;
            }
        }
        let changed = candidate != st.candidate || advanced;
        if done.is_empty() && !changed {
            tx.commit().await?;
            return Ok(Round::Done {
                applied: 0,
                parked: 0,
                more: false,
            });
        }
        let parked_count = parked.ids.len() as u64;
        sqlx::query(FINISH)
            .bind(part.id)
            .bind(&done)
            .bind(self.version.name())
            .bind(i32::try_from(self.version.number()).unwrap_or(i32::MAX))
            .bind(&parked.ids)
            .bind(&parked.seqs)
            .bind(&parked.keys)
            .bind(&parked.attempts)
            .bind(&parked.reasons)
            .bind(had_attempts)
            .bind(watermark)
            .bind(candidate.map(|(m, _)| m))
            .bind(new_fence)
            .bind(advanced)
            .bind(&part.hold)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.counters.applied(applied);
        self.counters.parked(parked_count);
        for (id, reason) in parked.ids.iter().zip(&parked.reasons) {
            tracing::warn!(projection = %self.version, event = %id, %reason, "projection: event parked");
        }
        Ok(Round::Done {
            applied,
            parked: parked_count,
            more: !done.is_empty() || !complete,
        })
    }

    /// Counts the failed attempt of `e` in its own statement.
    async fn failed(&self, part: &Partition, e: &Scanned, error: &ApplyError) -> Round {
        self.counters.failure();
        let permanent = error.kind() == inbox_consumer::FailureKind::Permanent;
        let counted: Result<i32, sqlx::Error> = sqlx::query_scalar(COUNT_FAILURE)
            .bind(part.id)
            .bind(e.seq)
            .bind(permanent)
            .bind(error_chain(error))
            .fetch_one(self.pool)
            .await;
        let failures = match counted {
            Ok(n) => n,
            Err(db) => {
                // The failure is what matters; it is tried again.
                tracing::error!(projection = %self.version, event = %e.id, error = %db,
                    "projection: could not count a failed attempt");
                self.counters.database_error();
                return Round::Failed {
                    retry_after: self.config.outage_delay,
                };
            }
        };
        tracing::warn!(projection = %self.version, event = %e.id, seq = e.seq, failures,
            error = %error_chain(error), "projection: apply failed");
        let retry_after = if permanent
            || failures >= i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX)
        {
            // Parked at the next round, at once.
            Duration::ZERO
        } else {
            self.config
                .retry_after(u32::try_from(failures).unwrap_or(u32::MAX))
        };
        Round::Failed { retry_after }
    }

    /// The lag of the version whose id is `version_id`: `(events behind,
    /// seconds behind)`.
    pub(crate) async fn lag(&self, version_id: i32) -> Result<(u64, f64), ProjectionError> {
        let mut q = sqlx::query(&self.sql.lag).bind(version_id);
        if self.sql.filtered {
            q = q.bind(self.destinations);
        }
        let row = q.fetch_one(self.pool).await?;
        let events: i64 = row.try_get("events")?;
        let seconds: f64 = row.try_get("seconds")?;
        Ok((events.unsigned_abs(), seconds.max(0.0)))
    }
}

/// An error and its sources, joined by `: `.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}
