//! Shared test helpers: service URLs, unique names, bounded waits, and the
//! transactional-mode cases written once for PostgreSQL and SQLite.
#![allow(dead_code, unused_macros, unused_imports)]

pub use test_support::{bounded, service_url, unique};

thread_local! {
    /// The consumer names this test thread made with [`consumer`].
    static CONSUMERS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A unique consumer name, remembered for [`PgTable`]'s clean-up. (A
/// `#[tokio::test]`'s body runs on its test's own thread, whatever the
/// runtime's flavor, so another test's names are never in this thread's
/// list.)
pub fn consumer(prefix: &str) -> String {
    let name = unique(prefix);
    remember(&name);
    name
}

/// Remembers a consumer name made elsewhere for [`PgTable`]'s clean-up.
pub fn remember(consumer: &str) {
    CONSUMERS.with(|c| c.borrow_mut().push(consumer.to_owned()));
}

/// A test's effect table in the shared PostgreSQL database. When the test
/// ends (passed or panicked) it drops the table and deletes the inbox rows
/// (`inbox_consumer.messages`, `.attempts`) of the consumers the test
/// thread named with [`consumer`], so that no test leaves rows behind.
#[cfg(feature = "postgres")]
pub struct PgTable {
    name: String,
    url: String,
}

#[cfg(feature = "postgres")]
impl PgTable {
    /// Creates `CREATE TABLE <unique name> (<columns>)` on `pool`.
    pub async fn create(pool: &sqlx::PgPool, url: &str, columns: &str) -> Self {
        let name = unique("ledger");
        sqlx::query(&format!("CREATE TABLE {name} ({columns})"))
            .execute(pool)
            .await
            .unwrap();
        Self {
            name,
            url: url.to_owned(),
        }
    }
}

#[cfg(feature = "postgres")]
impl std::ops::Deref for PgTable {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

#[cfg(feature = "postgres")]
impl std::fmt::Display for PgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(feature = "postgres")]
impl Drop for PgTable {
    fn drop(&mut self) {
        let consumers = CONSUMERS.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let (url, table) = (self.url.clone(), self.name.clone());
        // Its own thread and runtime: drop runs inside the test's runtime,
        // whose pool cannot be used from a blocking call.
        let cleaned = std::thread::spawn(move || {
            use sqlx::Connection;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(&mut conn)
                    .await?;
                for sql in [
                    "DELETE FROM inbox_consumer.messages WHERE consumer = ANY($1)",
                    "DELETE FROM inbox_consumer.attempts WHERE consumer = ANY($1)",
                ] {
                    sqlx::query(sql).bind(&consumers).execute(&mut conn).await?;
                }
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = cleaned {
            eprintln!(
                "could not clean up table {} and its inbox rows: {e}",
                self.name
            );
        }
    }
}

/// A ledger message body.
pub fn payment(account: &str, amount: i64) -> Vec<u8> {
    format!(r#"{{"account":"{account}","amount":{amount}}}"#).into_bytes()
}

#[derive(serde::Deserialize)]
pub struct Payment {
    pub account: String,
    pub amount: i64,
}

/// The transactional cases, written once for PostgreSQL and SQLite.
/// `setup(test)` returns `Option<(pool, effect table)>` (None: skipped, with
/// the reason printed); `new` builds the inbox; `insert` / `count` are the
/// effect's SQL with `{}` for the table; `age(pool, consumer, days)` backdates
/// a consumer's processed rows.
macro_rules! transactional_cases {
    (db = $db:ty, setup = $setup:path, new = $new:path, insert = $insert:expr, count = $count:expr, age = $age:path $(,)?) => {
        use inbox_consumer::{
            BoxFuture, DeadReason, HandlerError, InboxConfig, InboxMessage, Outcome,
        };
        use sqlx::Transaction;
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;

        type Tx = Transaction<'static, $db>;

        /// The ledger effect: decode (a permanent failure if it cannot), fail
        /// while `fail` > 0 (counting it down), then insert one row.
        fn ledger<'t>(
            table: String,
            fail: Arc<AtomicU32>,
            tx: &'t mut Tx,
            message: &'t InboxMessage,
        ) -> BoxFuture<'t, Result<(), HandlerError>> {
            Box::pin(async move {
                let p: common::Payment =
                    serde_json::from_slice(message.payload()).map_err(HandlerError::permanent)?;
                if fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(HandlerError::transient("scripted failure"));
                }
                sqlx::query(&format!($insert, table))
                    .bind(p.account)
                    .bind(p.amount)
                    .bind(message.id().unwrap_or_default().to_owned())
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
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

        fn msg(id: &str) -> InboxMessage {
            InboxMessage::new(Some(id.into()), common::payment("acct", 10))
        }

        #[tokio::test]
        async fn the_same_id_five_times_gives_one_effect() {
            let Some((pool, table)) = $setup("the_same_id_five_times_gives_one_effect").await
            else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let none = Arc::new(AtomicU32::new(0));
            let mut outcomes = Vec::new();
            for _ in 0..5 {
                let o = common::bounded(
                    "process",
                    inbox.process(&msg("m-1"), |tx, m| {
                        ledger(table.to_string(), none.clone(), tx, m)
                    }),
                )
                .await;
                outcomes.push(o.name());
            }
            assert_eq!(
                outcomes,
                [
                    "processed",
                    "duplicate",
                    "duplicate",
                    "duplicate",
                    "duplicate"
                ]
            );
            assert_eq!(effects(&pool, &table, "m-1").await, 1);
            let m = inbox.metrics();
            assert_eq!((m.processed, m.duplicate), (1, 4));
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_concurrent_copy_waits_then_sees_the_duplicate() {
            let Some((pool, table)) =
                $setup("a_concurrent_copy_waits_then_sees_the_duplicate").await
            else {
                return;
            };
            let inbox = Arc::new($new(pool.clone(), config(5)).await.unwrap());
            let entered = Arc::new(tokio::sync::Notify::new());
            let go = Arc::new(tokio::sync::Notify::new());
            let first = {
                let (inbox, table, entered, go) = (
                    inbox.clone(),
                    table.to_string(),
                    entered.clone(),
                    go.clone(),
                );
                tokio::spawn(async move {
                    let none = Arc::new(AtomicU32::new(0));
                    inbox
                        .process(&msg("m-c"), move |tx, m| {
                            Box::pin(async move {
                                // Hold the transaction (and the inbox row) open.
                                entered.notify_one();
                                go.notified().await;
                                ledger(table.to_string(), none.clone(), tx, m).await
                            })
                        })
                        .await
                })
            };
            common::bounded("first handler starts", entered.notified()).await;
            let second = {
                let (inbox, table) = (inbox.clone(), table.to_string());
                tokio::spawn(async move {
                    let none = Arc::new(AtomicU32::new(0));
                    inbox
                        .process(&msg("m-c"), |tx, m| {
                            ledger(table.to_string(), none.clone(), tx, m)
                        })
                        .await
                })
            };
            // Give the second copy time to reach the row lock; correctness does
            // not depend on it (if it came later it would see the committed row).
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            go.notify_one();
            let a = common::bounded("first", first).await.unwrap();
            let b = common::bounded("second", second).await.unwrap();
            assert!(matches!(a, Outcome::Processed { attempt: 1 }), "{a:?}");
            assert!(matches!(b, Outcome::Duplicate), "{b:?}");
            assert_eq!(effects(&pool, &table, "m-c").await, 1);
        }

        #[tokio::test]
        async fn failing_twice_then_succeeding_gives_one_effect_and_three_attempts() {
            let Some((pool, table)) = $setup("failing_twice_then_succeeding").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let fail = Arc::new(AtomicU32::new(2));
            let mut seen = Vec::new();
            for _ in 0..4 {
                match common::bounded(
                    "process",
                    inbox.process(&msg("m-f"), |tx, m| {
                        ledger(table.to_string(), fail.clone(), tx, m)
                    }),
                )
                .await
                {
                    Outcome::Failed { attempt, .. } => seen.push(format!("failed {attempt}")),
                    Outcome::Processed { attempt } => seen.push(format!("processed {attempt}")),
                    other => seen.push(other.name().to_owned()),
                }
            }
            assert_eq!(seen, ["failed 1", "failed 2", "processed 3", "duplicate"]);
            assert_eq!(effects(&pool, &table, "m-f").await, 1);
            assert_eq!(inbox.attempts("m-f").await.unwrap(), Some(3));
            assert_eq!(inbox.metrics().failed, 2);
        }

        #[tokio::test]
        async fn a_poison_message_dies_after_the_maximum_and_the_next_still_process() {
            let Some((pool, table)) = $setup("a_poison_message_dies").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(3)).await.unwrap();
            let always = Arc::new(AtomicU32::new(u32::MAX));
            let none = Arc::new(AtomicU32::new(0));
            let mut seen = Vec::new();
            for _ in 0..3 {
                let o = inbox
                    .process(&msg("poison"), |tx, m| {
                        ledger(table.to_string(), always.clone(), tx, m)
                    })
                    .await;
                seen.push(o.name());
                if let Outcome::Dead { reason } = &o {
                    assert!(
                        matches!(reason, DeadReason::MaxAttempts { attempts: 3, .. }),
                        "{reason:?}"
                    );
                }
            }
            assert_eq!(seen, ["failed", "failed", "dead"]);
            // A redelivery of the dead message does not run the handler.
            let again = inbox
                .process(&msg("poison"), |tx, m| {
                    ledger(table.to_string(), none.clone(), tx, m)
                })
                .await;
            assert!(
                matches!(
                    again,
                    Outcome::Dead {
                        reason: DeadReason::AlreadyDead
                    }
                ),
                "{again:?}"
            );
            assert_eq!(effects(&pool, &table, "poison").await, 0);
            for id in ["behind-1", "behind-2"] {
                let o = inbox
                    .process(&msg(id), |tx, m| {
                        ledger(table.to_string(), none.clone(), tx, m)
                    })
                    .await;
                assert!(matches!(o, Outcome::Processed { .. }), "{o:?}");
                assert_eq!(effects(&pool, &table, id).await, 1);
            }
            // Revived (after a fix), it processes once.
            assert!(inbox.revive("poison").await.unwrap());
            let o = inbox
                .process(&msg("poison"), |tx, m| {
                    ledger(table.to_string(), none.clone(), tx, m)
                })
                .await;
            assert!(matches!(o, Outcome::Processed { attempt: 1 }), "{o:?}");
            assert_eq!(effects(&pool, &table, "poison").await, 1);
        }

        #[tokio::test]
        async fn an_undecodable_payload_is_counted_then_dead() {
            let Some((pool, table)) = $setup("an_undecodable_payload").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let none = Arc::new(AtomicU32::new(0));
            let bad = InboxMessage::new(Some("bad".into()), &b"not json"[..]);
            let o = inbox
                .process(&bad, |tx, m| ledger(table.to_string(), none.clone(), tx, m))
                .await;
            assert!(
                matches!(
                    o,
                    Outcome::Dead {
                        reason: DeadReason::Rejected { attempt: 1, .. }
                    }
                ),
                "{o:?}"
            );
            assert_eq!(inbox.attempts("bad").await.unwrap(), Some(1));
            let o = inbox
                .process(&bad, |tx, m| ledger(table.to_string(), none.clone(), tx, m))
                .await;
            assert!(
                matches!(
                    o,
                    Outcome::Dead {
                        reason: DeadReason::AlreadyDead
                    }
                ),
                "{o:?}"
            );
        }

        #[tokio::test]
        async fn a_panicking_handler_is_counted_as_an_attempt() {
            let Some((pool, _table)) = $setup("a_panicking_handler").await else {
                return;
            };
            let inbox = $new(pool.clone(), config(2)).await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..2 {
                let o = inbox
                    .process(&msg("panics"), |_tx, _m| Box::pin(async { panic!("boom") }))
                    .await;
                seen.push(o.name());
            }
            assert_eq!(seen, ["failed", "dead"]);
        }

        #[tokio::test]
        async fn a_message_without_id_is_dead_unless_a_key_extractor_finds_one() {
            let Some((pool, table)) = $setup("a_message_without_id").await else {
                return;
            };
            let none = Arc::new(AtomicU32::new(0));
            let inbox = $new(pool.clone(), config(5)).await.unwrap();
            let anonymous = InboxMessage::new(None, common::payment("acct", 1));
            let o = inbox
                .process(&anonymous, |tx, m| {
                    ledger(table.to_string(), none.clone(), tx, m)
                })
                .await;
            assert!(
                matches!(
                    o,
                    Outcome::Dead {
                        reason: DeadReason::MissingId
                    }
                ),
                "{o:?}"
            );
            if let Outcome::Dead { reason } = &o {
                assert!(reason.to_string().contains("no id"), "{reason}");
            }

            let keyed = InboxConfig::builder(common::consumer("consumer"))
                .key_extractor(|m| m.header("x-key").map(str::to_owned))
                .build()
                .unwrap();
            let inbox = $new(pool.clone(), keyed).await.unwrap();
            let with_key = anonymous.clone().with_header("x-key", "k-1");
            for expected in ["processed", "duplicate"] {
                let o = inbox
                    .process(&with_key, |tx, m| {
                        ledger(table.to_string(), none.clone(), tx, m)
                    })
                    .await;
                assert_eq!(o.name(), expected);
            }
        }

        #[tokio::test]
        async fn purge_removes_old_processed_rows_only() {
            let Some((pool, table)) = $setup("purge_removes_old_processed_rows_only").await else {
                return;
            };
            let cfg = InboxConfig::builder(common::consumer("consumer"))
                .purge_batch(2)
                .build()
                .unwrap();
            let inbox = $new(pool.clone(), cfg).await.unwrap();
            let none = Arc::new(AtomicU32::new(0));
            for i in 0..5 {
                inbox
                    .process(&msg(&format!("old-{i}")), |tx, m| {
                        ledger(table.to_string(), none.clone(), tx, m)
                    })
                    .await;
            }
            $age(&pool, inbox.consumer(), 8).await;
            for i in 0..3 {
                inbox
                    .process(&msg(&format!("new-{i}")), |tx, m| {
                        ledger(table.to_string(), none.clone(), tx, m)
                    })
                    .await;
            }
            // Another consumer's old rows are not this inbox's to purge.
            let other = $new(pool.clone(), config(5)).await.unwrap();
            other
                .process(&msg("old-0"), |tx, m| {
                    ledger(table.to_string(), none.clone(), tx, m)
                })
                .await;
            $age(&pool, other.consumer(), 8).await;

            assert_eq!(inbox.purge().await.unwrap(), 5);
            assert_eq!(inbox.purge().await.unwrap(), 0);
            for i in 0..3 {
                assert_eq!(inbox.attempts(&format!("new-{i}")).await.unwrap(), Some(1));
            }
            assert_eq!(inbox.attempts("old-0").await.unwrap(), None);
            assert_eq!(other.attempts("old-0").await.unwrap(), Some(1));
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn purge_never_deletes_a_message_in_flight() {
            let Some((pool, table)) = $setup("purge_never_deletes_in_flight").await else {
                return;
            };
            let inbox = Arc::new($new(pool.clone(), config(5)).await.unwrap());
            let entered = Arc::new(tokio::sync::Notify::new());
            let go = Arc::new(tokio::sync::Notify::new());
            let running = {
                let (inbox, table, entered, go) = (
                    inbox.clone(),
                    table.to_string(),
                    entered.clone(),
                    go.clone(),
                );
                tokio::spawn(async move {
                    let none = Arc::new(AtomicU32::new(0));
                    inbox
                        .process(&msg("in-flight"), move |tx, m| {
                            Box::pin(async move {
                                entered.notify_one();
                                go.notified().await;
                                ledger(table.to_string(), none.clone(), tx, m).await
                            })
                        })
                        .await
                })
            };
            common::bounded("handler starts", entered.notified()).await;
            // Even a zero window cannot reach a row that is not committed.
            let purged =
                common::bounded("purge", inbox.purge_older_than(std::time::Duration::ZERO)).await;
            go.notify_one();
            let o = common::bounded("in-flight handler", running).await.unwrap();
            assert!(matches!(o, Outcome::Processed { .. }), "{o:?}");
            let _ = purged;
            assert_eq!(inbox.attempts("in-flight").await.unwrap(), Some(1));
            let again = inbox
                .process(&msg("in-flight"), |_tx, _m| Box::pin(async { Ok(()) }))
                .await;
            assert!(matches!(again, Outcome::Duplicate), "{again:?}");
        }
    };
}
