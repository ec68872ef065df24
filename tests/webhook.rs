//! The webhook sink against a real HTTP server the test runs on loopback (axum): body, headers, secrets,
//! `Idempotency-Key`, HMAC signature, retries of 5xx and timeouts, dead letters for 4xx.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Harness, redis_url};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use switchyard::app::service::Service;
use switchyard::config::LoadedConfig;

const TOKEN: &str = "tok-3c9f1e-never-printed";
const SIGNING_SECRET: &str = "whsec-7d1b0a-never-printed";

/// One request as the server saw it.
type Request = (HeaderMap, Bytes);

/// Every request, by path.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<HashMap<String, Vec<Request>>>>);

impl Received {
    fn on(&self, path: &str) -> Vec<Request> {
        self.0.lock().unwrap().get(path).cloned().unwrap_or_default()
    }
}

/// `/ok` answers 200; `/flaky` 503 then 200; `/slow` first stalls past the client timeout, then 200;
/// `/reject` 400; `/limited` 429 then 200.
async fn hook(
    State(received): State<Received>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let n = {
        let mut map = received.0.lock().unwrap();
        let calls = map.entry(path.clone()).or_default();
        calls.push((headers, body));
        calls.len()
    };
    match (path.as_str(), n) {
        ("flaky", 1) => StatusCode::SERVICE_UNAVAILABLE,
        ("limited", 1) => StatusCode::TOO_MANY_REQUESTS,
        ("reject", _) => StatusCode::BAD_REQUEST,
        ("slow", 1) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

async fn start_server() -> (String, Received) {
    let received = Received::default();
    let app = Router::new().route("/{path}", post(hook)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Lives as long as the test's runtime.
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), received)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn webhooks_post_signed_json_once_retry_transient_failures_and_dead_letter_rejections() {
    let h = Harness::new("webhook");
    let (base, received) = start_server().await;
    let rules = r#"
version: 1
routes:
  - name: notify-activation
    channel: orders
    when: became("Activation_Status__c", "Activating")
    then:
      - sink: hook-ok
        body: { orderId: "{{record_id}}", commit: "{{header.commit_timestamp}}", key: "{{idempotency_key}}",
                correlationId: "cdc-order-{{record_id}}" }
        headers: { X-Order-Id: "{{record_id}}" }
        idempotency_key: "hook-{{record_id}}-{{header.commit_timestamp}}"
      - sink: hook-flaky
        body: { orderId: "{{record_id}}" }
        idempotency_key: "flaky-{{record_id}}"
      - sink: hook-limited
        body: { orderId: "{{record_id}}" }
        idempotency_key: "limited-{{record_id}}"
      - sink: hook-slow
        body: { orderId: "{{record_id}}" }
        idempotency_key: "slow-{{record_id}}"
      - sink: hook-reject
        body: { orderId: "{{record_id}}" }
"#;
    let rules_path = h.dir.path().join("rules.yaml");
    std::fs::write(&rules_path, rules).unwrap();
    let id = h.order(1);
    let event = h.approval("approve", std::slice::from_ref(&id), Some("Approved"), json!({}));
    let commit = event["header"]["commit_timestamp"].clone();
    // Delivered twice: the done markers keep the second delivery from POSTing again.
    let events = h.write_events("events.jsonl", &[event.clone(), event]);
    let config = format!(
        "source: {{ kind: jsonl, jsonl: {{ path: {events} }} }}\nrules: [{rules}]\n\
         redis: {{ url: \"{url}\", key_prefix: \"{kp}\" }}\n\
         delivery: {{ concurrency: 1, retry: {{ initial_backoff_ms: 10, max_backoff_ms: 50, budget_ms: 30000 }} }}\n\
         sinks:\n\
         \x20 hook-ok: {{ kind: webhook, url: \"{base}/ok\", headers: {{ Authorization: \"Bearer ${{HOOK_TOKEN}}\" }}, signature: {{ secret: \"${{HOOK_SECRET}}\" }} }}\n\
         \x20 hook-flaky: {{ kind: webhook, url: \"{base}/flaky\" }}\n\
         \x20 hook-limited: {{ kind: webhook, url: \"{base}/limited\" }}\n\
         \x20 hook-slow: {{ kind: webhook, url: \"{base}/slow\", timeout_ms: 300 }}\n\
         \x20 hook-reject: {{ kind: webhook, url: \"{base}/reject\" }}\n",
        events = events.display(),
        rules = rules_path.display(),
        url = redis_url(),
        kp = h.key_prefix(),
    );
    let env = |name: &str| match name {
        "HOOK_TOKEN" => Some(TOKEN.to_string()),
        "HOOK_SECRET" => Some(SIGNING_SECRET.to_string()),
        _ => None,
    };
    let loaded = LoadedConfig::parse(&h.dir.path().join("config.yaml"), &config, &env).unwrap();
    assert!(
        !format!("{:?}", loaded.config).contains(TOKEN),
        "config Debug hides the header secret"
    );
    let service = Service::start(loaded, false).await.unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = service.run(shutdown).await.unwrap();
    assert_eq!(stats.events, 2);

    // The signed, authorised POST: once, although the event was delivered twice.
    let ok = received.on("ok");
    assert_eq!(ok.len(), 1, "one POST for two deliveries of the same event");
    let (headers, body) = &ok[0];
    let key = format!("hook-{id}-{commit}");
    let sent: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        sent,
        json!({"orderId": id, "commit": commit, "key": key, "correlationId": format!("cdc-order-{id}")})
    );
    assert_eq!(header(headers, "idempotency-key"), key);
    assert_eq!(header(headers, "authorization"), format!("Bearer {TOKEN}"));
    assert_eq!(header(headers, "x-order-id"), id);
    assert_eq!(header(headers, "content-type"), "application/json");
    let timestamp = header(headers, "x-switchyard-timestamp");
    assert!(timestamp.parse::<u64>().is_ok(), "{timestamp}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(header(headers, "x-switchyard-signature"), format!("sha256={expected}"));
    assert!(
        header(&received.on("flaky")[0].0, "x-switchyard-signature").is_empty(),
        "unsigned sinks send no signature"
    );

    // 503, 429 and a timeout are retried with the same Idempotency-Key, then succeed.
    for (path, key) in [("flaky", "flaky"), ("limited", "limited"), ("slow", "slow")] {
        let calls = received.on(path);
        assert_eq!(calls.len(), 2, "{path}: one failure, one success");
        for (headers, _) in &calls {
            assert_eq!(header(headers, "idempotency-key"), format!("{key}-{id}"));
        }
    }
    // 400 is permanent: one call, no retry, a dead letter saying why.
    assert_eq!(
        received.on("reject").len(),
        2,
        "one call per delivery (no key, so not deduplicated)"
    );
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["route"], "notify-activation");
        assert_eq!(letter["attempts"], 1);
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains("HTTP 400"), "{reason}");
    }

    let logs = h.logs.text();
    assert!(!logs.contains(TOKEN) && !logs.contains(SIGNING_SECRET), "{logs}");
    assert!(!letters.iter().any(|l| l.to_string().contains(TOKEN)));
}

#[test]
fn webhook_actions_are_checked_against_their_sink_kind_when_rules_load() {
    use switchyard::rules::load::{RuleEnv, RuleSource, compile};
    let config =
        "source: { kind: stdin }\nrules: [r.yaml]\nsinks:\n  hook: { kind: webhook, url: \"http://127.0.0.1:9/x\" }\n";
    let loaded = LoadedConfig::parse(std::path::Path::new("c.yaml"), config, &|_| None).unwrap();
    let env = RuleEnv::from_config(&loaded);
    let load = |actions: &str| {
        let text =
            format!("version: 1\nroutes:\n  - name: r\n    channel: orders\n    when: 'true'\n    then:\n{actions}");
        let out = compile(
            &[RuleSource {
                path: "r.yaml".into(),
                text,
            }],
            &env,
        );
        let problems: Vec<String> = out.problems.iter().map(ToString::to_string).collect();
        (out.ruleset.is_some(), problems.join("\n"))
    };
    let (ok, problems) = load(
        "      - sink: hook\n        body: { id: \"{{record_id}}\", n: \"{{event.Amount}}\" }\n        headers: { X-Id: \"{{record_id}}\" }\n        idempotency_key: \"k-{{record_id}}\"\n",
    );
    assert!(ok, "{problems}");
    let (ok, problems) = load("      - sink: hook\n        message: hi\n");
    assert!(!ok);
    assert!(problems.contains("does not take `message`"), "{problems}");
    assert!(problems.contains("needs `body`"), "{problems}");
    let (ok, problems) = load("      - sink: hook\n        body: { id: \"{{recordid}}\" }\n");
    assert!(!ok, "an unknown template root is a load error: {problems}");
}
