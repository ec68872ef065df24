//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::obs::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Route Salesforce change events to side effects by rules in YAML files"
)]
pub struct Cli {
    /// Log format on standard error: `auto` is text on a terminal and JSON lines elsewhere.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "SWITCHYARD_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProblemFormat {
    /// `file:line:col: error: message`
    Text,
    /// GitHub Actions annotations (`::error file=...,line=...,col=...::message`)
    Github,
    /// A JSON array of problems
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExplainFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RecordFrom {
    Earliest,
    Latest,
    Stored,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SchemaKind {
    /// Rule files (`rules/*.yaml`)
    Rules,
    /// The service config
    Config,
    /// Rule test files (`*.test.yaml`)
    Tests,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service. Without --config: the embedded demo (recorded events, in-memory sinks).
    Run {
        /// The service config (YAML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not watch the rule files (SIGHUP and `POST /reload` still reload).
        #[arg(long)]
        no_watch: bool,
    },
    /// Check rule files (and a config): YAML, schema, predicates (compiled, and dry-run on the `*.test.yaml`
    /// fixtures), sinks, templates, fields. Exit 1 on any error.
    Validate {
        /// Rule files or folders; default: the config's rules, or `rules/`.
        paths: Vec<PathBuf>,
        /// Check against this config's sinks, channels and mode (default: the built-in names).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A folder of Avro schemas (`OrderChangeEvent.avsc`, ...): event field names are checked against them.
        #[arg(long)]
        avro: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: ProblemFormat,
    },
    /// A language server on stdio for rule files, rule tests and the config: `validate`'s diagnostics as you type,
    /// completion of helpers, vars and sinks, a helper's doc on hover.
    Lsp {
        /// Check rules against this config's sinks, channels and mode (default: the built-in names).
        #[arg(long, short, env = "SWITCHYARD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the rule tests (`*.test.yaml`): events in, the exact actions out. No Redis, no network.
    Test {
        /// Test files or folders; default: `rules/`.
        paths: Vec<PathBuf>,
    },
    /// Why each route did (not) fire for recorded events: every clause's value, the enrichment, the actions.
    Explain {
        /// A JSONL file of events, or `-` for standard input.
        #[arg(long)]
        event: PathBuf,
        /// Rule files or folders (default: the config's rules, or `rules/`).
        #[arg(long)]
        rules: Vec<PathBuf>,
        /// The service config (channel aliases, sinks, mode).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// Run recorded events through rules with no side effects; with --against, print the decision diff
    /// (exit 2 when decisions differ).
    Replay {
        /// A JSONL file of recorded events.
        #[arg(long)]
        events: PathBuf,
        /// The rules to try (files or folders).
        #[arg(long, required = true)]
        rules: Vec<PathBuf>,
        /// The rules they replace.
        #[arg(long)]
        against: Vec<PathBuf>,
        /// The service config (channel aliases, sinks, mode).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Subscribe like `run`, but write the decoded events (with the records the rules read) as JSONL: real
    /// traffic becomes fixtures and input for the JSONL source. Runs no action and stores no position.
    Record {
        /// The service config (a `pubsub` or `emulator` source).
        #[arg(long, short)]
        config: PathBuf,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
        /// Where to start: `earliest` (all retained events), `latest`, or `stored` (the position `run` stored).
        #[arg(long, value_enum)]
        from: Option<RecordFrom>,
        /// Stop after this many events (default: until Ctrl-C or SIGTERM).
        #[arg(long)]
        max_events: Option<u64>,
        /// Payload and record fields to write as `***` (repeatable).
        #[arg(long)]
        redact: Vec<String>,
    },
    /// Serve a local Salesforce Pub/Sub API emulator (gRPC) with events from a JSONL file.
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7011")]
        listen: std::net::SocketAddr,
        /// Events to serve (JSONL, the same format as the JSONL source). A line that is not an event is skipped
        /// with a warning naming its line.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Serve each line that is not an event as a payload no schema decodes (on the Order channel), as a fault
        /// for subscribers to handle, instead of skipping it.
        #[arg(long)]
        serve_malformed: bool,
        /// The static access token accepted besides the ones the token endpoint issues.
        #[arg(long, default_value = "emulator-access-token")]
        access_token: String,
        /// Address of the HTTP side: the OAuth token endpoint (the login URL), userinfo and sobject reads (the
        /// instance URL).
        #[arg(long, default_value = "127.0.0.1:7012")]
        http_listen: std::net::SocketAddr,
        /// RSA public key (PEM) that verifies JWT bearer assertions; without it that flow is refused.
        #[arg(long)]
        jwt_public_key: Option<PathBuf>,
        /// The connected app's consumer secret the token endpoint expects.
        #[arg(long, default_value = "emulator-client-secret")]
        client_secret: String,
        /// A managed subscription of the org (ManagedSubscribe, CommitReplayRequest), repeatable:
        /// `NAME=TOPIC` (default replay EARLIEST), `NAME=TOPIC@latest`, or `NAME=TOPIC@stopped` (state STOP).
        #[arg(long, value_name = "NAME=TOPIC")]
        managed: Vec<crate::emulator::ManagedSubscription>,
    },
    /// Inspect or move stored source positions.
    Checkpoint {
        /// The service config (its Redis or checkpoint file).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        op: CheckpointOp,
    },
    /// Inspect, retry or purge dead letters.
    DeadLetter {
        /// The service config (its Redis).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        op: DeadLetterOp,
    },
    /// The journal's history of a record id, event id or idempotency key, newest first: what every route did
    /// and, when it did not fire, the clause that was false.
    Why {
        /// A record id (`801…`), an event id or an idempotency key.
        id: String,
        /// The service config (its Redis).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// Live decisions of a running service, one line each, until Ctrl-C.
    Tap {
        /// The service config (its Redis).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this route's decisions.
        #[arg(long)]
        route: Option<String>,
        /// Only this channel (`/data/OrderChangeEvent`, or its end: `OrderChangeEvent`).
        #[arg(long)]
        channel: Option<String>,
        /// Only this outcome: fired, guard-failed, not-matched, skipped, paused, failed, rejected.
        #[arg(long)]
        outcome: Option<String>,
        /// Only events of this record id.
        #[arg(long)]
        record: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// List, pause or resume routes (the runaway guard's pauses, on every replica of the config).
    Route {
        /// The service config (its Redis).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        op: RouteOp,
    },
    /// Ask a running service's listener for `/healthz`: exit 0 when it answers ok, 1 with the reason otherwise
    /// (the container image's health check).
    Health {
        /// The listener's URL (default: the config's `http.listen`, else http://127.0.0.1:9464).
        #[arg(long, env = "SWITCHYARD_HEALTH_URL")]
        url: Option<String>,
        /// The service config: its `http.listen` is where to ask.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value = "2000")]
        timeout_ms: u64,
    },
    /// Print the JSON Schema of rule files, rule tests or the config.
    Schema {
        #[arg(value_enum)]
        kind: SchemaKind,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointOp {
    /// Every stored position.
    Show,
    /// Store a position: `offset:N` for a JSONL file, or hex bytes (a replay id).
    Set { key: String, value: String },
    /// Forget a position: the source starts from its beginning (JSONL) or its configured start.
    Reset { key: String },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterOp {
    /// One line per dead letter: id, time, route, event, reason.
    List,
    /// One dead letter as JSON.
    Show { id: String },
    /// Run a dead letter again through the normal path (same idempotency key): its action, or the whole
    /// event under the current rules when a route failed. Removed when it succeeds or fails anew.
    Retry {
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteOp {
    /// Every route: channel, limit, and whether it is paused (since when, by whom, why).
    List,
    /// Pause a route: its actions are dead-lettered, not run, until it is resumed.
    Pause { name: String },
    /// Resume a paused route: its window of fires starts afresh. Its dead letters stay: `dead-letter retry`.
    Resume { name: String },
}
