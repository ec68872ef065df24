//! Metrics through the `metrics` facade, exported for Prometheus; every name starts with `switchyard_`.
//!
//! The source's own metrics (`switchyard_source_*`, `switchyard_position_age_seconds`), the REST enricher's
//! (`switchyard_enrich_*`) and the OAuth client's (`switchyard_auth_*`) are recorded where those live.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const EVENTS: &str = "switchyard_events_total";
pub const EVENTS_SETTLED: &str = "switchyard_events_settled_total";
pub const EVENTS_MALFORMED: &str = "switchyard_events_malformed_total";
pub const EVENTS_UNMATCHED: &str = "switchyard_events_unmatched_total";
pub const EVENTS_IN_FLIGHT: &str = "switchyard_events_in_flight";
pub const ROUTE_EVALUATED: &str = "switchyard_route_evaluated_total";
pub const ROUTE_MATCHED: &str = "switchyard_route_matched_total";
pub const ROUTE_FIRED: &str = "switchyard_route_fired_total";
pub const ROUTE_SHADOW: &str = "switchyard_route_shadow_total";
pub const ROUTE_FAILED: &str = "switchyard_route_failed_total";
pub const ROUTE_PAUSED: &str = "switchyard_route_paused";
pub const JOURNAL_DROPPED: &str = "switchyard_journal_dropped_total";
pub const SINK_CALLS: &str = "switchyard_sink_calls_total";
pub const SINK_ERRORS: &str = "switchyard_sink_errors_total";
pub const SINK_RETRIES: &str = "switchyard_sink_retries_total";
pub const SINK_DURATION: &str = "switchyard_sink_duration_seconds";
pub const SHADOW_ACTIONS: &str = "switchyard_shadow_actions_total";
pub const DEAD_LETTERS: &str = "switchyard_dead_letters_total";
pub const IDEMPOTENT_SKIPS: &str = "switchyard_idempotent_skips_total";
pub const IDEMPOTENCY_WRITES: &str = "switchyard_idempotency_writes_total";
pub const IDEMPOTENCY_CALLS: &str = "switchyard_idempotency_calls_total";
pub const RULES_VERSION: &str = "switchyard_rules_version_info";
pub const RULES_RELOADS: &str = "switchyard_rules_reload_total";
pub const CHECKPOINT_COMMITS: &str = "switchyard_checkpoint_commits_total";
pub const CHECKPOINT_ERRORS: &str = "switchyard_checkpoint_errors_total";
pub const CHECKPOINT_FENCED: &str = "switchyard_checkpoint_fenced_total";
pub const LEASE_CHANGES: &str = "switchyard_lease_changes_total";
pub const AUTH_TOKENS: &str = "switchyard_auth_token_requests_total";
pub const ENRICH_CALLS: &str = "switchyard_enrich_calls_total";
pub const ENRICH_CALLS_PER_EVENT: &str = "switchyard_enrich_calls_per_event";
pub const ENRICH_SECONDS: &str = "switchyard_enrich_duration_seconds";
pub const SOURCE_RECONNECTS: &str = "switchyard_source_reconnects_total";
pub const SOURCE_KEEPALIVES: &str = "switchyard_source_keepalives_total";
pub const SOURCE_MANAGED_COMMITS: &str = "switchyard_source_managed_commits_total";
pub const SOURCE_OUTSTANDING: &str = "switchyard_source_outstanding";
pub const SOURCE_ERRORS: &str = "switchyard_source_errors_total";
pub const SOURCE_STOPPED: &str = "switchyard_source_channel_stopped";
pub const SOURCE_REPLAY_FALLBACKS: &str = "switchyard_source_replay_fallbacks_total";
pub const POSITION_AGE: &str = "switchyard_position_age_seconds";
pub const ROLE: &str = "switchyard_role_info";
pub const READY: &str = "switchyard_ready";
pub const REDIS_UP: &str = "switchyard_redis_up";

/// Latency buckets in seconds (sink calls, REST reads): a Redis call takes about a millisecond, a webhook or a
/// Salesforce read up to its timeout.
const SINK_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".to_string()), SINK_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // A recorder installed by someone else (a test harness) keeps working; ours then stays empty.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            handle
        })
        .clone()
}

/// The HELP lines of the scrape.
fn describe() {
    describe_counter!(EVENTS, "Events received, per channel.");
    describe_counter!(
        EVENTS_SETTLED,
        "Events settled (every action done, skipped as done, or dead-lettered), per channel."
    );
    describe_counter!(EVENTS_MALFORMED, "Input that was not an event (dead-lettered).");
    describe_counter!(
        SOURCE_MANAGED_COMMITS,
        "Commits of settled positions to a managed subscription, per channel and result (ok, refused)."
    );
    describe_counter!(EVENTS_UNMATCHED, "Events no route's `when` matched, per channel.");
    describe_gauge!(EVENTS_IN_FLIGHT, "Events read and not yet settled.");
    describe_gauge!(
        ROUTE_PAUSED,
        "1 while the route is paused by its runaway guard (or by hand): its actions are dead-lettered."
    );
    describe_counter!(
        JOURNAL_DROPPED,
        "Decision journal entries dropped (the writer fell behind or its Redis was away); delivery is unaffected."
    );
    describe_counter!(ROUTE_EVALUATED, "Times a route's `when` was evaluated (per record).");
    describe_counter!(ROUTE_MATCHED, "Times a route's `when` held (per record).");
    describe_counter!(
        ROUTE_FIRED,
        "Times a route's `then` ran (per record; shadow routes excluded)."
    );
    describe_counter!(
        ROUTE_SHADOW,
        "Times a shadow route would have run its `then` (no sink called)."
    );
    describe_counter!(
        ROUTE_FAILED,
        "Times a route failed (predicate, enrichment or template error)."
    );
    describe_counter!(SINK_CALLS, "Sink calls, per sink and result (ok, error).");
    describe_counter!(
        SINK_ERRORS,
        "Failed sink calls, per sink and kind (transient, permanent)."
    );
    describe_counter!(SINK_RETRIES, "Sink calls retried after a transient error.");
    describe_histogram!(SINK_DURATION, Unit::Seconds, "Duration of one sink call.");
    describe_counter!(SHADOW_ACTIONS, "Actions of shadow routes (recorded, not sent).");
    describe_counter!(
        DEAD_LETTERS,
        "Dead letters written, per route (empty: not one route's)."
    );
    describe_counter!(
        IDEMPOTENT_SKIPS,
        "Actions skipped because their idempotency key was done."
    );
    describe_counter!(
        IDEMPOTENCY_WRITES,
        "Idempotency claims and done markers written to Redis."
    );
    describe_counter!(
        IDEMPOTENCY_CALLS,
        "Redis calls that carried them: concurrent writes go in one call (writes / calls = batch size)."
    );
    describe_gauge!(RULES_VERSION, "1 for the rules version in force.");
    describe_counter!(RULES_RELOADS, "Rule reloads, per result (ok, unchanged, error).");
    describe_counter!(CHECKPOINT_COMMITS, "Source positions stored.");
    describe_counter!(
        CHECKPOINT_ERRORS,
        "Source positions that could not be stored (retried)."
    );
    describe_counter!(
        CHECKPOINT_FENCED,
        "Position writes refused because another replica took the channel's lease."
    );
    describe_counter!(
        LEASE_CHANGES,
        "Channel leases taken, lost and released by this replica, by channel and event."
    );
    describe_gauge!(ROLE, "1 for this replica's role (active, standby).");
    describe_gauge!(READY, "1 when the last /readyz check passed.");
    describe_gauge!(REDIS_UP, "1 when the Redis server answered the last /readyz PING.");
}

/// Whether this replica holds a channel lease (or runs without leases): its role is then `active`, else `standby`.
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// This replica's role: `active` or `standby`.
pub fn role() -> &'static str {
    if ACTIVE.load(std::sync::atomic::Ordering::Relaxed) {
        "active"
    } else {
        "standby"
    }
}

/// Records this replica's role (`active` or `standby`) for `/healthz`, `/readyz` and `switchyard_role_info`.
pub fn set_role(role: &str) {
    let active = role == "active";
    ACTIVE.store(active, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(ROLE, "role" => "active").set(if active { 1.0 } else { 0.0 });
    metrics::gauge!(ROLE, "role" => "standby").set(if active { 0.0 } else { 1.0 });
}
