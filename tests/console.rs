//! The operator console in a real headless Chromium (Debian's `chromium`, driven by `playwright-core` from
//! `tests/console`), against `switchyard run` reading the project's Pub/Sub emulator over gRPC, with real Redis:
//! the overview shows the channel and the counts of `/metrics`; a provisioned order's decision is found; a dead
//! letter of a failed sink is retried from the page and leaves exactly one job; a paused route is resumed; a
//! reload with a broken rules file shows the refusal with its file:line; an event from the journal is explained;
//! the live tap shows a decision made while the page is open. Screenshots land in `target/console-screenshots/`.
//!
//! Needs `npm ci` in `tests/console` and `/usr/bin/chromium` (scripts/test installs both). Without them the test
//! is skipped with a loud message, unless `SWITCHYARD_CONSOLE_REQUIRED` is set (CI sets it): then it fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, OwnRedis, free_port, repo};
use serde_json::{Value, json};

const TOKEN: &str = "console-test-token-0123456789abcdef";

fn console_dir() -> PathBuf {
    repo().join("tests/console")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Whether the browser side can run here; panics when it cannot but is required.
fn browser_ready() -> bool {
    let required = std::env::var_os("SWITCHYARD_CONSOLE_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0");
    let modules = console_dir().join("node_modules/playwright-core").is_dir();
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let browser = chromium().is_file();
    if modules && node && browser {
        return true;
    }
    let why = if !node {
        "`node` is not installed".to_string()
    } else if !modules {
        "tests/console/node_modules is missing (run `npm ci` in tests/console)".to_string()
    } else {
        format!("{} is missing (install Debian's chromium)", chromium().display())
    };
    assert!(!required, "SWITCHYARD_CONSOLE_REQUIRED is set but {why}");
    eprintln!("\n**********************************************************************");
    eprintln!("SKIPPED the console browser test: {why}.");
    eprintln!("CI runs it (SWITCHYARD_CONSOLE_REQUIRED=1; scripts/test installs what it needs).");
    eprintln!("**********************************************************************\n");
    false
}

/// `switchyard run`, killed when the test ends however it ends.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP request on loopback (`Connection: close`): status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json_of(port: u16, path: &str) -> Value {
    let (status, body) = http(port, "GET", path, "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shipped rules (not their tests, which name recorded events beside them), copied where the test may break
/// them.
fn copy_rules(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(repo().join("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && !path.to_string_lossy().ends_with(".test.yaml") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Waiting jobs of the `provisioning` queue in a Redis, by job id.
fn jobs(redis: &OwnRedis, prefix: &str) -> Vec<String> {
    let mut c = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("LRANGE")
        .arg(format!("{prefix}:provisioning:wait"))
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_uses_the_console_in_a_real_browser() {
    use switchyard::emulator::{self, EmulatorOptions};
    if !browser_ready() {
        return;
    }
    let h = Harness::new("console");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    // The queue's own Redis, so that its outage is the failing sink's alone.
    let mut queue = OwnRedis::start();
    let rules = h.dir.path().join("rules");
    copy_rules(&rules);
    let port = free_port();
    let text = common::pubsub_config(
        &h,
        &emu,
        &common::redis_url(),
        &rules,
        "",
        &format!(
            "enricher: salesforce\nreload: {{ watch: false }}\n\
             delivery: {{ retry: {{ initial_backoff_ms: 50, max_backoff_ms: 200, budget_ms: 1500 }} }}\n\
             http: {{ listen: \"127.0.0.1:{port}\", token: \"${{SWITCHYARD_HTTP_TOKEN}}\" }}\n"
        ),
    )
    .replace(
        "enqueue-provisioning: { kind: queue,",
        &format!(
            "enqueue-provisioning: {{ kind: queue, redis: {{ url: \"{}\" }},",
            queue.url()
        ),
    );
    let config = h.dir.path().join("config.yaml");
    std::fs::write(&config, text).unwrap();
    let log = h.dir.path().join("run.log");
    let _service = Service(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(&config)
            .env("SWITCHYARD_HTTP_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/healthz", "").0 == 200) {
        assert!(
            Instant::now() < deadline,
            "the listener did not come up:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let bull = h.bull_prefix();
    let approve = |tx: &str, n: u32| {
        let (id, record) = h.record(n, None);
        let e = h.approval(
            tx,
            std::slice::from_ref(&id),
            Some("Approved"),
            json!({ id.clone(): record }),
        );
        emu.publish(&switchyard::event::Event::from_json(&e.to_string()).unwrap())
            .unwrap();
        id
    };
    // Order 1 is provisioned.
    let provisioned = approve("a", 1);
    wait_for("order 1's job", 30, || jobs(&queue, &bull).len() == 1);
    // Order 2's job cannot be enqueued while the queue's Redis is down: dead-lettered after the retries.
    queue.down();
    let failed = approve("b", 2);
    wait_for("order 2's dead letter", 30, || {
        json_of(port, "/api/dead-letters")
            .as_array()
            .is_some_and(|l| l.len() == 1)
    });
    queue.up();
    // A paused route (one these events never fire), and a rules file that does not load.
    let paused = "overflow-needs-resync";
    let (status, body) = http(port, "POST", &format!("/api/routes/{paused}/pause"), "");
    assert_eq!(status, 200, "{body}");
    let broken = "zz-broken.yaml";
    std::fs::write(
        rules.join(broken),
        "routes:\n  - name: broken\n    channel: orders\n    when: 'changed(\"Status\") &&'\n    then: [{ sink: log, message: x }]\n",
    )
    .unwrap();

    let shots = repo().join("target/console-screenshots");
    let mut node = Command::new("node")
        .arg(console_dir().join("console.mjs"))
        .current_dir(console_dir())
        .env("BASE", format!("http://127.0.0.1:{port}"))
        .env("TOKEN", TOKEN)
        .env("ORDER", &provisioned)
        .env("PAUSED", paused)
        .env("BROKEN", broken)
        .env("SHOTS", &shots)
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = node.stdin.take().unwrap();
    let stdout = BufReader::new(node.stdout.take().unwrap());
    let mut said = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        eprintln!("console: {line}");
        if line == "tap-ready" {
            approve("c", 3);
            writeln!(stdin, "published").unwrap();
        }
        said.push(line);
    }
    let status = node.wait().unwrap();
    assert!(
        status.success() && said.last().map(String::as_str) == Some("done"),
        "the browser test failed: {said:?}\n--- service log (tail) ---\n{}",
        log_text().lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );

    // What the clicks did, checked from outside the browser: exactly one job per order, nothing left over.
    let ids = jobs(&queue, &bull);
    for order in [&provisioned, &failed] {
        let n = ids.iter().filter(|j| j.contains(order.as_str())).count();
        assert_eq!(n, 1, "jobs of {order}: {ids:?}");
    }
    assert_eq!(json_of(port, "/api/dead-letters"), json!([]));
    let overview = json_of(port, "/api/overview");
    let route = overview["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == paused)
        .unwrap();
    assert!(route["paused"].is_null(), "{route}");
    let reloads = json_of(port, "/api/reloads");
    assert_eq!(reloads["reloads"][0]["ok"], false, "{reloads}");
    for shot in [
        "overview",
        "decisions",
        "decisions-live",
        "dead-letters",
        "rules-refused",
        "try",
    ] {
        assert!(shots.join(format!("{shot}.png")).is_file(), "no screenshot {shot}");
    }
    emu.shutdown().await.unwrap();
}

/// A listener other machines reach: every read needs the token, so the browser's first load gets the sign-in page;
/// the token entered there is kept in the tab's session storage and sent with every page after it.
#[test]
fn the_console_beyond_loopback_asks_for_the_token_once_and_keeps_it_in_the_tab() {
    if !browser_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, "").unwrap();
    let port = free_port();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "source: {{ kind: jsonl, jsonl: {{ path: {}, follow: true }} }}\nrules: [{}]\nsinks:\n  \
             enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\nenricher: recorded\n\
             http: {{ listen: \"0.0.0.0:{port}\", token: \"${{SWITCHYARD_HTTP_TOKEN}}\" }}\n",
            events.display(),
            repo().join("rules").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let _service = Service(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(&config)
            .env("SWITCHYARD_HTTP_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/healthz", "").0 == 200) {
        assert!(
            Instant::now() < deadline,
            "the listener did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new("node")
        .arg(console_dir().join("signin.mjs"))
        .current_dir(console_dir())
        .env("BASE", format!("http://127.0.0.1:{port}"))
        .env("TOKEN", TOKEN)
        .env("SHOTS", repo().join("target/console-screenshots"))
        .env("CHROMIUM", chromium())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim_end().ends_with("done"),
        "the sign-in test failed:\n{said}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(TOKEN), "the token never reaches the log");
}
