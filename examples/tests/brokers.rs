//! The messaging binaries (`outbox-relay`, `inbox-rabbitmq`, `inbox-nats`)
//! against brokers and databases that fail: TLS URLs go out as TLS (never
//! plaintext, never a panic); a server that accepts and never answers is a
//! clear error within a bound, and SIGTERM during startup exits 0 at once; a
//! closed port says "connection refused"; the consumers outlive a broker
//! outage (and JetStream a recreated stream) with every message's effect
//! once; the relay says why at WARN while the broker is gone and never logs
//! a returned message's payload; `--metrics-listen` serves Prometheus text.
//!
//! Tests that need a service read `DATABASE_URL`, `AMQP_URL` or `NATS_URL`
//! and skip, saying why, when it is unset; the fakes need none. Tests whose
//! relay or consumer does work get a PostgreSQL database of their own.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use test_support::{
    closed_port, eventually, host_port, is_tls_client_hello, service_url, unique, via, PgDatabase,
    Proxy, SilentServer,
};

const RELAY: &str = env!("CARGO_BIN_EXE_outbox-relay");
const INBOX_RABBITMQ: &str = env!("CARGO_BIN_EXE_inbox-rabbitmq");
const INBOX_NATS: &str = env!("CARGO_BIN_EXE_inbox-nats");

/// The binaries' connect timeout is 5 s: an error must come well within this.
const FAILS_WITHIN: Duration = Duration::from_secs(15);

/// How long a binary may take to exit after SIGTERM during startup.
const PROMPTLY: Duration = Duration::from_secs(2);

/// How long a binary may take to be ready (its log says so).
const STARTUP: Duration = Duration::from_secs(30);

/// The password in every URL here: it must never reach a log or an error.
const PASSWORD: &str = "s3cret-pw";

/// The `INFO` a NATS server that requires TLS greets its clients with.
const NATS_TLS_INFO: &str = "INFO {\"server_id\":\"FAKE\",\"server_name\":\"fake\",\
    \"version\":\"2.10.0\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":4222,\
    \"headers\":true,\"max_payload\":1048576,\"tls_required\":true}\r\n";

// ------------------------------------------------------------ TLS

#[tokio::test(flavor = "multi_thread")]
async fn amqps_goes_out_as_tls_from_the_relay_and_the_consumer() {
    let Some(db) = service_url("DATABASE_URL", "amqps_goes_out_as_tls") else {
        return;
    };
    for binary in [RELAY, INBOX_RABBITMQ] {
        let mut broker = SilentServer::start().await;
        let amqp = format!("amqps://guest:{PASSWORD}@{}/%2f", broker.addr);
        let mut proc = Proc::spawn(binary, &["--database", &db, "--amqp", &amqp]);
        let first = broker.first_bytes(STARTUP).await.unwrap_or_else(|| {
            panic!(
                "{}: sent nothing to the broker; log:\n{}",
                name(binary),
                proc.log()
            )
        });
        assert!(
            !first.starts_with(b"AMQP"),
            "{}: an amqps:// URL went out as plaintext AMQP: {first:?}",
            name(binary)
        );
        assert!(
            is_tls_client_hello(&first),
            "{}: not a TLS ClientHello: {first:?}",
            name(binary)
        );
        // The handshake never completes: a clear error within the bound.
        let (code, log) = proc.exit_within(FAILS_WITHIN).await;
        assert_eq!(code, Some(1), "{}: {log}", name(binary));
        assert_clear_timeout(binary, &log, "RabbitMQ");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_tls_starts_a_handshake_from_the_relay_and_the_consumer_and_never_panics() {
    let Some(db) = service_url("DATABASE_URL", "nats_tls_starts_a_handshake") else {
        return;
    };
    for (binary, extra) in [(RELAY, &["--broker", "nats"][..]), (INBOX_NATS, &[][..])] {
        let mut server = SilentServer::with_greeting(NATS_TLS_INFO).await;
        let nats = format!("tls://user:{PASSWORD}@{}", server.addr);
        let args = [&["--database", &db, "--nats", &nats][..], extra].concat();
        let mut proc = Proc::spawn(binary, &args);
        let first = server.first_bytes(STARTUP).await;
        let (code, log) = proc.exit_within(FAILS_WITHIN).await;
        assert_ne!(code, Some(101), "{} panicked: {log}", name(binary));
        let first = first.unwrap_or_else(|| panic!("{}: sent nothing; log:\n{log}", name(binary)));
        assert!(
            is_tls_client_hello(&first),
            "{}: not a TLS ClientHello: {first:?}",
            name(binary)
        );
        assert_eq!(code, Some(1), "{}: {log}", name(binary));
        assert_clear_timeout(binary, &log, "NATS");
    }
}

// ------------------------------------------ servers that never answer

/// Each binary, pointed at a server that accepts and never answers in one
/// of its flags (the others real, when the service is there).
async fn silent_cases(test: &str) -> Vec<(&'static str, Vec<String>, &'static str, SilentServer)> {
    let mut cases = Vec::new();
    for binary in [RELAY, INBOX_RABBITMQ, INBOX_NATS] {
        let server = SilentServer::start().await;
        let url = format!("postgres://postgres:{PASSWORD}@{}/test", server.addr);
        cases.push((
            binary,
            vec!["--database".to_owned(), url],
            "PostgreSQL",
            server,
        ));
    }
    let Some(db) = service_url("DATABASE_URL", test) else {
        return cases;
    };
    for (binary, flag, scheme, what, extra) in [
        (RELAY, "--amqp", "amqp", "RabbitMQ", None),
        (INBOX_RABBITMQ, "--amqp", "amqp", "RabbitMQ", None),
        (RELAY, "--nats", "nats", "NATS", Some("nats")),
        (INBOX_NATS, "--nats", "nats", "NATS", None),
    ] {
        let server = SilentServer::start().await;
        let vhost = if scheme == "amqp" { "/%2f" } else { "" };
        let url = format!("{scheme}://user:{PASSWORD}@{}{vhost}", server.addr);
        let mut args = vec!["--database".to_owned(), db.clone(), flag.to_owned(), url];
        if let Some(broker) = extra {
            args.extend(["--broker".to_owned(), broker.to_owned()]);
        }
        cases.push((binary, args, what, server));
    }
    cases
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_is_a_clear_error_within_a_bound() {
    let cases = silent_cases("a_server_that_never_answers").await;
    let mut running = Vec::new();
    for (binary, args, what, server) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        running.push((binary, what, Proc::spawn(binary, &args), server));
    }
    for (binary, what, mut proc, _server) in running {
        let (code, log) = proc.exit_within(FAILS_WITHIN).await;
        assert_eq!(code, Some(1), "{} ({what}): {log}", name(binary));
        assert_clear_timeout(binary, &log, what);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_startup_exits_0_promptly() {
    let cases = silent_cases("sigterm_during_startup").await;
    let mut running = Vec::new();
    for (binary, args, what, server) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        running.push((binary, what, Proc::spawn(binary, &args), server));
    }
    // Well inside the 5 s connect timeout: each is waiting for its server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, _, proc, _) in &running {
        proc.sigterm();
    }
    let signalled = Instant::now();
    for (binary, what, mut proc, _server) in running {
        let (code, log) = proc
            .exit_within(PROMPTLY.saturating_sub(signalled.elapsed()))
            .await;
        assert_eq!(
            code,
            Some(0),
            "{} waiting for {what}: SIGTERM is a clean shutdown: {log}",
            name(binary)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_says_connection_refused() {
    let port = closed_port();
    let mut cases: Vec<(&str, Vec<String>)> = [RELAY, INBOX_RABBITMQ, INBOX_NATS]
        .into_iter()
        .map(|binary| {
            let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/test");
            (binary, vec!["--database".to_owned(), url])
        })
        .collect();
    if let Some(db) = service_url("DATABASE_URL", "a_closed_port_says_connection_refused") {
        for (binary, args) in [
            (RELAY, vec!["--amqp", "amqp"]),
            (INBOX_RABBITMQ, vec!["--amqp", "amqp"]),
            (RELAY, vec!["--nats", "nats", "--broker", "nats"]),
            (INBOX_NATS, vec!["--nats", "nats"]),
        ] {
            let vhost = if args[1] == "amqp" { "/%2f" } else { "" };
            let url = format!("{}://user:{PASSWORD}@127.0.0.1:{port}{vhost}", args[1]);
            let mut all = vec!["--database".to_owned(), db.clone(), args[0].to_owned(), url];
            all.extend(args[2..].iter().map(|s| (*s).to_owned()));
            cases.push((binary, all));
        }
    }
    let mut running = Vec::new();
    for (binary, args) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        running.push((*binary, args.join(" "), Proc::spawn(binary, &args)));
    }
    for (binary, args, mut proc) in running {
        let (code, log) = proc.exit_within(FAILS_WITHIN).await;
        let error = last_line(&log);
        assert_eq!(code, Some(1), "{} {args}: {log}", name(binary));
        assert!(
            error.to_lowercase().contains("connection refused"),
            "{} {args}: the cause is not named: {error}",
            name(binary)
        );
        assert!(
            !log.contains(PASSWORD),
            "{}: the password leaked: {log}",
            name(binary)
        );
    }
}

/// The error line says what did not answer, within what, and where (the
/// URL without its password).
fn assert_clear_timeout(binary: &str, log: &str, what: &str) {
    let error = last_line(log);
    let name = name(binary);
    assert!(error.starts_with(&format!("{name}: ")), "{name}: {log}");
    assert!(
        error.contains(what),
        "{name}: does not name {what}: {error}"
    );
    assert!(
        error.contains("did not answer within 5s"),
        "{name}: not a timeout: {error}"
    );
    assert!(error.contains(":***@"), "{name}: no redacted URL: {error}");
    assert!(
        !log.contains(PASSWORD),
        "{name}: the password leaked: {log}"
    );
}

// --------------------------------------------- outages and recreation

#[tokio::test(flavor = "multi_thread")]
async fn inbox_rabbitmq_outlives_a_broker_outage_and_runs_each_message_once() {
    let test = "inbox_rabbitmq_outlives_a_broker_outage";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let queue = unique("brokers_q");
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ does not answer");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publish = |i: u32| {
        let ch = ch.clone();
        let queue = queue.clone();
        async move {
            let body = format!(r#"{{"account":"acct-{}","amount":{}}}"#, i % 5, i + 1);
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_message_id(format!("m{i}").into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    for i in 0..40 {
        publish(i).await;
    }
    let proxy = Proxy::start(host_port(&amqp, 5672)).await;
    let consumer = unique("ledger");
    let proc = Proc::spawn(
        INBOX_RABBITMQ,
        &[
            "--database",
            &db.url,
            "--amqp",
            &via(&amqp, proxy.addr),
            "--queue",
            &queue,
            "--consumer",
            &consumer,
            "--handler-delay",
            "20ms",
        ],
    );
    proc.wait_for("consuming", STARTUP).await;
    eventually("some ran before the outage", || async {
        db.count("SELECT count(*) FROM ledger_entries").await >= 5
    })
    .await;
    proxy.cut();
    for i in 40..60 {
        publish(i).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    eventually("every message ran after the outage", || async {
        db.count("SELECT count(DISTINCT message_id) FROM ledger_entries")
            .await
            == 60
    })
    .await;
    // Redeliveries of the deliveries unacked at the cut are duplicates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM ledger_entries").await,
        60,
        "one row per message"
    );
    let log = proc.log();
    let warned = log
        .lines()
        .find(|l| l.contains(" WARN ") && l.contains("lost the RabbitMQ subscription"))
        .unwrap_or_else(|| panic!("no WARN about the loss: {log}"));
    assert!(warned.contains("cause="), "no cause: {warned}");
    drop(proc);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_nats_outlives_an_outage_and_a_recreated_stream() {
    let test = "inbox_nats_outlives_an_outage_and_a_recreated_stream";
    let Some(nats) = service_url("NATS_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let js = jetstream::new(
        async_nats::connect(&nats)
            .await
            .expect("NATS does not answer"),
    );
    let stream = unique("BROKERS").to_uppercase();
    let subjects = format!("{stream}.>");
    let config = jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![subjects.clone()],
        ..Default::default()
    };
    let publish = |n: u32| {
        let (js, subject) = (js.clone(), format!("{stream}.pay"));
        async move {
            for i in 0..n {
                // No Nats-Msg-Id: keyed by the stream sequence and instant.
                let body = format!(r#"{{"account":"acct-{i}","amount":1}}"#);
                js.publish(subject.clone(), body.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    let rows = || db.count("SELECT count(*) FROM ledger_entries");
    let proxy = Proxy::start(host_port(&nats, 4222)).await;
    let consumer = unique("ledger");
    let proc = Proc::spawn(
        INBOX_NATS,
        &[
            "--database",
            &db.url,
            "--nats",
            &via(&nats, proxy.addr),
            "--stream",
            &stream,
            "--subject",
            &subjects,
            "--consumer",
            &consumer,
        ],
    );
    proc.wait_for("consuming", STARTUP).await;
    publish(20).await;
    eventually("20 ran", || async { rows().await == 20 }).await;

    proxy.cut();
    publish(10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    eventually("30 ran after the outage", || async { rows().await == 30 }).await;

    // The stream deleted and created again: sequences start at 1 again.
    js.delete_stream(&stream).await.unwrap();
    js.get_or_create_stream(config).await.unwrap();
    publish(5).await;
    eventually("35 ran after the stream was recreated", || async {
        rows().await == 35
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rows().await, 35, "one row per message");
    assert_eq!(
        db.count("SELECT count(DISTINCT message_id) FROM ledger_entries")
            .await,
        35
    );
    drop(proc);
    let _ = js.delete_stream(&stream).await;
    db.finish().await;
}

// ------------------------------------------------------- relay logs

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_says_why_at_warn_while_the_broker_is_gone() {
    let test = "the_relay_says_why_at_warn_while_the_broker_is_gone";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let queue = unique("brokers_q");
    let proxy = Proxy::start(host_port(&amqp, 5672)).await;
    let proc = Proc::spawn(
        RELAY,
        &[
            "--database",
            &db.url,
            "--amqp",
            &via(&amqp, proxy.addr),
            "--queue",
            &queue,
            "--poll-interval",
            "100ms",
        ],
    );
    proc.wait_for("relaying to", STARTUP).await;
    proxy.cut();
    enqueue(&db, "payments", b"{}").await;
    let line = proc
        .wait_for("cannot connect to RabbitMQ", Duration::from_secs(20))
        .await;
    assert!(line.contains(" WARN "), "not at WARN: {line}");
    assert!(line.contains("reason="), "no reason: {line}");
    proxy.restore();
    eventually("published after the outage", || async {
        db.count("SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
            .await
            == 0
    })
    .await;
    proc.wait_for("connected to RabbitMQ again", Duration::from_secs(10))
        .await;
    drop(proc);
    delete_queue(&amqp, &queue).await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returned_message_payload_stays_out_of_the_relay_log() {
    let test = "a_returned_message_payload_stays_out_of_the_relay_log";
    let Some(amqp) = service_url("AMQP_URL", test) else {
        return;
    };
    let Some(db) = PgDatabase::create(test).await else {
        return;
    };
    let queue = unique("brokers_q");
    let secret = format!("SECRET-{}", unique("payload"));
    let proc = Proc::spawn(
        RELAY,
        &[
            "--database",
            &db.url,
            "--amqp",
            &amqp,
            "--queue",
            &queue,
            "--poll-interval",
            "100ms",
        ],
    );
    proc.wait_for("relaying to", STARTUP).await;
    // No queue of that name: the broker returns the mandatory message.
    enqueue(&db, &unique("nowhere"), secret.as_bytes()).await;
    eventually("the broker returned it", || async {
        db.count("SELECT count(*) FROM outbox.events WHERE attempts > 0")
            .await
            == 1
    })
    .await;
    let log = proc.log();
    let bytes = format!("{:?}", secret.as_bytes());
    let bytes = bytes.trim_start_matches('[').trim_end_matches(']');
    assert!(!log.contains(&secret), "the payload is in the log: {log}");
    assert!(
        !log.contains(bytes),
        "the payload's bytes are in the log: {log}"
    );
    drop(proc);
    delete_queue(&amqp, &queue).await;
    db.finish().await;
}

// ------------------------------------------------------------ metrics

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_serves_prometheus_text_from_each_binary() {
    let test = "metrics_listen_serves_prometheus_text";
    let Some(db) = service_url("DATABASE_URL", test) else {
        return;
    };
    let consumer = unique("ledger");
    let queue = unique("brokers_q");
    let stream = unique("BROKERS").to_uppercase();
    let subjects = format!("{stream}.>");
    let mut cases: Vec<(&str, Vec<String>, &str)> = Vec::new();
    let amqp = service_url("AMQP_URL", test);
    if let Some(amqp) = &amqp {
        cases.push((
            INBOX_RABBITMQ,
            [
                "--amqp",
                amqp.as_str(),
                "--queue",
                &queue,
                "--consumer",
                &consumer,
            ]
            .map(str::to_owned)
            .to_vec(),
            "inbox_messages_total{consumer=",
        ));
        // Its own database: the relay publishes what it finds.
        cases.push((
            RELAY,
            ["--amqp", amqp.as_str(), "--queue", &queue]
                .map(str::to_owned)
                .to_vec(),
            "outbox_",
        ));
    }
    let nats = service_url("NATS_URL", test);
    if let Some(nats) = &nats {
        cases.push((
            INBOX_NATS,
            [
                "--nats",
                nats.as_str(),
                "--stream",
                &stream,
                "--subject",
                &subjects,
                "--consumer",
                &consumer,
            ]
            .map(str::to_owned)
            .to_vec(),
            "inbox_messages_total{consumer=",
        ));
    }
    let relay_db = PgDatabase::create(test).await;
    for (binary, args, series) in cases {
        let database = if binary == RELAY {
            match &relay_db {
                Some(db) => db.url.clone(),
                None => continue,
            }
        } else {
            db.clone()
        };
        let mut all = vec!["--database", &database, "--metrics-listen", "127.0.0.1:0"];
        all.extend(args.iter().map(String::as_str));
        let proc = Proc::spawn(binary, &all);
        let line = proc.wait_for("serving metrics", STARTUP).await;
        let addr: std::net::SocketAddr = line
            .split("listen=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        proc.wait_for(
            if binary == RELAY {
                "relaying to"
            } else {
                "consuming"
            },
            STARTUP,
        )
        .await;
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{}: {body}", name(binary));
        assert!(
            body.contains(series),
            "{}: no {series} in:\n{body}",
            name(binary)
        );
        drop(proc);
    }
    if let Some(amqp) = &amqp {
        delete_queue(amqp, &queue).await;
    }
    if let Some(nats) = &nats {
        if let Ok(client) = async_nats::connect(nats).await {
            let _ = jetstream::new(client).delete_stream(&stream).await;
        }
    }
    if let Some(db) = relay_db {
        db.finish().await;
    }
}

// ------------------------------------------------------------ helpers

/// A running binary, its stderr collected; killed on drop.
struct Proc {
    binary: &'static str,
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn spawn(binary: &'static str, args: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let collected = Arc::clone(&log);
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = collected.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            binary,
            child,
            log,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The first log line containing `what`, waiting up to `within`.
    async fn wait_for(&self, what: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(what)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what:?} within {within:?}; log:\n{}",
                name(self.binary),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// The exit code (`None`: killed by a signal) and the whole log; panics
    /// when it is still running after `within`.
    async fn exit_within(&mut self, within: Duration) -> (Option<i32>, String) {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "{}: still running after {within:?}; log:\n{}",
                    name(self.binary),
                    self.log()
                );
            }
        };
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        (status.code(), self.log())
    }
}

fn name(binary: &str) -> &str {
    binary.rsplit(['/', '\\']).next().unwrap_or(binary)
}

fn last_line(log: &str) -> &str {
    log.lines().last().unwrap_or_default()
}

/// One event, committed, to `destination` (the outbox table created first).
async fn enqueue(db: &PgDatabase, destination: &str, payload: &[u8]) {
    outbox::migrate_postgres(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &outbox::Event::new(destination, payload.to_vec()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn delete_queue(amqp: &str, queue: &str) {
    if let Ok(conn) = Connection::connect(amqp, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// `GET path` on its own connection: the status and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("GET answered in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
