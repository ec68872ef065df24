//! Delivery under faults, with real processes and real Redis: a Redis outage mid-stream, SIGKILL and
//! restart, SIGTERM, a permanently failing sink and `dead-letter retry`, and a soak with random
//! connection kills. Each test owns its key prefixes; the outage and soak tests own a redis-server.

mod common;

use common::OwnRedis;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// `n` approvals of distinct orders, one per line, each with its recorded order (no WHMCS id yet).
fn approvals(tag: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("801{tag:0>7}{i:05}AAA");
            json!({"id": format!("{tag}-{i}:1"), "channel": "/data/OrderChangeEvent",
                   "header": {"entity": "Order", "change_type": "UPDATE", "record_ids": [id],
                              "changed_fields": ["Activation_Status__c"], "commit_timestamp": 1764230400000u64 + i as u64},
                   "fields": {"Activation_Status__c": "Activating"},
                   "record": {id.clone(): {"WHMCS_Order_ID__c": null, "AccountId": "001xx0000000001AAA"}}})
        })
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    tag: String,
    url: String,
    events: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(name: &str, url: &str, events: &[Value], extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let tag = format!("{:x}", common::hash(&format!("{name}{:?}", Instant::now())) & 0xfffffff);
        let path = dir.path().join("events.jsonl");
        let text: String = events.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "source: {{ kind: jsonl, jsonl: {{ path: events.jsonl }} }}\nrules: [{rules}]\n\
                 redis: {{ url: \"{url}\", key_prefix: \"sy-{tag}:\" }}\n\
                 sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order, prefix: bull-{tag} }}\n  \
                 invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
                 delivery: {{ concurrency: 32, lease_ms: 2000, retry: {{ initial_backoff_ms: 50, max_backoff_ms: 500, budget_ms: 60000 }} }}\n{extra}",
                rules = common::repo().join("rules").display(),
            ),
        )
        .unwrap();
        Setup {
            dir,
            tag,
            url: url.to_string(),
            events: path,
            config,
        }
    }

    /// Starts `switchyard run`; its log goes to a file (a pipe nobody reads would fill and block it).
    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("switchyard.log")
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Job ids in the provisioning queue (any state).
    fn job_ids(&self) -> Vec<String> {
        let mut c = self.conn();
        let mut ids: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("bull-{}:provisioning:wait", self.tag))
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap();
        ids.sort();
        ids
    }

    fn stored_offset(&self) -> Option<u64> {
        let key = format!(
            "sy-{}:checkpoint:jsonl:{}",
            self.tag,
            std::fs::canonicalize(&self.events).unwrap().display()
        );
        let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap();
        bytes.map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }

    fn wait_for_jobs(&self, at_least: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.job_ids().len() < at_least {
            assert!(
                Instant::now() < deadline,
                "fewer than {at_least} jobs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.events).unwrap().len()
    }
}

fn expected_ids(events: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "activation-{}-{}",
                e["header"]["record_ids"][0].as_str().unwrap(),
                e["header"]["commit_timestamp"]
            )
        })
        .collect();
    ids.sort();
    ids
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "switchyard did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn redis_outage_mid_stream_loses_and_duplicates_nothing() {
    let mut redis = OwnRedis::start();
    let events = approvals("outage", 1500);
    let setup = Setup::new("outage", &redis.url(), &events, "");
    let mut child = setup.spawn();
    setup.wait_for_jobs(200, Duration::from_secs(60));
    redis.down();
    std::thread::sleep(Duration::from_secs(3));
    redis.up();
    let status = wait_exit(&mut child, Duration::from_secs(120));
    let logs = setup.logs();
    assert!(status.success(), "{logs}");
    assert!(logs.contains("retrying"), "the outage was seen and retried: {logs}");
    assert_eq!(
        setup.job_ids(),
        expected_ids(&events),
        "every activation enqueued exactly once"
    );
    assert_eq!(
        setup.stored_offset(),
        Some(setup.file_len()),
        "the position is past the last event"
    );
    let letters: i64 = redis::cmd("XLEN")
        .arg(format!("sy-{}:dead-letters", setup.tag))
        .query(&mut setup.conn())
        .unwrap();
    assert_eq!(letters, 0);
}

#[test]
fn sigkill_mid_stream_then_restart_loses_no_activation_and_duplicates_none() {
    let events = approvals("kill", 3000);
    let setup = Setup::new("kill", &common::redis_url(), &events, "");
    let mut child = setup.spawn();
    setup.wait_for_jobs(300, Duration::from_secs(60));
    child.kill().unwrap();
    let _ = child.wait();
    let before = setup.job_ids().len();
    assert!(before < events.len(), "killed mid-stream ({before} jobs)");
    let offset = setup.stored_offset().unwrap_or(0);
    assert!(offset < setup.file_len());

    let mut again = setup.spawn();
    let status = wait_exit(&mut again, Duration::from_secs(120));
    assert!(status.success(), "{}", setup.logs());
    assert_eq!(setup.job_ids(), expected_ids(&events));
    assert_eq!(setup.stored_offset(), Some(setup.file_len()));
}

#[test]
fn sigterm_mid_stream_exits_0_with_the_position_of_the_last_settled_event() {
    let events = approvals("term", 5000);
    let setup = Setup::new("term", &common::redis_url(), &events, "");
    let mut child = setup.spawn();
    setup.wait_for_jobs(300, Duration::from_secs(60));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", setup.logs());
    let offset = setup.stored_offset().expect("a position was stored") as usize;
    let text = std::fs::read_to_string(&setup.events).unwrap();
    assert!(offset < text.len(), "stopped mid-stream");
    assert!(text[..offset].ends_with('\n'), "the position is a line boundary");
    let settled = text[..offset].lines().count();
    // Every event before the position has its job, and none after it: nothing in flight was abandoned.
    assert_eq!(setup.job_ids(), expected_ids(&events[..settled]));
}

/// SIGTERM while every Redis command hangs (the server paused with `CLIENT PAUSE ALL`): the stop still ends by its
/// deadline (twice `delivery.shutdown_timeout_ms`, plus 5 s), exiting 1 and saying what it was waiting for. The
/// events it could not settle are redelivered on restart, so nothing is lost.
#[test]
fn sigterm_while_redis_hangs_ends_by_the_drain_deadline_and_says_what_it_waited_for() {
    let redis = OwnRedis::start();
    let events = approvals("hang", 2000);
    let setup = Setup::new("hang", &redis.url(), &events, "");
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "delivery: { concurrency: 32,",
        "delivery: { shutdown_timeout_ms: 500, concurrency: 32,",
    );
    std::fs::write(&setup.config, config).unwrap();
    let mut child = setup.spawn();
    setup.wait_for_jobs(100, Duration::from_secs(60));
    let mut c = setup.conn();
    // Longer than the stop may take (a paused server serves no command, CLIENT UNPAUSE included, until it ends).
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(9_000)
        .arg("ALL")
        .query(&mut c)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    let signalled = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let took = signalled.elapsed();
    let logs = setup.logs();
    // 0.5 s × 2 + 5 s, with a second of slack for a loaded machine.
    assert!(took < Duration::from_secs(7), "the stop took {took:?}: {logs}");
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("not stopped 6 s after the stop began (waiting for: "),
        "{logs}"
    );
    // Restarted on a Redis that answers again (once the pause is over), it finishes the file: every activation
    // once.
    let mut child = setup.spawn();
    setup.wait_for_jobs(events.len(), Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(setup.job_ids(), expected_ids(&events));
}

#[test]
fn a_permanently_failing_sink_is_dead_lettered_alone_and_retry_succeeds_once_it_works() {
    let h = common::Harness::new("permanent");
    let events: Vec<Value> = (1..=3)
        .map(|n| {
            h.change(
                &format!("status-{n}"),
                &[h.order(n)],
                &["Status", "Activation_Status__c"],
                json!({"Status": "Approved", "Activation_Status__c": "Activating"}),
                common::records(&[h.record(n, None)]),
            )
        })
        .collect();
    let setup = Setup::new("permanent", &common::redis_url(), &events, "");
    // BullMQ counts jobs with INCR on this key before it writes anything: a non-number there makes
    // every add fail with an error no retry can fix, and leaves no half-written job behind.
    let meta = format!("bull-{}:provisioning:id", setup.tag);
    let _: () = redis::cmd("SET")
        .arg(&meta)
        .arg("not a hash")
        .query(&mut setup.conn())
        .unwrap();
    let detail = format!("orders:detail:{}", h.order(1));
    let _: () = redis::cmd("SET")
        .arg(&detail)
        .arg("cached")
        .query(&mut setup.conn())
        .unwrap();

    let mut child = setup.spawn();
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(status.success(), "{}", setup.logs());
    let exists: i64 = redis::cmd("EXISTS").arg(&detail).query(&mut setup.conn()).unwrap();
    assert_eq!(exists, 0, "the cache route of the same event still ran");

    let list = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dead-letter", "list", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.status.success(),
        "{listed}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(listed.lines().count(), 1 + 3, "{listed}");
    assert!(
        listed.contains("provision-on-activating") && listed.contains("not an integer"),
        "{listed}"
    );
    // The routes' on_failure write-backs have no org to go to in this config: not sent, and said so, once each.
    assert_eq!(
        setup.logs().matches("Write-back not sent").count(),
        3,
        "{}",
        setup.logs()
    );

    // Fixed: the retry runs each action again through the normal path, with its idempotency key.
    let _: () = redis::cmd("DEL").arg(&meta).query(&mut setup.conn()).unwrap();
    let retry = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dead-letter", "retry", "--all", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(
        retry.status.success(),
        "{}{}",
        String::from_utf8_lossy(&retry.stdout),
        String::from_utf8_lossy(&retry.stderr)
    );
    assert_eq!(setup.job_ids(), expected_ids(&events));
    let list = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dead-letter", "list", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).lines().count(),
        1,
        "retried letters are removed"
    );
}

#[test]
fn soak_of_100000_events_with_random_connection_kills_settles_everything_once() {
    let redis = OwnRedis::start();
    // 50,000 activations, each delivered twice (the second time later in the stream, as a redelivery).
    let n: usize = std::env::var("SOAK_ACTIVATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SOAK_ACTIVATIONS);
    let distinct = approvals("soak", n);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut keyed: Vec<(u64, &Value)> = Vec::with_capacity(2 * n);
    for (i, e) in distinct.iter().enumerate() {
        let first = 4 * i as u64;
        keyed.push((first, e));
        keyed.push((first + 1 + next() % 4000, e));
    }
    keyed.sort_by_key(|(k, _)| *k);
    let events: Vec<Value> = keyed.into_iter().map(|(_, e)| e.clone()).collect();
    assert_eq!(events.len(), 2 * n);
    let setup = Setup::new("soak", &redis.url(), &events, "");
    let mut child = setup.spawn();

    // Chaos: every 100-300 ms, drop every client connection but our own. Calls in flight fail with
    // connection errors (transient) and are retried; replies lost after a command ran are absorbed by
    // the idempotency keys and BullMQ's job ids.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let stop = stop.clone();
        let url = redis.url();
        std::thread::spawn(move || {
            let mut kills = 0;
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut n: u64 = 7;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                std::thread::sleep(Duration::from_millis(100 + (n >> 33) % 200));
                if redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query::<i64>(&mut conn)
                    .is_ok()
                {
                    kills += 1;
                }
            }
            kills
        })
    };
    let status = wait_exit(&mut child, Duration::from_secs(600));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = chaos.join().unwrap();
    let logs = setup.logs();
    assert!(status.success(), "{}", &logs[logs.len().saturating_sub(4000)..]);
    assert!(kills > 3, "the chaos ran ({kills} rounds)");
    let (got, want) = (setup.job_ids(), expected_ids(&distinct));
    if got != want {
        let missing: Vec<&String> = want.iter().filter(|id| got.binary_search(id).is_err()).collect();
        let mut dupes = got.clone();
        dupes.dedup();
        panic!(
            "jobs != distinct activations: {} jobs for {} activations; missing {:?}; {} duplicate entries; log tail:\n{}",
            got.len(),
            want.len(),
            &missing[..missing.len().min(10)],
            got.len() - dupes.len(),
            &logs[logs.len().saturating_sub(3000)..]
        );
    }
    assert_eq!(setup.stored_offset(), Some(setup.file_len()), "zero unsettled events");
    let letters: i64 = redis::cmd("XLEN")
        .arg(format!("sy-{}:dead-letters", setup.tag))
        .query(&mut setup.conn())
        .unwrap();
    if letters != 0 {
        let entries: redis::Value = redis::cmd("XRANGE")
            .arg(format!("sy-{}:dead-letters", setup.tag))
            .arg("-")
            .arg("+")
            .query(&mut setup.conn())
            .unwrap();
        let errors: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("dead-letter"))
            .take(20)
            .collect();
        panic!(
            "transient failures never reach the dead letters, yet {letters} did: {entries:?}\nlog:\n{}",
            errors.join("\n")
        );
    }
}

/// Activations in the soak (each delivered twice); `SOAK_ACTIVATIONS` overrides it for quick runs.
const SOAK_ACTIVATIONS: usize = 50_000;

/// The idempotency claims and done markers of concurrent actions go to Redis in shared calls, each caller getting its
/// own answer (done, busy, ours); a call that fails because Redis is gone fails each of its writes as transient (the
/// dispatcher retries them), and the writer serves again once Redis is back.
#[tokio::test]
async fn concurrent_idempotency_writes_share_calls_and_each_gets_its_own_answer() {
    use futures_util::future::join_all;
    use switchyard::state::{Claim, Idempotency, Ttls};

    let mut redis = OwnRedis::start();
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = switchyard::state::Conn::Server(
        redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .unwrap(),
    );
    let ttls = Ttls {
        lease: Duration::from_secs(30),
        done: Duration::from_secs(600),
    };
    let idem = Idempotency::redis(conn.clone(), "batch:", ttls);
    let other = Idempotency::redis(conn, "batch:", ttls);
    let key = |i: usize| format!("k{i}");
    // Keys 0-9 are done, 10-19 leased by another holder, 20-29 leased by us already (a retry after a lost reply).
    for i in 0..10 {
        other.complete("q", &key(i), None).await.unwrap();
    }
    for i in 10..20 {
        assert!(matches!(
            other.claim("q", &key(i), None, None).await.unwrap(),
            Claim::Acquired(_)
        ));
    }
    for i in 20..30 {
        assert!(matches!(
            idem.claim("q", &key(i), Some("mine"), None).await.unwrap(),
            Claim::Acquired(_)
        ));
    }
    let keys: Vec<String> = (0..100).map(key).collect();
    let (writes, calls) = idem.write_stats().unwrap();
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            if (20..30).contains(&i) {
                "mine".to_string()
            } else {
                format!("token-{i}")
            }
        })
        .collect();
    let answers = join_all((0..100).map(|i| idem.claim("q", &keys[i], Some(&tokens[i]), None))).await;
    let (writes_after, calls_after) = idem.write_stats().unwrap();
    assert_eq!(writes_after - writes, 100);
    assert!(
        calls_after - calls <= 2,
        "100 concurrent claims took {} calls",
        calls_after - calls
    );
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = match i {
            0..10 => Claim::Done,
            10..20 => Claim::Busy,
            _ => Claim::Acquired(tokens[i].clone()),
        };
        assert_eq!(answer.unwrap(), expected, "claim {i}");
    }
    // Their done markers, together too; then every key but the other holder's reads as done.
    let done = join_all((20..100).map(|i| idem.complete("q", &keys[i], None))).await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert!(idem.write_stats().unwrap().1 - calls_after <= 2);
    let again = join_all((0..100).map(|i| idem.claim("q", &keys[i], None, None))).await;
    for (i, answer) in again.into_iter().enumerate() {
        let expected = if (10..20).contains(&i) {
            Claim::Busy
        } else {
            Claim::Done
        };
        assert_eq!(answer.unwrap(), expected, "claim {i} after the done markers");
    }

    // Redis goes away: every write of the failed call fails, transiently.
    redis.down();
    let outage: Vec<String> = (0..20).map(|i| format!("outage-{i}")).collect();
    let failed = join_all(outage.iter().map(|k| idem.claim("q", k, None, None))).await;
    for answer in &failed {
        assert!(matches!(answer, Err(e) if e.is_transient()), "{answer:?}");
    }
    // Back (its append-only file kept the markers): the same writer answers again.
    redis.up();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match idem.claim("q", "outage-0", None, None).await {
            Ok(claim) => {
                assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the marker writer did not recover after Redis came back: {e}"),
        }
    }
    assert_eq!(idem.claim("q", &key(0), None, None).await.unwrap(), Claim::Done);
}
