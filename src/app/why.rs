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
use crate::state::{Entry, JournalStore, RouteEntry, RouteOutcome};

/// One route's line: `provision-on-activating: fired` and, under it, its actions.
pub fn route_lines(rules: &RuleSet, entry: &Entry, route: &RouteEntry, letters: bool) -> Vec<String> {
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
            .filter(|_| letters)
        {
            lines.push(format!("      see `switchyard dead-letter show {id}`"));
        }
    }
    lines
}

/// The entry's heading: time, change, user, event, position, rules version.
pub fn heading(entry: &Entry) -> String {
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

/// The entry in words: the heading, then one line per route (for `id`'s record only, when it is a record id);
/// `letters`: the dead letters are in Redis, where `switchyard dead-letter show` reads them.
pub fn render(rules: &RuleSet, entry: &Entry, only_record: Option<&str>, letters: bool) -> String {
    let mut out = heading(entry);
    if entry.rules_version != rules.version {
        out.push_str(&format!(" (false clauses under the current rules {})", rules.version));
    }
    out.push('\n');
    if let Some(rejected) = &entry.rejected {
        out.push_str(&format!("  no route saw it: {rejected}\n"));
        if let Some(id) = rejected
            .strip_prefix("dead-lettered as ")
            .and_then(|r| r.split(' ').next())
            .filter(|_| letters)
        {
            out.push_str(&format!("    see `switchyard dead-letter show {id}`\n"));
        }
    }
    for route in entry
        .routes
        .iter()
        .filter(|r| only_record.is_none_or(|id| r.record_id.as_deref().is_none_or(|r| r == id)))
    {
        for line in route_lines(rules, entry, route, letters) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Where a CLI reads the journal: the Redis stream, or (a config without Redis keeps its journal in the running
/// process) that process's HTTP listener.
enum Reader<'a> {
    Store(&'a JournalStore),
    Listener { base: String, client: reqwest::Client },
}

fn reader(service: &Service) -> Result<Reader<'_>, AdminError> {
    let Some(journal) = &service.stores.journal else {
        return Err(AdminError::Usage(
            "this config has `journal: { enabled: false }`: no decisions are kept".into(),
        ));
    };
    if !matches!(*journal.store, JournalStore::Memory { .. }) {
        return Ok(Reader::Store(&journal.store));
    }
    let Some(http) = &service.config.config.http else {
        return Err(AdminError::Usage(
            "this config has no Redis and no `http.listen`: its journal lives only inside the running process, \
             which serves it to no one; add `http: { listen: \"127.0.0.1:9464\" }` (or a `redis:`) to the config"
                .into(),
        ));
    };
    // The listener asks for the token when it binds beyond loopback.
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &http.token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| AdminError::Usage("`http.token` holds a character a header cannot carry".into()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| AdminError::Usage(format!("cannot make an HTTP client: {e}")))?;
    Ok(Reader::Listener {
        base: listener_url(&http.listen),
        client,
    })
}

/// The URL a local client reaches a listener at: an unspecified address (`0.0.0.0`, `[::]`) is this machine's
/// loopback.
pub(crate) fn listener_url(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
        _ => format!("http://{listen}"),
    }
}

/// What a listener that did not answer as expected means for the person at the CLI.
fn unreachable(base: &str, service: &Service, e: impl std::fmt::Display) -> AdminError {
    AdminError::Usage(format!(
        "no switchyard answers at {base} ({e}): this config has no Redis, so its journal is read from the running \
         `switchyard run --config {}` over its HTTP listener",
        service.config.path.display()
    ))
}

/// A listener's answer that is not a success: its `error` (JSON) or its text.
async fn refusal(response: reqwest::Response) -> AdminError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let said = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(body);
    AdminError::Usage(format!("the service answered {status}: {}", said.trim()))
}

/// The entries for `id`, newest first, how many the journal trimmed, and whether they came from Redis.
async fn history(service: &Service, id: &str) -> Result<(Vec<Entry>, usize, bool), AdminError> {
    match reader(service)? {
        Reader::Store(store) => {
            let (entries, trimmed) = store.history(id).await?;
            Ok((entries, trimmed, true))
        }
        Reader::Listener { base, client } => {
            let response = client
                .get(format!("{base}/api/journal"))
                .query(&[("id", id), ("full", "true")])
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| unreachable(&base, service, e))?;
            if !response.status().is_success() {
                return Err(refusal(response).await);
            }
            let entries: Vec<Entry> = response
                .json()
                .await
                .map_err(|e| unreachable(&base, service, format!("an answer that is not the journal: {e}")))?;
            Ok((entries, 0, false))
        }
    }
}

/// `switchyard why ID`: the history of a record id, event id or idempotency key, newest first.
pub async fn why(service: &Service, id: &str, as_json: bool, out: &mut impl Write) -> Result<bool, AdminError> {
    let (entries, trimmed, in_redis) = history(service, id).await?;
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
        let _ = writeln!(out, "{}", render(&rules, entry, is_record.then_some(id), in_redis));
    }
    if trimmed > 0 {
        let _ = writeln!(
            out,
            "({trimmed} older decision(s) were trimmed from the journal by `journal.max_len`)"
        );
    }
    Ok(true)
}

/// What `switchyard tap` (and `/api/tap?route=…&outcome=…`) shows.
#[derive(Debug, Default, Clone, serde::Deserialize)]
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
        if entry.rejected.is_some() {
            // Input dead-lettered before routing: shown unless the filter asks for a route or another outcome.
            let shown = self.route.is_none() && self.outcome.as_deref().is_none_or(|o| o == "rejected");
            return shown.then(Vec::new);
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
    if let Some(rejected) = &entry.rejected {
        return format!(
            "{} {} {} rejected: {rejected}",
            crate::clock::utc(entry.at_ms),
            entry.event_id,
            entry.position
        );
    }
    format!(
        "{} {} {} {}",
        crate::clock::utc(entry.at_ms),
        entry.event_id,
        entry.record_ids.join(","),
        parts.join("  ")
    )
}

/// The line (or JSON) `tap` prints for an entry the filter keeps.
fn tap_output(entry: &Entry, filter: &TapFilter, as_json: bool) -> Option<String> {
    let routes = filter.keep(entry)?;
    Some(if as_json {
        let mut v = serde_json::to_value(entry).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.remove("event");
            obj.insert("routes".into(), serde_json::to_value(&routes).unwrap_or_default());
        }
        v.to_string()
    } else {
        tap_line(entry, &routes)
    })
}

/// Prints one line; false when the reader went away (a closed pipe).
fn print(out: &mut impl Write, line: &str) -> bool {
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// `switchyard tap`: follows the journal until `stop` resolves (Ctrl-C). Reads only: the service never waits for
/// a tap. A tap that reads slower than decisions are made loses the oldest (the stream's cap, or the listener's
/// buffer) and says how many it missed.
pub async fn tap(
    service: &Service,
    filter: &TapFilter,
    as_json: bool,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<bool, AdminError> {
    match reader(service)? {
        Reader::Store(store) => tap_stream(store, filter, as_json, out, stop).await,
        Reader::Listener { base, client } => {
            let query: Vec<(&str, &String)> = [
                ("route", &filter.route),
                ("channel", &filter.channel),
                ("outcome", &filter.outcome),
                ("record", &filter.record),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            .collect();
            let response = client
                .get(format!("{base}/api/tap"))
                .query(&query)
                .send()
                .await
                .map_err(|e| unreachable(&base, service, e))?;
            if !response.status().is_success() {
                return Err(refusal(response).await);
            }
            tap_events(response, filter, as_json, out, stop).await
        }
    }
}

/// `tap` over the Redis stream.
async fn tap_stream(
    store: &JournalStore,
    filter: &TapFilter,
    as_json: bool,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<bool, AdminError> {
    tokio::pin!(stop);
    let mut after = store.last_id().await?;
    let added_before = store.added().await?;
    let (mut shown, mut read_count) = (0u64, 0u64);
    loop {
        let read = store.read_after(&after, std::time::Duration::from_millis(500));
        let (cursor, entries) = tokio::select! {
            () = &mut stop => break,
            read = read => read?,
        };
        after = cursor;
        read_count += entries.len() as u64;
        for entry in &entries {
            let Some(line) = tap_output(entry, filter, as_json) else {
                continue;
            };
            shown += 1;
            if !print(out, &line) {
                return Ok(true);
            }
        }
    }
    // Every entry added since the tap started was read, is still waiting after the last one read, or was trimmed
    // (the stream's cap) before this tap got to it.
    let added = store.added().await?.saturating_sub(added_before);
    let waiting = store.count_after(&after).await?;
    let missed = added.saturating_sub(read_count + waiting);
    crate::errln!("tap: {shown} decision(s) shown; {missed} missed (trimmed before this tap read them)");
    Ok(true)
}

/// `tap` over the listener's server-sent events (`data:` an entry; `event: lagged` with how many it dropped).
async fn tap_events(
    mut response: reqwest::Response,
    filter: &TapFilter,
    as_json: bool,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<bool, AdminError> {
    tokio::pin!(stop);
    let (mut shown, mut missed) = (0u64, 0u64);
    let mut buf: Vec<u8> = Vec::new();
    let ended = loop {
        let chunk = tokio::select! {
            () = &mut stop => break None,
            chunk = response.chunk() => chunk,
        };
        match chunk {
            Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
            Ok(None) => break Some("the service closed the stream (it stopped)".to_string()),
            Err(e) => break Some(format!("the stream broke: {e}")),
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let (mut kind, mut data) = ("message", String::new());
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = if k.trim() == "lagged" { "lagged" } else { "other" };
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            match kind {
                "lagged" => missed += data.trim().parse::<u64>().unwrap_or(0),
                "message" if !data.is_empty() => {
                    let Ok(entry) = serde_json::from_str::<Entry>(&data) else {
                        continue;
                    };
                    let Some(line) = tap_output(&entry, filter, as_json) else {
                        continue;
                    };
                    shown += 1;
                    if !print(out, &line) {
                        return Ok(true);
                    }
                }
                _ => {}
            }
        }
    };
    crate::errln!(
        "tap: {shown} decision(s) shown; {missed} missed (the listener dropped them: this tap read slower than decisions were made)"
    );
    if let Some(why) = ended {
        crate::errln!("tap: {why}");
        return Ok(false);
    }
    Ok(true)
}
