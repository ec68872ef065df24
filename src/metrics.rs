//! Metrics through the `metrics` facade, exported for Prometheus; every name starts with `switchyard_`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const EVENTS: &str = "switchyard_events_total";
pub const EVENTS_MALFORMED: &str = "switchyard_events_malformed_total";
pub const EVENTS_UNMATCHED: &str = "switchyard_events_unmatched_total";
pub const ROUTE_MATCHED: &str = "switchyard_route_matched_total";
pub const ROUTE_FAILED: &str = "switchyard_route_failed_total";
pub const SINK_CALLS: &str = "switchyard_sink_calls_total";
pub const SINK_RETRIES: &str = "switchyard_sink_retries_total";
pub const SHADOW_ACTIONS: &str = "switchyard_shadow_actions_total";
pub const DEAD_LETTERS: &str = "switchyard_dead_letters_total";
pub const RULES_VERSION: &str = "switchyard_rules_version_info";
pub const RULES_RELOADS: &str = "switchyard_rules_reload_total";
pub const IDEMPOTENT_SKIPS: &str = "switchyard_idempotent_skips_total";
pub const EVENTS_SETTLED: &str = "switchyard_events_settled_total";
pub const EVENTS_IN_FLIGHT: &str = "switchyard_events_in_flight";
pub const CHECKPOINT_COMMITS: &str = "switchyard_checkpoint_commits_total";
pub const CHECKPOINT_ERRORS: &str = "switchyard_checkpoint_errors_total";
pub const AUTH_TOKENS: &str = "switchyard_auth_token_requests_total";
pub const ENRICH_CALLS: &str = "switchyard_enrich_calls_total";
pub const ENRICH_CALLS_PER_EVENT: &str = "switchyard_enrich_calls_per_event";
pub const ENRICH_SECONDS: &str = "switchyard_enrich_duration_seconds";
pub const SOURCE_RECONNECTS: &str = "switchyard_source_reconnects_total";
pub const SOURCE_KEEPALIVES: &str = "switchyard_source_keepalives_total";
pub const SOURCE_OUTSTANDING: &str = "switchyard_source_outstanding";
pub const SOURCE_ERRORS: &str = "switchyard_source_errors_total";
pub const SOURCE_STOPPED: &str = "switchyard_source_channel_stopped";
pub const SOURCE_REPLAY_FALLBACKS: &str = "switchyard_source_replay_fallbacks_total";
pub const POSITION_AGE: &str = "switchyard_position_age_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // A recorder installed by someone else (a test harness) keeps working; ours then stays empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
