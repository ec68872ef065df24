//! Pipeline behaviour beyond the order checklist: shadow routes, failing predicates, cache patterns and
//! publish, unmatched policy, the HTTP listener. Real Redis, each test on its own prefixes.

mod common;

use common::{Harness, records};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn shadow_route_records_its_actions_and_calls_no_sink() {
    let h = Harness::new("shadow");
    let rules = r#"
version: 1
routes:
  - name: provision-shadow
    channel: orders
    shadow: true
    when: became("Activation_Status__c", "Activating")
    then:
      - sink: enqueue-provisioning
        job: { sfOrderId: "{{record_id}}" }
        idempotency_key: "shadow-{{record_id}}"
"#;
    let id = h.order(1);
    let stats = h
        .run_rules(
            rules,
            &[h.approval("a", std::slice::from_ref(&id), None, json!({}))],
            "",
        )
        .await;
    assert_eq!(stats.shadow, 1);
    assert!(h.jobs().await.is_empty(), "a shadow route never enqueues");
    assert!(
        h.logs.text().contains("Shadow route action recorded"),
        "{}",
        h.logs.text()
    );
}

#[tokio::test]
async fn a_predicate_that_fails_at_run_time_dead_letters_that_route_only() {
    let h = Harness::new("runtime_error");
    let rules = r#"
version: 1
routes:
  - name: broken
    channel: orders
    when: event.Status.len() > 3 && changed(42)
    then:
      - sink: log
        message: never
  - name: provision
    channel: orders
    when: became("Activation_Status__c", "Activating")
    then:
      - sink: enqueue-provisioning
        job: { sfOrderId: "{{record_id}}" }
        idempotency_key: "k-{{record_id}}"
"#;
    let id = h.order(1);
    let stats = h
        .run_rules(
            rules,
            &[h.approval("a", std::slice::from_ref(&id), Some("Approved"), json!({}))],
            "",
        )
        .await;
    assert_eq!(h.jobs().await.len(), 1, "the other route still fires");
    assert_eq!(stats.dead_letters, 1);
    let letters = h.dead_letters().await;
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("route `broken` failed") && reason.contains("changed (i64)"),
        "{reason}"
    );
    assert_eq!(letters[0]["route"], "broken");
    assert_eq!(letters[0]["record_id"], json!(id));
    assert!(letters[0]["rules_version"].as_str().is_some_and(|v| v.len() == 12));
    assert_eq!(letters[0]["event"]["id"], h.approval("a", &[id], None, json!({}))["id"]);
}

#[tokio::test]
async fn a_predicate_that_is_not_boolean_fails_the_route_with_a_clear_reason() {
    let h = Harness::new("non_boolean");
    // A method's result, which only running it shows is a string (a bare `event.Status` is refused at load).
    let rules = "version: 1\nroutes:\n  - name: status-only\n    channel: orders\n    when: event.Status.to_string()\n    then:\n      - sink: log\n        message: x\n";
    h.run_rules(
        rules,
        &[h.approval("a", &[h.order(1)], Some("Approved"), json!({}))],
        "",
    )
    .await;
    let letters = h.dead_letters().await;
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("the predicate returned a string, not true or false"),
        "{letters:?}"
    );
}

#[tokio::test]
async fn enrichment_missing_from_the_recording_dead_letters_the_route() {
    let h = Harness::new("missing_enrichment");
    let id = h.order(1);
    // The recorded event carries no `record` entry for the order: the route cannot decide, so it fails
    // loudly instead of guessing "not found".
    h.run(&[h.approval("a", std::slice::from_ref(&id), Some("Approved"), json!({}))])
        .await;
    assert!(h.jobs().await.is_empty());
    let letters = h.dead_letters().await;
    assert!(!letters.is_empty());
    assert!(
        letters
            .iter()
            .all(|l| l["reason"].as_str().unwrap().contains("no recorded `record` entry")),
        "{letters:?}"
    );
}

#[tokio::test]
async fn cache_patterns_are_scanned_and_a_message_is_published() {
    let h = Harness::new("patterns");
    let id = h.order(1);
    let rules = r#"
version: 1
routes:
  - name: invalidate
    channel: orders
    when: changed("Status")
    then:
      - sink: invalidate-cache
        keys: ["orders:detail:{{record_id}}", "orders:missing:{{event.Nope}}"]
        patterns: ["orders:list:{{record_id}}:*"]
        publish: { channel: "orders:invalidated:{{record_id}}", message: "{{record_id}}" }
"#;
    for key in ["detail", "list"] {
        for page in 0..3 {
            h.set_key(&format!("orders:{key}:{id}:{page}")).await;
        }
    }
    h.set_key(&format!("orders:detail:{id}")).await;
    let keep = format!("orders:list:{id}x:0");
    h.set_key(&keep).await;

    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(format!("orders:invalidated:{id}")).await.unwrap();

    h.run_rules(
        rules,
        &[h.change(
            "s",
            std::slice::from_ref(&id),
            &["Status"],
            json!({"Status": "Completed"}),
            json!({}),
        )],
        "",
    )
    .await;
    assert!(!h.key_exists(&format!("orders:detail:{id}")).await);
    for page in 0..3 {
        assert!(!h.key_exists(&format!("orders:list:{id}:{page}")).await);
        assert!(
            h.key_exists(&format!("orders:detail:{id}:{page}")).await,
            "only the pattern's keys go"
        );
    }
    assert!(h.key_exists(&keep).await);
    let message = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use futures_util::StreamExt;
        pubsub.on_message().next().await.unwrap()
    })
    .await
    .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), id);
    assert!(
        h.logs.text().contains("Cache key skipped"),
        "a key with a missing part is skipped and logged at debug"
    );
}

#[tokio::test]
async fn unmatched_events_can_be_dead_lettered() {
    let h = Harness::new("unmatched");
    let event = h.change("x", &[h.order(1)], &["LastModifiedDate"], json!({}), json!({}));
    let stats = h.run_with(&[event], "on_unmatched: dead-letter\n").await;
    assert_eq!(stats.unmatched, 1);
    assert_eq!(
        h.dead_letters().await[0]["reason"],
        "no route matched the event (on_unmatched: dead-letter)"
    );
}

async fn http_get(addr: &str, path: &str) -> String {
    http_request(addr, "GET", path, "").await
}

/// `headers`: more header lines, each ending in CRLF.
async fn http_request(addr: &str, method: &str, path: &str, headers: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn healthz_and_metrics_are_served_while_running() {
    let h = Harness::new("http");
    // A followed file never ends, so the service keeps running while we scrape it.
    let id = h.order(1);
    let events = h.write_events(
        "events.jsonl",
        &[h.approval("a", std::slice::from_ref(&id), None, records(&[h.record(1, None)]))],
    );
    let (port, text) = h.followed_with_http(&events);
    let listen = format!("listen: \"127.0.0.1:{port}\"");
    let text = text.replace(&listen, &format!("{listen}, token: \"${{HTTP_TOKEN}}\""));
    let env = |name: &str| (name == "HTTP_TOKEN").then(|| "pipeline-token-0123456789".to_string());
    let loaded = switchyard::config::LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &env).unwrap();
    switchyard::obs::metrics::install();
    let service = switchyard::app::service::Service::start(loaded, false).await.unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { service.run(shutdown).await.map(|s| s.events) });
    let addr = format!("127.0.0.1:{port}");
    let mut metrics = String::new();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            continue;
        }
        metrics = http_get(&addr, "/metrics").await;
        if metrics.contains("switchyard_sink_calls_total") {
            break;
        }
    }
    let health = http_get(&addr, "/healthz").await;
    assert!(
        health.contains("\"status\":\"ok\"") && health.contains("\"rules_version\""),
        "{health}"
    );
    assert!(
        metrics.contains("switchyard_events_total{channel=\"/data/OrderChangeEvent\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_sink_calls_total{sink=\"enqueue-provisioning\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_route_matched_total{route=\"provision-on-activating\"}"),
        "{metrics}"
    );
    let rules = http_get(&addr, "/rules").await;
    assert!(
        rules.contains("\"name\":\"provision-on-activating\"") && rules.contains("\"fired\":1"),
        "{rules}"
    );
    // Every shipped predicate evaluates natively.
    assert!(
        rules.contains("\"native\":{\"when\":true,\"guard\":true}")
            && !rules.contains("\"when\":false")
            && !rules.contains("\"guard\":false"),
        "{rules}"
    );
    // A change needs the token: without it (or with another) nothing reloads.
    let refused = http_request(&addr, "POST", "/reload", "").await;
    assert!(
        refused.starts_with("HTTP/1.1 401") && refused.to_ascii_lowercase().contains("www-authenticate: bearer"),
        "{refused}"
    );
    let wrong = http_request(
        &addr,
        "POST",
        "/reload",
        "Authorization: Bearer pipeline-token-012345678X\r\n",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let reload = http_request(
        &addr,
        "POST",
        "/reload",
        "Authorization: Bearer pipeline-token-0123456789\r\n",
    )
    .await;
    assert!(
        reload.starts_with("HTTP/1.1 200") && reload.contains("\"ok\":true"),
        "{reload}"
    );
    stop.send(true).unwrap();
    let events = tokio::time::timeout(std::time::Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(events, 1);
    assert_eq!(h.jobs().await.len(), 1);
}

#[tokio::test]
async fn redacted_fields_never_reach_dead_letters_or_log_lines() {
    let h = Harness::new("redaction");
    let rules = r#"
version: 1
routes:
  - name: log-it
    channel: orders
    when: changed("BillingAddress")
    then:
      - sink: log
        message: address changed
        fields: { street: "{{event.BillingAddress.Street}}", BillingAddress: "{{event.BillingAddress.Street}}" }
      - sink: dead-letter
        reason: parked for review
"#;
    let event = h.change(
        "addr",
        &[h.order(1)],
        &["BillingAddress.Street"],
        json!({"BillingAddress": {"Street": "1 Secret Lane"}}),
        json!({}),
    );
    h.run_rules(rules, &[event], "redact: [BillingAddress, street]\n").await;
    let letters = h.dead_letters().await;
    assert_eq!(letters[0]["event"]["fields"]["BillingAddress"], "***");
    assert!(!letters[0].to_string().contains("Secret Lane"), "{}", letters[0]);
    let logs = h.logs.text();
    assert!(logs.contains("address changed"), "{logs}");
    assert!(!logs.contains("Secret Lane"), "{logs}");
}

/// A stop while an action waits to retry (here: its idempotency key is leased by a crashed holder, 30 s to go) does
/// not wait for it: the run ends at once, that event stays unsettled and its position unstored (events after it too),
/// and the next run delivers it again and enqueues its job once the lease is gone.
#[tokio::test]
async fn a_stop_does_not_wait_for_retries_and_leaves_their_events_unsettled() {
    use std::time::{Duration, Instant};
    use switchyard::app::service::Service;
    use switchyard::config::LoadedConfig;
    use switchyard::sources::jsonl::JsonlSource;
    use switchyard::state::{CheckpointStore, offset_of};

    let h = Harness::new("stop-retry");
    let approve = |n: u32| {
        let id = h.order(n);
        h.approval(
            &format!("a{n}"),
            std::slice::from_ref(&id),
            Some("Approved"),
            records(&[h.record(n, None)]),
        )
    };
    let (first, blocked, last) = (approve(1), approve(2), approve(3));
    let first_len = format!("{first}\n").len() as u64;
    let path = h.write_events("events.jsonl", &[first, blocked.clone(), last]);
    // A crashed holder's in-progress lease on the second approval's key.
    let key = format!(
        "{}idem:enqueue-provisioning:activation-{}-{}",
        h.key_prefix(),
        h.order(2),
        blocked["header"]["commit_timestamp"]
    );
    let mut conn = h.redis().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("lease:crashed:0:0")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = h.followed(
        &path,
        "delivery: { retry: { initial_backoff_ms: 50, max_backoff_ms: 200 } }\n",
    );
    let config_path = h.dir.path().join("config.yaml");
    let run = async |text: &str| {
        let loaded = LoadedConfig::parse(&config_path, text, &|_| None).unwrap();
        let service = Service::start(loaded, false).await.unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        (service, stop, shutdown)
    };

    let (service, stop, shutdown) = run(&text).await;
    let service = std::sync::Arc::new(service);
    let running = tokio::spawn({
        let service = service.clone();
        async move { service.run(shutdown).await.unwrap() }
    });
    // The first and third approvals are enqueued; the second waits for the foreign lease.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.jobs().await.len() < 2 {
        assert!(Instant::now() < deadline, "jobs: {:?}", h.jobs().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped_at = Instant::now();
    stop.send(true).unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the stop does not wait for the lease to expire")
        .unwrap();
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    assert_eq!(stats.interrupted, 1, "{stats:?}");
    assert_eq!(stats.settled, 1, "only the first settles in order: {stats:?}");
    assert_eq!(stats.dead_letters, 0, "{stats:?}");
    assert!(h.dead_letters().await.is_empty());
    let store = CheckpointStore::redis(
        switchyard::state::Conn::Server(
            redis::aio::ConnectionManager::new(redis::Client::open(common::redis_url()).unwrap())
                .await
                .unwrap(),
        ),
        &h.key_prefix(),
    );
    let stored = store.get(&JsonlSource::key_for(&path)).await.unwrap();
    assert_eq!(
        stored.as_deref().and_then(offset_of),
        Some(first_len),
        "the position stays before the second"
    );

    // The crashed holder's lease expires (deleted here); the next run redelivers the second and the third.
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    let (service, stop, shutdown) = run(&text.replace("follow: true,", "")).await;
    let stats = service.run(shutdown).await.unwrap();
    drop(stop);
    assert_eq!(stats.events, 2, "{stats:?}");
    assert_eq!(stats.skipped, 1, "the third was done before: {stats:?}");
    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 3, "{jobs:?}");
}
