//! Batch mode of the transactional inbox (`process_batch`, `process_each`),
//! written once and run on PostgreSQL (`DATABASE_URL`) and SQLite (a
//! temporary file; always runs): one call and one commit per batch,
//! duplicates inside a batch, a poison or panicking message that does not
//! hold the batch back, and concurrent batches sharing ids.
#![cfg(any(feature = "postgres", feature = "sqlite"))]

mod common;

macro_rules! batch_cases {
    (db = $db:ty, setup = $setup:path, new = $new:path, insert = $insert:expr, count = $count:expr $(,)?) => {
        use std::sync::{Arc, Mutex};

        use inbox_consumer::{
            BoxFuture, DeadReason, HandlerError, InboxConfig, InboxMessage, Outcome,
        };
        use sqlx::Transaction;

        use crate::common;

        type Tx = Transaction<'static, $db>;

        /// The ids a handler was given, call by call.
        #[derive(Clone, Default)]
        struct Calls(Arc<Mutex<Vec<Vec<String>>>>);

        impl Calls {
            fn record(&self, ids: Vec<String>) {
                self.0.lock().unwrap().push(ids);
            }

            fn take(&self) -> Vec<Vec<String>> {
                std::mem::take(&mut *self.0.lock().unwrap())
            }
        }

        fn id(m: &InboxMessage) -> String {
            m.id().unwrap_or_default().to_owned()
        }

        /// One message's effect: an undecodable payload is a permanent
        /// failure, an id starting with `poison` a transient one, one
        /// starting with `panic` panics; else one row.
        async fn effect(table: &str, tx: &mut Tx, m: &InboxMessage) -> Result<(), HandlerError> {
            let p: common::Payment =
                serde_json::from_slice(m.payload()).map_err(HandlerError::permanent)?;
            let id = id(m);
            if id.starts_with("poison") {
                return Err(HandlerError::transient("poisoned"));
            }
            if id.starts_with("panic") {
                panic!("the handler panics on {id}");
            }
            sqlx::query(&format!($insert, table))
                .bind(p.account)
                .bind(p.amount)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// A per-message handler (`process_each`).
        fn each(
            table: &str,
            calls: &Calls,
        ) -> impl for<'t> FnMut(
            &'t mut Tx,
            &'t InboxMessage,
        ) -> BoxFuture<'t, Result<(), HandlerError>>
               + Send {
            let (table, calls) = (table.to_owned(), calls.clone());
            move |tx, m| {
                calls.record(vec![id(m)]);
                let table = table.clone();
                Box::pin(async move { effect(&table, tx, m).await })
            }
        }

        /// A batch handler (`process_batch`).
        fn whole(
            table: &str,
            calls: &Calls,
        ) -> impl for<'t> FnMut(
            &'t mut Tx,
            &'t [&'t InboxMessage],
        ) -> BoxFuture<'t, Result<(), HandlerError>>
               + Send {
            let (table, calls) = (table.to_owned(), calls.clone());
            move |tx, new| {
                calls.record(new.iter().map(|m| id(m)).collect());
                let table = table.clone();
                Box::pin(async move {
                    for m in new {
                        effect(&table, tx, m).await?;
                    }
                    Ok(())
                })
            }
        }

        async fn effects(pool: &sqlx::Pool<$db>, table: &str, id: &str) -> i64 {
            sqlx::query_scalar(&format!($count, table))
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap()
        }

        fn config(max: u32) -> InboxConfig {
            InboxConfig::builder(common::consumer("consumer"))
                .max_attempts(max)
                .build()
                .unwrap()
        }

        fn msgs(ids: &[&str]) -> Vec<InboxMessage> {
            ids.iter()
                .map(|id| InboxMessage::new(Some((*id).into()), common::payment("acct", 10)))
                .collect()
        }

        fn names(outcomes: &[Outcome]) -> Vec<String> {
            outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Processed { attempt } => format!("processed {attempt}"),
                    Outcome::Failed { attempt, .. } => format!("failed {attempt}"),
                    Outcome::Dead {
                        reason: DeadReason::MaxAttempts { attempts, .. },
                    } => format!("dead after {attempts}"),
                    Outcome::Dead {
                        reason: DeadReason::AlreadyDead,
                    } => "dead before".to_owned(),
                    Outcome::Dead {
                        reason: DeadReason::Rejected { attempt, .. },
                    } => format!("rejected {attempt}"),
                    Outcome::Dead {
                        reason: DeadReason::MissingId,
                    } => "no id".to_owned(),
                    other => other.name().to_owned(),
                })
                .collect()
        }

        fn strings(calls: &[&[&str]]) -> Vec<Vec<String>> {
            calls
                .iter()
                .map(|c| c.iter().map(|s| (*s).to_owned()).collect())
                .collect()
        }

        #[tokio::test]
        async fn a_batch_runs_its_new_messages_in_one_call_and_commits_once() {
            let Some((pool, table)) = $setup("a_batch_runs_its_new_messages_in_one_call").await
            else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let calls = Calls::default();
            let ids: Vec<String> = (0..10).map(|i| format!("m-{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let batch = msgs(&ids);
            let outcomes = common::bounded(
                "the batch",
                inbox.process_batch(&batch, whole(&table, &calls)),
            )
            .await;
            assert_eq!(names(&outcomes), vec!["processed 1"; 10]);
            assert_eq!(calls.take(), strings(&[&ids]));
            for id in &ids {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
                assert_eq!(inbox.attempts(id).await.unwrap(), Some(1));
            }
            // Redelivered whole: duplicates, and the handler is not called.
            let outcomes = inbox.process_batch(&batch, whole(&table, &calls)).await;
            assert_eq!(names(&outcomes), vec!["duplicate"; 10]);
            assert!(calls.take().is_empty());
            // Mixed: only the new ones reach the handler, in their order.
            let outcomes = inbox
                .process_batch(&msgs(&["m-0", "n-1", "m-1", "n-2"]), whole(&table, &calls))
                .await;
            assert_eq!(
                names(&outcomes),
                ["duplicate", "processed 1", "duplicate", "processed 1"]
            );
            assert_eq!(calls.take(), strings(&[&["n-1", "n-2"]]));
            // All new again, then one recorded before among new ones (a
            // batch tries the cheaper plain insert first, and claims again
            // skipping the recorded ids when it meets one).
            for (batch, want) in [
                (&["p-1", "p-2"][..], &["processed 1", "processed 1"][..]),
                (
                    &["q-1", "p-2", "q-2"],
                    &["processed 1", "duplicate", "processed 1"],
                ),
                (&["r-1"], &["processed 1"]),
            ] {
                let outcomes = inbox
                    .process_batch(&msgs(batch), whole(&table, &calls))
                    .await;
                assert_eq!(names(&outcomes), want, "{batch:?}");
            }
            assert_eq!(
                calls.take(),
                strings(&[&["p-1", "p-2"], &["q-1", "q-2"], &["r-1"]])
            );
            for id in ["p-1", "p-2", "q-1", "q-2", "r-1"] {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
            }
            let m = inbox.metrics();
            assert_eq!((m.processed, m.duplicate), (17, 13));
            // An empty batch is nothing.
            assert!(inbox
                .process_each(&[], each(&table, &calls))
                .await
                .is_empty());
        }

        #[tokio::test]
        async fn duplicate_ids_inside_a_batch_run_once_and_both_copies_are_acked() {
            let Some((pool, table)) = $setup("duplicate_ids_inside_a_batch").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let calls = Calls::default();
            let outcomes = common::bounded(
                "the batch",
                inbox.process_each(&msgs(&["a", "b", "a", "c", "b"]), each(&table, &calls)),
            )
            .await;
            assert_eq!(
                names(&outcomes),
                [
                    "processed 1",
                    "processed 1",
                    "duplicate",
                    "processed 1",
                    "duplicate"
                ]
            );
            assert!(outcomes
                .iter()
                .all(|o| o.disposition() == inbox_consumer::Disposition::Ack));
            assert_eq!(calls.take(), strings(&[&["a"], &["b"], &["c"]]));
            for id in ["a", "b", "c"] {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
            }
            let outcomes = inbox
                .process_batch(&msgs(&["d", "d", "d"]), whole(&table, &calls))
                .await;
            assert_eq!(names(&outcomes), ["processed 1", "duplicate", "duplicate"]);
            assert_eq!(calls.take(), strings(&[&["d"]]));
            assert_eq!(effects(&pool, &table, "d").await, 1);
        }

        #[tokio::test]
        async fn a_poison_message_does_not_hold_the_batch_back_and_dies_after_the_attempts() {
            let Some((pool, table)) = $setup("a_poison_message_in_a_batch").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(3)).await.unwrap();
            let calls = Calls::default();
            let outcomes = common::bounded(
                "the batch",
                inbox.process_batch(&msgs(&["ok-0", "poison", "ok-1"]), whole(&table, &calls)),
            )
            .await;
            assert_eq!(names(&outcomes), ["processed 1", "failed 1", "processed 1"]);
            // The whole batch once, then one message at a time.
            assert_eq!(
                calls.take(),
                strings(&[
                    &["ok-0", "poison", "ok-1"],
                    &["ok-0"],
                    &["poison"],
                    &["ok-1"]
                ])
            );
            // No attempt counted against the others.
            for id in ["ok-0", "ok-1"] {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
                assert_eq!(inbox.attempts(id).await.unwrap(), Some(1), "{id}");
            }
            assert_eq!(inbox.attempts("poison").await.unwrap(), Some(1));
            // Redelivered with others, as a broker would.
            let outcomes = inbox
                .process_each(&msgs(&["poison", "ok-2", "ok-0"]), each(&table, &calls))
                .await;
            assert_eq!(names(&outcomes), ["failed 2", "processed 1", "duplicate"]);
            let outcomes = inbox
                .process_each(&msgs(&["ok-3", "poison"]), each(&table, &calls))
                .await;
            assert_eq!(names(&outcomes), ["processed 1", "dead after 3"]);
            calls.take();
            // Dead: left out of the next batch, the handler never sees it.
            let outcomes = inbox
                .process_batch(&msgs(&["poison", "ok-4"]), whole(&table, &calls))
                .await;
            assert_eq!(names(&outcomes), ["dead before", "processed 1"]);
            assert_eq!(calls.take(), strings(&[&["ok-4"]]));
            assert_eq!(effects(&pool, &table, "poison").await, 0);
            assert_eq!(inbox.attempts("poison").await.unwrap(), Some(3));
            for id in ["ok-0", "ok-1", "ok-2", "ok-3", "ok-4"] {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
                assert_eq!(inbox.attempts(id).await.unwrap(), Some(1), "{id}");
            }
            let m = inbox.metrics();
            assert_eq!((m.failed, m.dead), (2, 2));
        }

        #[tokio::test]
        async fn a_panicking_message_does_not_hold_the_batch_back() {
            let Some((pool, table)) = $setup("a_panicking_message_in_a_batch").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(2)).await.unwrap();
            let calls = Calls::default();
            let outcomes = common::bounded(
                "the batch",
                inbox.process_each(&msgs(&["ok-0", "panic-1", "ok-1"]), each(&table, &calls)),
            )
            .await;
            assert_eq!(names(&outcomes), ["processed 1", "failed 1", "processed 1"]);
            if let Outcome::Failed { error, .. } = &outcomes[1] {
                assert!(error.to_string().contains("panicked"), "{error}");
            }
            let outcomes = inbox
                .process_each(&msgs(&["panic-1", "ok-2"]), each(&table, &calls))
                .await;
            assert_eq!(names(&outcomes), ["dead after 2", "processed 1"]);
            for id in ["ok-0", "ok-1", "ok-2"] {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
            }
        }

        #[tokio::test]
        async fn undecodable_and_id_less_messages_in_a_batch_are_dead_and_the_rest_apply() {
            let Some((pool, table)) = $setup("undecodable_and_id_less_in_a_batch").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let calls = Calls::default();
            let batch = vec![
                InboxMessage::new(Some("ok".into()), common::payment("acct", 1)),
                InboxMessage::new(Some("bad".into()), &b"not json"[..]),
                InboxMessage::new(None, common::payment("acct", 1)),
                InboxMessage::new(Some("x".repeat(600)), common::payment("acct", 1)),
            ];
            let outcomes = common::bounded(
                "the batch",
                inbox.process_each(&batch, each(&table, &calls)),
            )
            .await;
            assert_eq!(
                names(&outcomes),
                ["processed 1", "rejected 1", "no id", "dead"]
            );
            assert_eq!(effects(&pool, &table, "ok").await, 1);
            let outcomes = inbox.process_each(&batch[1..2], each(&table, &calls)).await;
            assert_eq!(names(&outcomes), ["dead before"]);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_batches_sharing_ids_apply_each_once() {
            let Some((pool, table)) = $setup("concurrent_batches_sharing_ids").await else {
                return;
            };
            let inbox = Arc::new($new(pool.clone(), config(5)).await.unwrap());
            let ids: Vec<String> = (0..20).map(|i| format!("c-{i:02}")).collect();
            let tasks = (0..4).map(|n| {
                let (inbox, table) = (inbox.clone(), table.to_string());
                // Each batch holds every id, in an order of its own.
                let mut order: Vec<&str> = ids.iter().map(String::as_str).collect();
                order.rotate_left(n * 5);
                if n % 2 == 1 {
                    order.reverse();
                }
                let batch = msgs(&order);
                tokio::spawn(async move {
                    inbox
                        .process_each(&batch, each(&table, &Calls::default()))
                        .await
                        .iter()
                        .map(|o| o.name())
                        .collect::<Vec<_>>()
                })
            });
            let mut processed = 0;
            for task in tasks {
                let outcomes = common::bounded("a batch", task).await.unwrap();
                assert!(
                    outcomes
                        .iter()
                        .all(|o| *o == "processed" || *o == "duplicate"),
                    "{outcomes:?}"
                );
                processed += outcomes.iter().filter(|o| **o == "processed").count();
            }
            assert_eq!(processed, 20);
            for id in &ids {
                assert_eq!(effects(&pool, &table, id).await, 1, "{id}");
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::PgPool;

    async fn setup(test: &str) -> Option<(PgPool, crate::common::PgTable)> {
        let url = crate::common::service_url("DATABASE_URL", test)?;
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .connect(&url)
            .await
            .expect("DATABASE_URL is set but PostgreSQL does not answer");
        let columns = "account TEXT NOT NULL, amount BIGINT NOT NULL, message_id TEXT NOT NULL";
        let table = crate::common::PgTable::create(&pool, &url, columns).await;
        Some((pool, table))
    }

    batch_cases! {
        db = sqlx::Postgres,
        setup = setup,
        new = inbox_consumer::Inbox::postgres,
        insert = "INSERT INTO {} (account, amount, message_id) VALUES ($1, $2, $3)",
        count = "SELECT COUNT(*) FROM {} WHERE message_id = $1",
    }

    /// How many of the pool's connections (named `app`) wait on a lock.
    async fn waiting(pool: &PgPool, app: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(app)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Batch A holds `x1` and waits for `x2`, held by a third transaction;
    /// batch B, given `x3` before `x1`, comes next. Taken in the batches'
    /// own orders, B would hold `x3` and wait for `x1` while A, once `x2`
    /// is free, waits for `x3`: a deadlock, which PostgreSQL breaks by
    /// failing one of them (and the inbox would fall back to one message at
    /// a time, once the deadlock timeout has passed). Taken in the ids'
    /// order, as the inbox does, B waits for A at `x1` and then finds the
    /// duplicates, at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_batches_sharing_ids_in_opposite_orders_do_not_deadlock() {
        let test = "two_batches_sharing_ids_in_opposite_orders_do_not_deadlock";
        let Some((admin, table)) = setup(test).await else {
            return;
        };
        let app = crate::common::unique("batch_locks");
        let url = crate::common::service_url("DATABASE_URL", test).unwrap();
        // A deadlock would be found (and broken) only after 20 s, well
        // past the bound below, so that one cannot pass unnoticed.
        let options: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .connect_with(
                options
                    .application_name(&app)
                    .options([("deadlock_timeout", "20s")]),
            )
            .await
            .unwrap();
        let inbox = Arc::new(
            inbox_consumer::Inbox::postgres(pool.clone(), config(5))
                .await
                .unwrap(),
        );
        // The third transaction: holds x2, then rolls back.
        let (entered, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let holder = {
            let (inbox, entered, release) = (inbox.clone(), entered.clone(), release.clone());
            tokio::spawn(async move {
                inbox
                    .process(&msgs(&["x2"])[0], move |_tx, _m| {
                        Box::pin(async move {
                            entered.notify_one();
                            release.notified().await;
                            Err(HandlerError::transient("rolled back on purpose"))
                        })
                    })
                    .await
            })
        };
        common::bounded("the holder has x2", entered.notified()).await;
        let batch = |ids: &'static [&'static str], calls: Calls| {
            let (inbox, table) = (inbox.clone(), table.to_string());
            tokio::spawn(async move {
                names(&inbox.process_batch(&msgs(ids), whole(&table, &calls)).await)
            })
        };
        let (calls_a, calls_b) = (Calls::default(), Calls::default());
        let a = batch(&["x1", "x2", "x3"], calls_a.clone());
        test_support::eventually("A waits for x2", || async {
            waiting(&admin, &app).await == 1
        })
        .await;
        let b = batch(&["x3", "x1"], calls_b.clone());
        test_support::eventually("B waits too", || async { waiting(&admin, &app).await == 2 })
            .await;
        release.notify_one();
        let held = common::bounded("the holder", holder).await.unwrap();
        assert_eq!(held.name(), "failed");
        let quickly = std::time::Duration::from_secs(5);
        let a = tokio::time::timeout(quickly, a)
            .await
            .expect("batch A deadlocked")
            .unwrap();
        let b = tokio::time::timeout(quickly, b)
            .await
            .expect("batch B deadlocked")
            .unwrap();
        // (A's statement read the attempts before the holder counted its
        // failure: its snapshot is the statement's start.)
        assert_eq!(a, ["processed 1", "processed 1", "processed 1"]);
        assert_eq!(b, ["duplicate", "duplicate"]);
        // One call each with the whole batch: no deadlock, no fallback.
        assert_eq!(calls_a.take(), strings(&[&["x1", "x2", "x3"]]));
        assert!(calls_b.take().is_empty());
        for id in ["x1", "x2", "x3"] {
            assert_eq!(effects(&admin, &table, id).await, 1, "{id}");
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    use sqlx::SqlitePool;

    async fn setup(_test: &str) -> Option<(SqlitePool, String)> {
        let path =
            std::env::temp_dir().join(format!("{}.db", crate::common::unique("inbox_batch")));
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        let table = crate::common::unique("ledger");
        sqlx::query(&format!(
            "CREATE TABLE {table} (account TEXT NOT NULL, amount INTEGER NOT NULL, message_id TEXT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Some((pool, table))
    }

    batch_cases! {
        db = sqlx::Sqlite,
        setup = setup,
        new = inbox_consumer::Inbox::sqlite,
        insert = "INSERT INTO {} (account, amount, message_id) VALUES (?1, ?2, ?3)",
        count = "SELECT COUNT(*) FROM {} WHERE message_id = ?1",
    }
}
