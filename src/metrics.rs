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
