//! The statements, per area. Every list and show builds its items as JSON
//! in PostgreSQL (`json_build_object`), so one shape serves the CLI, the
//! API and the page. Parameters are the same in every area:
//!
//! - lists and picks: `$1` the scope (destination, consumer or saga name),
//!   `$2` the reason, `$3` the action's start (text), `$4` the limit;
//! - applies: `$1` the ids (text[]), `$2` inbox: the consumers (text[]),
//!   parallel to the ids.
//!
//! A pick takes one batch of the items a filter matches, locked `FOR
//! UPDATE SKIP LOCKED` (two consoles acting on one group take disjoint
//! batches), and only items untouched since the action started (so a batch
//! never takes an item that the action itself, or the system after it,
//! changed: an event retried and dead again is not retried twice). An
//! apply changes the items whose state still allows it, the state checked
//! in the `UPDATE` itself, and returns them: an item is changed once,
//! however many requests race.

use crate::model::Area;

/// The statements of one area.
pub(crate) struct AreaSql {
    /// The main table, for messages.
    pub(crate) table: &'static str,
    /// `FROM` with the alias `t`.
    pub(crate) from: String,
    /// An item as listed (JSON).
    pub(crate) item: String,
    /// An item as shown (JSON, with payload, headers, history).
    pub(crate) detail: String,
    /// The item's id (text).
    pub(crate) key: &'static str,
    /// The order of lists and picks.
    pub(crate) order: &'static str,
    /// The column `$1` filters on.
    pub(crate) scope: Option<&'static str>,
    /// The column `$2` filters on.
    pub(crate) reason: Option<&'static str>,
    /// The item's state (an SQL expression).
    pub(crate) state: String,
}

/// The condition of `state` in `area` (checked before), and the column
/// that says when an item entered it (the picks' guard).
pub(crate) fn state_condition(area: Area, state: &str) -> (&'static str, &'static str) {
    match (area, state) {
        (Area::Outbox, "pending") => (
            "t.published_at IS NULL AND t.dead_at IS NULL",
            "t.created_at",
        ),
        (Area::Outbox, "discarded") => ("t.discarded_at IS NOT NULL", "t.discarded_at"),
        (Area::Outbox, _) => (
            "t.dead_at IS NOT NULL AND t.published_at IS NULL AND t.discarded_at IS NULL",
            "t.dead_at",
        ),
        (Area::Inbox, "failing") => (
            "NOT t.dead AND t.failures > 0 AND t.replay_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM inbox_consumer.messages m \
                             WHERE m.consumer = t.consumer AND m.message_id = t.message_id)",
            "t.updated_at",
        ),
        (Area::Inbox, "replaying") => ("NOT t.dead AND t.replay_at IS NOT NULL", "t.updated_at"),
        (Area::Inbox, _) => ("t.dead", "t.updated_at"),
        (Area::Saga, "pending") => ("t.state IN ('running', 'compensating')", "t.updated_at"),
        (Area::Saga, "running") => ("t.state = 'running'", "t.updated_at"),
        (Area::Saga, "compensating") => ("t.state = 'compensating'", "t.updated_at"),
        (Area::Saga, "completed") => ("t.state = 'completed'", "t.updated_at"),
        (Area::Saga, "compensated") => ("t.state = 'compensated'", "t.updated_at"),
        (Area::Saga, _) => ("t.state = 'failed'", "t.updated_at"),
        (Area::Idempotency, _) => (
            "t.outcome IS NULL AND t.lease_until < now()",
            "t.lease_until",
        ),
    }
}

/// ISO 8601 in UTC, for JSON.
macro_rules! ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

pub(crate) fn area_sql(area: Area, idempotency_schema: &str) -> AreaSql {
    match area {
        Area::Outbox => {
            let state = "CASE WHEN t.published_at IS NOT NULL THEN 'published' \
                 WHEN t.discarded_at IS NOT NULL THEN 'discarded' \
                 WHEN t.dead_at IS NOT NULL THEN 'dead' ELSE 'pending' END";
            let common = format!(
                "'id', t.id::text, 'seq', t.seq, 'destination', t.destination, \
                 'ordering_key', t.ordering_key, 'attempts', t.attempts, 'reason', t.last_error, \
                 'state', {state}, 'created_at', {}, 'dead_at', {}, 'available_at', {}, \
                 'discarded_at', {}",
                ts!("t.created_at"),
                ts!("t.dead_at"),
                ts!("t.available_at"),
                ts!("t.discarded_at"),
            );
            AreaSql {
                table: "outbox.events",
                from: "outbox.events t".into(),
                item: format!("json_build_object({common})"),
                detail: format!(
                    "json_build_object({common}, 'published_at', {}, 'headers', t.headers, \
                     'payload_base64', encode(t.payload, 'base64'))",
                    ts!("t.published_at")
                ),
                key: "t.id::text",
                order: "t.seq",
                scope: Some("t.destination"),
                reason: Some("t.last_error"),
                state: state.into(),
            }
        }
        Area::Inbox => {
            let state =
                "CASE WHEN t.dead THEN 'dead' WHEN t.replay_at IS NOT NULL THEN 'replaying' \
                 ELSE 'failing' END";
            let common = format!(
                "'id', t.message_id, 'consumer', t.consumer, 'message_id', t.message_id, \
                 'attempts', t.failures, 'reason', t.last_error, 'state', {state}, \
                 'replayable', t.payload IS NOT NULL, 'updated_at', {}, 'replay_at', {}",
                ts!("t.updated_at"),
                ts!("t.replay_at"),
            );
            AreaSql {
                table: "inbox_consumer.attempts",
                from: "inbox_consumer.attempts t".into(),
                item: format!("json_build_object({common})"),
                detail: format!(
                    "json_build_object({common}, 'headers', t.headers, \
                     'payload_base64', encode(t.payload, 'base64'), \
                     'processed', EXISTS (SELECT 1 FROM inbox_consumer.messages m \
                        WHERE m.consumer = t.consumer AND m.message_id = t.message_id))"
                ),
                key: "t.message_id",
                order: "t.updated_at, t.consumer, t.message_id",
                scope: Some("t.consumer"),
                reason: Some("t.last_error"),
                state: state.into(),
            }
        }
        Area::Saga => {
            // The stored step is an index into the definition, which this
            // tool does not have; the history names the last action seen.
            let step = "COALESCE((SELECT h.step FROM saga.history h \
                 WHERE h.instance_id = t.id AND h.step IS NOT NULL ORDER BY h.seq DESC LIMIT 1), \
                 t.step::text)";
            let common = format!(
                "'id', t.id, 'name', t.name, 'version', t.version, 'state', t.state, \
                 'step', {step}, 'step_index', t.step, 'waiting', t.waiting, 'attempts', t.attempt, \
                 'reason', t.failure, 'due_at', {}, 'created_at', {}, 'updated_at', {}",
                ts!("t.due_at"),
                ts!("t.created_at"),
                ts!("t.updated_at"),
            );
            AreaSql {
                table: "saga.instances",
                from: "saga.instances t".into(),
                item: format!("json_build_object({common})"),
                detail: format!(
                    "json_build_object({common}, 'data', t.data, 'history', \
                     COALESCE((SELECT json_agg(json_build_object('at', {}, 'event', h.event, \
                        'step', h.step, 'detail', h.detail) ORDER BY h.seq) \
                      FROM saga.history h WHERE h.instance_id = t.id), '[]'::json))",
                    ts!("h.at")
                ),
                key: "t.id",
                order: "t.updated_at, t.id",
                scope: Some("t.name"),
                reason: Some("t.failure"),
                state: "t.state".into(),
            }
        }
        Area::Idempotency => {
            let state = "CASE WHEN t.outcome IS NOT NULL THEN 'completed' \
                 WHEN t.lease_until < now() THEN 'in-flight' ELSE 'in-flight (leased)' END";
            let common = format!(
                "'id', encode(t.id, 'hex'), 'state', {state}, \
                 'reason', CASE WHEN t.outcome IS NULL AND t.lease_until < now() \
                   THEN 'in flight past its lease' END, \
                 'lease_until', {}, 'expires_at', {}",
                ts!("t.lease_until"),
                ts!("t.expires_at"),
            );
            AreaSql {
                table: "idempotency_records",
                from: format!("{idempotency_schema}.idempotency_records t"),
                item: format!("json_build_object({common})"),
                detail: format!(
                    "json_build_object({common}, 'fingerprint', encode(t.fingerprint, 'hex'))"
                ),
                key: "encode(t.id, 'hex')",
                order: "t.lease_until",
                scope: None,
                reason: None,
                state: state.into(),
            }
        }
    }
}

/// `WHERE` of lists and picks: the state, `$1` the scope, `$2` the reason.
pub(crate) fn filtered(sql: &AreaSql, condition: &str) -> String {
    let mut w = condition.to_owned();
    if let Some(scope) = sql.scope {
        w.push_str(&format!(" AND ($1::text IS NULL OR {scope} = $1)"));
    }
    if let Some(reason) = sql.reason {
        w.push_str(&format!(" AND ($2::text IS NULL OR {reason} = $2)"));
    }
    w
}

/// The apply of `action` in `area`: `$1` the ids (`$2` the consumers for
/// the inbox) → the ids changed. Sagas go through `saga::operator`.
pub(crate) fn apply(area: Area, action: crate::Action, idempotency_schema: &str) -> Option<String> {
    use crate::Action::{Discard, Retry};
    Some(match (area, action) {
        // Back to the relay: waiting, due now, attempts counted afresh (the
        // last error stays, for the record). An event waiting for its
        // backoff is made due now.
        (Area::Outbox, Retry) => "UPDATE outbox.events SET dead_at = NULL, attempts = 0, \
               available_at = now() \
             WHERE id = ANY($1::uuid[]) AND published_at IS NULL AND discarded_at IS NULL \
               AND (dead_at IS NOT NULL OR available_at > now()) \
             RETURNING id::text"
            .into(),
        (Area::Outbox, Discard) => "UPDATE outbox.events SET discarded_at = now() \
             WHERE id = ANY($1::uuid[]) AND dead_at IS NOT NULL AND published_at IS NULL \
               AND discarded_at IS NULL \
             RETURNING id::text"
            .into(),
        // A replay through the consumer's inbox (Inbox::run_replays), with
        // its attempts counted afresh; only a message whose payload was kept.
        (Area::Inbox, Retry) => "UPDATE inbox_consumer.attempts a SET dead = false, failures = 0, \
               replay_at = now(), updated_at = now() \
             FROM unnest($2::text[], $1::text[]) AS k(consumer, message_id) \
             WHERE a.consumer = k.consumer AND a.message_id = k.message_id \
               AND a.dead AND a.payload IS NOT NULL \
             RETURNING a.message_id"
            .into(),
        // Settled as handled without running: the dead row goes, a processed
        // row takes its place, so a redelivery is a duplicate.
        (Area::Inbox, Discard) => "WITH gone AS ( \
               DELETE FROM inbox_consumer.attempts a \
               USING unnest($2::text[], $1::text[]) AS k(consumer, message_id) \
               WHERE a.consumer = k.consumer AND a.message_id = k.message_id AND a.dead \
               RETURNING a.consumer, a.message_id, a.failures), \
             settled AS ( \
               INSERT INTO inbox_consumer.messages (consumer, message_id, attempts) \
               SELECT consumer, message_id, failures FROM gone \
               ON CONFLICT (consumer, message_id) DO NOTHING) \
             SELECT message_id FROM gone"
            .into(),
        (Area::Idempotency, Discard) => format!(
            "DELETE FROM {idempotency_schema}.idempotency_records \
             WHERE id IN (SELECT decode(x, 'hex') FROM unnest($1::text[]) AS x) \
               AND outcome IS NULL AND lease_until < now() \
             RETURNING encode(id, 'hex')"
        ),
        _ => return None,
    })
}

/// The purge of `area`: `$1` the age in ms, `$2` the batch, `$3` inbox:
/// the consumer → the ids deleted.
pub(crate) fn purge(area: Area, idempotency_schema: &str) -> String {
    match area {
        // Below the lowest retention hold only, recording what it deleted
        // (as the relay's own purge of published events does).
        Area::Outbox => "WITH doomed AS (SELECT seq FROM outbox.events \
               WHERE discarded_at < now() - $1::int8 * interval '1 millisecond' \
                 AND seq < (SELECT outbox.purge_floor()) \
               ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED), \
             noted AS (UPDATE outbox.purged \
               SET max_seq = GREATEST(max_seq, (SELECT max(seq) FROM doomed)) \
               WHERE EXISTS (SELECT 1 FROM doomed)) \
             DELETE FROM outbox.events e USING doomed d WHERE e.seq = d.seq \
             RETURNING e.id::text"
            .into(),
        Area::Inbox => "WITH doomed AS (SELECT ctid FROM inbox_consumer.messages \
               WHERE processed_at < now() - $1::int8 * interval '1 millisecond' \
                 AND ($3::text IS NULL OR consumer = $3) \
               LIMIT $2 FOR UPDATE SKIP LOCKED) \
             DELETE FROM inbox_consumer.messages WHERE ctid IN (SELECT ctid FROM doomed) \
             RETURNING message_id"
            .into(),
        Area::Saga => "DELETE FROM saga.instances WHERE id IN (SELECT id FROM saga.instances \
               WHERE state IN ('completed', 'compensated') \
                 AND updated_at < now() - $1::int8 * interval '1 millisecond' \
               ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING id"
            .into(),
        Area::Idempotency => format!(
            "WITH doomed AS (SELECT ctid FROM {idempotency_schema}.idempotency_records \
               WHERE expires_at < now() - $1::int8 * interval '1 millisecond' \
               LIMIT $2 FOR UPDATE SKIP LOCKED) \
             DELETE FROM {idempotency_schema}.idempotency_records \
             WHERE ctid IN (SELECT ctid FROM doomed) RETURNING encode(id, 'hex')"
        ),
    }
}
