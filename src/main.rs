#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use switchyard::app::cli::{Cli, Command, ExplainFormat, ProblemFormat, SchemaKind};
use switchyard::app::service::{Service, StartError};
use switchyard::config::LoadedConfig;
use switchyard::diag::{Problem, Severity};
use switchyard::event::Event;
use switchyard::rules::load::RuleEnv;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard::obs::logging::init(cli.log_format);
    match cli.command {
        Command::Run { config, no_watch } => run(config, no_watch).await,
        Command::Validate {
            paths,
            config,
            avro,
            format,
        } => validate(paths, config, avro, format),
        Command::Test { paths } => test(paths),
        Command::Lsp { config } => match switchyard::app::lsp::serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                switchyard::errln!("switchyard lsp: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Explain {
            event,
            rules,
            config,
            format,
        } => explain(event, rules, config, format),
        Command::Replay {
            events,
            rules,
            against,
            config,
        } => replay(events, rules, against, config),
        Command::Record {
            config,
            out,
            from,
            max_events,
            redact,
        } => record(config, out, from, max_events, redact).await,
        Command::Emulator {
            listen,
            events,
            serve_malformed,
            access_token,
            http_listen,
            jwt_public_key,
            client_secret,
            managed,
        } => {
            let mut oauth = switchyard::emulator::OAuthSettings {
                client_secret,
                ..Default::default()
            };
            if let Some(path) = jwt_public_key {
                match std::fs::read_to_string(&path) {
                    Ok(pem) => oauth.jwt_public_key_pem = Some(pem),
                    Err(e) => {
                        switchyard::errln!("switchyard: cannot read {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            let options = switchyard::emulator::EmulatorOptions {
                addr: listen,
                http_addr: http_listen,
                access_token,
                oauth,
                managed,
                ..Default::default()
            };
            emulator(options, events, serve_malformed).await
        }
        Command::Checkpoint { config, op } => {
            admin(config, |service, out| {
                Box::pin(async move {
                    switchyard::app::admin::checkpoint(&service.ops(), op, out)
                        .await
                        .map(|()| true)
                })
            })
            .await
        }
        Command::DeadLetter { config, op } => {
            admin(config, |service, out| {
                Box::pin(async move { switchyard::app::admin::dead_letter(&service.ops(), op, out).await })
            })
            .await
        }
        Command::Why { id, config, format } => {
            admin(config, |service, out| {
                Box::pin(
                    async move { switchyard::app::why::why(service, &id, format == ExplainFormat::Json, out).await },
                )
            })
            .await
        }
        Command::Tap {
            config,
            route,
            channel,
            outcome,
            record,
            format,
        } => {
            let filter = switchyard::app::why::TapFilter {
                route,
                channel,
                outcome,
                record,
            };
            admin(config, |service, out| {
                Box::pin(async move {
                    switchyard::app::why::tap(service, &filter, format == ExplainFormat::Json, out, wait_for_signal())
                        .await
                })
            })
            .await
        }
        Command::Route { config, op } => {
            admin(config, |service, out| {
                Box::pin(async move {
                    switchyard::app::admin::route(&service.ops(), op, out)
                        .await
                        .map(|()| true)
                })
            })
            .await
        }
        Command::Health {
            url,
            config,
            timeout_ms,
        } => health(url, config, timeout_ms).await,
        Command::Schema { kind } => {
            let schema = match kind {
                SchemaKind::Rules => switchyard::authoring::schema::rules_schema(),
                SchemaKind::Config => switchyard::authoring::schema::config_schema(),
                SchemaKind::Tests => switchyard::authoring::schema::tests_schema(),
            };
            switchyard::out!("{}", switchyard::authoring::schema::pretty(&schema));
            ExitCode::SUCCESS
        }
    }
}

async fn run(config: Option<PathBuf>, no_watch: bool) -> ExitCode {
    switchyard::obs::metrics::install();
    let (embedded, loaded) = match &config {
        Some(path) => (false, LoadedConfig::load(path)),
        None => (true, LoadedConfig::demo()),
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(problems) => {
            switchyard::errln!("{problems}");
            switchyard::errln!("switchyard: the config has errors; not starting.");
            return ExitCode::FAILURE;
        }
    };
    if embedded {
        tracing::info!("No --config given: running the embedded demo (recorded events, in-memory queue and cache).");
    }
    let mut service = match Service::start(loaded, embedded).await {
        Ok(service) => service,
        Err(StartError::Invalid(problems)) => {
            switchyard::errln!("{problems}");
            switchyard::errln!("switchyard: the rules have errors; not starting.");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    service.watch = !no_watch;
    #[cfg(unix)]
    {
        // SIGHUP reloads the rules; the task lives as long as the process.
        let reloader = service.reloader.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                reloader.reload().await;
            }
        });
    }
    let (stop, shutdown) = watch::channel(false);
    let stop = std::sync::Arc::new(stop);
    // A reader of the decisions that went away (`run | head`): stop like on SIGTERM, settling what is in flight so
    // the stored position is exact, and exit 0.
    let closed = stop.clone();
    switchyard::obs::stdout::on_closed(move || {
        tracing::info!("Standard output was closed; stopping.");
        let _ = closed.send(true);
    });
    // However a stop begins (a signal, a closed stdout), it ends by this deadline: the events in
    // flight get the shutdown timeout to settle and the last position as long again to be stored; what remains
    // (leases, journal) gets a few seconds.
    let drain = std::time::Duration::from_millis(service.config.config.delivery.shutdown_timeout_ms) * 2
        + std::time::Duration::from_secs(5);
    let mut stopping = shutdown.clone();
    tokio::spawn(async move {
        while !*stopping.borrow() {
            if stopping.changed().await.is_err() {
                return;
            }
        }
        watchdog(drain);
    });
    // Ends when a signal arrives or the process exits; a second signal exits at once.
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutting down: finishing the event in hand.");
        let _ = stop.send(true);
        wait_for_signal().await;
        tracing::warn!("Second signal: exiting now.");
        std::process::exit(130);
    });
    match service.run(shutdown).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A thread (not a task: it must fire even when every runtime thread is stuck) that ends the process if the stop
/// takes longer than `drain`, saying what it was waiting for; events not settled are redelivered on restart.
fn watchdog(drain: std::time::Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(drain);
        let stage = switchyard::obs::stage::get();
        let waiting = if stage.is_empty() {
            "the pipeline to stop".to_string()
        } else {
            stage
        };
        tracing::error!(waiting = %waiting, drain_ms = drain.as_millis() as u64, "Stop took longer than its deadline; exiting now.");
        switchyard::errln!(
            "switchyard: not stopped {:.0} s after the stop began (waiting for: {waiting}); exiting. Events not \
             settled are redelivered on restart.",
            drain.as_secs_f64()
        );
        std::process::exit(1);
    });
}

type AdminFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, switchyard::app::admin::AdminError>> + 'a>>;

/// Loads the config and connects its stores, then runs one operator command.
async fn admin<F>(config: Option<PathBuf>, command: F) -> ExitCode
where
    F: for<'a> FnOnce(&'a Service, &'a mut switchyard::obs::stdout::Stdout) -> AdminFuture<'a>,
{
    let Some(config) = config else {
        switchyard::errln!("switchyard: this command needs --config (the service config whose stores it works on)");
        return ExitCode::from(2);
    };
    let loaded = match LoadedConfig::load(&config) {
        Ok(loaded) => loaded,
        Err(problems) => {
            switchyard::errln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    let service = match Service::start(loaded, false).await {
        Ok(service) => service,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = switchyard::obs::stdout::Stdout;
    match command(&service, &mut out).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn health(url: Option<String>, config: Option<PathBuf>, timeout_ms: u64) -> ExitCode {
    let listen = match (&url, &config) {
        (None, Some(path)) => match LoadedConfig::load(path) {
            Ok(loaded) => match loaded.config.http {
                Some(http) => Some(http.listen),
                None => {
                    switchyard::errln!("switchyard: {} has no `http.listen`: nothing to ask", path.display());
                    return ExitCode::FAILURE;
                }
            },
            Err(problems) => {
                switchyard::errln!("{problems}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let base = switchyard::app::probe::base_url(url.as_deref(), listen.as_deref());
    match switchyard::app::probe::check(&base, std::time::Duration::from_millis(timeout_ms)).await {
        Ok(summary) => {
            switchyard::outln!("{summary}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            switchyard::errln!("switchyard: unhealthy: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn validate(paths: Vec<PathBuf>, config: Option<PathBuf>, avro: Option<PathBuf>, format: ProblemFormat) -> ExitCode {
    let mut problems = Vec::new();
    // A config that does not load reports its own problems only; the rules it names (when they can still be read
    // from it) are then checked against the built-in channel and sink names.
    let (env, config_paths) = match &config {
        Some(path) => match LoadedConfig::load(path) {
            Ok(loaded) => (RuleEnv::from_config(&loaded), Some(loaded.rule_paths())),
            Err(p) => {
                problems.extend(p.0);
                (RuleEnv::defaults(), Some(LoadedConfig::rule_paths_of_unloadable(path)))
            }
        },
        None => (RuleEnv::defaults(), None),
    };
    let paths = match (paths.is_empty(), config_paths) {
        (false, _) => paths,
        (true, Some(config_paths)) => config_paths,
        (true, None) => vec![PathBuf::from("rules")],
    };
    if paths.is_empty() {
        // The config did not load, and names no rules that could be read from it.
        report(&problems, format);
        switchyard::errln!("{}: {} error(s)", display_paths(config.as_slice()), problems.len());
        return ExitCode::FAILURE;
    }
    let loaded = switchyard::authoring::validate::validate(&paths, &env, avro.as_deref());
    problems.extend(loaded.problems);
    report(&problems, format);
    let errors = problems.iter().filter(|p| p.severity == Severity::Error).count();
    let warnings = problems.len() - errors;
    match (&loaded.ruleset, errors) {
        (Some(rules), 0) => {
            switchyard::errln!(
                "{}: ok ({} routes in {} file(s), version {}, {warnings} warning(s))",
                display_paths(&paths),
                rules.routes.len(),
                rules.files.len(),
                rules.version
            );
            ExitCode::SUCCESS
        }
        _ => {
            switchyard::errln!("{}: {errors} error(s), {warnings} warning(s)", display_paths(&paths));
            ExitCode::FAILURE
        }
    }
}

fn test(paths: Vec<PathBuf>) -> ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("rules")]
    } else {
        paths
    };
    let files = switchyard::authoring::testing::find_test_files(&paths);
    if files.is_empty() {
        switchyard::errln!("{}: no *.test.yaml files found", display_paths(&paths));
        return ExitCode::FAILURE;
    }
    let report = switchyard::authoring::testing::run(&files);
    for p in &report.problems {
        switchyard::outln!("{p}");
    }
    for f in &report.failures {
        switchyard::outln!("{}: case \"{}\" FAILED", f.at, f.case);
        switchyard::out!("{}", f.message);
    }
    switchyard::outln!(
        "{} passed, {} failed{}",
        report.passed,
        report.failures.len(),
        if report.problems.is_empty() {
            String::new()
        } else {
            format!(", {} file problem(s)", report.problems.len())
        }
    );
    if report.failures.is_empty() && report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn emulator(
    options: switchyard::emulator::EmulatorOptions,
    events: Option<PathBuf>,
    serve_malformed: bool,
) -> ExitCode {
    use switchyard::emulator::{read_lines, run_cli};
    let lines = match events.as_deref().map(read_lines).transpose() {
        Ok(lines) => lines.unwrap_or_default(),
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %options.addr, lines = lines.len(), managed = options.managed.len(), "Pub/Sub emulator listening (plain HTTP/2, loopback).");
    match run_cli(options, events.as_deref(), lines, serve_malformed).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads rules for explain/replay: the config's environment (or the defaults, in CDC mode).
fn load_rules(paths: Vec<PathBuf>, config: Option<&PathBuf>) -> Result<switchyard::rules::RuleSet, ExitCode> {
    let (mut env, config_paths) = match config {
        Some(path) => match LoadedConfig::load(path) {
            Ok(loaded) => (RuleEnv::from_config(&loaded), loaded.rule_paths()),
            Err(p) => {
                switchyard::errln!("{p}");
                return Err(ExitCode::FAILURE);
            }
        },
        None => (RuleEnv::defaults(), vec![PathBuf::from("rules")]),
    };
    env.mode = Some(env.mode.unwrap_or_default());
    let paths = if paths.is_empty() { config_paths } else { paths };
    let loaded = switchyard::rules::load::load_paths(&paths, &env);
    match loaded.ruleset {
        Some(rules) => Ok(rules),
        None => {
            for p in &loaded.problems {
                switchyard::errln!("{p}");
            }
            Err(ExitCode::FAILURE)
        }
    }
}

fn explain(event: PathBuf, rules: Vec<PathBuf>, config: Option<PathBuf>, format: ExplainFormat) -> ExitCode {
    let rules = match load_rules(rules, config.as_ref()) {
        Ok(rules) => rules,
        Err(code) => return code,
    };
    let text = if event.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&event)
    };
    let text = match text {
        Ok(text) => text,
        Err(e) => {
            switchyard::errln!("switchyard: cannot read {}: {e}", event.display());
            return ExitCode::FAILURE;
        }
    };
    let mut all = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match Event::from_json(line) {
            Ok(e) => all.push(switchyard::authoring::explain::explain(&rules, &e)),
            Err(err) => {
                switchyard::errln!("{}:{}: not an event: {err}", event.display(), n + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    match format {
        ExplainFormat::Text => all
            .iter()
            .for_each(|x| switchyard::out!("{}", switchyard::authoring::explain::to_text(x))),
        ExplainFormat::Json => switchyard::outln!("{}", serde_json::to_string_pretty(&all).unwrap_or_default()),
    }
    ExitCode::SUCCESS
}

fn replay(events: PathBuf, rules: Vec<PathBuf>, against: Vec<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    use std::io::IsTerminal;
    let new = match load_rules(rules, config.as_ref()) {
        Ok(rules) => rules,
        Err(code) => return code,
    };
    let old = if against.is_empty() {
        None
    } else {
        match load_rules(against, config.as_ref()) {
            Ok(rules) => Some(rules),
            Err(code) => return code,
        }
    };
    let file = match std::fs::File::open(&events) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => {
            switchyard::errln!("switchyard: cannot read {}: {e}", events.display());
            return ExitCode::FAILURE;
        }
    };
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |n: u64| {
        if terminal {
            switchyard::obs::stdout::write_err(format_args!("\rreplayed {n} events"));
        }
    };
    let mut out = switchyard::obs::stdout::Stdout;
    let name = events.display().to_string();
    let report = match switchyard::authoring::replay::replay(file, &name, &new, old.as_ref(), &mut out, &mut progress) {
        Ok(report) => report,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if terminal {
        switchyard::errln!();
    }
    switchyard::outln!(
        "{} events replayed ({} malformed) under rules {}",
        report.events,
        report.malformed,
        new.version
    );
    for (route, n) in &report.fired {
        switchyard::outln!("  route {route}: fired {n} time(s)");
    }
    for (sink, n) in &report.actions {
        switchyard::outln!("  sink {sink}: {n} action(s)");
    }
    match &old {
        Some(old) if report.differing > 0 => {
            switchyard::outln!(
                "{} event(s) decide differently than under rules {}",
                report.differing,
                old.version
            );
            ExitCode::from(2)
        }
        Some(old) => {
            switchyard::outln!("no decision differs from rules {}", old.version);
            ExitCode::SUCCESS
        }
        None => ExitCode::SUCCESS,
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(problems: &[Problem], format: ProblemFormat) {
    match format {
        ProblemFormat::Text => problems.iter().for_each(|p| switchyard::outln!("{p}")),
        ProblemFormat::Json => switchyard::outln!("{}", serde_json::to_string_pretty(problems).unwrap_or_default()),
        ProblemFormat::Github => {
            for p in problems {
                let level = if p.severity == Severity::Error {
                    "error"
                } else {
                    "warning"
                };
                let message = p.message.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A");
                switchyard::outln!(
                    "::{level} file={},line={},col={}::{message}",
                    github_path(&p.file),
                    p.line.max(1),
                    p.column.max(1)
                );
            }
        }
    }
}

fn github_path(path: &Path) -> String {
    path.strip_prefix("./").unwrap_or(path).display().to_string()
}

async fn record(
    config: PathBuf,
    out: PathBuf,
    from: Option<switchyard::app::cli::RecordFrom>,
    max_events: Option<u64>,
    redact: Vec<String>,
) -> ExitCode {
    use switchyard::app::cli::RecordFrom;
    use switchyard::config::ReplayStart;
    let mut loaded = match LoadedConfig::load(&config) {
        Ok(loaded) => loaded,
        Err(problems) => {
            switchyard::errln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(from) = from {
        let mut pubsub = loaded.config.pubsub();
        pubsub.replay.start = match from {
            RecordFrom::Earliest => ReplayStart::Earliest,
            RecordFrom::Latest => ReplayStart::Latest,
            RecordFrom::Stored => ReplayStart::Stored,
        };
        loaded.config.source.pubsub = Some(pubsub);
    }
    // An observer: it never takes a channel lease from (or waits behind) the replicas that run the pipeline.
    loaded.config.lease.enabled = Some(false);
    let service = match Service::start(loaded, false).await {
        Ok(service) => service,
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.send_replace(true);
    });
    match switchyard::app::record::record(&service, &out, &redact, max_events, shutdown).await {
        Ok(done) => {
            switchyard::errln!(
                "switchyard: recorded {} event(s) to {} ({} undecodable skipped)",
                done.events,
                out.display(),
                done.malformed
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            switchyard::errln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}
