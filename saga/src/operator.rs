//! What an operator does to instances that need a hand: resume one, retry
//! its current step, force its compensation, discard an ended one. Used by
//! `messaging-admin`; usable from any tool.
//!
//! Each function works on the stored instances alone (no definition needed,
//! so a tool that does not link the sagas' code can run it) and only sets
//! the instance up for its **next transition**, which a worker that knows
//! the definition runs as usual: the instance is made due now, and the
//! worker times out a wait, re-sends a command, makes a call again under
//! its idempotency key, or starts a compensation, all in its own
//! transaction. Nothing runs a step here.
//!
//! Every function takes the instances by id, checks their state in the
//! `UPDATE` itself (an instance in another state is left alone, so the same
//! request made twice, or from two tools at once, changes each instance
//! once), writes a history line naming `by`, and runs in the caller's
//! connection: in a transaction, the change commits with whatever else the
//! caller writes there (an audit row, say). Each returns the ids it
//! changed.

use sqlx::PgConnection;

use crate::runtime::SagaError;

/// [`resume`]: a `failed` instance goes back to `compensating` on the
/// compensation that failed, its attempts counted afresh; a `running` or
/// `compensating` one has its timer fire now.
const RESUME: &str = "UPDATE saga.instances SET \
       state = CASE WHEN state = 'failed' THEN 'compensating' ELSE state END, \
       attempt = CASE WHEN state = 'failed' THEN 0 ELSE attempt END, \
       waiting = CASE WHEN state = 'failed' THEN false ELSE waiting END, \
       due_at = now(), updated_at = now() \
     WHERE id = ANY($1) AND state IN ('failed', 'running', 'compensating') \
     RETURNING id";

/// [`retry_step`]: the current action starts again now (a command sent
/// again, a call made again); a `failed` instance as [`RESUME`].
const RETRY_STEP: &str = "UPDATE saga.instances SET \
       state = CASE WHEN state = 'failed' THEN 'compensating' ELSE state END, \
       attempt = CASE WHEN state = 'failed' THEN 0 ELSE attempt END, \
       waiting = false, due_at = now(), updated_at = now() \
     WHERE id = ANY($1) AND state IN ('failed', 'running', 'compensating') \
     RETURNING id";

/// [`compensate`]: a `running` or `failed` instance compensates from the
/// step it is on (that step's compensation first, since its command or
/// call may have taken effect; a step without one is passed over).
const COMPENSATE: &str = "UPDATE saga.instances SET \
       state = 'compensating', attempt = 0, waiting = false, due_at = now(), \
       failure = $2, updated_at = now() \
     WHERE id = ANY($1) AND state IN ('running', 'failed') \
     RETURNING id";

/// [`discard`]: an ended instance is deleted, its history with it.
const DISCARD: &str = "DELETE FROM saga.instances \
     WHERE id = ANY($1) AND state IN ('completed', 'compensated', 'failed') \
     RETURNING id";

/// One history line per changed instance.
const NOTE: &str = "INSERT INTO saga.history (instance_id, event, detail) \
     SELECT id, $2, $3 FROM unnest($1::text[]) AS i(id)";

/// Resumes the instances `ids`: a `failed` one compensates again from the
/// compensation that failed, with its attempts counted afresh; a `running`
/// or `compensating` one has its timer fire now (a wait times out as its
/// step says, a backoff ends, a call is made). Ended instances
/// (`completed`, `compensated`) are left alone.
///
/// # Errors
/// [`SagaError::Database`].
pub async fn resume(
    conn: &mut PgConnection,
    ids: &[String],
    by: &str,
) -> Result<Vec<String>, SagaError> {
    operate(conn, RESUME, ids, None, "resumed", by).await
}

/// Retries the current step of the instances `ids` now: a message step
/// sends its command again (a new attempt), a call is made again under the
/// same idempotency key (a call still out is fenced off), a compensation
/// likewise; a `failed` instance compensates again from the compensation
/// that failed, its attempts counted afresh. Ended instances are left
/// alone.
///
/// # Errors
/// [`SagaError::Database`].
pub async fn retry_step(
    conn: &mut PgConnection,
    ids: &[String],
    by: &str,
) -> Result<Vec<String>, SagaError> {
    operate(conn, RETRY_STEP, ids, None, "retried", by).await
}

/// Forces the compensation of the instances `ids` that are `running` (or
/// `failed`): they compensate from the step they are on, that step's
/// compensation first (its command or call may have taken effect), then
/// the completed steps below in reverse order, and end `compensated` (or
/// `failed`). The reason is kept as the instance's failure. A call still
/// out is fenced off: its outcome changes nothing.
///
/// # Errors
/// [`SagaError::Database`].
pub async fn compensate(
    conn: &mut PgConnection,
    ids: &[String],
    by: &str,
) -> Result<Vec<String>, SagaError> {
    let reason = format!("compensation forced by {by}");
    operate(conn, COMPENSATE, ids, Some(&reason), "compensating", by).await
}

/// Deletes the ended instances (`completed`, `compensated`, `failed`)
/// among `ids`, with their history; running ones are left alone.
///
/// # Errors
/// [`SagaError::Database`].
pub async fn discard(conn: &mut PgConnection, ids: &[String]) -> Result<Vec<String>, SagaError> {
    Ok(sqlx::query_scalar(DISCARD)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?)
}

async fn operate(
    conn: &mut PgConnection,
    sql: &str,
    ids: &[String],
    reason: Option<&str>,
    event: &str,
    by: &str,
) -> Result<Vec<String>, SagaError> {
    let mut query = sqlx::query_scalar(sql).bind(ids);
    if let Some(reason) = reason {
        query = query.bind(reason);
    }
    let changed: Vec<String> = query.fetch_all(&mut *conn).await?;
    if !changed.is_empty() {
        sqlx::query(NOTE)
            .bind(&changed)
            .bind(event)
            .bind(format!("by {by}"))
            .execute(&mut *conn)
            .await?;
        tracing::info!(
            instances = changed.len(),
            by,
            event,
            "saga: an operator moved instances on"
        );
    }
    Ok(changed)
}
