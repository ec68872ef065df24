//! `switchyard run`: load the config and rules, connect the sinks, serve HTTP, run the pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::{EnricherKind, LoadedConfig, SourceKind};
use crate::diag::{Problem, Problems, Severity};
use crate::enrich::{Enricher, SalesforceEnricher};
use crate::metrics as m;
use crate::pipeline::{Pipeline, Stats};
use crate::reload::{Reloader, RouteCounters};
use crate::rules::RuleSet;
use crate::rules::load::{self, RuleEnv, RuleSource};
use crate::sinks::{BuildError, Sinks};
use crate::sources::jsonl::JsonlSource;

/// The rules and events the embedded demo runs, so `switchyard run` works from any directory.
const DEMO_RULES: &str = include_str!("../rules/orders.yaml");
const DEMO_EVENTS: &str = include_str!("../examples/events/order-lifecycle.jsonl");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(Problems),
    #[error(transparent)]
    Sinks(#[from] BuildError),
    #[error("cannot open the event source {path}: {source}")]
    Source { path: PathBuf, source: std::io::Error },
    #[error("cannot read the stored position: {0}")]
    Checkpoint(crate::checkpoint::CheckpointError),
    #[error("this source is not available yet")]
    NotYet,
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
    pub sinks: Arc<Sinks>,
    pub pipeline: Arc<Pipeline>,
    /// Reloads the rules (file watch, SIGHUP, `POST /reload`).
    pub reloader: Arc<Reloader>,
    /// Whether `run` watches the rule files (the config's `reload.watch`, unless `--no-watch`).
    pub watch: bool,
    /// Warnings found while loading the rules.
    pub warnings: Vec<Problem>,
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
            let checked = crate::rules::validate::validate(&config.rule_paths(), &env, None);
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
        let sinks = Arc::new(Sinks::build(&config).await?);
        m::register(&config.config, &rules.load(), crate::http::ROLE);
        let counters = Arc::new(RouteCounters::default());
        let auth = match &config.config.salesforce {
            Some(sf) if config.config.enricher() == EnricherKind::Salesforce => {
                let base = config.path.parent().unwrap_or(std::path::Path::new("."));
                Some((Arc::new(Auth::new(sf, base)?), sf))
            }
            _ => None,
        };
        let enricher = match config.config.enricher() {
            EnricherKind::None => Enricher::None,
            EnricherKind::Recorded => Enricher::Recorded,
            EnricherKind::Salesforce => {
                let (auth, sf) = auth
                    .as_ref()
                    .expect("validated: the salesforce enricher has a `salesforce` section");
                Enricher::Salesforce(Arc::new(SalesforceEnricher::new(auth.clone(), sf)?))
            }
        };
        let mut pipeline = Pipeline::new(&config.config, rules.clone(), sinks.clone(), enricher);
        pipeline.counters = counters.clone();
        let reloader = Arc::new(Reloader::new(rules.clone(), counters, config.rule_paths(), env));
        Ok(Service {
            config,
            embedded,
            rules,
            sinks,
            pipeline: Arc::new(pipeline),
            reloader,
            warnings,
            watch: true,
        })
    }

    /// Opens the configured source.
    pub async fn source(&self) -> Result<JsonlSource, StartError> {
        let c = &self.config.config;
        Ok(match c.source.kind {
            SourceKind::Stdin => JsonlSource::stdin(),
            SourceKind::Pubsub | SourceKind::Emulator => return Err(StartError::NotYet),
            SourceKind::Jsonl if self.embedded => {
                JsonlSource::text("examples/events/order-lifecycle.jsonl", DEMO_EVENTS)
            }
            SourceKind::Jsonl => {
                let jsonl = c.source.jsonl.as_ref().expect("validated: a jsonl source has settings");
                let path = self.config.resolve(&jsonl.path);
                let key = JsonlSource::key_for(&path);
                let stored = self.sinks.checkpoints.get(&key).await.map_err(StartError::Checkpoint)?;
                let start = stored.as_deref().and_then(crate::checkpoint::offset_of).unwrap_or(0);
                if start > 0 {
                    tracing::info!(%key, offset = start, "Resuming the source from its stored position.");
                }
                JsonlSource::file(&path, jsonl.follow, start)
                    .await
                    .map_err(|source| StartError::Source { path, source })?
            }
        })
    }

    /// Serves HTTP (when configured) and runs the pipeline until the source ends or `shutdown` flips.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<Stats, StartError> {
        let source = self.source().await?;
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
                let state = crate::http::AppState {
                    reloader: self.reloader.clone(),
                    metrics: m::install(),
                    redis: Arc::new(self.sinks.redis_checks.clone()),
                };
                let (addr, task) = crate::http::serve(&http.listen, state, shutdown.clone())
                    .await
                    .map_err(|source| StartError::Http {
                        listen: http.listen.clone(),
                        source,
                    })?;
                tracing::info!(%addr, "HTTP listener up: /healthz, /readyz, /metrics, /rules, POST /reload.");
                Some(task)
            }
            None => None,
        };
        let stats = self.pipeline.run(source, shutdown).await;
        if let Some(task) = http {
            task.abort();
        }
        if self.config.config.print_decisions {
            stats.print_summary(&self.sinks);
        }
        Ok(stats)
    }
}
