//! Operating switchyard: Redis Streams output read by a consumer group, Redis with an ACL user, connect
//! timeouts, `/readyz` while a Redis goes away, the Prometheus scrape, JSON log lines. Real Redis.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Harness, records, redis_url, repo};
use serde_json::{Value, json};
use switchyard::app::service::{Service, StartError};
use switchyard::config::LoadedConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROVISION_TO_STREAM: &str = r#"
version: 1
routes:
  - name: provision-to-stream
    channel: orders
    when: became("Activation_Status__c", "Activating")
    then:
      - sink: provisioning-stream
        job: { sfOrderId: "{{record_id}}", correlationId: "cdc-order-{{record_id}}" }
        idempotency_key: "activation-{{record_id}}-{{header.commit_timestamp}}"
"#;

/// host:port of the test Redis.
fn redis_host_port() -> String {
    let url = redis_url();
    let rest = url.split("://").nth(1).unwrap_or("127.0.0.1:6379");
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

fn base_config(h: &Harness, events: &std::path::Path, rules: &std::path::Path, url: &str) -> String {
    format!(
        "source: {{ kind: jsonl, jsonl: {{ path: {events} }} }}\nrules: [{rules}]\n\
         redis: {{ url: \"{url}\", key_prefix: \"{kp}\", connect_timeout_ms: 2000, command_timeout_ms: 2000 }}\n",
        events = events.display(),
        rules = rules.display(),
        kp = h.key_prefix(),
    )
}

async fn start(h: &Harness, text: &str) -> Result<Service, StartError> {
    let loaded = LoadedConfig::parse(&h.dir.path().join("config.yaml"), text, &|_| None)
        .unwrap_or_else(|e| panic!("config: {e}"));
    Service::start(loaded, false).await
}

#[tokio::test]
async fn stream_output_is_read_by_a_consumer_group_and_trimmed() {
    let h = Harness::new("stream");
    let stream = format!("{}provisioning-stream", h.key_prefix());
    let mut conn = h.redis().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    // 250 activations, the first delivered twice: 250 entries (the idempotency key holds back the copy).
    let mut events: Vec<Value> = (1..=250)
        .map(|n| {
            let id = format!("{}{n:03}", &h.order(0)[..15]);
            h.approval(&format!("a{n}"), &[id], None, json!({}))
        })
        .collect();
    events.insert(1, events[0].clone());
    let rules = h.dir.path().join("rules.yaml");
    std::fs::write(&rules, PROVISION_TO_STREAM).unwrap();
    let path = h.write_events("events.jsonl", &events);
    let config = format!(
        "{}sinks:\n  provisioning-stream: {{ kind: queue, format: stream, queue: \"{stream}\", job_name: provision-order, max_len: 20 }}\n",
        base_config(&h, &path, &rules, &redis_url())
    );
    let service = start(&h, &config).await.unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = service.run(shutdown).await.unwrap();
    assert_eq!(stats.events, 251);
    assert_eq!(
        stats.skipped, 1,
        "the redelivered activation is skipped by its idempotency key"
    );

    // MAXLEN ~ trims whole stream nodes (100 entries each by default): far fewer than 250 remain, and at
    // least the 20 asked for.
    let len: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut conn).await.unwrap();
    assert!((20..=120).contains(&len), "XLEN {len}");

    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("worker-1")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = &reply.keys[0].ids;
    assert_eq!(entries.len(), len, "the group reads every entry still in the stream");
    let field = |entry: &redis::streams::StreamId, name: &str| -> String {
        entry
            .get(name)
            .unwrap_or_else(|| panic!("entry {} has no `{name}`", entry.id))
    };
    let last = entries.last().unwrap();
    let last_event = events.last().unwrap();
    let order = last_event["header"]["record_ids"][0].as_str().unwrap();
    let key = format!("activation-{order}-{}", last_event["header"]["commit_timestamp"]);
    assert_eq!(field(last, "job_id"), key);
    assert_eq!(field(last, "idempotency_key"), key);
    assert_eq!(field(last, "name"), "provision-order");
    assert_eq!(
        serde_json::from_str::<Value>(&field(last, "data")).unwrap(),
        json!({"sfOrderId": order, "correlationId": format!("cdc-order-{order}")})
    );
    assert_eq!(field(last, "event_id"), last_event["id"].as_str().unwrap());
    assert_eq!(field(last, "route"), "provision-to-stream");
    assert_eq!(field(last, "record_id"), order);
    assert_eq!(field(last, "correlation_id"), format!("cdc-order-{order}"));
    assert_eq!(field(last, "rules_version").len(), 12);
    assert!(field(last, "at_ms").parse::<u64>().is_ok());
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let acked: usize = redis::cmd("XACK")
        .arg(&stream)
        .arg("workers")
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, len);
}

#[tokio::test]
async fn redis_with_an_acl_user_and_password_works_and_a_wrong_password_never_prints() {
    let h = Harness::new("acl");
    let user = format!("sytest-acl-{}", h.tag);
    let password = format!("pw-{}-secret", h.tag);
    let mut admin = h.redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();
    let id = h.order(1);
    let events = h.write_events(
        "events.jsonl",
        &[h.approval(
            "a",
            std::slice::from_ref(&id),
            Some("Approved"),
            records(&[h.record(1, None)]),
        )],
    );
    let acl_url = format!("redis://{user}:{password}@{}", redis_host_port());
    let config = h
        .config(&events, "")
        .replace(&format!("url: \"{}\"", redis_url()), &format!("url: \"{acl_url}\""));
    assert!(config.contains(&acl_url));
    let outcome = async {
        let service = start(&h, &config).await.unwrap();
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        service.run(shutdown).await.unwrap();
        let jobs = h.jobs().await;
        assert_eq!(
            jobs.len(),
            1,
            "BullMQ, idempotency and positions all work as the ACL user: {jobs:?}"
        );

        let wrong = config.replace(&password, "wrong-password-9f2");
        let err = start(&h, &wrong)
            .await
            .err()
            .expect("a wrong password fails start-up")
            .to_string();
        assert!(!err.contains("wrong-password-9f2"), "{err}");
        assert!(err.contains(&user), "the message names the user: {err}");
    };
    // Runs the assertions, then removes the user whatever they found.
    let result = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn a_redis_that_never_answers_or_speaks_no_tls_fails_start_up_with_a_timeout_not_a_hang() {
    let h = Harness::new("timeouts");
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = silent.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let events = h.write_events("events.jsonl", &[]);
    let rules = h.dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "version: 1\nroutes:\n  - name: r\n    channel: orders\n    when: 'true'\n    then: [{ sink: log, message: m }]\n",
    )
    .unwrap();
    for url in [
        format!("redis://{silent_addr}"),
        // TLS against the plaintext test Redis: the handshake never completes.
        format!("rediss://{}", redis_host_port()),
    ] {
        let config = format!(
            "{}sinks: {{ log: {{ kind: log }} }}\n",
            base_config(&h, &events, &rules, &url).replace("connect_timeout_ms: 2000", "connect_timeout_ms: 300")
        );
        // The outer bound only keeps a regression from hanging the suite.
        let started = tokio::time::timeout(Duration::from_secs(20), start(&h, &config))
            .await
            .expect("start-up gives up by itself");
        let err = started.err().unwrap_or_else(|| panic!("{url}: start-up must fail"));
        let text = err.to_string();
        assert!(text.contains("cannot connect to Redis"), "{url}: {text}");
    }
}

/// A TCP proxy to the test Redis that can be cut: stands in for a Redis that goes away.
struct Proxy {
    addr: std::net::SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = redis_host_port();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let inner = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                inner.lock().unwrap().push(pipe);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { addr, tasks }
    }

    /// Closes the listener and every proxied connection.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test]
async fn readyz_turns_503_with_a_reason_when_a_sinks_redis_goes_away_and_metrics_cover_the_run() {
    let h = Harness::new("readyz");
    let cache_redis = Proxy::start().await;
    let id = h.order(1);
    let approval = h.approval(
        "a",
        std::slice::from_ref(&id),
        Some("Approved"),
        records(&[h.record(1, None)]),
    );
    let events = h.write_events("events.jsonl", &[approval.clone(), approval]);
    let (port, text) = h.followed_with_http(&events);
    // The cache sink on its own Redis (through the proxy); everything else on the main one.
    let text = text.replace(
        "invalidate-cache: { kind: cache-invalidate }",
        &format!(
            "invalidate-cache: {{ kind: cache-invalidate, redis: {{ url: \"redis://{}\", command_timeout_ms: 500 }} }}",
            cache_redis.addr
        ),
    );
    switchyard::obs::metrics::install();
    let service = start(&h, &text).await.unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { service.run(shutdown).await.map(|s| s.events) });
    let addr = format!("127.0.0.1:{port}");
    let mut metrics = String::new();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            continue;
        }
        metrics = http_get(&addr, "/metrics").await.1;
        if metrics.contains("switchyard_idempotent_skips_total{sink=\"enqueue-provisioning\"} 1") {
            break;
        }
    }
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["role"], "active");
    assert_eq!(ready["redis"]["redis"]["ok"], true, "{ready}");
    assert_eq!(ready["redis"]["sink invalidate-cache"]["ok"], true, "{ready}");
    let health: Value = serde_json::from_str(&http_get(&addr, "/healthz").await.1).unwrap();
    assert_eq!(health["role"], "active");

    // Every family of the scrape, with values from this run (other tests in this binary may add to
    // the same process-wide recorder, so only this test's own labels are checked exactly).
    for expected in [
        "switchyard_events_total{channel=\"/data/OrderChangeEvent\"}",
        "switchyard_events_settled_total{channel=\"/data/OrderChangeEvent\"}",
        "switchyard_route_evaluated_total{route=\"provision-on-activating\"}",
        "switchyard_route_matched_total{route=\"provision-on-activating\"}",
        "switchyard_route_fired_total{route=\"provision-on-activating\"}",
        "switchyard_route_shadow_total{route=\"provision-on-activating\"}",
        "switchyard_route_failed_total{route=\"provision-on-activating\"}",
        "switchyard_sink_calls_total{sink=\"enqueue-provisioning\",result=\"ok\"}",
        "switchyard_sink_errors_total{sink=\"enqueue-provisioning\",kind=\"transient\"}",
        "switchyard_sink_retries_total{sink=\"enqueue-provisioning\"}",
        "switchyard_sink_duration_seconds_bucket{sink=\"enqueue-provisioning\",le=\"0.005\"}",
        "switchyard_sink_duration_seconds_count{sink=\"enqueue-provisioning\"}",
        "switchyard_dead_letters_total{route=\"provision-on-activating\"}",
        "switchyard_idempotent_skips_total{sink=\"enqueue-provisioning\"} 1",
        "switchyard_rules_version_info{version=",
        "switchyard_rules_reload_total{result=\"ok\"}",
        "switchyard_role_info{role=\"active\"} 1",
        "# HELP switchyard_sink_duration_seconds",
    ] {
        assert!(metrics.contains(expected), "missing `{expected}` in:\n{metrics}");
    }

    cache_redis.cut();
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let not_ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(not_ready["status"], "not-ready");
    assert_eq!(not_ready["redis"]["redis"]["ok"], true);
    assert_eq!(not_ready["redis"]["sink invalidate-cache"]["ok"], false);
    let reason = not_ready["reason"].as_str().unwrap();
    assert!(
        reason.contains("invalidate-cache") && reason.contains(&cache_redis.addr.to_string()),
        "{reason}"
    );
    let metrics = http_get(&addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_redis_up{redis=\"sink invalidate-cache\"} 0"),
        "{metrics}"
    );

    stop.send(true).unwrap();
    let events = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(events, 2);
}

#[test]
fn json_log_lines_carry_event_record_route_rules_version_and_correlation_id() {
    let h = Harness::new("json_logs");
    let id = h.order(1);
    let events = h.write_events(
        "events.jsonl",
        &[h.approval(
            "a",
            std::slice::from_ref(&id),
            Some("Approved"),
            records(&[h.record(1, None)]),
        )],
    );
    // No Redis: the in-memory sinks keep this test independent of the server.
    let config = format!(
        "source: {{ kind: jsonl, jsonl: {{ path: {} }} }}\nrules: [{}]\n\
         sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
        events.display(),
        repo().join("rules").display()
    );
    let path = h.dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    // No --log-format: standard error is a pipe here, so `auto` picks JSON.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--no-watch", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("SWITCHYARD_LOG_FORMAT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let activation = lines
        .iter()
        .find(|l| l["message"] == "Order activation moved to Activating via CDC, enqueuing fulfillment")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(activation["record_id"], json!(id));
    assert_eq!(activation["route"], "provision-on-activating");
    assert_eq!(activation["event_id"], json!(format!("a-{}:1", h.tag)));
    assert_eq!(activation["correlation_id"], json!(format!("cdc-order-{id}")));
    assert_eq!(activation["rules_version"].as_str().map(str::len), Some(12));
    assert_eq!(activation["channel"], "/data/OrderChangeEvent");
    assert_eq!(activation["level"], "INFO");

    let text = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--no-watch", "--log-format", "text", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(stderr.lines().all(|l| !l.starts_with('{')), "{stderr}");
    assert!(
        stderr.contains(&format!("record_id={id}")) || stderr.contains(&format!("record_id=\"{id}\"")),
        "{stderr}"
    );
}

/// Every `switchyard_*` name in `text`, without the histogram suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchyard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerts_and_dashboard_use_only_metrics_that_exist() {
    let exported = metric_names(&std::fs::read_to_string(repo().join("src/obs/metrics.rs")).unwrap());
    // Recorded by the Pub/Sub source and the REST enricher (their own modules).
    let source_and_enricher = [
        "switchyard_source_reconnects_total",
        "switchyard_source_keepalives_total",
        "switchyard_source_outstanding",
        "switchyard_position_age_seconds",
        "switchyard_enrich_calls_total",
    ];
    let alerts = std::fs::read_to_string(repo().join("examples/monitoring/alerts.yml")).unwrap();
    let parsed: Value = serde_saphyr::from_str(&alerts).unwrap();
    assert!(parsed["groups"][0]["rules"].as_array().unwrap().len() >= 8);
    let dashboard = std::fs::read_to_string(repo().join("examples/monitoring/grafana-dashboard.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 20);
    for (file, text) in [("alerts.yml", &alerts), ("grafana-dashboard.json", &dashboard)] {
        for name in metric_names(text) {
            assert!(
                exported.contains(&name) || source_and_enricher.contains(&name.as_str()),
                "{file} uses `{name}`, which switchyard does not export"
            );
        }
    }
    let used: std::collections::BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    for name in source_and_enricher {
        assert!(used.contains(name), "{name} is neither alerted on nor charted");
    }
}

#[test]
fn deploy_examples_are_valid_configs() {
    let env = |name: &str| match name {
        "REDIS_URL" => Some("redis://switchyard:pw@redis-queue:6379/0".to_string()),
        "CACHE_REDIS_URL" => Some("rediss://cache:pw@redis-cache:6380/0".to_string()),
        "SF_LOGIN_URL" => Some("https://example.my.salesforce.com".to_string()),
        "SF_CLIENT_ID" | "SF_CLIENT_SECRET" | "POD_NAME" => Some("x".to_string()),
        "SWITCHYARD_HTTP_TOKEN" => Some("deploy-token-0123456789".to_string()),
        _ => None,
    };
    let deploy = repo().join("examples/deploy");
    let text = std::fs::read_to_string(deploy.join("config.yaml")).unwrap();
    let loaded = LoadedConfig::parse(&deploy.join("config.yaml"), &text, &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.config.http.is_some());
    // The config embedded in the Kubernetes ConfigMap.
    let manifest = std::fs::read_to_string(deploy.join("kubernetes.yaml")).unwrap();
    let start = manifest
        .find("  config.yaml: |\n")
        .expect("the ConfigMap holds config.yaml")
        + "  config.yaml: |\n".len();
    let embedded: String = manifest[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let k8s = LoadedConfig::parse(&deploy.join("kubernetes.yaml"), &embedded, &env)
        .unwrap_or_else(|e| panic!("{e}\n{embedded}"));
    assert!(k8s.config.leases_enabled(), "two replicas coordinate through leases");
    assert!(manifest.contains("replicas: 2"));
    assert!(manifest.contains("path: /readyz") && manifest.contains("path: /healthz"));
}

/// A throwaway TLS-only redis-server with a certificate from a private CA made for this test.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl TlsRedis {
    fn start(dir: &std::path::Path) -> TlsRedis {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl is installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=switchyard-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsRedis {
            child,
            port,
            ca: dir.join("ca.pem"),
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_carries_jobs_and_refuses_an_unknown_ca() {
    let h = Harness::new("tls");
    let tls = TlsRedis::start(h.dir.path());
    let id = h.order(1);
    let events = h.write_events(
        "events.jsonl",
        &[h.approval(
            "a",
            std::slice::from_ref(&id),
            Some("Approved"),
            records(&[h.record(1, None)]),
        )],
    );
    let url = format!("rediss://localhost:{}", tls.port);
    let plain = h
        .config(&events, "")
        .replace(&format!("url: \"{}\"", redis_url()), &format!("url: \"{url}\""));
    assert!(plain.contains(&url));
    let with_ca = plain.replace(
        &format!("url: \"{url}\""),
        &format!("url: \"{url}\", tls: {{ ca_file: \"{}\" }}", tls.ca.display()),
    );
    let service = start(&h, &with_ca).await.unwrap_or_else(|e| panic!("{e}"));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = service.run(shutdown).await.unwrap();
    assert_eq!(stats.actions_done.get("enqueue-provisioning"), Some(&1), "{stats:?}");
    assert_eq!(stats.dead_letters, 0);
    // Read it back over TLS with an independent client.
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&tls.ca).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let waiting: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}:provisioning:wait", h.bull_prefix()))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(waiting[0].starts_with(&format!("activation-{id}-")), "{waiting:?}");

    // Without the CA the certificate is not trusted: start-up fails, it does not connect unverified.
    let err = start(&h, &plain)
        .await
        .err()
        .expect("an unknown CA is refused")
        .to_string();
    assert!(err.contains("cannot connect to Redis"), "{err}");
}

/// A sink that a config reload moves to its own Redis is PINGed by `/readyz` from then on, like one configured at
/// start: ready while it answers, 503 naming it once it is gone.
#[tokio::test]
async fn readyz_pings_the_redis_a_config_reload_gave_a_sink() {
    let h = Harness::new("readyz-reload");
    let cache_redis = Proxy::start().await;
    let events = h.write_events("events.jsonl", &[]);
    let (port, text) = h.followed_with_http(&events);
    let path = h.dir.path().join("config.yaml");
    std::fs::write(&path, &text).unwrap();
    let service = Arc::new(start(&h, &text).await.unwrap());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn({
        let service = service.clone();
        async move { service.run(shutdown).await.map(|s| s.events) }
    });
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ready["redis"].as_object().unwrap().len(),
        1,
        "only the main Redis: {ready}"
    );

    let moved = text.replace(
        "invalidate-cache: { kind: cache-invalidate }",
        &format!(
            "invalidate-cache: {{ kind: cache-invalidate, redis: {{ url: \"redis://{}\", command_timeout_ms: 500 }} }}",
            cache_redis.addr
        ),
    );
    assert_ne!(moved, text);
    std::fs::write(&path, &moved).unwrap();
    let outcome = service.reloader.reload().await;
    assert!(
        outcome.applied.iter().any(|a| a.contains("invalidate-cache")),
        "{outcome:?}"
    );
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["redis"]["sink invalidate-cache"]["ok"], true, "{ready}");

    cache_redis.cut();
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let not_ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(not_ready["redis"]["redis"]["ok"], true, "{not_ready}");
    assert_eq!(not_ready["redis"]["sink invalidate-cache"]["ok"], false, "{not_ready}");

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
