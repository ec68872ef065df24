//! The operator console at `/ui`: server-rendered HTML (maud), its stylesheet and script embedded in the binary.
//!
//! Every page reads without JavaScript on a listener that serves reads without a token. The script adds what
//! needs it: the live tap (streamed from `/api/tap`), the buttons that change something (each a `POST` to the
//! `/api/` with the bearer token), and, on a listener whose reads need the token too, a sign-in that keeps the
//! token in the tab's `sessionStorage` and fetches pages with it (never in a URL, a cookie or a log).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::AppState;
use super::access::Access;
use super::api;
use crate::clock::utc;
use crate::state::{Entry, RouteOutcome};

const STYLE: &str = include_str!("ui/console.css");
const SCRIPT: &str = include_str!("ui/console.js");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/", get(overview))
        .route("/ui/decisions", get(decisions))
        .route("/ui/dead-letters", get(dead_letters))
        .route("/ui/rules", get(rules))
        .route("/ui/try", get(try_get).post(try_post))
        .route(
            "/ui/assets/console.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .route(
            "/ui/assets/console.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

/// Which page a layout is for (its tab is marked).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    Overview,
    Decisions,
    DeadLetters,
    Rules,
    Try,
}

const PAGES: [(Page, &str, &str); 5] = [
    (Page::Overview, "/ui", "Overview"),
    (Page::Decisions, "/ui/decisions", "Decisions"),
    (Page::DeadLetters, "/ui/dead-letters", "Dead letters"),
    (Page::Rules, "/ui/rules", "Rules"),
    (Page::Try, "/ui/try", "Try an event"),
];

/// The frame of every page: which instance it is, the tabs, and what the script needs to know.
fn layout(state: &AppState, access: &Access, page: Page, body: Markup) -> Response {
    let rules = state.reloader.rules.load();
    let title = PAGES.iter().find(|p| p.0 == page).map_or("", |p| p.2);
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · switchyard · " (state.instance) }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body data-page=(title) data-token-configured=(access.has_token()) data-reads-need-token=(access.reads_need_token()) {
                header {
                    div.brand {
                        strong { "switchyard" }
                        span.instance title="this instance" { (state.instance) }
                        span.meta {
                            "mode " b { (rules.mode.map_or("all", |m| m.as_str())) }
                            " · rules " b { (rules.version) }
                            " · role " b { (crate::obs::metrics::role()) }
                        }
                    }
                    nav {
                        @for (p, href, name) in PAGES {
                            a href=(href) class=[(p == page).then_some("current")] { (name) }
                        }
                    }
                    div #token {}
                }
                div #flash role="status" {}
                main { (body) }
                footer {
                    "switchyard " (env!("CARGO_PKG_VERSION")) " · "
                    @if access.has_token() { "changes need the token (http.token)" }
                    @else { "changes are off: the config has no http.token" }
                }
            }
        }
    };
    markup.into_response()
}

/// What a page served to a reader without the token, on a listener whose reads need it: the script asks for the
/// token once, keeps it in `sessionStorage`, and fetches the page again with it.
pub fn sign_in() -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · switchyard" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body data-shell="true" data-token-configured="true" data-reads-need-token="true" {
                header { div.brand { strong { "switchyard" } } div #token {} }
                div #flash role="status" {}
                main {
                    h1 { "This console needs the token" }
                    p { "This listener is reachable beyond loopback, so reading it needs the bearer token of "
                        code { "http.token" } ". The page keeps it in this tab's session storage only." }
                    noscript { p.error { "Without JavaScript, send it yourself: "
                        code { "curl -H 'Authorization: Bearer …' …/api/overview" } } }
                }
            }
        }
    };
    let mut response = (StatusCode::UNAUTHORIZED, markup).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"switchyard\""),
    );
    response
}

fn age(ms: u64) -> String {
    let now = crate::clock::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h {} min ago", s / 3600, s % 3600 / 60),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// A sparkline of fires per sample, newest on the right.
fn sparkline(values: &[u64]) -> Markup {
    let (w, h) = (120.0, 24.0);
    let values = match values {
        [] => return html! { span.muted { "sampling…" } },
        // One interval so far: a flat line at its count.
        [one] => &[*one, *one][..],
        more => more,
    };
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = w / (values.len() - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, h - 1.0 - (*v as f64 / max) * (h - 2.0)))
        .collect();
    html! {
        svg.spark width="120" height="24" viewBox="0 0 120 24" role="img"
            aria-label=(format!("fires per 10 s over the last {} min, at most {max}", values.len() / 6)) {
            polyline points=(points.join(" ")) {}
        }
    }
}

/// A button that POSTs `body` to `action` (the script runs it, with the token); disabled without a token.
fn post_button(access: &Access, label: &str, action: &str, body: &str, confirm: Option<&str>) -> Markup {
    html! {
        button.post type="button" data-action=(action) data-body=(body) data-confirm=[confirm]
            disabled[!access.has_token()] title=[(!access.has_token()).then_some("changes need http.token in the config")] {
            (label)
        }
    }
}

async fn overview(State(state): State<AppState>, Extension(access): Extension<Arc<Access>>) -> Response {
    let o = api::overview(&state).await;
    let body = html! {
        h1 { "Overview" }
        @if !o.errors.is_empty() {
            div.error { strong { "Not everything could be read:" } ul { @for e in &o.errors { li { (e) } } } }
        }
        dl.facts {
            dt { "Instance" } dd { (o.instance) " (" (o.role) ")" }
            dt { "Version" } dd { (o.version) }
            dt { "Mode" } dd { (o.mode.as_deref().unwrap_or("every route (no mode set)")) }
            dt { "Rules" } dd { (o.rules_version) ", loaded " (utc(o.rules_loaded_at_ms)) " (" (age(o.rules_loaded_at_ms)) ")" }
            dt { "Uptime" } dd { (duration(o.uptime_s)) }
            dt { "Dead letters" } dd { a href="/ui/dead-letters" {
                @match o.dead_letters { Some(n) => (n), None => "unknown" } } }
            dt { "Journal" } dd { @if o.journal { "on" } @else { "off (journal: { enabled: false })" } }
        }
        h2 { "Channels" }
        @if o.channels.is_empty() && o.positions.is_empty() {
            p.muted { "No Pub/Sub channel and no stored position yet." }
        }
        @if !o.channels.is_empty() {
            table #channels {
                thead { tr { th { "Channel" } th { "State" } th { "Position last moved" } } }
                tbody { @for c in &o.channels {
                    tr data-channel=(c.channel) {
                        td { code { (c.channel) } }
                        td { span class=(format!("state {}", c.state.split(':').next().unwrap_or(""))) { (c.state) } }
                        td { (format!("{:.0} s ago", c.last_event_age_s)) }
                    }
                } }
            }
        }
        @if !o.positions.is_empty() {
            table #positions {
                thead { tr { th { "Position key" } th { "Stored position" } th { "Lease" } } }
                tbody { @for p in &o.positions {
                    tr {
                        td { code { (p.key) } }
                        td { (p.position) }
                        td { @match (&p.lease_holder, p.lease_left_ms) {
                            (Some(who), Some(left)) => { (who) " (" (left / 1000) " s left)" }
                            _ => span.muted { "none" },
                        } }
                    }
                } }
            }
        }
        h2 { "Redis" }
        @if o.redis.is_empty() { p.muted { "No Redis: every store is in this process's memory." } }
        @else {
            table #redis {
                thead { tr { th { "Used by" } th { "URL" } th { "Health" } } }
                tbody { @for r in &o.redis {
                    tr {
                        td { (r.name) } td { code { (r.url) } }
                        td { @if r.ok { span.ok { "answers PING" } } @else { span.bad { "down: " (r.error.as_deref().unwrap_or("")) } } }
                    }
                } }
            }
        }
        h2 { "Routes" }
        table #routes {
            thead { tr {
                th { "Route" } th { "Channel" } th.num { "Fired" } th.num { "Not matched" } th.num { "Failed" }
                th.num { "Dead-lettered" } th.num { "Fires/min" } th { "Last 10 min" } th { "State" }
            } }
            tbody { @for r in &o.routes {
                tr data-route=(r.name) class=[r.paused.as_ref().map(|_| "paused")] {
                    td { a href=(format!("/ui/decisions?route={}", r.name)) { (r.name) } }
                    td { code { (r.channel) } }
                    td.num data-count="fired" { (r.counts.fired) }
                    td.num data-count="not-matched" { (r.not_matched) }
                    td.num data-count="failed" { (r.counts.failed) }
                    td.num data-count="dead-lettered" { (r.counts.dead_lettered) }
                    td.num { (format!("{:.1}", r.fires_per_min)) }
                    td { (sparkline(&r.spark)) }
                    td {
                        @if let Some(p) = &r.paused {
                            span.bad { "PAUSED" } " " span.muted { (p.reason) " (" (age(p.at_ms)) ", by " (p.by) ")" } " "
                            (post_button(&access, "Resume", &format!("/api/routes/{}/resume", r.name), "", None))
                        } @else if !r.live {
                            span.muted { "not live in this mode" }
                        } @else {
                            span.ok { "running" } " "
                            (post_button(&access, "Pause", &format!("/api/routes/{}/pause", r.name), "",
                                Some(&format!("Pause {}? Its actions are dead-lettered on every replica until resumed.", r.name))))
                        }
                    }
                }
            } }
        }
        @for (name, p) in &o.orphan_pauses {
            p.muted { "Paused, not in the current rules: " code { (name) } " — " (p.reason) " "
                (post_button(&access, "Resume", &format!("/api/routes/{name}/resume"), "", None)) }
        }
    };
    layout(&state, &access, Page::Overview, body)
}

#[derive(Deserialize, Default)]
struct DecisionsQuery {
    #[serde(default)]
    id: String,
    #[serde(default)]
    route: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    record: String,
}

fn outcome_class(o: &RouteOutcome) -> &'static str {
    match o {
        RouteOutcome::Fired => "ok",
        RouteOutcome::NotMatched | RouteOutcome::Skipped { .. } => "muted",
        RouteOutcome::GuardFailed => "warn",
        RouteOutcome::Paused { .. } | RouteOutcome::Failed { .. } => "bad",
    }
}

fn entry_markup(rules: &crate::rules::RuleSet, entry: &Entry, only_record: Option<&str>) -> Markup {
    let routes: Vec<_> = entry
        .routes
        .iter()
        .filter(|r| only_record.is_none_or(|id| r.record_id.as_deref().is_none_or(|r| r == id)))
        .collect();
    let json = crate::delivery::journal::to_json(rules, entry);
    html! {
        details.entry {
            summary {
                (crate::app::why::heading(entry))
                " " @for r in &routes {
                    span class=(format!("badge {}", outcome_class(&r.outcome))) title=(r.outcome.name()) {
                        (r.route) ": " (r.outcome.name())
                    } " "
                }
                @if let Some(rejected) = &entry.rejected { span.badge.bad { "rejected: " (rejected) } }
            }
            ul.lines {
                @for r in &routes {
                    @for line in crate::app::why::route_lines(rules, entry, r, true) { li { code { (line.strip_prefix("  ").unwrap_or(&line)) } } }
                }
            }
            details.raw { summary { "as JSON" } pre { (serde_json::to_string_pretty(&json).unwrap_or_default()) } }
        }
    }
}

async fn decisions(
    State(state): State<AppState>,
    Extension(access): Extension<Arc<Access>>,
    Query(q): Query<DecisionsQuery>,
) -> Response {
    let id = q.id.trim();
    let history = if id.is_empty() {
        None
    } else {
        Some(match &state.ops.stores.journal {
            Some(journal) => journal.store.history(id).await.map_err(|e| e.to_string()),
            None => Err("this config has `journal: { enabled: false }`: no decisions are kept".into()),
        })
    };
    let rules = state.reloader.rules.load_full();
    let only_record = history.as_ref().and_then(|h| h.as_ref().ok()).and_then(|(entries, _)| {
        entries
            .iter()
            .any(|e| e.record_ids.iter().any(|r| r == id))
            .then_some(id)
    });
    let body = html! {
        h1 { "Decisions" }
        form.search method="get" action="/ui/decisions" {
            label for="id" { "Why did this (not) fire?" }
            input #id type="search" name="id" value=(id) placeholder="record id, event id or idempotency key" autofocus;
            button type="submit" { "Search" }
        }
        @match &history {
            None => {}
            Some(Err(e)) => div.error { (e) },
            Some(Ok((entries, trimmed))) => {
                h2 { "History of " code { (id) } ", newest first" }
                @if entries.is_empty() {
                    p.muted #no-history { "No decision about " code { (id) } " in the journal's retention." }
                }
                @if *trimmed > 0 { p.muted { (trimmed) " older entries were trimmed from the stream." } }
                div #history { @for e in entries { (entry_markup(&rules, e, only_record)) } }
            }
        }
        h2 { "Live" }
        form #tap-filter.filters {
            input name="route" value=(q.route) placeholder="route";
            input name="channel" value=(q.channel) placeholder="channel";
            select name="outcome" {
                option value="" { "any outcome" }
                @for o in ["fired", "not-matched", "guard-failed", "skipped", "paused", "failed"] {
                    option value=(o) selected[q.outcome == o] { (o) }
                }
            }
            input name="record" value=(q.record) placeholder="record id";
            button type="submit" { "Filter" }
        }
        @if state.ops.stores.journal.is_none() {
            p.muted { "The journal is off: nothing to tap." }
        } @else {
            p.muted #tap-status { "Decisions of this process appear here as they are made." }
            noscript { p.muted { "The live view needs JavaScript; " code { "switchyard tap" } " shows the same." } }
            ol #tap.tap {}
        }
    };
    layout(&state, &access, Page::Decisions, body)
}

#[derive(Deserialize, Default)]
struct LettersQuery {
    #[serde(default)]
    route: String,
    #[serde(default)]
    id: String,
}

async fn dead_letters(
    State(state): State<AppState>,
    Extension(access): Extension<Arc<Access>>,
    Query(q): Query<LettersQuery>,
) -> Response {
    let route = Some(q.route.as_str()).filter(|r| !r.is_empty());
    let all = api::dead_letters(&state, None).await;
    let shown = q.id.trim();
    let letter = if shown.is_empty() {
        None
    } else {
        Some(api::dead_letter(&state, shown).await)
    };
    let body = html! {
        h1 { "Dead letters" }
        @if let Some(letter) = &letter {
            section #letter {
                h2 { "Dead letter " code { (shown) } }
                @match letter {
                    Ok(Some(v)) => {
                        p { (post_button(&access, "Retry", "/api/dead-letters/retry", &serde_json::json!({"ids": [shown]}).to_string(), None)) " "
                            (post_button(&access, "Purge", "/api/dead-letters/purge", &serde_json::json!({"ids": [shown]}).to_string(),
                                Some("Purge this dead letter? It cannot be retried afterwards."))) }
                        pre { (serde_json::to_string_pretty(v).unwrap_or_default()) }
                    }
                    Ok(None) => p.muted { "No dead letter " code { (shown) } " (retried or purged)." },
                    Err(e) => div.error { (e) },
                }
            }
        }
        @match &all {
            Err(e) => div.error { "The dead letters cannot be read: " (e) },
            Ok(all) => {
                @let mut by_route = std::collections::BTreeMap::<&str, usize>::new();
                @for l in all { @let _ = by_route.entry(l.route.as_deref().unwrap_or("-")).and_modify(|n| *n += 1).or_insert(1); }
                p.filters {
                    a href="/ui/dead-letters" class=[route.is_none().then_some("current")] { "all (" (all.len()) ")" }
                    @for (r, n) in &by_route {
                        " · " a href=(format!("/ui/dead-letters?route={r}")) class=[(route == Some(*r)).then_some("current")] { (r) " (" (n) ")" }
                    }
                }
                @let list: Vec<_> = all.iter().filter(|l| route.is_none() || l.route.as_deref() == route).collect();
                @if list.is_empty() {
                    p.muted #no-letters { "No dead letters" @if let Some(r) = route { " of " code { (r) } } "." }
                } @else {
                    @let selection = match route {
                        Some(r) => serde_json::json!({"route": r}).to_string(),
                        None => serde_json::json!({"all": true}).to_string(),
                    };
                    @let what = route.map_or("all".to_string(), |r| format!("all of {r}"));
                    p.bulk {
                        (post_button(&access, &format!("Retry {what} ({})", list.len()), "/api/dead-letters/retry", &selection, None)) " "
                        (post_button(&access, &format!("Purge {what} ({})", list.len()), "/api/dead-letters/purge", &selection,
                            Some(&format!("Purge {} dead letter(s)? They cannot be retried afterwards.", list.len()))))
                    }
                    table #letters {
                        thead { tr { th { "Id" } th { "Age" } th { "Route" } th { "Event" } th { "Record" } th { "Reason" } th.num { "Attempts" } th {} } }
                        tbody { @for l in &list {
                            tr data-letter=(l.id) {
                                td { a href=(format!("/ui/dead-letters?id={}", l.id)) { code { (l.id) } } }
                                td title=(utc(l.at_ms)) { (age(l.at_ms)) }
                                td { (l.route.as_deref().unwrap_or("-")) }
                                td { @if let Some(e) = &l.event_id { a href=(format!("/ui/decisions?id={e}")) { code { (e) } } } }
                                td { @if let Some(r) = &l.record_id { a href=(format!("/ui/decisions?id={r}")) { code { (r) } } } }
                                td.reason { (l.reason) }
                                td.num { (l.attempts) }
                                td { (post_button(&access, "Retry", "/api/dead-letters/retry", &serde_json::json!({"ids": [l.id]}).to_string(), None)) }
                            }
                        } }
                    }
                }
            }
        }
    };
    layout(&state, &access, Page::DeadLetters, body)
}

async fn rules(State(state): State<AppState>, Extension(access): Extension<Arc<Access>>) -> Response {
    let (version, specs) = api::route_specs(&state);
    let rules = state.reloader.rules.load_full();
    let history = state.reloader.history();
    let mut channels: Vec<&str> = specs.iter().map(|s| s.channel.as_str()).collect();
    channels.dedup();
    let loaded = state.reloader.loaded_at_ms();
    let body = html! {
        h1 { "Rules" }
        p { "Version " b { (version) } ", loaded " (utc(loaded)) " (" (age(loaded)) "). "
            (post_button(&access, "Reload now", "/api/reload", "", None)) }
        details { summary { (rules.files.len()) " files" }
            ul { @for f in &rules.files { li { code { (f.display()) } } } } }
        h2 { "Reloads" }
        @if history.is_empty() { p.muted #no-reloads { "No reload since start." } }
        @else {
            table #reloads {
                thead { tr { th { "When" } th { "Outcome" } th { "Version" } th { "What changed" } } }
                tbody { @for r in &history {
                    tr class=(if r.outcome.ok { "ok" } else { "refused" }) {
                        td title=(utc(r.at_ms)) { (age(r.at_ms)) }
                        td { @if !r.outcome.ok { span.bad { "refused" } } @else if r.outcome.swapped { span.ok { "applied" } } @else { "no change" } }
                        td { (r.outcome.old_version) @if let Some(n) = &r.outcome.new_version { @if *n != r.outcome.old_version { " → " (n) } } }
                        td {
                            @if !r.outcome.added.is_empty() { div { "added: " (r.outcome.added.join(", ")) } }
                            @if !r.outcome.removed.is_empty() { div { "removed: " (r.outcome.removed.join(", ")) } }
                            @if !r.outcome.changed.is_empty() { div { "changed: " (r.outcome.changed.join(", ")) } }
                            @for a in &r.outcome.applied { div { (a) } }
                            @for a in &r.outcome.restart_required { div.warn { (a) } }
                            @if !r.outcome.problems.is_empty() {
                                ul.problems { @for p in &r.outcome.problems { li { code { (p) } } } }
                            }
                        }
                    }
                } }
            }
        }
        @for channel in &channels {
            h2 { "Routes on " code { (channel) } }
            table.routes {
                thead { tr { th { "Route" } th { "When" } th { "Guard" } th { "Then" } th { "Else" } th { "Limit" } th { "Defined at" } } }
                tbody { @for s in specs.iter().filter(|s| s.channel == *channel) {
                    tr class=[(!s.live).then_some("muted")] {
                        td { b { (s.name) } @if !s.live { br; span.muted { "not live in this mode (" (s.mode) ")" } }
                            @if s.stop { br; span.muted { "stop" } } @if s.shadow { br; span.warn { "shadow" } } }
                        td { pre { (s.when) } }
                        td { @if let Some(g) = &s.guard { pre { (g) } } }
                        td { @for a in &s.then { div { code { (a) } } } }
                        td { @for a in &s.otherwise { div { code { (a) } } } }
                        td { (s.limit.as_deref().unwrap_or("none")) }
                        td { code { (s.at) } }
                    }
                } }
            }
        }
    };
    layout(&state, &access, Page::Rules, body)
}

#[derive(Deserialize, Default)]
struct TryQuery {
    /// A journal entry's id: its event fills the box.
    #[serde(default)]
    recent: String,
}

#[derive(Deserialize, Default)]
struct TryForm {
    #[serde(default)]
    event: String,
}

async fn try_get(
    State(state): State<AppState>,
    Extension(access): Extension<Arc<Access>>,
    Query(q): Query<TryQuery>,
) -> Response {
    let recent = api::recent(&state, 20).await.unwrap_or_default();
    let event = recent
        .iter()
        .find(|e| !q.recent.is_empty() && e.id.as_deref() == Some(q.recent.as_str()))
        .map(|e| serde_json::to_string_pretty(&e.event).unwrap_or_default())
        .unwrap_or_default();
    try_page(&state, &access, &event, None, &recent)
}

async fn try_post(
    State(state): State<AppState>,
    Extension(access): Extension<Arc<Access>>,
    axum::Form(form): axum::Form<TryForm>,
) -> Response {
    let recent = api::recent(&state, 20).await.unwrap_or_default();
    let result = api::explain(&state, &form.event).map(|x| crate::authoring::explain::to_text(&x));
    try_page(&state, &access, &form.event, Some(result), &recent)
}

fn try_page(
    state: &AppState,
    access: &Access,
    event: &str,
    result: Option<Result<String, String>>,
    recent: &[Entry],
) -> Response {
    let body = html! {
        h1 { "Try an event" }
        p.muted { "Paste an event (one JSON object, as a line of an events file) and see what every route would do \
                   under the rules in effect. Nothing runs: no job, no cache change, no journal entry." }
        form #try method="post" action="/ui/try" {
            textarea name="event" rows="14" spellcheck="false" placeholder="{\"id\": \"…\", \"channel\": \"/data/OrderChangeEvent\", \"header\": {…}, \"fields\": {…}}" { (event) }
            button type="submit" { "Explain" }
        }
        @match &result {
            None => {}
            Some(Ok(text)) => { h2 { "What the rules would do" } pre #explanation { (text) } }
            Some(Err(e)) => div.error #explanation { (e) },
        }
        @if !recent.is_empty() {
            h2 { "Recent events from the journal" }
            ul.recent { @for e in recent {
                @if let Some(id) = &e.id {
                    li { a href=(format!("/ui/try?recent={id}")) { (crate::app::why::heading(e)) } }
                }
            } }
        }
    };
    layout(state, access, Page::Try, body)
}
