//! The operations, over one PostgreSQL database: list, show, group, act,
//! and the audit.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row as _};
use tokio::sync::OnceCell;

use crate::error::AdminError;
use crate::model::{Action, Actor, Area, Filter, Group, Report, Skipped, Target};
use crate::sql::{self, area_sql, filtered, state_condition};

/// Items one transaction of an action takes (one audit row each).
pub const BATCH: usize = 500;
/// The most items a list returns unless told otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The operator's view of one database's stuck work. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Admin {
    pool: PgPool,
    idempotency_schema: String,
    audit_ready: std::sync::Arc<OnceCell<()>>,
}

impl Admin {
    /// Connects to `url` (bounded by [`CONNECT_TIMEOUT`]), reading the
    /// idempotency records in schema `idempotency_schema` (the SQL store's
    /// default is `idempotency`).
    ///
    /// # Errors
    /// [`AdminError::Usage`] for a URL that is not PostgreSQL's or a schema
    /// name that is not a plain identifier; [`AdminError::Database`] when
    /// PostgreSQL cannot be reached.
    pub async fn connect(url: &str, idempotency_schema: &str) -> Result<Self, AdminError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(AdminError::Usage(format!(
                "--database must be a postgres:// URL (the outbox, the inbox, the sagas and the \
                 idempotency records this tool reads live on PostgreSQL), got {:?}",
                url.split(':').next().unwrap_or_default()
            )));
        }
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| AdminError::Usage(format!("--database is not a valid URL: {e}")))?;
        // One connection first, so that a refusal or a wrong password is
        // said as PostgreSQL or the network said it (a pool retries until
        // its timeout and reports only that).
        let at = redact(url);
        let first = {
            use sqlx::ConnectOptions as _;
            tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await
        };
        match first {
            Ok(Ok(conn)) => drop(conn),
            Ok(Err(e)) => return Err(AdminError::Connect { at, source: e }),
            Err(_) => {
                return Err(AdminError::Connect {
                    at,
                    source: sqlx::Error::PoolTimedOut,
                })
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options);
        Self::new(pool, idempotency_schema)
    }

    /// An admin over `pool`.
    ///
    /// # Errors
    /// [`AdminError::Usage`] when `idempotency_schema` is not a plain
    /// identifier.
    pub fn new(pool: PgPool, idempotency_schema: &str) -> Result<Self, AdminError> {
        let plain = !idempotency_schema.is_empty()
            && idempotency_schema.len() <= 63
            && idempotency_schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !idempotency_schema.starts_with(|c: char| c.is_ascii_digit());
        if !plain {
            return Err(AdminError::Usage(format!(
                "the idempotency schema must be a plain lowercase identifier, got {idempotency_schema:?}"
            )));
        }
        Ok(Self {
            pool,
            idempotency_schema: idempotency_schema.to_owned(),
            audit_ready: std::sync::Arc::default(),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn sql(&self, area: Area) -> sql::AreaSql {
        area_sql(area, &self.idempotency_schema)
    }

    fn missing(&self, area: Area, e: sqlx::Error) -> AdminError {
        AdminError::from_sql(area.as_str(), self.sql(area).table, e)
    }

    /// The items of `area` the filter matches, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`AdminError::Usage`] for a state or filter the area has not;
    /// [`AdminError::MissingTables`]; [`AdminError::Database`].
    pub async fn list(
        &self,
        area: Area,
        filter: &Filter,
        limit: i64,
    ) -> Result<Vec<Value>, AdminError> {
        let state = area.state(filter.state.as_deref())?;
        let scope = filter.scope(area)?;
        let s = self.sql(area);
        let (condition, _) = state_condition(area, state);
        let query = format!(
            "SELECT ({})::text FROM {} WHERE {} ORDER BY {} LIMIT $4",
            s.item,
            s.from,
            filtered(&s, condition),
            s.order
        );
        let rows: Vec<String> = sqlx::query_scalar(&query)
            .bind(scope)
            .bind(filter.reason.as_deref())
            .bind(None::<String>)
            .bind(limit.max(1))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.missing(area, e))?;
        Ok(rows.iter().map(|r| parse(r)).collect())
    }

    /// One item with its payload, headers and history (saga), and the
    /// audit rows that name it.
    ///
    /// # Errors
    /// [`AdminError::NotFound`]; [`AdminError::Ambiguous`] for an inbox
    /// message id several consumers hold (give `consumer`);
    /// [`AdminError::Usage`] for an id that cannot be one;
    /// [`AdminError::MissingTables`]; [`AdminError::Database`].
    pub async fn show(
        &self,
        area: Area,
        id: &str,
        consumer: Option<&str>,
    ) -> Result<Value, AdminError> {
        check_ids(area, std::slice::from_ref(&id.to_owned()))?;
        let s = self.sql(area);
        let query = format!(
            "SELECT ({})::text FROM {} WHERE {} = $1 AND ($2::text IS NULL OR {}) LIMIT 10",
            s.detail,
            s.from,
            s.key,
            if area == Area::Inbox {
                "t.consumer = $2"
            } else {
                "true"
            }
        );
        let rows: Vec<String> = sqlx::query_scalar(&query)
            .bind(id)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.missing(area, e))?;
        let mut item = match rows.as_slice() {
            [] => {
                return Err(AdminError::NotFound {
                    what: area.item(),
                    id: id.to_owned(),
                })
            }
            [one] => parse(one),
            many => {
                let consumers: Vec<String> = many
                    .iter()
                    .filter_map(|r| parse(r)["consumer"].as_str().map(str::to_owned))
                    .collect();
                return Err(AdminError::Ambiguous {
                    id: id.to_owned(),
                    consumers: consumers.join(", "),
                });
            }
        };
        decode_payload(&mut item);
        let audit = self.audit_of(area, &item_ref(area, &item)).await?;
        item["audit"] = Value::Array(audit);
        Ok(item)
    }

    /// The failures of `area` in `state` (the default: dead, failed,
    /// in-flight) grouped by cause: reason and destination (outbox),
    /// consumer (inbox) or saga name; largest first.
    ///
    /// # Errors
    /// As [`list`](Self::list).
    pub async fn groups(&self, area: Area, state: Option<&str>) -> Result<Vec<Group>, AdminError> {
        let state = area.state(state)?;
        let s = self.sql(area);
        let (condition, _) = state_condition(area, state);
        let scope = s.scope.unwrap_or("NULL::text");
        let reason = s.reason.unwrap_or("NULL::text");
        let query = format!(
            "SELECT {scope} AS scope, {reason} AS reason, count(*) AS n FROM {} WHERE {condition} \
             GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 200",
            s.from
        );
        let rows = sqlx::query(&query)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.missing(area, e))?;
        let mut groups = Vec::with_capacity(rows.len());
        for row in rows {
            let scope: Option<String> = row.try_get("scope")?;
            let reason: Option<String> = row.try_get("reason")?;
            let mut filter = Filter {
                state: Some(state.to_owned()),
                reason: reason.clone(),
                ..Filter::default()
            };
            match area {
                Area::Outbox => filter.destination.clone_from(&scope),
                Area::Inbox => filter.consumer.clone_from(&scope),
                Area::Saga => filter.name.clone_from(&scope),
                Area::Idempotency => {}
            }
            groups.push(Group {
                state: state.to_owned(),
                scope,
                reason,
                count: row.try_get("n")?,
                filter,
            });
        }
        Ok(groups)
    }

    /// Does `action` to the items `target` names, in batches of [`BATCH`],
    /// each batch one transaction that also writes its audit row (who,
    /// what, which items, when). Safe to run twice, or from two consoles
    /// at once: each item's state is checked in the statement that changes
    /// it, so it is changed once; a filter's batches are taken with `SKIP
    /// LOCKED`, and only among items untouched since the action started.
    ///
    /// # Errors
    /// [`AdminError::Usage`] for an action the area has not, or a target it
    /// does not take; [`AdminError::Ambiguous`]; [`AdminError::MissingTables`];
    /// [`AdminError::Database`] (the batches committed before stay, each
    /// with its audit row).
    pub async fn act(
        &self,
        actor: &Actor,
        area: Area,
        action: Action,
        target: &Target,
    ) -> Result<Report, AdminError> {
        if !area.actions().contains(&action) {
            return Err(AdminError::Usage(match (area, action) {
                (Area::Idempotency, Action::Retry) => "idempotency records are not retried: a \
                    record in flight past its lease is taken over by the client's next request \
                    with its key; discard it to forget the key now"
                    .to_owned(),
                _ => format!(
                    "{area} has no action {action}; it has {}",
                    area.actions()
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }));
        }
        match (action, target) {
            (Action::Purge, Target::OlderThan { .. }) => {}
            (Action::Purge, _) => {
                return Err(AdminError::Usage(
                    "purge takes --older-than DURATION, no ids nor filter".into(),
                ))
            }
            (_, Target::OlderThan { .. }) => {
                return Err(AdminError::Usage(format!(
                    "--older-than is for purge, not {action}"
                )))
            }
            (_, Target::Ids { ids, .. }) if ids.is_empty() => {
                return Err(AdminError::Usage(format!(
                    "{action} needs ids, or --state STATE for every item in a state"
                )))
            }
            _ => {}
        }
        // Every check of the request before anything is written (the
        // audit's own table included).
        match target {
            Target::Ids { ids, .. } => check_ids(area, ids)?,
            Target::Filter(filter) => {
                area.state(filter.state.as_deref())?;
                filter.scope(area)?;
            }
            Target::OlderThan { .. } => {}
        }
        self.migrate_audit().await?;
        let mut report = Report {
            area: area.as_str().into(),
            action: action.as_str().into(),
            action_id: uuid::Uuid::now_v7().to_string(),
            ..Report::default()
        };
        let started: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
            .fetch_one(&self.pool)
            .await?;
        match target {
            Target::Ids { ids, consumer } => {
                for chunk in ids.chunks(BATCH) {
                    let keys = self.resolve(area, chunk, consumer.as_deref()).await?;
                    let changed = self.batch(actor, area, action, &report, &keys).await?;
                    report.batches += 1;
                    self.explain_skipped(area, action, chunk, &keys, &changed, &mut report)
                        .await?;
                    report.changed.extend(changed);
                }
            }
            Target::Filter(filter) => {
                let state = area.state(filter.state.as_deref())?;
                let scope = filter.scope(area)?;
                let s = self.sql(area);
                let (mut condition, since) = state_condition(area, state);
                let extra = match (area, action) {
                    (Area::Outbox, Action::Retry) if state == "pending" => {
                        " AND t.available_at > now()"
                    }
                    (Area::Inbox, Action::Retry) => " AND t.payload IS NOT NULL",
                    _ => "",
                };
                let joined;
                if !extra.is_empty() {
                    joined = format!("{condition}{extra}");
                    condition = &joined;
                }
                let consumer = if area == Area::Inbox {
                    ", t.consumer"
                } else {
                    ""
                };
                let pick = format!(
                    "SELECT {}{consumer} FROM {} WHERE {} AND {since} <= $3::text::timestamptz \
                     ORDER BY {} LIMIT $4 FOR UPDATE OF t SKIP LOCKED",
                    s.key,
                    s.from,
                    filtered(&s, condition),
                    s.order
                );
                let described = serde_json::to_value(filter).unwrap_or(Value::Null);
                loop {
                    let mut tx = self.pool.begin().await?;
                    let rows = sqlx::query(&pick)
                        .bind(scope)
                        .bind(filter.reason.as_deref())
                        .bind(&started)
                        .bind(i64::try_from(BATCH).unwrap_or(i64::MAX))
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| self.missing(area, e))?;
                    let keys = rows
                        .iter()
                        .map(|r| {
                            Ok(Key {
                                id: r.try_get(0)?,
                                consumer: if area == Area::Inbox {
                                    Some(r.try_get(1)?)
                                } else {
                                    None
                                },
                            })
                        })
                        .collect::<Result<Vec<_>, sqlx::Error>>()?;
                    let picked = keys.len();
                    let changed = self
                        .apply(&mut tx, area, action, &keys, &actor.name)
                        .await?;
                    if !changed.is_empty() || report.batches == 0 {
                        self.write_audit(
                            &mut tx,
                            actor,
                            area,
                            action,
                            &report,
                            Some(&described),
                            &changed,
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    report.batches += 1;
                    let progress = !changed.is_empty();
                    report.changed.extend(changed);
                    // A short batch was the last; a batch that changed
                    // nothing would be taken again.
                    if picked < BATCH || !progress {
                        break;
                    }
                }
                if area == Area::Inbox && action == Action::Retry {
                    self.note_unreplayable(filter, scope, &mut report).await?;
                }
            }
            Target::OlderThan { age, consumer } => {
                if consumer.is_some() && area != Area::Inbox {
                    return Err(AdminError::Usage(format!(
                        "{area} has no consumer to purge by"
                    )));
                }
                let purge = sql::purge(area, &self.idempotency_schema);
                let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                loop {
                    let mut tx = self.pool.begin().await?;
                    let gone: Vec<String> = sqlx::query_scalar(&purge)
                        .bind(age_ms)
                        .bind(i64::try_from(BATCH).unwrap_or(i64::MAX))
                        .bind(consumer.as_deref())
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| self.missing(area, e))?;
                    if !gone.is_empty() || report.batches == 0 {
                        let described = serde_json::json!({ "older_than": humantime::format_duration(*age).to_string(), "consumer": consumer });
                        self.write_audit(
                            &mut tx,
                            actor,
                            area,
                            action,
                            &report,
                            Some(&described),
                            &gone,
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    report.batches += 1;
                    let full = gone.len() == BATCH;
                    report.changed.extend(gone);
                    if !full {
                        break;
                    }
                }
            }
        }
        tracing::info!(
            area = area.as_str(),
            action = action.as_str(),
            actor = %actor.name,
            via = actor.via,
            changed = report.changed.len(),
            skipped = report.skipped.len(),
            "messaging-admin: action done"
        );
        Ok(report)
    }

    /// One batch by ids: apply and audit in one transaction.
    async fn batch(
        &self,
        actor: &Actor,
        area: Area,
        action: Action,
        report: &Report,
        keys: &[Key],
    ) -> Result<Vec<String>, AdminError> {
        let mut tx = self.pool.begin().await?;
        let changed = self.apply(&mut tx, area, action, keys, &actor.name).await?;
        self.write_audit(&mut tx, actor, area, action, report, None, &changed)
            .await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Changes the items `keys` whose state allows `action`, in `conn`;
    /// returns their ids.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        area: Area,
        action: Action,
        keys: &[Key],
        by: &str,
    ) -> Result<Vec<String>, AdminError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
        if area == Area::Saga {
            return Ok(match action {
                Action::Retry => saga::operator::retry_step(conn, &ids, by).await?,
                Action::Resume => saga::operator::resume(conn, &ids, by).await?,
                Action::Compensate => saga::operator::compensate(conn, &ids, by).await?,
                Action::Discard => saga::operator::discard(conn, &ids).await?,
                Action::Purge => Vec::new(),
            });
        }
        let Some(statement) = sql::apply(area, action, &self.idempotency_schema) else {
            return Ok(Vec::new());
        };
        let consumers: Vec<String> = keys
            .iter()
            .map(|k| k.consumer.clone().unwrap_or_default())
            .collect();
        let changed: Vec<String> = sqlx::query_scalar(&statement)
            .bind(&ids)
            .bind(&consumers)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.missing(area, e))?;
        if area == Area::Outbox && action == Action::Retry && !changed.is_empty() {
            // Wake the relays (delivered at commit), as an enqueue does.
            sqlx::query("SELECT pg_notify('outbox', '')")
                .execute(&mut *conn)
                .await?;
        }
        Ok(changed)
    }

    /// The keys of `ids`: for the inbox, each message id with its
    /// consumer (`consumer`, or the one consumer that holds it).
    async fn resolve(
        &self,
        area: Area,
        ids: &[String],
        consumer: Option<&str>,
    ) -> Result<Vec<Key>, AdminError> {
        if area != Area::Inbox {
            if consumer.is_some() {
                return Err(AdminError::Usage(format!(
                    "{area} items have no consumer; --consumer is for the inbox"
                )));
            }
            return Ok(ids
                .iter()
                .map(|id| Key {
                    id: id.clone(),
                    consumer: None,
                })
                .collect());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT message_id, consumer FROM inbox_consumer.attempts \
             WHERE message_id = ANY($1) AND ($2::text IS NULL OR consumer = $2) \
             ORDER BY message_id, consumer",
        )
        .bind(ids)
        .bind(consumer)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.missing(area, e))?;
        let mut by_id: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, c) in &rows {
            by_id.entry(id).or_default().push(c);
        }
        let mut keys = Vec::new();
        for id in ids {
            match by_id.get(id.as_str()).map(Vec::as_slice) {
                None => {}
                Some([one]) => keys.push(Key {
                    id: id.clone(),
                    consumer: Some((*one).to_owned()),
                }),
                Some(many) => {
                    return Err(AdminError::Ambiguous {
                        id: id.clone(),
                        consumers: many.join(", "),
                    })
                }
            }
        }
        Ok(keys)
    }

    /// Says why each id given that was not changed was left alone.
    async fn explain_skipped(
        &self,
        area: Area,
        action: Action,
        ids: &[String],
        keys: &[Key],
        changed: &[String],
        report: &mut Report,
    ) -> Result<(), AdminError> {
        let left: Vec<&Key> = keys.iter().filter(|k| !changed.contains(&k.id)).collect();
        let s = self.sql(area);
        let mut states: HashMap<String, (String, bool)> = HashMap::new();
        if !left.is_empty() {
            let query = format!(
                "SELECT {} AS id, {} AS state, {} AS replayable FROM {} WHERE {} = ANY($1) \
                 AND ($2::text[] IS NULL OR t.consumer = ANY($2))",
                s.key,
                s.state,
                if area == Area::Inbox {
                    "t.payload IS NOT NULL"
                } else {
                    "true"
                },
                s.from,
                s.key,
            );
            let query = if area == Area::Inbox {
                query
            } else {
                query.replace("AND ($2::text[] IS NULL OR t.consumer = ANY($2))", "")
            };
            let ids: Vec<String> = left.iter().map(|k| k.id.clone()).collect();
            let consumers: Option<Vec<String>> = (area == Area::Inbox)
                .then(|| left.iter().filter_map(|k| k.consumer.clone()).collect());
            let mut q = sqlx::query(&query).bind(&ids);
            if area == Area::Inbox {
                q = q.bind(consumers);
            }
            for row in q.fetch_all(&self.pool).await? {
                states.insert(
                    row.try_get("id")?,
                    (row.try_get("state")?, row.try_get("replayable")?),
                );
            }
        }
        for id in ids {
            if changed.contains(id) {
                continue;
            }
            let reason = match states.get(id) {
                None => format!("no {} {id}", area.item()),
                Some((_, false)) if area == Area::Inbox && action == Action::Retry => {
                    "its payload was not kept (it died before the inbox kept payloads): \
                     replay it from the broker after `Inbox::revive`"
                        .to_owned()
                }
                Some((state, _)) => format!("it is {state}: nothing to {action}"),
            };
            report.skipped.push(crate::model::Skipped {
                id: id.clone(),
                reason,
            });
        }
        Ok(())
    }

    /// After an inbox retry by filter: the dead messages it could not
    /// replay (no payload kept).
    async fn note_unreplayable(
        &self,
        filter: &Filter,
        scope: Option<&str>,
        report: &mut Report,
    ) -> Result<(), AdminError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox_consumer.attempts t WHERE t.dead AND t.payload IS NULL \
             AND ($1::text IS NULL OR t.consumer = $1) AND ($2::text IS NULL OR t.last_error = $2)",
        )
        .bind(scope)
        .bind(filter.reason.as_deref())
        .fetch_one(&self.pool)
        .await?;
        if n > 0 {
            report.skipped.push(Skipped {
                id: format!("{n} message(s)"),
                reason: "dead without a kept payload (they died before the inbox kept payloads): \
                         replay them from the broker"
                    .into(),
            });
        }
        Ok(())
    }

    /// Creates the audit table (schema `messaging_admin`) once.
    async fn migrate_audit(&self) -> Result<(), AdminError> {
        self.audit_ready
            .get_or_try_init(|| async {
                sql_foundation::migrate_postgres(&self.pool, "messaging_admin", &MIGRATOR)
                    .await
                    .map_err(AdminError::Database)
            })
            .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_audit(
        &self,
        conn: &mut PgConnection,
        actor: &Actor,
        area: Area,
        action: Action,
        report: &Report,
        filter: Option<&Value>,
        items: &[String],
    ) -> Result<(), AdminError> {
        sqlx::query(
            "INSERT INTO messaging_admin.audit (action_id, actor, via, area, action, filter, items) \
             VALUES ($1::uuid, $2, $3, $4, $5, $6::text::jsonb, $7)",
        )
        .bind(&report.action_id)
        .bind(&actor.name)
        .bind(actor.via)
        .bind(area.as_str())
        .bind(action.as_str())
        .bind(filter.map(Value::to_string))
        .bind(items)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The latest audit rows, newest first (none while no action ran).
    ///
    /// # Errors
    /// [`AdminError::Database`].
    pub async fn audit(&self, limit: i64) -> Result<Vec<Value>, AdminError> {
        self.audit_rows(None, None, limit).await
    }

    async fn audit_of(&self, area: Area, item: &str) -> Result<Vec<Value>, AdminError> {
        self.audit_rows(Some(area), Some(item), 50).await
    }

    async fn audit_rows(
        &self,
        area: Option<Area>,
        item: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, AdminError> {
        let rows: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT json_build_object('at', to_char(at AT TIME ZONE 'UTC', \
               'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), 'action_id', action_id::text, \
               'actor', actor, 'via', via, 'area', area, 'action', action, 'filter', filter, \
               'items', items)::text \
             FROM messaging_admin.audit \
             WHERE ($1::text IS NULL OR area = $1) AND ($2::text IS NULL OR items @> ARRAY[$2]) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(area.map(Area::as_str))
        .bind(item)
        .bind(limit.max(1))
        .fetch_all(&self.pool)
        .await;
        match rows {
            Ok(rows) => Ok(rows.iter().map(|r| parse(r)).collect()),
            // No action yet: no audit table yet.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("42P01" | "3F000")) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An item's id, with its consumer for the inbox.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    consumer: Option<String>,
}

/// The id the audit records for an item of `area`.
fn item_ref(area: Area, item: &Value) -> String {
    let field = match area {
        Area::Inbox => "message_id",
        _ => "id",
    };
    item[field].as_str().unwrap_or_default().to_owned()
}

fn parse(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// `payload_base64` → `payload` (text when it is UTF-8) or kept as base64.
fn decode_payload(item: &mut Value) {
    use base64::Engine as _;
    let Some(b64) = item.get("payload_base64").and_then(Value::as_str) else {
        return;
    };
    // PostgreSQL's base64 wraps lines at 76 characters.
    let b64: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&b64) {
        if let Ok(text) = String::from_utf8(bytes) {
            item["payload"] = Value::String(text);
            if let Some(map) = item.as_object_mut() {
                map.remove("payload_base64");
            }
            return;
        }
    }
    item["payload_base64"] = Value::String(b64);
}

/// Ids that cannot be ids of `area` are a usage error, said before any
/// statement runs.
fn check_ids(area: Area, ids: &[String]) -> Result<(), AdminError> {
    for id in ids {
        let ok = match area {
            Area::Outbox => uuid::Uuid::parse_str(id).is_ok(),
            Area::Idempotency => id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            Area::Inbox | Area::Saga => !id.is_empty(),
        };
        if !ok {
            return Err(AdminError::Usage(format!(
                "{id:?} is not the id of an {}{}",
                area.item(),
                match area {
                    Area::Outbox => " (a UUID)",
                    Area::Idempotency => " (64 hex digits, as listed)",
                    _ => "",
                }
            )));
        }
    }
    Ok(())
}
