//! Test harness: runs the real pipeline against the real Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), each test on its own BullMQ prefix, key prefix and order ids.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use switchyard::app::service::Service;
use switchyard::config::LoadedConfig;
use switchyard::delivery::Stats;
use tokio::sync::watch;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tracing writer that keeps everything for assertions.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Harness {
    pub name: String,
    /// Unique per test and per run: order ids, BullMQ prefix and key prefix derive from it.
    pub tag: String,
    pub dir: tempfile::TempDir,
    pub logs: Logs,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Harness {
    pub fn new(name: &str) -> Harness {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let tag = format!("{:x}", (nanos as u64) ^ (std::process::id() as u64) << 40 ^ hash(name));
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Harness {
            name: name.into(),
            tag,
            dir: tempfile::tempdir().unwrap(),
            logs,
            _guard: guard,
        }
    }

    /// An 18-character Salesforce-style Order id unique to this test run.
    pub fn order(&self, n: u32) -> String {
        let t: String = self.tag.chars().rev().take(10).collect();
        format!("801{t:0>10}{n:02}AAA")
    }

    pub fn account(&self, n: u32) -> String {
        let t: String = self.tag.chars().rev().take(10).collect();
        format!("001{t:0>10}{n:02}AAA")
    }

    pub fn bull_prefix(&self) -> String {
        format!("sytest-{}", self.tag)
    }

    pub fn key_prefix(&self) -> String {
        format!("sytest:{}:", self.tag)
    }

    /// A config using Redis and the shipped rules; `extra` is appended (e.g. `mode: platform-event`).
    pub fn config(&self, events: &Path, extra: &str) -> String {
        self.config_with_rules(events, &repo().join("rules"), extra)
    }

    /// Like `config`, with the events file followed: the service keeps running past its end until it is stopped.
    pub fn followed(&self, events: &Path, extra: &str) -> String {
        self.config(events, extra).replace("jsonl: {", "jsonl: { follow: true,")
    }

    /// Like `followed`, with an HTTP listener on a free loopback port (returned).
    pub fn followed_with_http(&self, events: &Path) -> (u16, String) {
        let port = free_port();
        (
            port,
            self.followed(events, &format!("http: {{ listen: \"127.0.0.1:{port}\" }}\n")),
        )
    }

    /// Like `config`, with the given rules file or folder.
    pub fn config_with_rules(&self, events: &Path, rules: &Path, extra: &str) -> String {
        format!(
            "source:\n  kind: jsonl\n  jsonl: {{ path: {events} }}\nrules: [{rules}]\nredis: {{ url: \"{url}\", key_prefix: \"{kp}\" }}\n\
             sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order, prefix: {bp} }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n{extra}",
            events = events.display(),
            rules = rules.display(),
            url = redis_url(),
            kp = self.key_prefix(),
            bp = self.bull_prefix(),
        )
    }

    pub fn write_events(&self, name: &str, events: &[Value]) -> PathBuf {
        let path = self.dir.path().join(name);
        let text: String = events.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs the whole pipeline (config, rules, Redis sinks) over `events` to the end of the file.
    pub async fn run(&self, events: &[Value]) -> Stats {
        self.run_with(events, "").await
    }

    pub async fn run_with(&self, events: &[Value], extra: &str) -> Stats {
        let path = self.write_events("events.jsonl", events);
        self.run_file(&path, extra).await
    }

    pub async fn run_file(&self, path: &Path, extra: &str) -> Stats {
        self.run_config(&self.config(path, extra)).await
    }

    /// Writes `rules` as this test's rules file and runs `events` through them.
    pub async fn run_rules(&self, rules: &str, events: &[Value], extra: &str) -> Stats {
        let rules_path = self.dir.path().join("rules.yaml");
        std::fs::write(&rules_path, rules).unwrap();
        let events = self.write_events("events.jsonl", events);
        self.run_config(&self.config_with_rules(&events, &rules_path, extra))
            .await
    }

    pub async fn run_config(&self, text: &str) -> Stats {
        let config_path = self.dir.path().join("config.yaml");
        let loaded = LoadedConfig::parse(&config_path, text, &|_| None).unwrap_or_else(|e| panic!("config: {e}"));
        let service = Service::start(loaded, false)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        let (_stop, shutdown) = watch::channel(false);
        service.run(shutdown).await.unwrap()
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every job in the provisioning queue: (job id, name, data), in the order they were added.
    pub async fn jobs(&self) -> Vec<(String, String, Value)> {
        let options = bullmq::QueueOptions::new()
            .connection(bullmq::options::RedisConnectionOptions::new().url(redis_url()))
            .prefix(self.bull_prefix());
        let queue = bullmq::Queue::with_options("provisioning", options).await.unwrap();
        let jobs = queue.get_waiting(0, -1).await.unwrap();
        jobs.iter()
            .map(|j| (j.id().to_string(), j.name().to_string(), j.data().clone()))
            .collect()
    }

    pub async fn set_key(&self, key: &str) {
        let mut conn = self.redis().await;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("cached")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    pub async fn key_exists(&self, key: &str) -> bool {
        let mut conn = self.redis().await;
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap()
            == 1
    }

    pub async fn dead_letters(&self) -> Vec<Value> {
        let mut conn = self.redis().await;
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(format!("{}dead-letters", self.key_prefix()))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        entries
            .into_iter()
            .map(|(_, f)| serde_json::from_str(&f[0].1).unwrap())
            .collect()
    }

    /// A CDC UPDATE on Orders, as the Pub/Sub source would deliver it.
    pub fn change(&self, tx: &str, ids: &[String], changed: &[&str], fields: Value, record: Value) -> Value {
        json!({
            "id": format!("{tx}-{}:1", self.tag), "channel": "/data/OrderChangeEvent", "kind": "change",
            "replay_id": "00000000000003e8",
            "header": {"entity": "Order", "change_type": "UPDATE", "record_ids": ids, "changed_fields": changed,
                       "nulled_fields": [], "diff_fields": [], "change_origin": "com/salesforce/api/rest/62.0",
                       "transaction_key": format!("{tx}-{}", self.tag), "sequence_number": 1,
                       "commit_timestamp": 1764230400000u64 + hash(tx) % 100_000, "commit_number": 42,
                       "commit_user": "005xx0000000001AAA"},
            "fields": fields, "record": record
        })
    }

    /// The approval Flow's change: Status (when given) and Activation_Status__c = Activating.
    pub fn approval(&self, tx: &str, ids: &[String], status: Option<&str>, record: Value) -> Value {
        let mut changed = vec![
            "Activation_Status__c",
            "Activation_Error_Code__c",
            "Activation_Error_Message__c",
            "LastModifiedDate",
        ];
        let mut fields = json!({"Activation_Status__c": "Activating", "Activation_Error_Code__c": null,
                                "Activation_Error_Message__c": null, "LastModifiedDate": 1764230400000u64});
        if let Some(status) = status {
            changed.insert(0, "Status");
            fields["Status"] = json!(status);
        }
        self.change(tx, ids, &changed, fields, record)
    }

    /// The enrichment record map: order id -> fields (`null` = not found).
    pub fn record(&self, n: u32, whmcs: Option<&str>) -> (String, Value) {
        (
            self.order(n),
            json!({"WHMCS_Order_ID__c": whmcs, "AccountId": self.account(n)}),
        )
    }
}

/// An 18-character Order id unique to this run, for up to 9,999 orders (the streaming tests' many approvals).
pub fn order4(h: &Harness, n: u32) -> String {
    let t: String = h.tag.chars().rev().take(8).collect();
    format!("801{t:0>8}{n:04}AAA")
}

/// The approval of order [`order4`] `n` whose org record has no WHMCS id yet, as the Pub/Sub source decodes it.
pub fn activation(h: &Harness, n: u32) -> switchyard::event::Event {
    let id = order4(h, n);
    let record = json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(n % 100)});
    let value = h.approval(
        &format!("tx-{n}"),
        std::slice::from_ref(&id),
        Some("Approved"),
        records(&[(id.clone(), record)]),
    );
    switchyard::event::Event::from_json(&value.to_string()).unwrap()
}

pub fn hash(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Builds a `record` map from pairs.
pub fn records(pairs: &[(String, Value)]) -> Value {
    Value::Object(pairs.iter().cloned().collect())
}

/// A redis-server this test starts, stops and restarts (AOF on, so a restart keeps the data).
pub struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not come up on port {}", self.port);
    }

    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl OwnRedis {
    /// Write commands from every client wait for `d` (CLIENT PAUSE ... WRITE): a Redis that stalls, not one that is
    /// gone.
    pub fn pause_writes(&self, d: Duration) {
        let mut c = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(d.as_millis() as u64)
            .arg("WRITE")
            .query(&mut c)
            .unwrap();
    }

    /// Jobs waiting in the `provisioning` queue under a BullMQ prefix.
    pub fn job_count(&self, prefix: &str) -> usize {
        let mut c = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        redis::cmd("LLEN")
            .arg(format!("{prefix}:provisioning:wait"))
            .query(&mut c)
            .unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// `switchyard run --config examples/salesforce.yaml` against `emu`, configured by environment alone (nothing of the
/// caller's `SF_*`/`SWITCHYARD_*` environment leaks in), on this harness's key and BullMQ prefixes, logging to
/// `<dir>/<log>`; the caller adds what differs (mode, listener, lease TTL) and spawns it.
pub fn salesforce_run(h: &Harness, emu: &switchyard::emulator::EmulatorHandle, log: &str) -> std::process::Command {
    use switchyard::emulator;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SF_") || k.starts_with("SWITCHYARD_")) {
        cmd.env_remove(k);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(h.dir.path().join(log))
        .unwrap();
    cmd.args(["run", "--config"])
        .arg(repo().join("examples/salesforce.yaml"))
        .env("SF_PUBSUB_ENDPOINT", emu.endpoint())
        .env("SF_LOGIN_URL", emu.base_url())
        .env("SF_CLIENT_ID", emulator::DEFAULT_CLIENT_ID)
        .env("SF_CLIENT_SECRET", emulator::DEFAULT_CLIENT_SECRET)
        .env("REDIS_URL", redis_url())
        .env("SWITCHYARD_KEY_PREFIX", h.key_prefix())
        .env("BULLMQ_PREFIX", h.bull_prefix())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    cmd
}

/// The config of a `pubsub` source against `emu` (its OAuth client, quick reconnects, positions in Redis under this
/// harness's prefixes, the shipped sink names) with the rules at `rules`; `pubsub` adds settings to
/// `source.pubsub`, `extra` top-level lines.
pub fn pubsub_config(
    h: &Harness,
    emu: &switchyard::emulator::EmulatorHandle,
    redis: &str,
    rules: &Path,
    pubsub: &str,
    extra: &str,
) -> String {
    use switchyard::emulator;
    format!(
        "source:\n  kind: pubsub\n  pubsub: {{ endpoint: \"{endpoint}\", initial_backoff_ms: 20, max_backoff_ms: 200, \
         replay: {{ start: stored, fallback: earliest }}{pubsub} }}\n\
         rules: [{rules}]\nredis: {{ url: \"{redis}\", key_prefix: \"{kp}\" }}\n\
         sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order, prefix: {bp} }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
         salesforce: {{ login_url: \"{login}\", client_id: {id}, client_secret: {secret} }}\n\
         {extra}",
        endpoint = emu.endpoint(),
        rules = rules.display(),
        kp = h.key_prefix(),
        bp = h.bull_prefix(),
        login = emu.base_url(),
        id = emulator::DEFAULT_CLIENT_ID,
        secret = emulator::DEFAULT_CLIENT_SECRET,
    )
}

/// The stock Node BullMQ worker of the interop tests.
pub fn interop_dir() -> PathBuf {
    repo().join("tests/interop")
}

/// Whether the stock Node BullMQ worker (`tests/interop`) can run here; panics when it cannot but is required
/// (`SWITCHYARD_INTEROP_REQUIRED`, set by CI), else says loudly that the Node side is skipped.
pub fn node_ready() -> bool {
    let required = std::env::var_os("SWITCHYARD_INTEROP_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0");
    let modules = interop_dir().join("node_modules/bullmq");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if modules.is_dir() && node {
        return true;
    }
    let why = if node {
        "tests/interop/node_modules is missing (run `npm ci` in tests/interop)"
    } else {
        "`node` is not installed"
    };
    assert!(!required, "SWITCHYARD_INTEROP_REQUIRED is set but {why}");
    eprintln!("\n**********************************************************************");
    eprintln!("SKIPPED the Node BullMQ worker: {why}.");
    eprintln!("CI runs it (SWITCHYARD_INTEROP_REQUIRED=1 after `npm ci`).");
    eprintln!("**********************************************************************\n");
    false
}
