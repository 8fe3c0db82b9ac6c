//! What the tests share: the binary, a private database, a RabbitMQ queue
//! and a relay publishing to it with `max_attempts(1)` (an event sent to a
//! queue that does not exist is returned, and dies at once).
#![allow(dead_code)]

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::{PostgresRelay, RelayConfig};
use test_support::{service_url, PgDatabase};
use tokio::sync::oneshot;

/// What one run of the binary came to.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `messaging-admin --database URL ARGS...` (as `ops`).
pub async fn admin(database: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_messaging-admin"))
        .arg("--database")
        .arg(database)
        .arg("--as")
        .arg("ops@test")
        .args(args)
        .output()
        .await
        .expect("run messaging-admin");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `admin`, asserting exit status 0; its stdout as JSON.
pub async fn admin_json(database: &str, args: &[&str]) -> serde_json::Value {
    let run = admin(database, args).await;
    assert_eq!(run.code, 0, "{args:?}: {run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"))
}

/// A private database with the outbox's tables, and a RabbitMQ channel.
pub struct Broker {
    pub db: PgDatabase,
    pub conn: Connection,
    pub ch: Channel,
    pub amqp: String,
    pub queue: String,
}

impl Broker {
    /// `None` (saying why) when `DATABASE_URL` or `AMQP_URL` is unset.
    pub async fn new(test: &str) -> Option<Self> {
        let amqp = service_url("AMQP_URL", test)?;
        let db = PgDatabase::create(test).await?;
        outbox::migrate_postgres(&db.pool)
            .await
            .expect("outbox tables");
        let conn = Connection::connect(&amqp, ConnectionProperties::default())
            .await
            .expect("RabbitMQ does not answer");
        let ch = conn.create_channel().await.expect("channel");
        Some(Self {
            db,
            conn,
            ch,
            amqp,
            queue: test_support::unique("admin_q"),
        })
    }

    /// Declares the queue: the destination exists from now on.
    pub async fn declare(&self) {
        self.ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the queue");
    }

    /// The message ids in the queue now (taken out of it).
    pub async fn drain(&self) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(got) = self
            .ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            ids.push(
                got.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
            );
        }
        ids
    }

    /// Starts a relay on the database: one attempt per event, polling
    /// every 50 ms. Stopped (its batch finished) when the handle drops.
    pub async fn relay(&self) -> RelayHandle {
        let publisher = RabbitMqPublisher::connect(self.amqp.clone())
            .await
            .expect("publisher");
        let config = RelayConfig::builder()
            .max_attempts(1)
            .poll_interval(Duration::from_millis(50))
            .build()
            .expect("config");
        let relay = PostgresRelay::new(self.db.pool.clone(), publisher, config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("relay");
        });
        RelayHandle {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Deletes the queue and the database.
    pub async fn finish(self) {
        let _ = self
            .ch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.conn.close(0, "done".into()).await;
        self.db.finish().await;
    }
}

/// A relay running in this process.
pub struct RelayHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RelayHandle {
    /// Stops it and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = test_support::bounded("the relay stops", task).await;
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The count `sql` selects.
pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Enqueues `n` events to `destination`; their ids.
pub async fn enqueue(pool: &sqlx::PgPool, destination: &str, n: usize) -> Vec<String> {
    let mut tx = pool.begin().await.expect("begin");
    let mut ids = Vec::new();
    for i in 0..n {
        let event = outbox::Event::new(
            destination.to_owned(),
            format!(r#"{{"account":"acct-{i}","amount":{i}}}"#).into_bytes(),
        )
        .with_header("content-type", "application/json");
        outbox::enqueue(&mut *tx, &event).await.expect("enqueue");
        ids.push(event.id().to_string());
    }
    tx.commit().await.expect("commit");
    ids
}

/// A `messaging-admin serve` process, killed on drop.
pub struct Console {
    pub base: String,
    child: tokio::process::Child,
    _tokens: tempfile_path::TempPath,
}

/// The token file's one line: `alice` with this token.
pub const TOKEN: &str = "alice-0123456789abcdef";

impl Console {
    /// Starts the console on a free port, with a token file that holds
    /// `alice` [`TOKEN`].
    pub async fn start(database: &str) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let tokens = tempfile_path::TempPath::new("tokens");
        std::fs::write(
            &tokens.0,
            format!("# the console's tokens\nalice {TOKEN}\n"),
        )
        .expect("write the token file");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_messaging-admin"))
            .arg("--database")
            .arg(database)
            .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
            .arg(&tokens.0)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the console");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let base = test_support::bounded("the console says where it serves", async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("stderr")
                    .expect("the console exited before serving");
                if let Some(rest) = line.strip_prefix("messaging-admin: console on ") {
                    return rest.trim_end_matches('/').to_owned();
                }
            }
        })
        .await;
        // Keep reading (and dropping) its log lines, so it never blocks on
        // a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            base,
            child,
            _tokens: tokens,
        }
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A file path removed on drop.
pub mod tempfile_path {
    /// The path.
    pub struct TempPath(pub std::path::PathBuf);

    impl TempPath {
        /// A fresh name in the temporary directory.
        pub fn new(prefix: &str) -> Self {
            Self(std::env::temp_dir().join(test_support::unique(prefix)))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
