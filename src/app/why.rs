//! `switchyard why ID` and `switchyard tap`: the decision journal read back in words a person reads.
//!
//! The journal stores what happened; the clause that was false is worked out at read time
//! ([`crate::delivery::journal::false_clause`]), so that the service's path pays nothing for it.

use std::io::Write;

use serde_json::Value;

use crate::app::admin::AdminError;
use crate::app::service::Service;
use crate::delivery::journal::{false_clause, to_json};
use crate::rules::RuleSet;
use crate::state::{Entry, RouteEntry, RouteOutcome};

/// One route's line: `provision-on-activating: fired` and, under it, its actions.
fn route_lines(rules: &RuleSet, entry: &Entry, route: &RouteEntry) -> Vec<String> {
    let record = route
        .record_id
        .as_ref()
        .filter(|_| entry.record_ids.len() > 1)
        .map(|id| format!(" [{id}]"))
        .unwrap_or_default();
    let what = match &route.outcome {
        RouteOutcome::Fired => "fired".to_string(),
        RouteOutcome::GuardFailed => format!(
            "guard failed: {}",
            false_clause(rules, entry, route).unwrap_or_else(|| "its guard was false".into())
        ),
        RouteOutcome::NotMatched => format!(
            "not matched: {}",
            false_clause(rules, entry, route).unwrap_or_else(|| "its `when` was false".into())
        ),
        RouteOutcome::Skipped { by } => format!("skipped: `{by}` fired first and has `stop: true`"),
        RouteOutcome::Paused { reason } => format!("PAUSED: {reason}"),
        RouteOutcome::Failed { reason } => format!("FAILED: {reason}"),
    };
    let mut lines = vec![format!("  {}{record}: {what}", route.route)];
    for a in &route.actions {
        let key = a
            .idempotency_key
            .as_ref()
            .filter(|k| !a.summary.contains(k.as_str()))
            .map(|k| format!(" (key {k})"))
            .unwrap_or_default();
        lines.push(format!("    {}: {}{key}: {}", a.sink, a.summary, a.result));
        if let Some(id) = a
            .result
            .strip_prefix("dead-lettered as ")
            .and_then(|r| r.split(':').next())
        {
            lines.push(format!("      see `switchyard dead-letter show {id}`"));
        }
    }
    lines
}

/// The entry's heading: time, change, user, event, position, rules version.
fn heading(entry: &Entry) -> String {
    let change = entry.change_type.as_deref().unwrap_or("event");
    let by = entry
        .commit_user
        .as_ref()
        .map(|u| format!(" by {u}"))
        .unwrap_or_default();
    format!(
        "{} {change}{by} on {}: event {} at {}, rules {}",
        crate::clock::utc(entry.at_ms),
        entry.channel,
        entry.event_id,
        entry.position,
        entry.rules_version
    )
}

/// The entry in words: the heading, then one line per route (for `id`'s record only, when it is a record id).
pub fn render(rules: &RuleSet, entry: &Entry, only_record: Option<&str>) -> String {
    let mut out = heading(entry);
    if entry.rules_version != rules.version {
        out.push_str(&format!(" (false clauses under the current rules {})", rules.version));
    }
    out.push('\n');
    for route in entry
        .routes
        .iter()
        .filter(|r| only_record.is_none_or(|id| r.record_id.as_deref().is_none_or(|r| r == id)))
    {
        for line in route_lines(rules, entry, route) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// `switchyard why ID`: the history of a record id, event id or idempotency key, newest first.
pub async fn why(service: &Service, id: &str, as_json: bool, out: &mut impl Write) -> Result<bool, AdminError> {
    let Some(journal) = &service.stores.journal else {
        return Err(AdminError::Usage(
            "this config has `journal: { enabled: false }`: no decisions are kept".into(),
        ));
    };
    if matches!(*journal.store, crate::state::JournalStore::Memory { .. }) {
        return Err(AdminError::Usage(
            "this config has no Redis: its journal lives in the running process; ask it over its HTTP listener: \
             curl 'http://LISTEN/api/journal?id=ID'"
                .into(),
        ));
    }
    let (entries, trimmed) = journal.store.history(id).await?;
    let rules = service.rules.load_full();
    if as_json {
        let list: Vec<Value> = entries.iter().map(|e| to_json(&rules, e)).collect();
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&list).unwrap_or_default());
        return Ok(!entries.is_empty());
    }
    if entries.is_empty() {
        let _ = writeln!(
            out,
            "{id}: no decision in the journal (not a record id, event id or idempotency key seen within the retention)"
        );
        return Ok(false);
    }
    let is_record = entries.iter().any(|e| e.record_ids.iter().any(|r| r == id));
    let _ = writeln!(out, "{id}: {} decision(s), newest first\n", entries.len());
    for entry in &entries {
        let _ = writeln!(out, "{}", render(&rules, entry, is_record.then_some(id)));
    }
    if trimmed > 0 {
        let _ = writeln!(
            out,
            "({trimmed} older decision(s) were trimmed from the journal by `journal.max_len`)"
        );
    }
    Ok(true)
}

/// What `switchyard tap` shows.
#[derive(Debug, Default, Clone)]
pub struct TapFilter {
    pub route: Option<String>,
    pub channel: Option<String>,
    pub outcome: Option<String>,
    pub record: Option<String>,
}

impl TapFilter {
    /// The entry's routes this filter keeps (None: the entry is not shown).
    pub fn keep<'a>(&self, entry: &'a Entry) -> Option<Vec<&'a RouteEntry>> {
        if self
            .channel
            .as_ref()
            .is_some_and(|c| !entry.channel.ends_with(c.as_str()))
        {
            return None;
        }
        if self.record.as_ref().is_some_and(|r| !entry.record_ids.contains(r)) {
            return None;
        }
        let routes: Vec<&RouteEntry> = entry
            .routes
            .iter()
            .filter(|r| self.route.as_ref().is_none_or(|n| &r.route == n))
            .filter(|r| self.outcome.as_ref().is_none_or(|o| r.outcome.name() == o))
            .collect();
        (!routes.is_empty()).then_some(routes)
    }
}

/// One tap line: time, event, record, and each kept route's outcome with its actions' results.
pub fn tap_line(entry: &Entry, routes: &[&RouteEntry]) -> String {
    let parts: Vec<String> = routes
        .iter()
        .map(|r| {
            let results: Vec<&str> = r.actions.iter().map(|a| a.result.as_str()).collect();
            let record = r
                .record_id
                .as_deref()
                .filter(|_| entry.record_ids.len() > 1)
                .map(|id| format!("[{id}]"))
                .unwrap_or_default();
            if results.is_empty() {
                format!("{}{record}={}", r.route, r.outcome.name())
            } else {
                format!("{}{record}={} ({})", r.route, r.outcome.name(), results.join("; "))
            }
        })
        .collect();
    format!(
        "{} {} {} {}",
        crate::clock::utc(entry.at_ms),
        entry.event_id,
        entry.record_ids.join(","),
        parts.join("  ")
    )
}

/// `switchyard tap`: follows the journal stream until `stop` resolves (Ctrl-C). Reads only: the service never
/// waits for a tap, and a tap that reads slower than decisions are made loses the oldest (the stream's cap) and
/// says how many it missed.
pub async fn tap(
    service: &Service,
    filter: &TapFilter,
    as_json: bool,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<bool, AdminError> {
    let Some(journal) = &service.stores.journal else {
        return Err(AdminError::Usage(
            "this config has `journal: { enabled: false }`".into(),
        ));
    };
    if matches!(*journal.store, crate::state::JournalStore::Memory { .. }) {
        return Err(AdminError::Usage(
            "this config has no Redis: tap the running process over its HTTP listener: curl -N 'http://LISTEN/api/tap'"
                .into(),
        ));
    }
    tokio::pin!(stop);
    let mut after = journal.store.last_id().await?;
    let added_before = journal.store.added().await?;
    let (mut shown, mut read_count) = (0u64, 0u64);
    loop {
        let read = journal.store.read_after(&after, std::time::Duration::from_millis(500));
        let entries = tokio::select! {
            () = &mut stop => break,
            read = read => read?,
        };
        read_count += entries.len() as u64;
        for entry in &entries {
            if let Some(id) = &entry.id {
                after = id.clone();
            }
            let Some(routes) = filter.keep(entry) else {
                continue;
            };
            shown += 1;
            let line = if as_json {
                let mut v = serde_json::to_value(entry).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.remove("event");
                    obj.insert("routes".into(), serde_json::to_value(&routes).unwrap_or_default());
                }
                v.to_string()
            } else {
                tap_line(entry, &routes)
            };
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                // The reader went away (a closed pipe): stop quietly.
                return Ok(true);
            }
        }
    }
    // Every entry added since the tap started was read, is still waiting after the last one read, or was trimmed
    // (the stream's cap) before this tap got to it.
    let added = journal.store.added().await?.saturating_sub(added_before);
    let waiting = journal.store.count_after(&after).await?;
    let missed = added.saturating_sub(read_count + waiting);
    crate::errln!("tap: {shown} decision(s) shown; {missed} missed (trimmed before this tap read them)");
    Ok(true)
}
