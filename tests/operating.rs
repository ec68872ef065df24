//! The operator's run-time tools against real processes and a real Redis: the decision journal (`why`, `tap`, the
//! HTTP reads) and the runaway guard (a route that fires
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
    http_get_with(port, path, "")
}

/// `http_get` with more header lines (each ending in CRLF).
fn http_get_with(port: u16, path: &str, headers: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes())
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

/// An 18-character Order id for `n` up to 9,999, unique to this test run.
fn order_id(h: &Harness, n: u32) -> String {
    let t: String = h.tag.chars().rev().take(10).collect();
    format!("801{t:0>10}{n:04}A")
}

/// 1,000 order events of four kinds, by `n % 4`: 0 an approval that provisions, 1 an approval of an order that
/// has a WHMCS order id already, 2 an internal status change (Activating -> Activated), 3 a billing city change.
fn mixed_events(h: &Harness, count: u32) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    let mut records = serde_json::Map::new();
    for n in 0..count {
        let id = order_id(h, n);
        let whmcs = (n % 4 == 1).then(|| format!("WH-{n}"));
        records.insert(
            id.clone(),
            serde_json::json!({"WHMCS_Order_ID__c": whmcs, "AccountId": h.account(n % 50)}),
        );
        let tx = format!("tx{n}");
        let ids = [id];
        events.push(match n % 4 {
            0 | 1 => h.approval(&tx, &ids, Some("Approved"), Value::Null),
            2 => h.change(
                &tx,
                &ids,
                &["Activation_Status__c"],
                serde_json::json!({"Activation_Status__c": "Activated"}),
                Value::Null,
            ),
            _ => h.change(
                &tx,
                &ids,
                &["BillingAddress.City"],
                serde_json::json!({"BillingAddress": {"City": "Osaka"}}),
                Value::Null,
            ),
        });
    }
    (events, Value::Object(records))
}

/// The events with the enrichment records of `records` (the recorded enricher reads `record` from the event).
fn with_records(events: Vec<Value>, records: &Value) -> Vec<Value> {
    events
        .into_iter()
        .map(|mut e| {
            let id = e["header"]["record_ids"][0].as_str().unwrap().to_string();
            e["record"] = serde_json::json!({ id.clone(): records[&id].clone() });
            e
        })
        .collect()
}

/// The entries the journal's stream holds: one item per written batch, its entry count in its `n` field.
async fn journal_len(h: &Harness) -> usize {
    let mut conn = h.redis().await;
    let items: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{}journal", h.key_prefix()))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    items
        .iter()
        .map(|(_, fields)| fields["n"].parse::<usize>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_says_which_route_fired_and_which_clause_was_false_for_1000_mixed_orders() {
    let h = Harness::new("why");
    let (events, records) = mixed_events(&h, 1_000);
    let events = with_records(events, &records);
    let path = h.write_events("events.jsonl", &events);
    let config = h.dir.path().join("config.yaml");
    std::fs::write(&config, h.config(&path, "")).unwrap();
    let stats = h.run_config(&std::fs::read_to_string(&config).unwrap()).await;
    assert_eq!(stats.events, 1_000, "{stats:?}");
    assert_eq!(h.jobs().await.len(), 250);
    assert_eq!(journal_len(&h).await, 1_000);

    // A provisioned order: the route fired, with the job's idempotency key and result.
    let provisioned = order_id(&h, 40);
    let out = cli(&["why", &provisioned], &config);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        said.starts_with(&format!("{provisioned}: 1 decision(s), newest first")),
        "{said}"
    );
    assert!(
        said.contains("UPDATE by 005xx0000000001AAA on /data/OrderChangeEvent"),
        "{said}"
    );
    assert!(said.contains("  provision-on-activating: fired\n"), "{said}");
    let key = format!("activation-{provisioned}-");
    assert!(
        said.lines()
            .any(|l| l.trim_start().starts_with("enqueue-provisioning:") && l.contains(&key) && l.contains(": done")),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "    invalidate-cache: orders:detail:{provisioned}, orders:account:"
        )),
        "{said}"
    );
    assert!(said.contains("  activation-order-not-found: guard failed"), "{said}");

    // Blocked by the WHMCS guard: the guard's false clause is named.
    let blocked = order_id(&h, 41);
    let said = text(&cli(&["why", &blocked], &config));
    assert!(
        said.contains("  provision-on-activating: guard failed: `is_blank(record.WHMCS_Order_ID__c)` was false"),
        "{said}"
    );
    assert!(!said.contains("provision-on-activating: fired"), "{said}");

    // The status never became Activating: the `when`'s clause and what the field changed to.
    let internal = order_id(&h, 42);
    let said = text(&cli(&["why", &internal], &config));
    assert!(
        said.contains(
            "  provision-on-activating: not matched: `became(\"Activation_Status__c\", \"Activating\")` was false \
             (it changed to `Activated`)"
        ),
        "{said}"
    );

    // The billing change invalidated the cache; found by its event id too.
    let billing = order_id(&h, 43);
    let said = text(&cli(&["why", &billing], &config));
    assert!(said.contains("  invalidate-order-cache: fired\n"), "{said}");
    let event_id = events[43]["id"].as_str().unwrap();
    let by_event = text(&cli(&["why", event_id], &config));
    assert!(by_event.contains("invalidate-order-cache: fired"), "{by_event}");

    // By idempotency key, and as JSON for scripts.
    let job_key = h
        .jobs()
        .await
        .into_iter()
        .find(|(_, _, data)| data["sfOrderId"] == provisioned.as_str())
        .map(|(_, _, data)| data["idempotencyKey"].as_str().unwrap().to_string())
        .unwrap();
    let out = cli(&["why", &job_key, "--format", "json"], &config);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(entry["record_ids"][0], provisioned.as_str());
    let route = entry["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "provision-on-activating")
        .unwrap();
    assert_eq!(route["outcome"], "fired", "{route}");

    let unknown = cli(&["why", "801000000000000XYZ"], &config);
    assert!(text(&unknown).contains("no decision"), "{}", text(&unknown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_stays_within_its_cap_and_its_entries_expire() {
    let h = Harness::new("journal-cap");
    let (events, records) = mixed_events(&h, 9_999);
    let mut all = with_records(events, &records);
    // 20,000 events: the same orders again, as later changes.
    let again: Vec<Value> = all
        .iter()
        .cycle()
        .take(20_000 - all.len())
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e["id"] = format!("again{i}-{}", e["id"].as_str().unwrap()).into();
            e
        })
        .collect();
    all.extend(again);
    assert_eq!(all.len(), 20_000);
    let path = h.write_events("events.jsonl", &all);
    let config = h.dir.path().join("config.yaml");
    std::fs::write(&config, h.config(&path, "journal: { max_len: 2000, retention: 2s }\n")).unwrap();
    h.run_config(&std::fs::read_to_string(&config).unwrap()).await;
    let len = journal_len(&h).await;
    // The stream trims whole items (one per written batch of at most 128 entries): the cap, and at most one batch
    // more.
    assert!((2_000..2_128).contains(&len), "journal length {len}");

    let mut conn = h.redis().await;
    // The index: buckets of 256 consecutive entries (a cap of 2,000), each expiring 2 s after its last write, and
    // only those that can still name an entry of the stream: the index does not outgrow the capped stream.
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}journal:idx:*", h.key_prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (8..=11).contains(&buckets.len()),
        "{} index buckets for 20,000 entries capped at 2,000: {buckets:?}",
        buckets.len()
    );
    let mut members = 0;
    for bucket in &buckets {
        let ttl: i64 = redis::cmd("PTTL").arg(bucket).query_async(&mut conn).await.unwrap();
        assert!((1..=2_000).contains(&ttl), "index bucket {bucket} ttl {ttl}");
        let card: usize = redis::cmd("ZCARD").arg(bucket).query_async(&mut conn).await.unwrap();
        members += card;
    }
    // Each entry is a member by its record id(s) (its event id and idempotency keys are the hash's fields).
    assert!(
        members <= 11 * 256 * 2,
        "{members} index members for at most 2,816 entries"
    );
    // The buckets' hashes of event ids and idempotency keys: one per sorted set, expiring with it.
    let hashes: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}journal:keys:*", h.key_prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hashes.len(), buckets.len(), "{hashes:?} against {buckets:?}");
    for hash in &hashes {
        let ttl: i64 = redis::cmd("PTTL").arg(hash).query_async(&mut conn).await.unwrap();
        assert!((1..=2_000).contains(&ttl), "index hash {hash} ttl {ttl}");
    }
    let buckets: Vec<String> = buckets.into_iter().chain(hashes).collect();
    // The last two events were of orders 0 and 1 (the second pass wrapped around).
    let recent = order_id(&h, 1);
    let said = text(&cli(&["why", &recent], &config));
    assert!(said.contains(&recent) && !said.contains("no decision"), "{said}");
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    for bucket in &buckets {
        let exists: i64 = redis::cmd("EXISTS").arg(bucket).query_async(&mut conn).await.unwrap();
        assert_eq!(exists, 0, "the index bucket {bucket} expired with the retention");
    }
    let said = text(&cli(&["why", &order_id(&h, 9_000)], &config));
    assert!(said.contains("no decision in the journal"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_follows_one_routes_decisions_live_and_leaving_it_does_not_disturb_the_service() {
    let h = Harness::new("tap");
    let dir = h.dir.path();
    let (events, records) = mixed_events(&h, 80);
    let events = with_records(events, &records);
    let path = h.write_events("events.jsonl", &[]);
    let (port, config_text) = h.followed_with_http(&path);
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_text).unwrap();
    let mut children = Killed(vec![spawn(&config, &dir.join("run.log"))]);
    wait_for("the listener", Duration::from_secs(30), async || {
        http_get(port, "/healthz").is_some()
    })
    .await;
    let mut tap = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "tap",
            "--route",
            "provision-on-activating",
            "--format",
            "json",
            "--config",
        ])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tap.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The tap reads from the stream's end: give it a moment to start before the events arrive.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let append = |events: &[Value]| {
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        for e in events {
            writeln!(file, "{e}").unwrap();
        }
    };
    append(&events[..40]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 40 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(serde_json::from_str::<Value>(&line).unwrap());
        }
    }
    assert_eq!(seen.len(), 40, "one line per decision: {seen:?}");
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for entry in &seen {
        let routes = entry["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1, "only the chosen route: {entry}");
        assert_eq!(routes[0]["route"], "provision-on-activating");
        *outcomes
            .entry(routes[0]["outcome"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let want: std::collections::BTreeMap<String, usize> = [
        ("fired".into(), 10),
        ("guard-failed".into(), 10),
        ("not-matched".into(), 20),
    ]
    .into();
    assert_eq!(outcomes, want);

    // The tap goes away mid-stream; the service goes on deciding.
    tap.kill().unwrap();
    tap.wait().unwrap();
    append(&events[40..]);
    wait_for("the other 40 decisions", Duration::from_secs(30), async || {
        journal_len(&h).await == 80
    })
    .await;
    assert_eq!(h.jobs().await.len(), 20);
    assert!(children.0[0].try_wait().unwrap().is_none(), "the service still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_why_and_tap_read_the_running_process_over_its_http_listener() {
    let h = Harness::new("journal-http");
    let dir = h.dir.path();
    let (events, records) = mixed_events(&h, 8);
    let mut events = with_records(events, &records);
    // JSON that is not an event: dead-lettered before routing, and journaled under the id it names.
    events.push(serde_json::json!({"id": "broken-1", "channel": "/data/OrderChangeEvent", "fields": "not a map"}));
    let path = h.write_events("events.jsonl", &[]);
    let port = free_port();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "source:\n  kind: jsonl\n  jsonl: {{ path: {}, follow: true }}\nrules: [{}]\nsinks:\n  \
             enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
             http: {{ listen: \"0.0.0.0:{port}\", token: \"tap-token-0123456789abcdef\" }}\n",
            path.display(),
            common::repo().join("rules").display(),
        ),
    )
    .unwrap();
    let _child = Killed(vec![spawn(&config, &dir.join("run.log"))]);
    wait_for("the listener", Duration::from_secs(30), async || {
        http_get(port, "/healthz").is_some()
    })
    .await;

    // A listener beyond loopback serves its reads only with the token (which the CLI takes from the config).
    let refused = http_get(port, "/api/journal?id=x").unwrap();
    assert!(refused.contains("reads need `Authorization: Bearer`"), "{refused}");
    // `tap` over the listener's server-sent events (the config binds 0.0.0.0: the CLI asks loopback).
    let mut tap = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["tap", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tap.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    for e in &events {
        writeln!(file, "{e}").unwrap();
    }
    drop(file);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 9 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    assert_eq!(seen.len(), 9, "one line per decision: {seen:#?}");
    let fired = seen.iter().find(|l| l.contains(&order_id(&h, 4))).unwrap();
    assert!(fired.contains("provision-on-activating=fired (done"), "{fired}");
    let rejected = seen.iter().find(|l| l.contains("broken-1")).unwrap();
    assert!(
        rejected.contains("events.jsonl:9 rejected: dead-lettered as "),
        "{rejected}"
    );
    // Ctrl-C ends the tap cleanly, saying what it showed.
    let interrupted = Command::new("kill")
        .args(["-INT", &tap.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let status = tap.wait().unwrap();
    let mut said = String::new();
    tap.stderr.take().unwrap().read_to_string(&mut said).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("tap: 9 decision(s) shown; 0 missed"), "{said}");

    // `why` asks the same process.
    let id = order_id(&h, 4);
    let read = http_get_with(
        port,
        &format!("/api/journal?id={id}"),
        "Authorization: Bearer tap-token-0123456789abcdef\r\n",
    );
    let history: Value = serde_json::from_str(&read.unwrap()).unwrap();
    let route = history[0]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "provision-on-activating")
        .unwrap()
        .clone();
    assert_eq!(route["outcome"], "fired", "{history}");
    let out = cli(&["why", &id], &config);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(said.contains("  provision-on-activating: fired\n"), "{said}");
    let out = cli(&["why", &order_id(&h, 6)], &config);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(
            "  provision-on-activating: not matched: `became(\"Activation_Status__c\", \"Activating\")` was false \
             (it changed to `Activated`)"
        ),
        "{said}"
    );
    let out = cli(&["why", "broken-1"], &config);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("  no route saw it: dead-lettered as "), "{said}");
    assert!(
        !said.contains("see `switchyard dead-letter show "),
        "no Redis: the CLI cannot show that process's dead letters: {said}"
    );
    let out = cli(&["why", &format!("{}:9", path.display())], &config);
    assert!(out.status.success(), "found by its position too: {}", text(&out));
}

/// The operator's reading commands piped into a reader that closes after one line (`| head -1`) end quietly with 0:
/// no panic, no hang. `why` and `dead-letter list` print far more than a pipe holds; `tap` is still following a
/// service that keeps deciding when its reader goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_tap_and_dead_letter_list_piped_into_a_reader_that_stops_end_quietly() {
    use std::io::BufRead;
    let h = Harness::new("piped");
    let dir = h.dir.path();
    let (events, records) = mixed_events(&h, 40);
    let events = with_records(events, &records);
    // The same approvals many times over (one record's history fills the journal's 200 entries, some 150 KB in
    // words), and lines that are not events (each one a dead letter; the list is some 100 KB): more than a pipe
    // holds, so each command is still writing when its reader goes away.
    let mut lines: Vec<String> = Vec::new();
    for round in 0..30 {
        for e in &events {
            let mut e = e.clone();
            e["id"] = Value::from(format!("{}-{round}", e["id"].as_str().unwrap()));
            lines.push(e.to_string());
        }
    }
    for round in 30..230 {
        let mut e = events[0].clone();
        e["id"] = Value::from(format!("{}-{round}", e["id"].as_str().unwrap()));
        lines.push(e.to_string());
    }
    for n in 0..1000 {
        lines.push(format!("{{\"not an event\": {n}"));
    }
    let path = h.write_events("events.jsonl", &[]);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, h.followed(&path, "")).unwrap();
    let _run = Killed(vec![spawn(&config, &dir.join("run.log"))]);
    let order = order_id(&h, 0);
    let listed = || {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["dead-letter", "list", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait_for("1000 dead letters", Duration::from_secs(60), async || listed() > 1000).await;

    let piped = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        (child, first)
    };
    let finish = |mut child: Child, what: &str| {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{what} did not end within 30 s of its reader closing"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{what}: {status:?}: {}",
            err.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    };
    for args in [&["why", order.as_str()][..], &["dead-letter", "list"]] {
        let (child, first) = piped(args);
        assert!(!first.is_empty(), "{args:?} printed nothing");
        finish(child, &format!("{args:?}"));
    }
    // The tap prints decisions as they are made: keep the service deciding until the tap has ended.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let feeder = {
        let (path, events) = (path.clone(), events.clone());
        std::thread::spawn(move || {
            let mut round = 100;
            while rx.try_recv().is_err() {
                let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
                for e in &events {
                    let mut e = e.clone();
                    e["id"] = Value::from(format!("{}-{round}", e["id"].as_str().unwrap()));
                    writeln!(file, "{e}").unwrap();
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (tap, first) = piped(&["tap"]);
    assert!(!first.is_empty(), "tap printed nothing");
    finish(tap, "tap");
    tx.send(()).unwrap();
    feeder.join().unwrap();
}
