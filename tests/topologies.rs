//! Production Redis topologies with real processes on loopback, as BullMQ's own users run them: a Sentinel-managed
//! primary (one replica, three sentinels) SIGKILLed mid-stream, and a three-node Redis Cluster with switchyard
//! SIGKILLed mid-stream. Each streams 2,000 activations from the emulator over gRPC into `switchyard run` (the
//! binary), counts the jobs by idempotency key (BullMQ's job id), and lets the stock Node BullMQ worker, through
//! Sentinel or on `IORedis.Cluster`, consume them all.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, activation, free_port, node_ready, repo};
use serde_json::Value;
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions};
use switchyard::sources::pubsub::subscriber::checkpoint_key;

const ACTIVATIONS: u32 = 2_000;

/// A process this test started; killed when dropped.
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        self.0.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn query(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redis-server` on `port` with `args`, answering PING.
fn redis_server(dir: &Path, port: u16, args: &[&str]) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/test installs it)");
    let proc = Proc(child);
    wait_until(
        &format!("redis-server on {port} answers"),
        Duration::from_secs(10),
        || query(port, &["PING"]).is_ok(),
    );
    proc
}

/// `switchyard run` on `config`, logging to `<dir>/<log>`.
fn spawn_switchyard(h: &Harness, config: &Path, log: &str) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(h.dir.path().join(log))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--no-watch", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("SWITCHYARD_MODE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn logs(h: &Harness) -> String {
    let mut text = String::new();
    for name in ["first.log", "second.log"] {
        text += &std::fs::read_to_string(h.dir.path().join(name)).unwrap_or_default();
    }
    text
}

/// The jobs waiting in `prefix`'s provisioning queue at `url` (a server or, with `cluster`, the cluster's seeds):
/// (job id, sfOrderId).
async fn jobs(url: &str, cluster: &[String], prefix: &str) -> Vec<(String, String)> {
    let mut connection = bullmq::options::RedisConnectionOptions::new();
    connection = if cluster.is_empty() {
        connection.url(url)
    } else {
        connection.cluster_nodes(cluster.iter().map(|n| format!("redis://{n}")))
    };
    let options = bullmq::QueueOptions::new().connection(connection).prefix(prefix);
    let Ok(queue) = bullmq::Queue::with_options("provisioning", options).await else {
        return Vec::new();
    };
    let Ok(waiting) = queue.get_waiting(0, -1).await else {
        return Vec::new();
    };
    waiting
        .iter()
        .map(|j| {
            (
                j.id().to_string(),
                j.data()["sfOrderId"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until `prefix`'s queue at `url` (or on the `cluster` seeds) holds at least `n` jobs; past `within`, fails
/// with `what`, the count reached and the logs.
async fn wait_for_jobs(
    h: &Harness,
    (url, cluster, prefix): (&str, &[String], &str),
    n: usize,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let have = jobs(url, cluster, prefix).await.len();
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} jobs: {what}; logs:\n{}",
            logs(h)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job once: as many distinct job ids (idempotency keys) and orders as jobs, `expected` of them.
fn assert_exactly_once(jobs: &[(String, String)], expected: usize, context: &str) {
    let mut ids: Vec<&str> = jobs.iter().map(|j| j.0.as_str()).collect();
    ids.sort();
    ids.dedup();
    let mut orders: Vec<&str> = jobs.iter().map(|j| j.1.as_str()).collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), expected, "every activation enqueued: {context}");
    assert_eq!(ids.len(), jobs.len(), "no two jobs with one idempotency key: {context}");
    assert_eq!(jobs.len(), expected, "no duplicate job: {context}");
}

/// The stock Node BullMQ worker with `env` (SENTINELS + MASTER, or CLUSTER) consumes `expect` jobs, each once.
fn node_worker(prefix: &str, expect: usize, env: &[(&str, String)]) {
    let mut worker = Command::new("node");
    worker
        .arg("worker.js")
        .current_dir(common::interop_dir())
        .env("PREFIX", prefix)
        .env("QUEUE", "provisioning")
        .env("EXPECT", expect.to_string())
        .env("CONCURRENCY", "32")
        .env("GIVE_UP_MS", "90000");
    for (k, v) in env {
        worker.env(k, v);
    }
    let out = worker.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        let start: String = stdout.chars().take(2_000).collect();
        panic!(
            "worker output is not JSON ({e}): {start}…\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "the worker did not complete {expect} jobs: counts {}\n{}",
        report["counts"],
        String::from_utf8_lossy(&out.stderr)
    );
    let mut processed: Vec<&str> = report["processed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    let taken = processed.len();
    processed.sort();
    processed.dedup();
    assert_eq!(
        (taken, processed.len()),
        (expect, expect),
        "the worker took each job once"
    );
}

/// The config of `switchyard run` against `emu` with the shipped rules, the `redis` section given (its address and
/// key prefix).
fn config(h: &Harness, emu: &EmulatorHandle, redis: &str, bull_prefix: &str) -> std::path::PathBuf {
    let text = common::pubsub_config(h, emu, "PLACEHOLDER", &repo().join("rules"), "", "")
        .replace(
            &format!("redis: {{ url: \"PLACEHOLDER\", key_prefix: \"{}\" }}", h.key_prefix()),
            &format!("redis: {{ {redis} }}"),
        )
        .replace(&format!("prefix: {}", h.bull_prefix()), &format!("prefix: \"{bull_prefix}\""))
        // A restarted process takes over its predecessor's channel lease soon after.
        + "lease: { ttl_ms: 2000 }\ndelivery: { retry: { max_backoff_ms: 500 } }\n";
    let path = h.dir.path().join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Publishes approvals `from..=to`, a few at a time (a stream, not one burst).
async fn stream(h: &Harness, emu: &EmulatorHandle, from: u32, to: u32) {
    for n in from..=to {
        emu.publish(&activation(h, n)).unwrap();
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}

/// Publishes approvals `from..=to` like [`stream`], and once `waiting()` (jobs so far) reaches `at`, runs `kill`
/// at once, with events still in flight, and streams on; returns the jobs seen at the kill.
async fn stream_killing(
    h: &Harness,
    emu: &EmulatorHandle,
    (from, to): (u32, u32),
    at: usize,
    mut waiting: impl FnMut() -> usize,
    kill: impl FnOnce(),
) -> usize {
    let mut kill = Some(kill);
    let mut seen = 0;
    for n in from..=to {
        emu.publish(&activation(h, n)).unwrap();
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
            if kill.is_some() {
                seen = waiting();
                if seen >= at {
                    kill.take().unwrap()();
                }
            }
        }
    }
    assert!(
        kill.is_none(),
        "only {seen} jobs by the end of the stream: the kill never came"
    );
    seen
}

/// `LLEN` of the provisioning queue's wait list under `prefix`.
fn waiting(conn: &mut impl redis::ConnectionLike, prefix: &str) -> usize {
    redis::cmd("LLEN")
        .arg(format!("{prefix}:provisioning:wait"))
        .query(conn)
        .unwrap_or(0)
}

/// `SENTINEL get-master-addr-by-name mymaster` on the sentinel at `port`.
fn primary_port(sentinel: u16) -> Option<u16> {
    let reply = query(sentinel, &["SENTINEL", "get-master-addr-by-name", "mymaster"]).ok()?;
    let addr: Vec<String> = redis::from_redis_value(reply).ok()?;
    addr.get(1)?.parse().ok()
}

/// A Sentinel-managed primary SIGKILLed while 2,000 activations stream in: the sentinels promote the replica,
/// switchyard follows them (retrying the writes that failed in the switch, never a dead letter), and the result is
/// 2,000 jobs, none twice; the position kept advancing on the new primary and a restarted process resumes from it;
/// the stock BullMQ worker, through Sentinel, consumes every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_mid_stream_gives_every_job_once_and_the_worker_follows() {
    let h = Harness::new("sentinel");
    let dir = tempfile::tempdir().unwrap();
    let (primary_at, replica_at) = (free_port(), free_port());
    let mut primary = redis_server(dir.path(), primary_at, &[]);
    let replica_dir = dir.path().join("replica");
    std::fs::create_dir_all(&replica_dir).unwrap();
    let _replica = redis_server(
        &replica_dir,
        replica_at,
        &["--replicaof", "127.0.0.1", &primary_at.to_string()],
    );
    let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _sentinels: Vec<Proc> = sentinel_ports
        .iter()
        .map(|port| {
            // Sentinels rewrite their config file: each gets its own, writable.
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {primary_at} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 4000\n"
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Proc(child)
        })
        .collect();
    // Each sentinel knows the replica and the two other sentinels (so that two can agree on a failover).
    for &port in &sentinel_ports {
        wait_until(
            &format!("sentinel {port} sees the replica and its peers"),
            Duration::from_secs(20),
            || {
                let count = |what: &str| {
                    query(port, &["SENTINEL", what, "mymaster"])
                        .ok()
                        .and_then(|v| redis::from_redis_value::<Vec<redis::Value>>(v).ok())
                        .map_or(0, |v| v.len())
                };
                count("replicas") == 1 && count("sentinels") == 2
            },
        );
    }
    let sentinels: Vec<String> = sentinel_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();

    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let bull = h.bull_prefix();
    let path = config(
        &h,
        &emu,
        &format!(
            "sentinels: [{}], master: mymaster, key_prefix: \"{}\"",
            sentinels.join(", "),
            h.key_prefix()
        ),
        &bull,
    );
    let mut first = spawn_switchyard(&h, &path, "first.log");
    // The primary dies mid-stream (events in flight); the rest arrives while the sentinels elect the replica.
    let mut on_primary = redis::Client::open(format!("redis://127.0.0.1:{primary_at}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let killed_at = std::cell::Cell::new(None);
    let at_kill = stream_killing(
        &h,
        &emu,
        (1, ACTIVATIONS),
        300,
        || waiting(&mut on_primary, &bull),
        || {
            primary.kill();
            killed_at.set(Some(Instant::now()));
        },
    )
    .await;
    let killed_at = killed_at.get().unwrap();
    wait_until("the sentinels promote the replica", Duration::from_secs(30), || {
        primary_port(sentinel_ports[0]) == Some(replica_at)
    });
    let promoted = killed_at.elapsed();
    let new_url = format!("redis://127.0.0.1:{replica_at}");
    let queue = (new_url.as_str(), &[][..], bull.as_str());
    let want = ACTIVATIONS as usize;
    wait_for_jobs(&h, queue, want, Duration::from_secs(90), "on the new primary").await;
    // Settled: the stored position reaches the last event, on the new primary.
    let key = format!(
        "{}checkpoint:{}",
        h.key_prefix(),
        checkpoint_key(switchyard::config::Mode::Cdc, emulator::ORDER_CHANNEL)
    );
    let last = emu.latest_replay_id();
    wait_until(
        "the position reaches the last event on the new primary",
        Duration::from_secs(20),
        || {
            query(replica_at, &["GET", &key])
                .ok()
                .and_then(|v| redis::from_redis_value::<Vec<u8>>(v).ok())
                .is_some_and(|stored| stored >= last)
        },
    );
    assert!(first.terminate().success(), "{}", logs(&h));
    let log = logs(&h);
    assert!(
        log.contains("the sentinels name this one now"),
        "switchyard followed the failover: {log}"
    );

    // A restart resumes from the position stored on the new primary: one more activation, one more job.
    let mut second = spawn_switchyard(&h, &path, "second.log");
    stream(&h, &emu, ACTIVATIONS + 1, ACTIVATIONS + 1).await;
    wait_for_jobs(
        &h,
        queue,
        want + 1,
        Duration::from_secs(30),
        "the restart did not resume",
    )
    .await;
    assert!(second.terminate().success(), "{}", logs(&h));
    let all = jobs(&new_url, &[], &bull).await;
    let context = format!("{at_kill} jobs at the kill, promoted {promoted:?} after it");
    assert_exactly_once(&all, ACTIVATIONS as usize + 1, &context);
    let second_log = std::fs::read_to_string(h.dir.path().join("second.log")).unwrap();
    assert!(
        second_log.contains("Resuming after the stored position"),
        "{second_log}"
    );
    let dead: Vec<redis::Value> = redis::from_redis_value(
        query(
            replica_at,
            &["XRANGE", &format!("{}dead-letters", h.key_prefix()), "-", "+"],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(dead.is_empty(), "no dead letter for a failover: {dead:?}");
    eprintln!("sentinel: {context}; {} jobs, each once", all.len());

    if node_ready() {
        node_worker(
            &bull,
            all.len(),
            &[("SENTINELS", sentinels.join(",")), ("MASTER", "mymaster".into())],
        );
    }
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of three primaries (`redis-cli --cluster create`): 2,000 activations streamed with switchyard
/// SIGKILLed mid-stream and restarted give 2,000 jobs, none twice, no CROSSSLOT error anywhere (every key carries
/// a hash tag: `{…}` in `key_prefix` and the BullMQ prefix), and the stock worker on `IORedis.Cluster` with the same
/// prefix processes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_gives_every_job_once_across_a_kill_and_the_worker_consumes_them() {
    let h = Harness::new("cluster");
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
    let _nodes: Vec<Proc> = ports
        .iter()
        .map(|&port| {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            redis_server(
                &node_dir,
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
        })
        .collect();
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let create = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(create.status.success(), "{}", String::from_utf8_lossy(&create.stdout));
    for &port in &ports {
        wait_until(
            &format!("node {port} sees the cluster ok"),
            Duration::from_secs(20),
            || {
                query(port, &["CLUSTER", "INFO"])
                    .ok()
                    .and_then(|v| redis::from_redis_value::<String>(v).ok())
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            },
        );
    }

    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let bull = format!("{{{}}}", h.bull_prefix());
    let key_prefix = format!("{{sytest-{}}}:", h.tag);
    let path = config(
        &h,
        &emu,
        &format!("cluster: [{}], key_prefix: \"{key_prefix}\"", nodes.join(", ")),
        &bull,
    );
    let mut first = spawn_switchyard(&h, &path, "first.log");
    let seeds: Vec<String> = nodes.iter().map(|n| format!("redis://{n}")).collect();
    let mut cluster = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_connection()
        .unwrap();
    let at_kill = stream_killing(
        &h,
        &emu,
        (1, ACTIVATIONS),
        400,
        || waiting(&mut cluster, &bull),
        || first.kill(),
    )
    .await;
    let mut second = spawn_switchyard(&h, &path, "second.log");
    let queue = ("", nodes.as_slice(), bull.as_str());
    let at = format!("{at_kill} at the kill");
    wait_for_jobs(&h, queue, ACTIVATIONS as usize, Duration::from_secs(90), &at).await;
    assert!(second.terminate().success(), "{}", logs(&h));
    let all = jobs("", &nodes, &bull).await;
    assert_exactly_once(&all, ACTIVATIONS as usize, &format!("{at_kill} jobs at the kill"));
    let log = logs(&h);
    assert!(!log.contains("CROSSSLOT"), "{log}");
    assert!(log.contains("Resuming after the stored position"), "{log}");
    let dead: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(format!("{key_prefix}dead-letters"))
        .arg("-")
        .arg("+")
        .query(&mut cluster)
        .unwrap();
    assert!(dead.is_empty(), "no dead letter: {dead:?}");
    eprintln!("cluster: {at_kill} jobs at the kill; {} jobs, each once", all.len());

    if node_ready() {
        node_worker(&bull, all.len(), &[("CLUSTER", nodes.join(","))]);
    }
}
