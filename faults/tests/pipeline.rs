//! Scenarios 1 and 2 of issue 25: the broker (RabbitMQ, then NATS) and
//! then PostgreSQL restarted while payments flow through
//! payments-axum `--transactional --outbox` → outbox-relay → broker →
//! inbox-rabbitmq / inbox-nats → `ledger_entries`, each binary in a network
//! namespace of its own, every server a private one (see the crate's doc).
//! No process is restarted: each must reconnect on its own, and at the end
//! every payment is in the ledger exactly once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faults::{
    count, created_ids, drained, enabled, exactly_once, load, pool, Bin, Nats, Netns, Postgres,
    Rabbit, Services, Tally,
};

/// Payments per scenario, and their rate.
const PAYMENTS: u32 = 600;
const RATE: u32 = 40;

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    Rabbitmq,
    Nats,
}

enum Server {
    Rabbit(Rabbit),
    Nats(Nats),
}

impl Server {
    fn url(&self) -> String {
        match self {
            Server::Rabbit(r) => r.url(),
            Server::Nats(n) => n.url(),
        }
    }
}

/// The pipeline on private servers, each binary in its namespace.
struct Pipeline {
    // Field order is drop order: the binaries before their namespaces,
    // the namespaces before the servers.
    api: Bin,
    relay: Bin,
    inbox: Bin,
    _ns: Vec<Netns>,
    api_addr: String,
    db: sqlx::PgPool,
    broker: Server,
    pg: Postgres,
    _services: Services,
}

impl Pipeline {
    async fn start(broker: Broker) -> Self {
        let services = Services::new();
        let pg = Postgres::start(&services.postgres()).await;
        let server = match broker {
            Broker::Rabbitmq => Server::Rabbit(Rabbit::start(&services.rabbitmq()).await),
            Broker::Nats => Server::Nats(Nats::start(&services.nats()).await),
        };
        let database = pg.url("postgres");
        let broker_url = server.url();
        let (ns_api, ns_relay, ns_inbox) =
            (Netns::new("api"), Netns::new("relay"), Netns::new("inbox"));
        let api = Bin::start(
            &ns_api,
            "payments-axum",
            &[
                "--listen",
                "0.0.0.0:3000",
                "--transactional",
                "--outbox",
                "--store",
                &database,
            ],
            "serving",
        )
        .await;
        let (flag, name) = match broker {
            Broker::Rabbitmq => ("--amqp", "rabbitmq"),
            Broker::Nats => ("--nats", "nats"),
        };
        let relay = Bin::start(
            &ns_relay,
            "outbox-relay",
            &[
                "--database",
                &database,
                "--broker",
                name,
                flag,
                &broker_url,
                "--poll-interval",
                "200ms",
            ],
            "relaying to",
        )
        .await;
        let inbox_bin = match broker {
            Broker::Rabbitmq => "inbox-rabbitmq",
            Broker::Nats => "inbox-nats",
        };
        let inbox = Bin::start(
            &ns_inbox,
            inbox_bin,
            &["--database", &database, flag, &broker_url],
            "consuming",
        )
        .await;
        let api_addr = format!("{}:3000", ns_api.addr());
        let db = pool(&database).await;
        Self {
            api,
            relay,
            inbox,
            _ns: vec![ns_api, ns_relay, ns_inbox],
            api_addr,
            db,
            broker: server,
            pg,
            _services: services,
        }
    }

    fn assert_running(&mut self) {
        self.api.assert_running();
        self.relay.assert_running();
        self.inbox.assert_running();
    }

    async fn ledger(&self) -> i64 {
        count(&self.db, "SELECT count(*) FROM ledger_entries").await
    }

    /// Waits until the ledger grows past `before`; how long it took.
    async fn ledger_moves(&self, before: i64, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.ledger().await <= before {
            assert!(
                started.elapsed() < limit,
                "the ledger did not move within {limit:?} of the restart; \
                 relay:\n{}\ninbox:\n{}",
                faults::tail(&self.relay.log(), 20),
                faults::tail(&self.inbox.log(), 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restarted_under_load_nothing_lost_nothing_doubled() {
    if !enabled("rabbitmq_restarted_under_load") {
        return;
    }
    broker_restart(Broker::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restarted_under_load_nothing_lost_nothing_doubled() {
    if !enabled("nats_restarted_under_load") {
        return;
    }
    broker_restart(Broker::Nats).await;
}

async fn broker_restart(broker: Broker) {
    let label = match broker {
        Broker::Rabbitmq => "RabbitMQ restarted (rabbitmqctl stop_app, 3 s, start_app)",
        Broker::Nats => "NATS restarted (SIGTERM, 3 s, start)",
    };
    let mut p = Pipeline::start(broker).await;
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let traffic = tokio::spawn(load(
        p.api_addr.clone(),
        PAYMENTS,
        RATE,
        tally.clone(),
        Instant::now() + Duration::from_secs(120),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    match &mut p.broker {
        Server::Rabbit(r) => r.down(),
        Server::Nats(n) => n.down(),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = p.ledger().await;
    match &mut p.broker {
        Server::Rabbit(r) => r.up().await,
        Server::Nats(n) => n.up().await,
    }
    let recovery = p.ledger_moves(before, Duration::from_secs(60)).await;
    let results = traffic.await.expect("the load");
    let ids = created_ids(&results);
    let drain = drained(&p.db, ids.len() as i64, Duration::from_secs(90)).await;
    let payments = exactly_once(&p.db).await;
    assert_eq!(payments, ids.len() as i64);
    p.assert_running();
    // The fault reached them: the consumer lost its subscription and came
    // back on its own (RabbitMQ; async-nats reconnects inside the client).
    let mentions = |log: String| {
        log.lines()
            .filter(|l| l.to_ascii_lowercase().contains("reconnect"))
            .count()
    };
    let (relay_reconnects, inbox_reconnects) = (mentions(p.relay.log()), mentions(p.inbox.log()));
    if broker == Broker::Rabbitmq {
        assert!(
            p.inbox.log().contains("lost the RabbitMQ subscription"),
            "the restart did not reach the consumer; its log:\n{}",
            faults::tail(&p.inbox.log(), 20)
        );
    }
    let tally = tally.lock().unwrap().clone();
    println!(
        "FIGURES | {label} | log lines saying reconnect: relay {relay_reconnects}, \
         inbox {inbox_reconnects} | payments {payments}, requests {}, 503s {}, ledger rows = payments \
         (exactly once), ledger moving again {:.1} s after the broker came back, drained {:.1} s \
         after the last payment, no process restarted | {:.0} s in all",
        tally.requests,
        tally.unavailable,
        recovery.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_every_payment_once() {
    if !enabled("postgres_restarted_under_load") {
        return;
    }
    let mut p = Pipeline::start(Broker::Rabbitmq).await;
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let traffic = tokio::spawn(load(
        p.api_addr.clone(),
        PAYMENTS,
        RATE,
        tally.clone(),
        Instant::now() + Duration::from_secs(120),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    p.pg.down();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.pg.up().await;
    // Recovery: the first payment created (201) after PostgreSQL is back,
    // and the first new ledger row.
    let up_at = Instant::now();
    let created_before = tally.lock().unwrap().created;
    let api_recovery = loop {
        if tally.lock().unwrap().created > created_before {
            break up_at.elapsed();
        }
        assert!(
            up_at.elapsed() < Duration::from_secs(60),
            "no payment created within 60 s of PostgreSQL's restart; api:\n{}",
            faults::tail(&p.api.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The host's own pool reconnects too (its connections died).
    let before = loop {
        let n = p.ledger().await;
        if n >= 0 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    p.ledger_moves(before, Duration::from_secs(60)).await;
    let ledger_recovery = up_at.elapsed();
    let results = traffic.await.expect("the load");
    let ids = created_ids(&results);
    let drain = drained(&p.db, ids.len() as i64, Duration::from_secs(90)).await;
    let payments = exactly_once(&p.db).await;
    assert_eq!(payments, ids.len() as i64);
    p.assert_running();
    let tally = tally.lock().unwrap().clone();
    println!(
        "FIGURES | PostgreSQL restarted (pg_ctl stop -m fast, 3 s, start) | payments {payments}, \
         requests {}, 503s {}, other failures {}, first 201 {:.2} s after PostgreSQL was back \
         ({:.1} s after it went down), ledger moving again {:.1} s after, drained {:.1} s after \
         the last payment, ledger rows = payments, no process restarted | {:.0} s in all",
        tally.requests,
        tally.unavailable,
        tally.errors,
        api_recovery.as_secs_f64(),
        (up_at - down_at).as_secs_f64() + api_recovery.as_secs_f64(),
        ledger_recovery.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
