//! The running service and the CLI's bodies: start-up (`service`), HTTP, reloads, admin commands, `record`.
//! The top of the crate: it imports every part, and nothing but `main.rs` imports it.

pub mod admin;
pub mod cli;
pub mod http;
pub mod lsp;
pub mod probe;
pub mod record;
pub mod reload;
pub mod service;
pub mod why;

use crate::config::Config;
use crate::rules::RuleSet;

/// The Pub/Sub channels to subscribe to: those with live routes in the configured mode, sorted; none when
/// `source.pubsub.enabled` is false (SF_EVENTS_ENABLED=false). Start-up and every config reload use this one list.
fn subscribed_channels(config: &Config, rules: &RuleSet) -> Vec<String> {
    if !config.pubsub().enabled {
        return Vec::new();
    }
    let mut live: Vec<String> = rules.live_channels().map(str::to_string).collect();
    live.sort();
    live
}
