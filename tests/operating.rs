//! The operator's run-time tools against real processes and a real Redis: the runaway guard (a route that fires
//! too often is paused on every replica, its events dead-lettered, and nothing is lost once it is fixed).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, free_port, records};
use serde_json::Value;

/// A route whose `when` is true for every approval: the runaway the guard is for.
fn flood_rules(fires: u32) -> String {
    format!(
        r#"version: 1
routes:
  - name: flood
    channel: /data/OrderChangeEvent
    when: event.Activation_Status__c == "Activating"
    limit: {{ fires: {fires}, per: 1m }}
    then:
      - sink: enqueue-provisioning
        job: {{ sfOrderId: "{{{{record_id}}}}" }}
        idempotency_key: "flood-{{{{record_id}}}}"
  - name: audit
    channel: /data/OrderChangeEvent
    when: event.Activation_Status__c == "Activating"
    then:
      - sink: log
        message: "seen {{{{record_id}}}}"
"#
    )
}

/// `switchyard run` with its stderr in `log`.
fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn cli(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A GET on loopback; None while nothing listens.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn paused_gauge(port: u16, route: &str) -> Option<f64> {
    let metrics = http_get(port, "/metrics")?;
    let prefix = format!("switchyard_route_paused{{route=\"{route}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_route_is_paused_on_every_replica_and_nothing_is_lost_once_it_is_fixed() {
    let h = Harness::new("runaway");
    let dir = h.dir.path();
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, flood_rules(100)).unwrap();
    let approvals = |from: u32, to: u32| -> Vec<Value> {
        (from..to)
            .map(|i| {
                let id = h.order(i);
                h.approval(&format!("flood{i}"), &[id], None, records(&[h.record(i, None)]))
            })
            .collect()
    };
    let first = h.write_events("first.jsonl", &approvals(0, 5_000));
    let second = h.write_events("second.jsonl", &approvals(5_000, 5_010));
    let replica = |events: &Path, name: &str| -> (u16, std::path::PathBuf) {
        let port = free_port();
        let text = h
            .config_with_rules(
                events,
                &rules,
                &format!("http: {{ listen: \"127.0.0.1:{port}\" }}\nreload: {{ debounce_ms: 50 }}\n"),
            )
            .replace("jsonl: {", "jsonl: { follow: true,");
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        (port, path)
    };
    let (port_a, config_a) = replica(&first, "a");
    let (port_b, config_b) = replica(&second, "b");
    let mut children = Killed(vec![spawn(&config_a, &dir.join("a.log"))]);

    // 5,000 events: the first 100 fires run, the 101st pauses the route, the rest are dead-lettered.
    wait_for(
        "replica a to settle 5,000 events",
        Duration::from_secs(120),
        async || h.dead_letters().await.len() >= 4_900,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = || std::fs::read_to_string(dir.join("a.log")).unwrap_or_default();
    let letters = h.dead_letters().await;
    assert_eq!(h.jobs().await.len(), 100, "{}", log());
    assert_eq!(letters.len(), 4_900);
    assert!(
        letters
            .iter()
            .all(|l| l["route"] == "flood" && l["reason"] == "route paused: fired 100 times in 1m"),
        "{:?}",
        letters.first()
    );
    assert!(log().contains("Route paused by its runaway guard"), "{}", log());
    assert_eq!(paused_gauge(port_a, "flood"), Some(1.0));
    // The other route of the channel kept running: no letter is for it.
    assert!(letters.iter().all(|l| l["route"] != "audit"));

    let listed = cli(&["route", "list"], &config_a);
    assert!(listed.status.success(), "{}", text(&listed));
    let listed = text(&listed);
    let flood = listed.lines().find(|l| l.starts_with("flood\t")).unwrap_or_default();
    assert!(
        flood.contains("100 per 1m") && flood.contains("PAUSED since") && flood.contains("fired 100 times in 1m"),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("audit\t") && l.ends_with("running")),
        "{listed}"
    );

    // A second replica sees the pause: its events are dead-lettered too, and its gauge says so.
    children.0.push(spawn(&config_b, &dir.join("b.log")));
    wait_for(
        "replica b to dead-letter its 10 events",
        Duration::from_secs(60),
        async || h.dead_letters().await.len() >= 4_910,
    )
    .await;
    assert_eq!(h.jobs().await.len(), 100);
    wait_for("replica b's gauge", Duration::from_secs(15), async || {
        paused_gauge(port_b, "flood") == Some(1.0)
    })
    .await;

    // Retrying while paused is refused, and runs nothing.
    let refused = cli(&["dead-letter", "retry", "--all"], &config_a);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("is paused"), "{}", text(&refused));
    assert_eq!(h.dead_letters().await.len(), 4_910);

    // Fixed: a reload raises the limit (the `when` is the same, so it stays paused until resumed).
    std::fs::write(&rules, flood_rules(100_000)).unwrap();
    wait_for("replica a to reload", Duration::from_secs(30), async || {
        log().contains("Rules reloaded")
    })
    .await;
    let listed = text(&cli(&["route", "list"], &config_a));
    assert!(
        listed.contains("100000 per 1m") && listed.contains("PAUSED"),
        "{listed}"
    );
    let resumed = cli(&["route", "resume", "flood"], &config_a);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(text(&resumed).contains("4910 dead letter(s)"), "{}", text(&resumed));
    let retried = cli(&["dead-letter", "retry", "--all"], &config_a);
    assert!(retried.status.success(), "{}", text(&retried));

    // Every event has exactly one job: 0 lost, 0 duplicate (counted by idempotency key).
    let jobs = h.jobs().await;
    let keys: Vec<String> = jobs.iter().map(|(id, _, _)| id.clone()).collect();
    let distinct: BTreeSet<&String> = keys.iter().collect();
    let expected: BTreeSet<String> = (0..5_010).map(|i| format!("flood-{}", h.order(i))).collect();
    assert_eq!(keys.len(), 5_010);
    assert_eq!(distinct.len(), 5_010);
    assert_eq!(distinct.into_iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(h.dead_letters().await.is_empty());
    wait_for("the gauges to clear", Duration::from_secs(15), async || {
        paused_gauge(port_a, "flood") == Some(0.0) && paused_gauge(port_b, "flood") == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_paused_routes_when_resumes_it_and_says_so() {
    let h = Harness::new("resume-on-fix");
    let dir = h.dir.path();
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, flood_rules(1_000)).unwrap();
    let events = h.write_events("none.jsonl", &[]);
    let port = free_port();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        h.config_with_rules(
            &events,
            &rules,
            &format!("http: {{ listen: \"127.0.0.1:{port}\" }}\nreload: {{ debounce_ms: 50 }}\n"),
        )
        .replace("jsonl: {", "jsonl: { follow: true,"),
    )
    .unwrap();
    let log = dir.join("run.log");
    let _child = Killed(vec![spawn(&config, &log)]);
    wait_for("the listener", Duration::from_secs(30), async || {
        http_get(port, "/healthz").is_some()
    })
    .await;

    let paused = cli(&["route", "pause", "flood"], &config);
    assert!(text(&paused).contains("flood\tpaused"), "{}", text(&paused));
    assert!(text(&cli(&["route", "pause", "flood"], &config)).contains("already paused"));
    let unknown = cli(&["route", "pause", "flod"], &config);
    assert!(!unknown.status.success());
    assert!(text(&unknown).contains("no route `flod`"), "{}", text(&unknown));

    // Only the limit changes: still paused.
    std::fs::write(&rules, flood_rules(2_000)).unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the first reload", Duration::from_secs(30), async || {
        read().contains("Rules reloaded")
    })
    .await;
    assert!(text(&cli(&["route", "list"], &config)).contains("PAUSED"));

    // The `when` changes: the reload resumes the route and says so.
    std::fs::write(
        &rules,
        flood_rules(2_000).replacen(
            r#"when: event.Activation_Status__c == "Activating""#,
            r#"when: became("Activation_Status__c", "Activating")"#,
            1,
        ),
    )
    .unwrap();
    wait_for("the resume", Duration::from_secs(30), async || {
        read().contains("Route resumed: the reload changed its `when`")
    })
    .await;
    let listed = text(&cli(&["route", "list"], &config));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("flood\t") && l.ends_with("running")),
        "{listed}"
    );
    let again = cli(&["route", "resume", "flood"], &config);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "flood\tnot paused");
}
