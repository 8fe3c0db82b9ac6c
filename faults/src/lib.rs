//! The fault-injection harness (issue 25): the example binaries run in
//! network namespaces of their own, joined to private PostgreSQL, RabbitMQ,
//! NATS and Redis servers by veth pairs; a test cuts a link
//! (`ip link set ... down`), slows one through a proxy of `test-support`,
//! or restarts a server, under load, and checks its invariant at the end.
//!
//! # Private servers, never the shared ones
//!
//! Every server a scenario restarts is a private instance of the machine's
//! own server binaries, started by this harness on an address of its own
//! (a host-only veth, `10.B.K.x`) with its data under a temporary directory:
//! other suites use the shared services on `127.0.0.1` at the same time (CI
//! runs everything on one machine), so the harness never stops, restarts or
//! even connects to them. The commands it uses:
//!
//! | server | start | restart |
//! |---|---|---|
//! | PostgreSQL | `runuser -u postgres -- initdb -D DIR --auth=trust`, then `pg_ctl -D DIR -o "-p 5432 -k DIR -c listen_addresses=ADDR" start` | `pg_ctl -D DIR stop -m fast`, then `start` again |
//! | RabbitMQ | `runuser -u rabbitmq -- /usr/lib/rabbitmq/bin/rabbitmq-server` with `RABBITMQ_NODENAME=faults-PID-N@localhost`, its own config file (`listeners.tcp.default = ADDR:5672`), `RABBITMQ_DIST_PORT`, `RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE` and an empty `RABBITMQ_ENABLED_PLUGINS_FILE` (no management listener) | `rabbitmqctl -n NODE stop_app`, then `start_app` |
//! | NATS | `nats-server -a ADDR -p 4222 -js -sd DIR` | SIGTERM, then the same command (the streams are on disk) |
//! | Redis | `redis-server --port 6379 --bind ADDR --save ""` | (not restarted: its link is cut) |
//!
//! Every server is stopped when its guard drops, also when a test fails or
//! panics (the guard kills the server's whole process group, which this
//! harness made); a scenario that stops a server starts it again before it
//! checks anything. Network namespaces, veth pairs and routes are named
//! after the test process's id and deleted on drop too.
//!
//! # When it runs
//!
//! Only as root, with `ip netns`, and with `FAULTS=1` in the environment;
//! otherwise each test prints why it skips and passes, so
//! `cargo test --workspace` passes on a laptop. CI runs
//! `FAULTS=1 cargo test -p faults -- --test-threads=1` after the main tests.
//!
//! # Quick start
//!
//! A scenario of your own: a private PostgreSQL, payments-axum in a
//! namespace whose only way to it is a link the test cuts.
//!
//! ```no_run
//! use faults::{enabled, Bin, Netns, Payment, Postgres, Services};
//! use std::time::Duration;
//!
//! # async fn scenario() {
//! if !enabled("my_scenario") {
//!     return;
//! }
//! let services = Services::new();
//! let pg = Postgres::start(&services.postgres()).await;
//! let mut ns = Netns::new("api");
//! let store_link = ns.link_to(&[services.postgres()]);
//! let store = pg.url("postgres");
//! let args = ["--listen", "0.0.0.0:3000", "--transactional", "--store", &store];
//! let _api = Bin::start(&ns, "payments-axum", &args, "serving").await;
//! let addr = format!("{}:3000", ns.addr());
//! ns.link(store_link).cut();
//! let answer = Payment::new(0).send(&addr, Duration::from_secs(10)).await;
//! assert_eq!(answer.expect("an answer").status, 503);
//! ns.link(store_link).restore();
//! # }
//! ```
//!
//! # Guarantees
//!
//! - It never stops, restarts or connects to the shared services on
//!   `127.0.0.1`; it changes no host setting (no sysctl, `ip_forward` left
//!   as it is): namespaces reach the servers, and the test reaches the
//!   namespaces, through the host's own addresses.
//! - Every server, process, namespace, veth and route it makes is named
//!   after the test process's id and removed on drop, panics included.
//!   A run killed before its guards ran (SIGKILL) leaves its namespaces and
//!   veths behind; the next run deletes those of processes that are gone.
//! - Every wait is bounded ([`STARTUP`], and each scenario's own limits):
//!   a broken scenario fails with the logs of the binaries involved, it
//!   never hangs.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// How long a binary or a server may take to be ready.
pub const STARTUP: Duration = Duration::from_secs(60);

/// Whether the harness can and should run; prints why not when it cannot.
pub fn enabled(test: &str) -> bool {
    if std::env::var("FAULTS").ok().as_deref() != Some("1") {
        println!(
            "skipped {test}: set FAULTS=1 (and run as root) to run the fault-injection scenarios"
        );
        return false;
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        println!("skipped {test}: FAULTS=1 but not root (ip netns and veth need root)");
        return false;
    }
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !netns {
        println!("skipped {test}: FAULTS=1 but `ip netns` does not work here");
        return false;
    }
    true
}

/// Runs a command to completion; its stdout, or a panic naming it with its
/// stderr.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`sh`], ignoring failure (cleanup).
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ------------------------------------------------------------ the network

/// The per-process second octet of every address (`10.B.K.x`), so that two
/// runs at once do not meet.
fn octet() -> u32 {
    100 + std::process::id() % 100
}

static NEXT: AtomicU32 = AtomicU32::new(1);

/// A fresh `/24` number `K` (one per link, per test process).
fn next_subnet() -> u32 {
    let k = NEXT.fetch_add(1, Ordering::SeqCst);
    assert!(k < 255, "out of subnets");
    k
}

/// A veth pair whose host end has `10.B.K.1/24`: as a link of a namespace
/// (the other end `10.B.K.2` inside it) or, both ends on the host, the
/// interface that holds the private servers' addresses. A host route
/// blackholes `10.B.K.0/24` while the link is down, so that no packet for a
/// cut namespace leaves by the default route. Deleted on drop.
pub struct Link {
    /// The host end's name.
    pub host: String,
    k: u32,
}

impl Link {
    fn new(ns: Option<&str>) -> Self {
        let k = next_subnet();
        let pid = std::process::id();
        let host = format!("fz{pid}h{k}");
        let peer = format!("fz{pid}p{k}");
        let b = octet();
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        let link = Self { host, k };
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.{b}.{k}.1/24"),
                "dev",
                &link.host,
            ],
        );
        sh("ip", &["link", "set", &link.host, "up"]);
        sh_quiet(
            "ip",
            &[
                "route",
                "add",
                "blackhole",
                &format!("10.{b}.{k}.0/24"),
                "metric",
                "4000",
            ],
        );
        match ns {
            Some(ns) => {
                sh("ip", &["link", "set", &peer, "netns", ns]);
                let inside = ["netns", "exec", ns, "ip"];
                let run = |args: &[&str]| sh("ip", &[&inside[..], args].concat());
                run(&["addr", "add", &format!("10.{b}.{k}.2/24"), "dev", &peer]);
                run(&["link", "set", &peer, "up"]);
            }
            None => {
                sh("ip", &["link", "set", &peer, "up"]);
            }
        }
        link
    }

    /// The host end's address.
    pub fn host_addr(&self) -> String {
        format!("10.{}.{}.1", octet(), self.k)
    }

    /// The namespace end's address.
    pub fn ns_addr(&self) -> String {
        format!("10.{}.{}.2", octet(), self.k)
    }

    /// Cuts it: `ip link set HOST down`. Packets on it are lost, in both
    /// directions, without a reset: a partition, not a refusal.
    pub fn cut(&self) {
        sh("ip", &["link", "set", &self.host, "down"]);
    }

    /// Restores it (and the connected route the host dropped with it).
    pub fn restore(&self) {
        sh("ip", &["link", "set", &self.host, "up"]);
        let net = format!("10.{}.{}.0/24", octet(), self.k);
        sh_quiet(
            "ip",
            &[
                "route",
                "replace",
                &net,
                "dev",
                &self.host,
                "src",
                &self.host_addr(),
            ],
        );
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        sh_quiet("ip", &["link", "del", &self.host]);
        let net = format!("10.{}.{}.0/24", octet(), self.k);
        sh_quiet("ip", &["route", "del", "blackhole", &net, "metric", "4000"]);
    }
}

/// The pid in a name this harness made (`fz<pid>h3`, `fz<pid>-api-4`), when
/// that process is gone.
fn dead_run(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("fz") else {
        return false;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    !digits.is_empty()
        && digits != std::process::id().to_string()
        && !Path::new(&format!("/proc/{digits}")).exists()
}

/// Deletes the namespaces and host veths of runs killed before their
/// guards ran (SIGKILL, a CI timeout); only names of this harness whose
/// process is gone.
fn sweep_dead_runs() {
    for line in sh("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if dead_run(name) {
            sh_quiet("ip", &["netns", "del", name]);
        }
    }
    for line in sh("ip", &["-o", "link", "show"]).lines() {
        let name = line
            .split(": ")
            .nth(1)
            .and_then(|n| n.split('@').next())
            .unwrap_or("");
        if dead_run(name) {
            sh_quiet("ip", &["link", "del", name]);
        }
    }
}

/// The host-only interface that holds the private servers' addresses:
/// `10.B.K.1` (PostgreSQL), `.11` (RabbitMQ), `.12` (NATS), `.13` (Redis),
/// `.14` (a proxy). Reached from every namespace by its routes.
pub struct Services {
    link: Link,
}

impl Services {
    /// Creates the interface (after removing the namespaces and veths of
    /// earlier runs that were killed before their guards ran).
    pub fn new() -> Self {
        sweep_dead_runs();
        let link = Link::new(None);
        for last in [11, 12, 13, 14] {
            sh(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.{}.{}.{last}/32", octet(), link.k),
                    "dev",
                    &link.host,
                ],
            );
        }
        Self { link }
    }

    fn addr(&self, last: u32) -> String {
        format!("10.{}.{}.{last}", octet(), self.link.k)
    }

    /// PostgreSQL's address.
    pub fn postgres(&self) -> String {
        self.addr(1)
    }
    /// RabbitMQ's address.
    pub fn rabbitmq(&self) -> String {
        self.addr(11)
    }
    /// NATS's address.
    pub fn nats(&self) -> String {
        self.addr(12)
    }
    /// Redis's address.
    pub fn redis(&self) -> String {
        self.addr(13)
    }
    /// A proxy's address.
    pub fn proxy(&self) -> String {
        self.addr(14)
    }
}

impl Default for Services {
    fn default() -> Self {
        Self::new()
    }
}

/// A network namespace with its front link (the default route: clients
/// reach its binaries through it, and it reaches every server through it
/// unless a [`Netns::link_to`] link says otherwise). Deleted on drop, with
/// whatever still runs in it killed first by its guards.
pub struct Netns {
    /// Its name.
    pub name: String,
    /// Its front link.
    pub front: Link,
    links: Vec<Link>,
}

impl Netns {
    /// A new namespace, `lo` up, the front link its default route.
    pub fn new(role: &str) -> Self {
        let name = format!("fz{}-{role}-{}", std::process::id(), next_subnet());
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
        );
        let front = Link::new(Some(&name));
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "ip",
                "route",
                "add",
                "default",
                "via",
                &front.host_addr(),
            ],
        );
        Self {
            name,
            front,
            links: Vec::new(),
        }
    }

    /// A second link, the only way from this namespace to `addrs` (routes
    /// `ADDR/32 via` its host end): cutting it cuts this namespace from
    /// those servers and from nothing else. Its index for [`Netns::link`].
    pub fn link_to(&mut self, addrs: &[String]) -> usize {
        let link = Link::new(Some(&self.name));
        for addr in addrs {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.name,
                    "ip",
                    "route",
                    "add",
                    &format!("{addr}/32"),
                    "via",
                    &link.host_addr(),
                ],
            );
        }
        self.links.push(link);
        self.links.len() - 1
    }

    /// A link made by [`Netns::link_to`].
    pub fn link(&self, i: usize) -> &Link {
        &self.links[i]
    }

    /// The namespace's address on its front link.
    pub fn addr(&self) -> String {
        self.front.ns_addr()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.links.clear();
        sh_quiet("ip", &["netns", "del", &self.name]);
    }
}

// ----------------------------------------------------------- processes

/// Kills process group `pgid` (made by this harness for one server).
fn kill_group(pgid: u32, signal: &str) {
    sh_quiet("kill", &[signal, "--", &format!("-{pgid}")]);
}

/// A temporary directory of this process, removed on drop.
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
}

impl TempDir {
    /// A new directory named after `what`, owned by `owner` when given.
    pub fn new(what: &str, owner: Option<&str>) -> Self {
        let path = std::env::temp_dir().join(format!(
            "faults-{}-{what}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("a temporary directory");
        if let Some(owner) = owner {
            sh("chown", &["-R", owner, &path.to_string_lossy()]);
        }
        Self { path }
    }

    /// `name` inside it, as a string.
    pub fn join(&self, name: &str) -> String {
        self.path.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits until `addr` accepts a TCP connection, up to `limit`.
pub async fn wait_for_port(addr: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            return Err(format!("{addr} did not accept within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server process in a process group of its own (killed whole on drop).
struct Group {
    child: Option<std::process::Child>,
}

impl Group {
    fn spawn(cmd: &mut std::process::Command, log: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).expect("a log file");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Self { child: Some(child) }
    }

    fn stop(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id(), signal);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_group(child.id(), "-KILL");
            let _ = child.wait();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop("-KILL");
    }
}

/// A private PostgreSQL server (its own data directory, trust auth) on
/// `ADDR:5432`. Stopped (`pg_ctl stop -m immediate`) on drop.
pub struct Postgres {
    addr: String,
    dir: TempDir,
    bin: PathBuf,
    running: bool,
}

impl Postgres {
    /// initdb and start.
    pub async fn start(addr: &str) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql (PostgreSQL's server binaries)")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = TempDir::new("postgres", Some("postgres:postgres"));
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        sh(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &initdb.to_string_lossy(),
                "-D",
                &data,
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let hba = Path::new(&data).join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        text.push_str("\nhost all all 10.0.0.0/8 trust\n");
        std::fs::write(&hba, text).expect("pg_hba.conf");
        let mut pg = Self {
            addr: addr.to_owned(),
            dir,
            bin,
            running: false,
        };
        pg.up().await;
        pg
    }

    fn ctl(&self, args: &[&str]) {
        let ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let opts = format!(
            "-p 5432 -k {} -c listen_addresses={} -c fsync=off -c max_connections=200",
            self.dir.path.display(),
            self.addr
        );
        let mut all = vec![
            "-u",
            "postgres",
            "--",
            ctl.to_str().expect("a UTF-8 path"),
            "-D",
            &data,
        ];
        all.extend(["-l", &log, "-o", &opts, "-w", "-t", "60"]);
        all.extend(args);
        sh("runuser", &all);
    }

    /// Starts it (again) and waits until it accepts.
    pub async fn up(&mut self) {
        self.ctl(&["start"]);
        self.running = true;
        wait_for_port(&format!("{}:5432", self.addr), STARTUP)
            .await
            .expect("PostgreSQL");
    }

    /// `pg_ctl stop -m fast`: every connection is closed.
    pub fn down(&mut self) {
        self.ctl(&["stop", "-m", "fast"]);
        self.running = false;
    }

    /// A URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:5432/{db}", self.addr)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let ctl = self.bin.join("pg_ctl");
            let data = self.dir.join("data");
            sh_quiet(
                "runuser",
                &[
                    "-u",
                    "postgres",
                    "--",
                    &ctl.to_string_lossy(),
                    "-D",
                    &data,
                    "stop",
                    "-m",
                    "immediate",
                ],
            );
        }
    }
}

/// A private NATS server with JetStream on `ADDR:4222`, its store in a
/// temporary directory. Killed on drop.
pub struct Nats {
    addr: String,
    dir: TempDir,
    group: Group,
}

impl Nats {
    /// Starts it.
    pub async fn start(addr: &str) -> Self {
        let mut nats = Self {
            addr: addr.to_owned(),
            dir: TempDir::new("nats", None),
            group: Group { child: None },
        };
        nats.up().await;
        nats
    }

    /// Starts it (again) with its store as it was.
    pub async fn up(&mut self) {
        let mut cmd = std::process::Command::new("/usr/sbin/nats-server");
        cmd.args(["-a", &self.addr, "-p", "4222", "-js", "-sd"])
            .arg(self.dir.join("js"));
        self.group = Group::spawn(&mut cmd, &self.dir.join("log"));
        wait_for_port(&self.url_addr(), STARTUP)
            .await
            .expect("nats-server");
    }

    /// SIGTERM, and waits until it is gone.
    pub fn down(&mut self) {
        self.group.stop("-TERM");
    }

    fn url_addr(&self) -> String {
        format!("{}:4222", self.addr)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://{}", self.url_addr())
    }
}

/// A private RabbitMQ node (`faults-PID-K@localhost`) on `ADDR:5672`, run
/// as the `rabbitmq` user (whose Erlang cookie `rabbitmqctl` shares), with
/// no plugins. Killed on drop.
pub struct Rabbit {
    addr: String,
    node: String,
    dir: TempDir,
    group: Group,
}

impl Rabbit {
    /// Starts the node and waits until AMQP accepts.
    pub async fn start(addr: &str) -> Self {
        let dir = TempDir::new("rabbitmq", None);
        std::fs::write(dir.path.join("plugins"), "").expect("plugins file");
        std::fs::write(
            dir.path.join("rabbitmq.conf"),
            format!("listeners.tcp.default = {addr}:5672\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        std::fs::write(dir.path.join("env.conf"), "ERL_EPMD_ADDRESS=127.0.0.1\n")
            .expect("env.conf");
        sh("chown", &["-R", "rabbitmq", &dir.path.to_string_lossy()]);
        let node = format!("faults-{}-{}@localhost", std::process::id(), next_subnet());
        let dist = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = std::process::Command::new("runuser");
        cmd.current_dir(&dir.path)
            .args(["-u", "rabbitmq", "--", "env", "HOME=/var/lib/rabbitmq"])
            .arg(format!("RABBITMQ_CONF_ENV_FILE={}", dir.join("env.conf")))
            .arg(format!(
                "RABBITMQ_CONFIG_FILE={}",
                dir.join("rabbitmq.conf")
            ))
            .arg(format!("RABBITMQ_NODENAME={node}"))
            .arg(format!("RABBITMQ_DIST_PORT={dist}"))
            .arg(format!("RABBITMQ_MNESIA_BASE={}", dir.join("mnesia")))
            .arg(format!("RABBITMQ_LOG_BASE={}", dir.join("logs")))
            .arg(format!(
                "RABBITMQ_ENABLED_PLUGINS_FILE={}",
                dir.join("plugins")
            ))
            .arg("/usr/lib/rabbitmq/bin/rabbitmq-server");
        let group = Group::spawn(&mut cmd, &dir.join("out.log"));
        let rabbit = Self {
            addr: addr.to_owned(),
            node,
            dir,
            group,
        };
        wait_for_port(&format!("{addr}:5672"), STARTUP)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e}; its log:\n{}",
                    std::fs::read_to_string(rabbit.dir.path.join("out.log")).unwrap_or_default()
                )
            });
        rabbit
    }

    fn ctl(&self, action: &str) {
        let _ = self.rabbitmqctl(&[action]);
    }

    /// `rabbitmqctl -n NODE ARGS...`: its output.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        sh(
            "runuser",
            &[
                "-u",
                "rabbitmq",
                "--",
                "env",
                "HOME=/var/lib/rabbitmq",
                &format!("RABBITMQ_CONF_ENV_FILE={}", self.dir.join("env.conf")),
                "/usr/lib/rabbitmq/bin/rabbitmqctl",
                "-n",
                &self.node,
            ]
            .iter()
            .copied()
            .chain(args.iter().copied())
            .collect::<Vec<_>>(),
        )
    }

    /// `rabbitmqctl stop_app`: every connection closed, the listener gone.
    pub fn down(&mut self) {
        self.ctl("stop_app");
    }

    /// `rabbitmqctl start_app`, and waits until AMQP accepts.
    pub async fn up(&mut self) {
        self.ctl("start_app");
        wait_for_port(&format!("{}:5672", self.addr), STARTUP)
            .await
            .expect("RabbitMQ after start_app");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}:5672/%2f", self.addr)
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        sh_quiet(
            "runuser",
            &[
                "-u",
                "rabbitmq",
                "--",
                "env",
                "HOME=/var/lib/rabbitmq",
                &format!("RABBITMQ_CONF_ENV_FILE={}", self.dir.join("env.conf")),
                "timeout",
                "20",
                "/usr/lib/rabbitmq/bin/rabbitmqctl",
                "-n",
                &self.node,
                "stop",
            ],
        );
        self.group.stop("-KILL");
    }
}

/// A private `redis-server` (nothing on disk) on `ADDR:6379`. Killed on drop.
pub struct Redis {
    addr: String,
    _dir: TempDir,
    _group: Group,
}

impl Redis {
    /// Starts it.
    pub async fn start(addr: &str) -> Self {
        let dir = TempDir::new("redis", None);
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            "6379",
            "--bind",
            addr,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir.path);
        let group = Group::spawn(&mut cmd, &dir.join("log"));
        wait_for_port(&format!("{addr}:6379"), STARTUP)
            .await
            .expect("redis-server");
        Self {
            addr: addr.to_owned(),
            _dir: dir,
            _group: group,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://{}:6379", self.addr)
    }
}

/// The example binaries' directory: beside this test's `deps` directory
/// (`cargo build -p examples --bins` puts them there).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the example binaries first (cargo build -p examples --bins)",
        path.display()
    );
    path
}

/// An example binary running in a namespace (`ip netns exec`, which execs
/// the binary in place). Killed on drop.
pub struct Bin {
    name: String,
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
}

impl Bin {
    /// Starts `name` with `args` in `ns`; returns once its log has a line
    /// with `ready`.
    pub async fn start(ns: &Netns, name: &str, args: &[&str], ready: &str) -> Self {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary(name))
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let writer = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = writer.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let bin = Self {
            name: name.to_owned(),
            child,
            log,
        };
        bin.ready_rest(ready, Instant::now() + STARTUP).await
    }

    async fn ready_rest(mut self, ready: &str, deadline: Instant) -> Self {
        while !self.log().contains(ready) {
            let exited = self.child.try_wait().expect("wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{} was not ready ({exited:?}); its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Panics, with its log, when it has exited.
    pub fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("wait");
        assert!(
            exited.is_none(),
            "{} exited ({exited:?}); it had to survive the fault on its own. Its log:\n{}",
            self.name,
            tail(&self.log(), 40)
        );
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// --------------------------------------------------------------- HTTP

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 exchange on a connection of its own, within `limit`.
pub async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: Duration,
) -> std::io::Result<Answer> {
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(limit, talk)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// A payment request under its own key and scope.
#[derive(Clone, Debug)]
pub struct Payment {
    /// Its idempotency key.
    pub key: String,
    /// Its amount.
    pub amount: i64,
}

impl Payment {
    /// Payment number `i` of this run.
    pub fn new(i: u32) -> Self {
        Self {
            key: format!(
                "fault-{}-{i}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            amount: 1000 + i64::from(i),
        }
    }

    /// `POST /payments` once, within `limit`.
    pub async fn send(&self, addr: &str, limit: Duration) -> std::io::Result<Answer> {
        let body = serde_json::json!({"amount": self.amount, "currency": "EUR"}).to_string();
        exchange(
            addr,
            "POST",
            "/payments",
            &[
                ("Idempotency-Key", &self.key),
                ("Authorization", "Bearer faults"),
                ("Content-Type", "application/json"),
            ],
            &body,
            limit,
        )
        .await
    }
}

/// What a load of payments saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Requests sent (every attempt).
    pub requests: u64,
    /// Answers 201.
    pub created: u64,
    /// Answers 503.
    pub unavailable: u64,
    /// Answers 409 (the key in flight).
    pub conflicts: u64,
    /// Other answers, or no answer.
    pub errors: u64,
    /// Unexpected statuses seen (status, body), a few.
    pub unexpected: Vec<(u16, String)>,
}

impl Tally {
    /// Counts one attempt's outcome; whether it was definite (201).
    pub fn count(&mut self, answer: &std::io::Result<Answer>) -> bool {
        self.requests += 1;
        match answer {
            Ok(a) if a.status == 201 => {
                self.created += 1;
                return true;
            }
            Ok(a) if a.status == 503 => self.unavailable += 1,
            Ok(a) if a.status == 409 => self.conflicts += 1,
            Ok(a) => {
                self.errors += 1;
                if self.unexpected.len() < 5 {
                    self.unexpected.push((a.status, a.text()));
                }
            }
            Err(_) => self.errors += 1,
        }
        false
    }
}

/// Sends `payment` until it is created (retrying 503, 409, 5xx and
/// connection errors every 100 ms) or `deadline`; its id, or `None`.
pub async fn until_created(
    payment: &Payment,
    addr: &str,
    tally: &Mutex<Tally>,
    deadline: Instant,
) -> Option<String> {
    while Instant::now() < deadline {
        let answer = payment.send(addr, Duration::from_secs(10)).await;
        let done = tally.lock().unwrap().count(&answer);
        if done {
            let id = answer.ok()?.json()["id"].as_str()?.to_owned();
            return Some(id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Runs `total` payments, `rate` a second, each until created; returns the
/// payments with their ids (None: not created before the deadline).
pub async fn load(
    addr: String,
    total: u32,
    rate: u32,
    tally: Arc<Mutex<Tally>>,
    deadline: Instant,
) -> Vec<(Payment, Option<String>)> {
    let mut tasks = Vec::new();
    let gap = Duration::from_secs(1) / rate;
    for i in 0..total {
        let payment = Payment::new(i);
        let (addr, tally) = (addr.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let id = until_created(&payment, &addr, &tally, deadline).await;
            (payment, id)
        }));
        tokio::time::sleep(gap).await;
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("a payment task"));
    }
    out
}

// ----------------------------------------------------------- database

/// A pool to the private server's database (from the host).
pub async fn pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A count, or -1 when the query fails (a table not there yet).
pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Waits until every payment has a ledger row and the outbox is published,
/// up to `limit`; how long it took.
pub async fn drained(pool: &sqlx::PgPool, payments: i64, limit: Duration) -> Duration {
    let started = Instant::now();
    let covered = "SELECT count(*) FROM payments p \
                   WHERE EXISTS (SELECT 1 FROM ledger_entries l WHERE l.account = p.id)";
    loop {
        let unpublished = count(
            pool,
            "SELECT count(*) FROM outbox.events WHERE published_at IS NULL",
        )
        .await;
        let ledger = count(pool, covered).await;
        if unpublished == 0 && ledger == payments {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not drained after {limit:?}: {ledger} of {payments} payments in the ledger, \
             {unpublished} events unpublished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The invariant of the pipeline: every payment exactly one ledger row, no
/// ledger row without its payment, no dead event; the number of payments.
pub async fn exactly_once(pool: &sqlx::PgPool) -> i64 {
    // Copies still on their way would land now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let payments = count(pool, "SELECT count(*) FROM payments").await;
    let doubled = count(
        pool,
        "SELECT count(*) FROM (SELECT account FROM ledger_entries \
         GROUP BY account HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(doubled, 0, "payments with more than one ledger row");
    let missing = count(
        pool,
        "SELECT count(*) FROM payments p \
         WHERE NOT EXISTS (SELECT 1 FROM ledger_entries l WHERE l.account = p.id)",
    )
    .await;
    assert_eq!(missing, 0, "payments without a ledger row");
    let orphans = count(
        pool,
        "SELECT count(*) FROM ledger_entries l \
         WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = l.account)",
    )
    .await;
    assert_eq!(orphans, 0, "ledger rows without their payment");
    let dead = count(
        pool,
        "SELECT count(*) FROM outbox.events WHERE dead_at IS NOT NULL",
    )
    .await;
    assert!(dead <= 0, "{dead} dead events");
    payments
}

/// The payments a load created, checked: every payment created, ids unique,
/// and each id a row of `payments` (when `pool` is given).
pub fn created_ids(results: &[(Payment, Option<String>)]) -> Vec<String> {
    let missing: Vec<_> = results
        .iter()
        .filter(|(_, id)| id.is_none())
        .map(|(p, _)| p.key.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "{} payments never created: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let ids: Vec<String> = results.iter().filter_map(|(_, id)| id.clone()).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "two keys got the same payment id");
    ids
}
