//! Two replicas, one subscriber: real `switchyard run` processes on one emulator stream and one Redis, under
//! SIGKILL, SIGSTOP past the lease, and a rolling restart. Every approval must become exactly one job.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Harness, activation, redis_url};
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions};
use switchyard::event::Event;

/// The lease TTL of these tests: short, so takeovers are quick (renewed every third of it).
const TTL: Duration = Duration::from_millis(2000);
const CHANNEL_KEY: &str = "pubsub:cdc:/data/OrderChangeEvent";

struct Replica {
    child: Child,
    name: String,
    port: u16,
}

impl Replica {
    /// `switchyard run --config examples/salesforce.yaml` against `emu`, configured by environment.
    fn spawn(h: &Harness, emu: &EmulatorHandle, name: &str) -> Replica {
        let port = common::free_port();
        let child = common::salesforce_run(h, emu, &format!("{name}.log"))
            .env("SWITCHYARD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHYARD_LEASE_TTL_MS", TTL.as_millis().to_string())
            .spawn()
            .unwrap();
        Replica {
            child,
            name: name.into(),
            port,
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {}", self.name);
    }

    /// SIGTERM, and the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let started = Instant::now();
        let status = self.child.wait().unwrap();
        // A graceful stop settles what is in flight: well within the shutdown timeout (30 s), never by it.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} took {:?} to stop",
            self.name,
            started.elapsed()
        );
        status
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// `/healthz`, or `None` while the listener is not up (or the process is paused).
    async fn health(&self) -> Option<serde_json::Value> {
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/healthz", self.port))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    fn log(&self, h: &Harness) -> String {
        std::fs::read_to_string(h.dir.path().join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn redis(h: &Harness) -> redis::aio::MultiplexedConnection {
    h.redis().await
}

/// The pid in the channel lease's value (`<host>:<pid> <token>`) and its token, if someone holds it.
async fn holder(h: &Harness) -> Option<(u32, u64)> {
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{}lease:{CHANNEL_KEY}", h.key_prefix()))
        .query_async(&mut redis(h).await)
        .await
        .unwrap();
    let value = value?;
    let (instance, token) = value.rsplit_once(' ')?;
    let pid = instance.rsplit_once(':')?.1.parse().ok()?;
    Some((pid, token.parse().ok()?))
}

/// The stored position of the order channel.
async fn position(h: &Harness) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(format!("{}checkpoint:{CHANNEL_KEY}", h.key_prefix()))
        .query_async(&mut redis(h).await)
        .await
        .unwrap()
}

/// Waits until `what` holds, failing with `message` after `within`.
async fn until<F: AsyncFnMut() -> bool>(within: Duration, message: &str, mut what: F) {
    let deadline = Instant::now() + within;
    while !what().await {
        assert!(Instant::now() < deadline, "{message} (within {within:?})");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until one of `replicas` holds the lease; returns its index.
async fn active_of(h: &Harness, replicas: &[&Replica]) -> usize {
    let mut found = None;
    until(Duration::from_secs(30), "no replica took the lease", async || {
        found = match holder(h).await {
            Some((pid, _)) => replicas.iter().position(|r| r.child.id() == pid),
            None => None,
        };
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// Waits until the queue holds `n` jobs, then checks they are the `n` distinct approvals, once each, with no dead
/// letter.
async fn exactly_once(h: &Harness, n: u32, within: Duration, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        let jobs = h.jobs().await;
        if jobs.len() >= n as usize {
            break;
        }
        if Instant::now() >= deadline {
            // Which approvals are missing, and every log line about them.
            let have: std::collections::HashSet<&str> = jobs
                .iter()
                .map(|j| j.2["sfOrderId"].as_str().unwrap_or_default())
                .collect();
            let missing: Vec<String> = (0..n)
                .map(|i| common::order4(h, i))
                .filter(|id| !have.contains(id.as_str()))
                .collect();
            let all = logs();
            let about: Vec<&str> = all
                .lines()
                .filter(|l| {
                    missing.iter().any(|m| l.contains(m.as_str()))
                        || l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("lease")
                        || l.contains("Resuming")
                })
                .collect();
            panic!(
                "only {} of {n} jobs; missing {missing:?}; dead letters {:?}; log lines about them, and warnings:\n{}",
                jobs.len(),
                h.dead_letters().await,
                about.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything late (a duplicate) would show up now.
    tokio::time::sleep(TTL).await;
    let jobs = h.jobs().await;
    let mut ids: Vec<&str> = jobs.iter().map(|j| j.2["sfOrderId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n as usize, "every approval enqueued");
    assert_eq!(jobs.len(), n as usize, "no duplicate job");
    assert_eq!(
        h.dead_letters().await,
        Vec::<serde_json::Value>::new(),
        "no dead letter"
    );
}

fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(6000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Publishes approvals `from..to`, `per_second` of them each second.
async fn publish(emu: &EmulatorHandle, h: &Harness, from: u32, to: u32, per_second: u32) {
    let pause = Duration::from_secs(1) / per_second;
    for n in from..to {
        emu.publish(&activation(h, n)).unwrap();
        tokio::time::sleep(pause).await;
    }
}

/// Two instances on one stream: exactly one subscribes (the other stands by, ready, role `standby`), and every event
/// is settled once: no duplicate job.
// Multi-threaded: the emulator runs in this process and must keep serving while the test waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_subscriber_every_event_once() {
    let h = Harness::new("ha-two");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let a = Replica::spawn(&h, &emu, "a");
    let b = Replica::spawn(&h, &emu, "b");
    let active = active_of(&h, &[&a, &b]).await;
    let (active, standby) = if active == 0 { (&a, &b) } else { (&b, &a) };
    until(Duration::from_secs(20), "both replicas answer /healthz", async || {
        active.health().await.is_some() && standby.health().await.is_some()
    })
    .await;
    // Several renewals later, still one subscription per channel (the shipped CDC rules live on Order and
    // OrderItem; each channel has its own lease, so the two may be held by different replicas) and the same holder.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(emu.subscriptions(), 2, "exactly one replica subscribed to each channel");
    let (ha, hs) = (active.health().await.unwrap(), standby.health().await.unwrap());
    assert_eq!(ha["role"], "active", "{ha}");
    assert_eq!(hs["channels"]["/data/OrderChangeEvent"], "standby", "{hs}");
    for channel in ["/data/OrderChangeEvent", "/data/OrderItemChangeEvent"] {
        // The holder's channel is connecting or streaming (a quiet bus answers its first fetch only with a
        // keepalive); the other replica's is standby.
        let held = [&ha, &hs]
            .iter()
            .filter(|h| h["channels"][channel] != "standby")
            .count();
        assert_eq!(held, 1, "{channel}: {ha} {hs}");
    }
    // A replica that holds no lease at all is a standby.
    let holds_none = hs["channels"]["/data/OrderItemChangeEvent"] == "standby";
    if holds_none {
        assert_eq!(hs["role"], "standby", "{hs}");
    }
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", standby.port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "a standby is ready, so rolling deploys proceed");
    publish(&emu, &h, 0, 300, 1000).await;
    exactly_once(&h, 300, Duration::from_secs(60), &|| {
        format!("{}{}", a.log(&h), b.log(&h))
    })
    .await;
    assert_eq!(emu.subscriptions(), 2, "no channel was subscribed twice");
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", standby.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    if holds_none {
        assert!(
            metrics.contains("switchyard_role_info{role=\"standby\"} 1"),
            "{metrics}"
        );
    }
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// The active instance SIGKILLed mid-stream: the standby takes over within the lease time plus one renewal, from the
/// stored position; nothing lost, no duplicate job.
// Multi-threaded: the emulator runs in this process and must keep serving while the test waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_takes_over_from_a_killed_active_within_the_lease_time() {
    let h = Harness::new("ha-kill");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let a = Replica::spawn(&h, &emu, "a");
    let b = Replica::spawn(&h, &emu, "b");
    let first = active_of(&h, &[&a, &b]).await;
    let (active, standby) = if first == 0 { (a, b) } else { (b, a) };
    until(Duration::from_secs(20), "the active replica subscribed", async || {
        emu.subscriptions() >= 1
    })
    .await;
    for n in 0..400 {
        emu.publish(&activation(&h, n)).unwrap();
    }
    // A position stored first: with nothing stored, the standby would start at `latest` (README "Positions").
    until(Duration::from_secs(30), "progress before the kill", async || {
        h.jobs().await.len() >= 80 && position(&h).await.is_some()
    })
    .await;
    let subscriptions = emu.subscriptions();
    let killed_at = Instant::now();
    active.kill();
    until(TTL * 3, "the standby subscribed", async || {
        emu.subscriptions() > subscriptions
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!(
        "takeover after SIGKILL: {takeover:?} (lease {TTL:?}, renewed every {:?})",
        TTL / 3
    );
    // The lease lapses at most TTL after the last renewal; the standby retries every TTL/3 (with up to 25% jitter).
    // Scheduling on a loaded 2-core CI machine gets half a second more.
    assert!(
        takeover <= TTL + TTL / 3 + TTL / 12 + Duration::from_millis(500),
        "took {takeover:?}"
    );
    exactly_once(&h, 400, Duration::from_secs(60), &|| standby.log(&h)).await;
    let log = standby.log(&h);
    assert!(log.contains("Took this channel's lease"), "{}", tail(&log));
    assert!(log.contains("Resuming after the stored position"), "{}", tail(&log));
    assert!(standby.terminate().success());
}

/// The active instance paused (SIGSTOP) past its lease, then resumed: the standby took over; the old holder's late
/// writes are refused (it cannot move the position, mark actions done or enqueue), it stands by, and nothing is
/// duplicated.
// Multi-threaded: the emulator runs in this process and must keep serving while the test waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_active_loses_its_lease_and_its_late_writes_are_refused() {
    let h = Harness::new("ha-stop");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let a = Replica::spawn(&h, &emu, "a");
    let b = Replica::spawn(&h, &emu, "b");
    let first = active_of(&h, &[&a, &b]).await;
    let (paused, other) = if first == 0 { (&a, &b) } else { (&b, &a) };
    let (_, first_token) = holder(&h).await.unwrap();
    until(Duration::from_secs(20), "subscribed", async || emu.subscriptions() >= 1).await;
    // Events keep flowing while the active replica is paused mid-stream, with work in flight.
    for n in 0..150 {
        emu.publish(&activation(&h, n)).unwrap();
    }
    until(Duration::from_secs(30), "progress before the pause", async || {
        h.jobs().await.len() >= 30 && position(&h).await.is_some()
    })
    .await;
    paused.signal("STOP");
    for n in 150..300 {
        emu.publish(&activation(&h, n)).unwrap();
    }
    // The other replica takes over once the paused one's lease lapses.
    until(TTL * 4, "the other replica took the lease", async || {
        holder(&h).await.is_some_and(|(pid, _)| pid == other.child.id())
    })
    .await;
    let (_, second_token) = holder(&h).await.unwrap();
    assert!(second_token > first_token, "a takeover increments the fencing token");
    // From now on the stored position only moves forward, whatever the paused replica tries when it wakes up.
    let mut positions = vec![position(&h).await];
    until(
        Duration::from_secs(30),
        "the new holder processed past the pause",
        async || {
            positions.push(position(&h).await);
            h.jobs().await.len() >= 200
        },
    )
    .await;
    paused.signal("CONT");
    for n in 300..350 {
        emu.publish(&activation(&h, n)).unwrap();
    }
    let deadline = Instant::now() + TTL * 2;
    while Instant::now() < deadline {
        positions.push(position(&h).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exactly_once(&h, 350, Duration::from_secs(60), &|| {
        format!("{}{}", paused.log(&h), other.log(&h))
    })
    .await;
    positions.push(position(&h).await);
    let stored: Vec<Vec<u8>> = positions.into_iter().flatten().collect();
    assert!(
        stored.windows(2).all(|w| w[0] <= w[1]),
        "the stored position never moves backwards"
    );
    let woke = paused.log(&h);
    assert!(
        woke.contains("Lease lost"),
        "the paused replica noticed: {}",
        tail(&woke)
    );
    assert_eq!(
        holder(&h).await.map(|(pid, _)| pid),
        Some(other.child.id()),
        "the woken replica stands by"
    );
    assert_eq!(paused.health().await.unwrap()["role"], "standby", "and says so");
}

/// A rolling restart of both instances under load (SIGTERM hands the lease over at once, a new process takes the
/// standby's place): nothing lost, nothing duplicated.
// Multi-threaded: the emulator runs in this process and must keep serving while the test waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_of_both_replicas_under_load_loses_nothing() {
    let h = Harness::new("ha-roll");
    let emu = std::sync::Arc::new(emulator::start(EmulatorOptions::default()).await.unwrap());
    let a = Replica::spawn(&h, &emu, "a");
    let b = Replica::spawn(&h, &emu, "b");
    let first = active_of(&h, &[&a, &b]).await;
    let (active, standby) = if first == 0 { (a, b) } else { (b, a) };
    // Nothing is stored yet and the fallback is `latest`: publish once the first holder is subscribed.
    until(Duration::from_secs(20), "subscribed", async || emu.subscriptions() >= 1).await;
    let load = {
        let emu = emu.clone();
        let events: Vec<Event> = (0..600).map(|n| activation(&h, n)).collect();
        tokio::spawn(async move {
            for event in events {
                emu.publish(&event).unwrap();
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        })
    };
    until(Duration::from_secs(30), "progress", async || h.jobs().await.len() >= 50).await;
    // Restart the active one: it settles, stores its position, releases the lease; the standby takes over at once.
    let stopped_at = Instant::now();
    let active_pid = active.child.id();
    assert!(active.terminate().success(), "graceful stop");
    until(
        TTL / 2,
        "the standby took over at once after the handover",
        async || holder(&h).await.is_some_and(|(pid, _)| pid != active_pid),
    )
    .await;
    eprintln!("takeover after SIGTERM: {:?}", stopped_at.elapsed());
    let c = Replica::spawn(&h, &emu, "c");
    until(Duration::from_secs(20), "the new replica is up", async || {
        c.health().await.is_some()
    })
    .await;
    until(Duration::from_secs(30), "more progress", async || {
        h.jobs().await.len() >= 250
    })
    .await;
    // Then the other one.
    let standby_pid = standby.child.id();
    assert!(standby.terminate().success(), "graceful stop");
    until(TTL / 2, "the restarted replica took over", async || {
        holder(&h).await.is_some_and(|(pid, _)| pid == c.child.id())
    })
    .await;
    assert_ne!(standby_pid, c.child.id());
    let d = Replica::spawn(&h, &emu, "d");
    load.await.unwrap();
    let logs = || {
        ["a", "b", "c", "d"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(h.dir.path().join(format!("{n}.log"))).unwrap_or_default();
                text.lines().map(|l| format!("[{n}] {l}\n")).collect::<String>()
            })
            .collect::<String>()
    };
    exactly_once(&h, 600, Duration::from_secs(60), &logs).await;
    assert!(c.terminate().success());
    assert!(d.terminate().success());
}

/// Fencing, at the Redis level: once another replica took the lease, a write under the old token is refused by Redis
/// itself (position, idempotency claim, done marker), whatever the old holder believes; the new holder's writes pass.
// Multi-threaded: the emulator runs in this process and must keep serving while the test waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_under_a_stale_fencing_token_are_refused_by_redis() {
    use std::sync::Arc;
    use switchyard::failure::Failure;
    use switchyard::state::CheckpointStore;
    use switchyard::state::Leases;
    use switchyard::state::{Claim, Idempotency, Ttls};

    let h = Harness::new("ha-fence");
    let conn = switchyard::state::Conn::Server(
        redis::aio::ConnectionManager::new(redis::Client::open(redis_url()).unwrap())
            .await
            .unwrap(),
    );
    let ttl = Duration::from_millis(600);
    let a = Arc::new(Leases::new(conn.clone(), &h.key_prefix(), "a".into(), ttl));
    let b = Arc::new(Leases::new(conn.clone(), &h.key_prefix(), "b".into(), ttl));
    let key: Arc<str> = Arc::from(CHANNEL_KEY);
    let old = a.try_acquire(&key).await.unwrap().expect("a takes the free lease");
    assert!(
        b.try_acquire(&key).await.unwrap().is_none(),
        "b stands by while a holds it"
    );
    let store = CheckpointStore::redis(conn.clone(), &h.key_prefix());
    let idem = Idempotency::redis(
        conn.clone(),
        &h.key_prefix(),
        Ttls {
            lease: Duration::from_secs(5),
            done: Duration::from_secs(60),
        },
    );
    assert!(store.set_fenced(&key, b"\x00\x01", Some(&old)).await.unwrap());
    // `a` is paused: it does not renew. Its lease lapses and `b` takes over with a higher token.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let new = b.try_acquire(&key).await.unwrap().expect("b takes the lapsed lease");
    assert!(new.token > old.token);
    assert!(!old.is_lost(), "a has not noticed yet: only Redis can stop its writes");
    // a wakes up and writes: every write is refused.
    assert!(
        !store.set_fenced(&key, b"\x00\x09", Some(&old)).await.unwrap(),
        "position refused"
    );
    assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&b"\x00\x01"[..]));
    assert!(old.is_lost(), "a refused write tells the old holder it lost the lease");
    let claim = idem.claim("enqueue-provisioning", "k1", None, Some(&old)).await;
    assert!(matches!(claim, Err(Failure::Fenced(_))), "{claim:?}");
    let done = idem.complete("enqueue-provisioning", "k2", Some(&old)).await;
    assert!(matches!(done, Err(Failure::Fenced(_))), "{done:?}");
    assert!(
        !h.key_exists(&format!("{}idem:enqueue-provisioning:k2", h.key_prefix()))
            .await
    );
    // The holder's writes pass, and its done marker carries its token.
    assert!(store.set_fenced(&key, b"\x00\x05", Some(&new)).await.unwrap());
    assert!(matches!(
        idem.claim("enqueue-provisioning", "k1", None, Some(&new))
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));
    idem.complete("enqueue-provisioning", "k1", Some(&new)).await.unwrap();
    let marker: String = redis::cmd("GET")
        .arg(format!("{}idem:enqueue-provisioning:k1", h.key_prefix()))
        .query_async(&mut redis(&h).await)
        .await
        .unwrap();
    assert_eq!(marker, format!("done {}", new.token));
    assert_eq!(
        idem.claim("enqueue-provisioning", "k1", None, Some(&new))
            .await
            .unwrap(),
        Claim::Done
    );
    // A restarted `b` (same instance name) takes its own lease back at once, with a new token that fences the old
    // process.
    let b2 = Leases::new(conn.clone(), &h.key_prefix(), "b".into(), ttl);
    let again = b2.try_acquire(&key).await.unwrap().expect("same name, own lease");
    assert!(again.token > new.token);
    assert!(!store.set_fenced(&key, b"\x00\x06", Some(&new)).await.unwrap());
}

/// `switchyard checkpoint set|reset` refuses while a replica holds the channel's lease (its next fenced commit would
/// overwrite the position), naming the holder; once the lease is handed back, the position moves.
#[tokio::test]
async fn checkpoint_set_refuses_while_a_replica_holds_the_channel() {
    use std::sync::Arc;
    use switchyard::app::admin::{AdminError, checkpoint};
    use switchyard::app::cli::CheckpointOp;
    use switchyard::app::service::Service;
    use switchyard::config::LoadedConfig;
    use switchyard::state::Leases;

    let h = Harness::new("ha-admin");
    let events = h.write_events("events.jsonl", &[]);
    let text = h.config(&events, "lease: { enabled: true, ttl_ms: 5000 }\n");
    let loaded = LoadedConfig::parse(&h.dir.path().join("config.yaml"), &text, &|_| None).unwrap();
    let admin = Service::start(loaded, false).await.unwrap();
    let conn = switchyard::state::Conn::Server(
        redis::aio::ConnectionManager::new(redis::Client::open(redis_url()).unwrap())
            .await
            .unwrap(),
    );
    let replica = Leases::new(conn, &h.key_prefix(), "replica-a".into(), Duration::from_secs(5));
    let key: Arc<str> = Arc::from(CHANNEL_KEY);
    let fence = replica.try_acquire(&key).await.unwrap().expect("the lease is free");
    let set = || CheckpointOp::Set {
        key: CHANNEL_KEY.into(),
        value: "00000000000003e8".into(),
    };
    let mut out = Vec::new();
    for op in [
        set(),
        CheckpointOp::Reset {
            key: CHANNEL_KEY.into(),
        },
    ] {
        let refused = checkpoint(&admin.ops(), op, &mut out).await;
        let Err(AdminError::Usage(message)) = refused else {
            panic!("not refused: {refused:?}")
        };
        assert!(message.contains("replica `replica-a` holds its lease"), "{message}");
    }
    assert_eq!(
        admin.stores.checkpoints.get(CHANNEL_KEY).await.unwrap(),
        None,
        "nothing written"
    );

    replica.release(&fence).await;
    checkpoint(&admin.ops(), set(), &mut out).await.unwrap();
    assert_eq!(
        admin.stores.checkpoints.get(CHANNEL_KEY).await.unwrap(),
        Some(vec![0, 0, 0, 0, 0, 0, 3, 0xe8])
    );
}
