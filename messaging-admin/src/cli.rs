//! The command line: `messaging-admin --database URL AREA ACTION` and
//! `messaging-admin --database URL serve --listen ADDR --token-file PATH`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{Action, Actor, Admin, AdminError, Area, Filter, Report, Target, DEFAULT_LIMIT};

/// See stuck work and fix it: dead outbox events, dead inbox messages,
/// failed sagas, in-flight idempotency records. Every action is audited
/// (table messaging_admin.audit) in the transaction that performs it.
#[derive(Debug, Parser)]
#[command(
    name = "messaging-admin",
    after_help = "Exit status: 0 done, 1 failed (a database error, an unknown id), 2 usage error.\n\
                  A retried item takes the normal path: the relay publishes an outbox event \
                  again, the consumer replays an inbox message through its inbox (so a \
                  duplicate stays a duplicate), a worker runs a saga's next transition."
)]
pub struct Cli {
    /// The service's PostgreSQL database.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database: String,
    /// Who acts, for the audit (the CLI's default: cli:$USER).
    #[arg(long = "as", global = true, value_name = "NAME")]
    actor: Option<String>,
    /// The schema of the SQL idempotency store's records.
    #[arg(long, global = true, default_value = "idempotency")]
    idempotency_schema: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Outbox events: `pending` (waiting, or in backoff), `dead`, `discarded`.
    Outbox(AreaArgs),
    /// Inbox messages, per consumer: `dead`, `failing`, `replaying`.
    Inbox(AreaArgs),
    /// Saga instances: `failed`, `pending` (running or compensating),
    /// `running`, `compensating`, `completed`, `compensated`.
    Saga(AreaArgs),
    /// Idempotency records `in-flight` past their lease (SQL stores).
    Idempotency(AreaArgs),
    /// Serve the web console and its JSON API (under /api/, bearer token).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct AreaArgs {
    #[command(subcommand)]
    action: ActionCommand,
}

#[derive(Debug, Subcommand)]
enum ActionCommand {
    /// List items (oldest first).
    List(ListArgs),
    /// Failures grouped by cause (reason and destination, consumer or saga).
    Groups(GroupArgs),
    /// One item: payload, headers, reason, attempts, history, audit.
    Show(ShowArgs),
    /// Back through the normal path: `retry ID...` or `retry --state STATE`.
    Retry(TargetArgs),
    /// Put aside for good: `discard ID...` or `discard --state STATE`.
    Discard(TargetArgs),
    /// Delete what is finished and older than --older-than.
    Purge(PurgeArgs),
    /// Sagas: a failed one compensates again; a running one's timer fires now.
    Resume(TargetArgs),
    /// Sagas: force the compensation from the current step.
    Compensate(TargetArgs),
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// The state (each area's default: dead, failed, in-flight).
    #[arg(long)]
    state: Option<String>,
    /// Outbox: the destination.
    #[arg(long)]
    destination: Option<String>,
    /// Inbox: the consumer.
    #[arg(long)]
    consumer: Option<String>,
    /// Saga: the saga's name.
    #[arg(long)]
    name: Option<String>,
    /// The reason, exactly as listed.
    #[arg(long)]
    reason: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            state: self.state.clone(),
            destination: self.destination.clone(),
            consumer: self.consumer.clone(),
            name: self.name.clone(),
            reason: self.reason.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.filter() == Filter::default()
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// At most this many.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    limit: i64,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct GroupArgs {
    /// The state (each area's default).
    #[arg(long)]
    state: Option<String>,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The item's id (inbox: the message id).
    id: String,
    /// Inbox: the consumer, when several hold the id.
    #[arg(long)]
    consumer: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// The items' ids; or none, with --state (and more filters) for every
    /// item that matches.
    ids: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    /// Only what finished longer ago than this (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Duration,
    /// Inbox: only this consumer's processed rows.
    #[arg(long)]
    consumer: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Where to serve the console.
    #[arg(long, default_value = "127.0.0.1:3300")]
    listen: SocketAddr,
    /// The tokens: one `NAME TOKEN` a line (the name goes to the audit);
    /// `#` starts a comment. Tokens of 16 characters or more.
    #[arg(long, value_name = "PATH")]
    token_file: PathBuf,
}

/// `println!` that ignores a closed stdout (`| head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Runs the command line; the exit status.
pub async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("messaging-admin: {}", chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// `e` and its causes, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors print their cause in their own message already.
        let said = s.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}

async fn run(cli: Cli) -> Result<ExitCode, AdminError> {
    let (area, args) = match cli.command {
        Command::Outbox(a) => (Area::Outbox, a),
        Command::Inbox(a) => (Area::Inbox, a),
        Command::Saga(a) => (Area::Saga, a),
        Command::Idempotency(a) => (Area::Idempotency, a),
        Command::Serve(serve) => {
            let tokens = crate::console::Tokens::read(&serve.token_file)?;
            let admin = Admin::connect(&cli.database, &cli.idempotency_schema).await?;
            crate::console::serve(
                admin,
                tokens,
                serve.listen,
                crate::console::shutdown_signal(),
            )
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let admin = Admin::connect(&cli.database, &cli.idempotency_schema).await?;
    let actor = Actor {
        name: cli.actor.unwrap_or_else(|| {
            format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            )
        }),
        via: "cli",
    };
    let (action, target, json) = match args.action {
        ActionCommand::List(l) => {
            let filter = l.filter.filter();
            let items = admin.list(area, &filter, l.limit).await?;
            if l.json {
                say!("{}", Value::Array(items));
            } else if items.is_empty() {
                say!(
                    "no {} {}s{}",
                    area.state(filter.state.as_deref())?,
                    area.item(),
                    match filter.describe() {
                        d if d.is_empty() => String::new(),
                        d => format!(" match {d}"),
                    }
                );
            } else {
                print_table(area, &items);
            }
            return Ok(ExitCode::SUCCESS);
        }
        ActionCommand::Groups(g) => {
            let groups = admin.groups(area, g.state.as_deref()).await?;
            if g.json {
                say!("{}", serde_json::to_string(&groups).unwrap_or_default());
            } else if groups.is_empty() {
                say!("no {} {}s", area.state(g.state.as_deref())?, area.item());
            } else {
                for g in groups {
                    say!(
                        "{:>6}  {}  {}",
                        g.count,
                        g.scope.as_deref().unwrap_or("-"),
                        g.reason.as_deref().unwrap_or("-")
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        ActionCommand::Show(s) => {
            let item = admin.show(area, &s.id, s.consumer.as_deref()).await?;
            if s.json {
                say!("{item}");
            } else {
                print_item(&item);
            }
            return Ok(ExitCode::SUCCESS);
        }
        ActionCommand::Retry(t) => (Action::Retry, target(t.ids, &t.filter)?, t.json),
        ActionCommand::Discard(t) => (Action::Discard, target(t.ids, &t.filter)?, t.json),
        ActionCommand::Resume(t) => (Action::Resume, target(t.ids, &t.filter)?, t.json),
        ActionCommand::Compensate(t) => (Action::Compensate, target(t.ids, &t.filter)?, t.json),
        ActionCommand::Purge(p) => (
            Action::Purge,
            Target::OlderThan {
                age: p.older_than,
                consumer: p.consumer,
            },
            p.json,
        ),
    };
    let by_ids = matches!(target, Target::Ids { .. });
    let report = admin.act(&actor, area, action, &target).await?;
    if json {
        say!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print_report(area, &target, &report);
    }
    // An id that was left alone (unknown, or in another state) is a failure.
    Ok(if by_ids && !report.skipped.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Ids, or a filter with at least a state (not both).
fn target(ids: Vec<String>, filter: &FilterArgs) -> Result<Target, AdminError> {
    match (ids.is_empty(), filter.is_empty()) {
        (false, true) => Ok(Target::Ids {
            ids,
            consumer: None,
        }),
        // --consumer narrows the ids of the inbox.
        (false, false)
            if filter.state.is_none()
                && filter.destination.is_none()
                && filter.name.is_none()
                && filter.reason.is_none() =>
        {
            Ok(Target::Ids {
                ids,
                consumer: filter.consumer.clone(),
            })
        }
        (false, false) => Err(AdminError::Usage(
            "give ids or a filter (--state ...), not both".into(),
        )),
        (true, _) if filter.state.is_none() => Err(AdminError::Usage(
            "give ids, or --state STATE for every item in that state".into(),
        )),
        (true, _) => Ok(Target::Filter(filter.filter())),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(area: Area, items: &[Value]) {
    let columns: &[&str] = match area {
        Area::Outbox => &["id", "destination", "attempts", "state", "reason"],
        Area::Inbox => &["consumer", "message_id", "attempts", "state", "reason"],
        Area::Saga => &["id", "name", "state", "step", "attempts", "reason"],
        Area::Idempotency => &["id", "state", "lease_until", "expires_at"],
    };
    say!("{}", columns.join("\t"));
    for item in items {
        let row: Vec<String> = columns.iter().map(|c| text(&item[*c])).collect();
        say!("{}", row.join("\t"));
    }
}

fn print_item(item: &Value) {
    let Some(map) = item.as_object() else {
        say!("{item}");
        return;
    };
    for (k, v) in map {
        match (k.as_str(), v) {
            ("history" | "audit", Value::Array(lines)) => {
                say!("{k}:");
                for line in lines {
                    say!("  {line}");
                }
            }
            _ => say!("{k}: {}", text(v)),
        }
    }
}

fn print_report(area: Area, target: &Target, report: &Report) {
    let done = match report.action.as_str() {
        "retry" => "retried",
        "discard" => "discarded",
        "purge" => "purged",
        "resume" => "resumed",
        "compensate" => "compensation forced for",
        other => other,
    };
    if report.changed.is_empty() {
        match target {
            Target::Filter(f) => say!(
                "nothing to {}: no {} {}s match {}",
                report.action,
                f.state.as_deref().unwrap_or_default(),
                area.item(),
                f.describe()
            ),
            _ => say!("{done} nothing"),
        }
    } else {
        say!(
            "{done} {} {}(s): {}",
            report.changed.len(),
            area.item(),
            report.changed.join(" ")
        );
    }
    for s in &report.skipped {
        say!("left alone: {}: {}", s.id, s.reason);
    }
}
