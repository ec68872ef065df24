//! `switchyard run`: load the config and rules, connect the sinks, serve HTTP, run the pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::app::reload::Reloader;
use crate::auth::Auth;
use crate::config::{EnricherKind, LoadedConfig, SourceKind};
use crate::delivery::{self, RouteCounters};
use crate::delivery::{Pipeline, Stats};
use crate::diag::{Problem, Problems, Severity};
use crate::enrich::{Enricher, SalesforceEnricher};
use crate::obs::metrics as m;
use crate::rules::RuleSet;
use crate::rules::load::{self, RuleEnv, RuleSource};
use crate::sinks::{BuildError, Sinks};
use crate::sources::Source;
use crate::sources::jsonl::JsonlSource;
use crate::sources::pubsub::subscriber::{PubsubSource, Subscription};
use crate::state::{ConnectError, Stores};

/// The rules and events the embedded demo runs, so `switchyard run` works from any directory.
const DEMO_RULES: &str = include_str!("../../rules/orders.yaml");
const DEMO_EVENTS: &str = include_str!("../../examples/events/order-lifecycle.jsonl");

/// How long a start waits for the checkpoint store to answer before it fails.
const STORED_POSITION_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(Problems),
    #[error(transparent)]
    Stores(#[from] ConnectError),
    #[error(transparent)]
    Sinks(#[from] BuildError),
    #[error("cannot open the event source {path}: {source}")]
    Source { path: PathBuf, source: std::io::Error },
    #[error("cannot read the stored position: {0}")]
    Checkpoint(crate::state::CheckpointError),
    #[error("the in-process emulator: {0}")]
    Emulator(#[from] crate::emulator::EmulatorError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("cannot listen on {listen}: {source}")]
    Http { listen: String, source: std::io::Error },
}

pub struct Service {
    pub config: LoadedConfig,
    /// Whether this is the embedded demo (rules and events compiled into the binary).
    pub embedded: bool,
    pub rules: Arc<ArcSwap<RuleSet>>,
    /// Dead letters, idempotency markers, positions, leases: built once, shared by everything below.
    pub stores: Arc<Stores>,
    pub sinks: Arc<Sinks>,
    pub pipeline: Arc<Pipeline>,
    /// Reloads the rules (file watch, SIGHUP, `POST /reload`).
    pub reloader: Arc<Reloader>,
    /// Whether `run` watches the rule files (the config's `reload.watch`, unless `--no-watch`).
    pub watch: bool,
    /// Warnings found while loading the rules.
    pub warnings: Vec<Problem>,
    /// The Salesforce token source, shared by the Pub/Sub source and the REST enricher.
    pub auth: Option<Arc<Auth>>,
    /// The in-process emulator of the `emulator` source, and the events it publishes.
    pub emulator: Option<(crate::emulator::EmulatorHandle, Vec<EmulatorInput>)>,
    /// The running Pub/Sub channels (for `/healthz`, tests).
    pub channels: Arc<std::sync::Mutex<Vec<Arc<crate::sources::pubsub::subscriber::ChannelStatus>>>>,
}

impl Service {
    /// What the operator commands (CLI and HTTP) act on.
    pub fn ops(&self) -> crate::app::admin::Ops {
        crate::app::admin::Ops {
            stores: self.stores.clone(),
            rules: self.rules.clone(),
            pipeline: self.pipeline.clone(),
        }
    }
}

/// One line of the `emulator` source's events file.
pub enum EmulatorInput {
    Event(Box<crate::event::Event>),
    /// A line that is not an event: published as a payload no schema can decode, so the subscriber's handling of
    /// corrupt Avro shows in the demo.
    Corrupt(String),
}

impl Service {
    /// Loads the rules and connects the sinks; nothing runs yet.
    pub async fn start(config: LoadedConfig, embedded: bool) -> Result<Service, StartError> {
        let env = RuleEnv::from_config(&config);
        let loaded = if embedded {
            load::compile(
                &[RuleSource {
                    path: PathBuf::from("rules/orders.yaml"),
                    text: DEMO_RULES.to_string(),
                }],
                &env,
            )
        } else {
            // The same path as every reload: compile, check, dry-run on the fixtures.
            let checked = crate::authoring::validate::validate_deployed(&config.rule_paths(), &env);
            load::Loaded {
                ruleset: checked.ruleset,
                problems: checked.problems,
            }
        };
        let Some(ruleset) = loaded.ruleset else {
            return Err(StartError::Invalid(Problems(loaded.problems)));
        };
        let warnings: Vec<Problem> = loaded
            .problems
            .into_iter()
            .filter(|p| p.severity == Severity::Warning)
            .collect();
        for w in &warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(rules_version = %ruleset.version, routes = ruleset.routes.len(), mode = config.config.mode.as_str(), "Rules loaded.");
        metrics::gauge!(m::RULES_VERSION, "version" => ruleset.version.clone()).set(1.0);
        let rules = Arc::new(ArcSwap::from_pointee(ruleset));
        let stores = Arc::new(Stores::build(&config).await?);
        delivery::register_series(&config.config, &rules.load());
        let counters = Arc::new(RouteCounters::default());
        let c = &config.config;
        // The `emulator` source brings its own org: an in-process emulator on loopback, and credentials for it.
        let (emulator, salesforce) = if c.source.kind == SourceKind::Emulator {
            let (handle, inputs, sf) = start_emulator(&config).await?;
            (Some((handle, inputs)), Some(sf))
        } else {
            (None, c.salesforce.clone())
        };
        let needs_auth = c.source.kind != SourceKind::Jsonl && c.source.kind != SourceKind::Stdin
            || c.enricher() == EnricherKind::Salesforce;
        let base = config.path.parent().unwrap_or(std::path::Path::new("."));
        let auth = match &salesforce {
            Some(sf) if needs_auth => Some(Arc::new(Auth::new(sf, base)?)),
            // Only write-backs (`salesforce-update`) would use the org: settings that do not make a token source
            // leave them dead-lettered, with the reason on each, rather than stopping the service.
            Some(sf) => match Auth::new(sf, base) {
                Ok(auth) => Some(Arc::new(auth)),
                Err(e) => {
                    tracing::warn!(error = %e, "The `salesforce` settings cannot issue tokens: write-backs (`salesforce-update`) will be dead-lettered.");
                    None
                }
            },
            None => None,
        };
        let write_back = match (&auth, &salesforce) {
            (Some(auth), Some(sf)) => Some((auth.clone(), sf)),
            _ => None,
        };
        let sinks = Arc::new(Sinks::build(&config, &stores, write_back).await?);
        let enricher = match c.enricher() {
            EnricherKind::None => Enricher::None,
            EnricherKind::Recorded => Enricher::Recorded,
            EnricherKind::Salesforce => {
                let (Some(auth), Some(sf)) = (&auth, &salesforce) else {
                    unreachable!("validated: the salesforce enricher has a `salesforce` section");
                };
                Enricher::Salesforce(Arc::new(SalesforceEnricher::new(auth.clone(), sf)?))
            }
        };
        let mut pipeline = Pipeline::new(&config.config, rules.clone(), stores.clone(), sinks.clone(), enricher);
        pipeline.counters = counters.clone();
        pipeline.write_back = salesforce.is_some();
        let mut reloader = Reloader::new(rules.clone(), counters, config.rule_paths(), env).with_pauses(stores.clone());
        // With a config file on disk, a reload re-reads it and applies what can change live.
        if !embedded && config.path.is_file() {
            reloader = reloader.with_config(config.clone(), sinks.clone());
        }
        let reloader = Arc::new(reloader);
        Ok(Service {
            config,
            embedded,
            rules,
            stores,
            sinks,
            pipeline: Arc::new(pipeline),
            reloader,
            warnings,
            watch: true,
            auth,
            emulator,
            channels: Arc::default(),
        })
    }

    /// Opens the configured source.
    pub async fn source(&self) -> Result<Source, StartError> {
        let c = &self.config.config;
        Ok(Source::Jsonl(match c.source.kind {
            SourceKind::Stdin => JsonlSource::stdin(),
            SourceKind::Pubsub | SourceKind::Emulator => return Ok(Source::Pubsub(self.subscribe())),
            SourceKind::Jsonl if self.embedded => {
                JsonlSource::text("examples/events/order-lifecycle.jsonl", DEMO_EVENTS)
            }
            SourceKind::Jsonl => {
                let jsonl = c.source.jsonl.as_ref().expect("validated: a jsonl source has settings");
                let path = self.config.resolve(&jsonl.path);
                let key = JsonlSource::key_for(&path);
                let stored = self.stored_position(&key).await?;
                let start = stored.as_deref().and_then(crate::state::offset_of).unwrap_or(0);
                if start > 0 {
                    tracing::info!(%key, offset = start, "Resuming the source from its stored position.");
                }
                JsonlSource::file(&path, jsonl.follow, start)
                    .await
                    .map_err(|source| StartError::Source { path, source })?
            }
        }))
    }

    /// The source's stored position. A store that fails transiently (Redis restarting, a connection dropped
    /// under us) is retried for a while, as every other Redis call is, before the start gives up.
    async fn stored_position(&self, key: &str) -> Result<Option<Vec<u8>>, StartError> {
        let started = std::time::Instant::now();
        let patient = |e: &crate::state::CheckpointError| {
            let transient = matches!(e, crate::state::CheckpointError::Store(e) if e.is_transient());
            let retry = transient && started.elapsed() < STORED_POSITION_PATIENCE;
            if retry {
                tracing::warn!(%key, error = %e, "Cannot read the stored position yet; retrying.");
            }
            retry
        };
        self.stores
            .checkpoints
            .get_retrying(key, std::time::Duration::from_secs(2), patient)
            .await
            .map_err(StartError::Checkpoint)
    }

    /// Starts the Pub/Sub subscriptions: one per channel with live routes in the configured mode, none when
    /// `source.pubsub.enabled` is false (SF_EVENTS_ENABLED=false).
    pub fn subscribe(&self) -> PubsubSource {
        let c = &self.config.config;
        let pubsub = c.pubsub();
        let endpoint = match &self.emulator {
            Some((handle, _)) => handle.endpoint(),
            None => pubsub.endpoint.clone(),
        };
        if !pubsub.enabled {
            tracing::warn!(
                "Pub/Sub events are disabled (source.pubsub.enabled / SF_EVENTS_ENABLED); nothing is subscribed."
            );
        }
        let channels = super::subscribed_channels(c, &self.rules.load());
        let auth = self.auth.clone().expect("validated: a pubsub source has credentials");
        tracing::info!(%endpoint, mode = c.mode.as_str(), channels = ?channels, auth = auth.flow_name(), "Subscribing.");
        let source = PubsubSource::start(
            Subscription {
                endpoint,
                mode: c.mode,
                config: pubsub,
                auth,
                checkpoints: self.stores.checkpoints.clone(),
                leases: self.stores.leases.clone(),
            },
            &channels,
            c.delivery.concurrency,
            self.channels.clone(),
        );
        // A config reload starts and stops channels (mode, channel aliases, `enabled`).
        self.reloader.set_subscriptions(source.subscriptions.clone());
        source
    }

    /// Serves HTTP (when configured) and runs the pipeline until the source ends or `shutdown` flips.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<Stats, StartError> {
        let source = self.source().await?;
        // The `emulator` source publishes its events one after another, each once the previous one settled, as
        // an org would produce them; then the source ends and the run prints its summary.
        let feeding = {
            let feed_what = match (&self.emulator, &source) {
                (Some((handle, inputs)), Source::Pubsub(pubsub)) => {
                    let live: Vec<String> = pubsub.channels.iter().map(|c| c.channel.clone()).collect();
                    Some((handle, inputs, live, pubsub.stopper()))
                }
                _ => None,
            };
            let settled = self.pipeline.settled.subscribe();
            async move {
                match feed_what {
                    Some((handle, inputs, live, stop)) => feed(handle, inputs, &live, settled, stop).await,
                    None => std::future::pending().await,
                }
            }
        };
        let reload = &self.config.config.reload;
        // Kept alive for the whole run; dropping it stops the watch.
        let _watcher = if self.watch && reload.watch && !self.embedded {
            match self
                .reloader
                .watch(std::time::Duration::from_millis(reload.debounce_ms))
            {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot watch the rule files; reload with SIGHUP or POST /reload.");
                    None
                }
            }
        } else {
            None
        };
        let http = match &self.config.config.http {
            Some(http) => {
                let state = crate::app::http::AppState {
                    reloader: self.reloader.clone(),
                    metrics: m::install(),
                    main_redis: self.stores.redis_check(),
                    sink_redis: self.sinks.redis_checks.clone(),
                    channels: self.channels.clone(),
                    ops: self.ops(),
                    instance: self.config.config.instance_name(),
                    started: std::time::Instant::now(),
                    sparks: Default::default(),
                };
                let (addr, task) = crate::app::http::serve(http, state, shutdown.clone())
                    .await
                    .map_err(|source| StartError::Http {
                        listen: http.listen.clone(),
                        source,
                    })?;
                tracing::info!(%addr, "HTTP listener up: /healthz, /readyz, /metrics, /api/, the console at /ui.");
                Some(task)
            }
            None => None,
        };
        let gauges = tokio::spawn(refresh_pause_gauges(self.stores.clone(), self.rules.clone()));
        let subscriptions = match &source {
            Source::Pubsub(pubsub) => Some(pubsub.subscriptions.clone()),
            _ => None,
        };
        let pipeline = self.pipeline.run(source, shutdown);
        tokio::pin!(pipeline);
        let stats = tokio::select! {
            stats = &mut pipeline => stats,
            () = feeding => pipeline.await,
        };
        // Managed subscriptions commit the positions just stored to Salesforce before the process ends.
        if let Some(subscriptions) = subscriptions {
            crate::obs::stage::set("committing the managed subscriptions' positions");
            subscriptions.finish(std::time::Duration::from_secs(6)).await;
        }
        // Graceful handover: the last settled positions are stored, so a standby may take over from them now.
        if let Some(leases) = &self.stores.leases {
            crate::obs::stage::set("handing back the channel leases");
            leases.release_all().await;
        }
        gauges.abort();
        if let Some(journal) = &self.stores.journal {
            crate::obs::stage::set("writing the last decisions to the journal");
            journal.flush().await;
        }
        if let Some(task) = http {
            task.abort();
        }
        if self.config.config.print_decisions {
            stats.print_summary(self.stores.memory.as_deref());
        }
        Ok(stats)
    }
}

/// How often every replica reads the paused routes into `switchyard_route_paused`.
const PAUSE_GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `switchyard_route_paused{route}` true on every replica, not only the one whose guard paused the route
/// (or the operator's `route pause`, which runs in no replica): 1 for each paused route, 0 for the others.
async fn refresh_pause_gauges(stores: Arc<Stores>, rules: Arc<ArcSwap<RuleSet>>) {
    let mut tick = tokio::time::interval(PAUSE_GAUGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let paused = match stores.pauses.list().await {
            Ok(paused) => paused,
            Err(e) => {
                tracing::debug!(error = %e, "Paused routes unreadable; the gauge keeps its last values.");
                continue;
            }
        };
        let rules = rules.load();
        let names = rules.routes.iter().map(|r| &r.name).chain(paused.keys());
        for name in names {
            let value = if paused.contains_key(name) { 1.0 } else { 0.0 };
            metrics::gauge!(m::ROUTE_PAUSED, "route" => name.clone()).set(value);
        }
    }
}

/// Starts the in-process emulator of the `emulator` source and returns it with its events and the credentials
/// that reach it.
async fn start_emulator(
    config: &LoadedConfig,
) -> Result<
    (
        crate::emulator::EmulatorHandle,
        Vec<EmulatorInput>,
        crate::config::SalesforceConfig,
    ),
    StartError,
> {
    use crate::emulator::{self, EmulatorOptions};
    let settings = config
        .config
        .source
        .emulator
        .as_ref()
        .expect("validated: an emulator source has settings");
    let path = config.resolve(&settings.events);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) if path.ends_with("examples/events/order-lifecycle.jsonl") => DEMO_EVENTS.to_string(),
        Err(source) => return Err(StartError::Source { path, source }),
    };
    let inputs = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|line| match crate::event::Event::from_json(line) {
            Ok(event) => EmulatorInput::Event(Box::new(event)),
            Err(_) => EmulatorInput::Corrupt(line.to_string()),
        })
        .collect();
    let handle = emulator::start(EmulatorOptions::default()).await?;
    let sf = crate::config::SalesforceConfig {
        login_url: Some(handle.base_url()),
        client_id: Some(emulator::DEFAULT_CLIENT_ID.into()),
        client_secret: Some(crate::config::Secret::new(emulator::DEFAULT_CLIENT_SECRET)),
        ..config.config.salesforce.clone().unwrap_or_default()
    };
    tracing::info!(endpoint = %handle.endpoint(), login_url = %handle.base_url(), "In-process Pub/Sub emulator started.");
    Ok((handle, inputs, sf))
}

/// Publishes the emulator source's events, each once everything before it has settled, then ends the source.
/// Undecodable lines go to the orders channel, so they are delivered (and dead-lettered) in CDC mode only.
async fn feed(
    handle: &crate::emulator::EmulatorHandle,
    inputs: &[EmulatorInput],
    live: &[String],
    mut settled: watch::Receiver<u64>,
    stop: Arc<watch::Sender<bool>>,
) {
    let mut published = 0u64;
    for input in inputs {
        let result = match input {
            // An event of a channel nobody subscribes to (the other mode) is on the bus but never delivered.
            EmulatorInput::Event(event) if !live.contains(&event.channel) => {
                let _ = handle.publish(event);
                continue;
            }
            EmulatorInput::Event(event) => handle.publish(event).map(drop),
            EmulatorInput::Corrupt(_) if !live.iter().any(|c| c == crate::emulator::ORDER_CHANNEL) => continue,
            EmulatorInput::Corrupt(line) => {
                tracing::debug!(line = %line, "Publishing an undecodable payload for a line that is not an event.");
                handle.publish_corrupt(crate::emulator::ORDER_CHANNEL).map(drop)
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "The emulator cannot publish an event of the demo file; it is skipped.");
            continue;
        }
        published += 1;
        if settled.wait_for(|n| *n >= published).await.is_err() {
            return;
        }
    }
    stop.send_replace(true);
}
