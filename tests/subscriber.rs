//! The Pub/Sub subscriber against the emulator over real gRPC on loopback, with real Redis: flow control,
//! resubscribes, replay positions, recovery by error code, schema changes, backpressure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, records, redis_url, repo};
use serde_json::{Value, json};
use switchyard::app::service::Service;
use switchyard::config::LoadedConfig;
use switchyard::delivery::Stats;
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions, Fault};
use switchyard::event::Event;
use switchyard::sources::pubsub::subscriber::{ChannelState, checkpoint_key};
use switchyard::state::CheckpointStore;
use tokio::sync::watch;

struct Running {
    service: Arc<Service>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Stats>,
}

impl Running {
    /// Waits until `n` events (malformed ones included) have settled.
    async fn settled(&self, n: u64, within: Duration) {
        let mut settled = self.service.pipeline.settled.subscribe();
        if tokio::time::timeout(within, settled.wait_for(|s| *s >= n))
            .await
            .is_err()
        {
            panic!("only {} of {n} events settled within {within:?}", *settled.borrow());
        }
    }

    async fn finish(self) -> Stats {
        self.stop.send_replace(true);
        self.task.await.unwrap()
    }
}

/// The config of a pubsub run against `emu` with the shipped rules (see [`common::pubsub_config`]).
fn config(h: &Harness, emu: &EmulatorHandle, redis: &str, pubsub: &str, extra: &str) -> String {
    common::pubsub_config(h, emu, redis, &repo().join("rules"), pubsub, extra)
}

async fn start(h: &Harness, text: &str) -> Running {
    let path = h.dir.path().join("config.yaml");
    let loaded = LoadedConfig::parse(&path, text, &|_| None).unwrap_or_else(|e| panic!("config: {e}"));
    let service = Arc::new(
        Service::start(loaded, false)
            .await
            .unwrap_or_else(|e| panic!("start: {e}")),
    );
    let (stop, shutdown) = watch::channel(false);
    let task = {
        let service = service.clone();
        tokio::spawn(async move { service.run(shutdown).await.unwrap() })
    };
    Running { service, stop, task }
}

fn event(value: &Value) -> Event {
    Event::from_json(&value.to_string()).unwrap()
}

/// An 18-character Order id unique to this test run, for up to 999 orders.
fn order(h: &Harness, n: u32) -> String {
    let t: String = h.tag.chars().rev().take(9).collect();
    format!("801{t:0>9}{n:03}AAA")
}

/// An approval of order `n` whose recorded record (what the org's REST API returns) has no WHMCS id.
fn approval(h: &Harness, n: u32) -> Event {
    let id = order(h, n);
    let record = json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(n % 100)});
    event(&h.approval(
        &format!("tx-{n}"),
        std::slice::from_ref(&id),
        Some("Approved"),
        records(&[(id.clone(), record)]),
    ))
}

async fn emulator_with(options: EmulatorOptions) -> EmulatorHandle {
    emulator::start(options).await.unwrap()
}

async fn stored(h: &Harness, redis: &str, key: &str) -> Option<Vec<u8>> {
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(redis).unwrap())
        .await
        .unwrap();
    CheckpointStore::redis(switchyard::state::Conn::Server(conn), &h.key_prefix())
        .get(key)
        .await
        .unwrap()
}

/// More than 100 events queued and a stream dropped mid-batch: the subscriber never has more than 100 outstanding,
/// resumes after the last event it handed on, and every event is processed exactly once.
#[tokio::test]
async fn stream_dropped_mid_batch_resumes_without_loss_or_duplicates() {
    let h = Harness::new("sub-drop");
    let emu = emulator_with(EmulatorOptions::default()).await;
    for n in 1..=250 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    emu.inject(Fault::DropStreamAfter(120));
    let run = start(&h, &config(&h, &emu, &redis_url(), "", "")).await;
    run.settled(250, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = run.finish().await;
    assert_eq!(stats.events, 250, "every event exactly once: {stats:?}");
    assert_eq!(stats.skipped, 0, "no event was handed over twice");
    assert_eq!(stats.dead_letters, 0);
    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 250);
    assert!(emu.subscriptions() >= 2, "the dropped stream was resubscribed");
    assert!(
        emu.max_requested() <= 100,
        "asked for {} outstanding",
        emu.max_requested()
    );
    assert!(emu.max_outstanding() <= 100);
    let position = stored(
        &h,
        &redis_url(),
        &checkpoint_key(switchyard::config::Mode::Cdc, emulator::ORDER_CHANNEL),
    )
    .await;
    assert_eq!(
        position,
        Some(250u64.to_be_bytes().to_vec()),
        "the stored position is past the last event"
    );
}

/// A stored position Salesforce refuses (older than 72 hours) falls back to `on_invalid` (earliest), says so,
/// and idempotency keys keep the replayed events from enqueuing twice.
#[tokio::test]
async fn corrupted_replay_id_falls_back_to_earliest_and_says_so() {
    let h = Harness::new("sub-corrupt");
    let emu = emulator_with(EmulatorOptions::default()).await;
    for n in 1..=3 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    let text = config(&h, &emu, &redis_url(), "", "");
    let run = start(&h, &text).await;
    run.settled(3, Duration::from_secs(20)).await;
    run.finish().await;
    for n in 4..=5 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    emu.inject(Fault::CorruptNextReplayId);
    let run = start(&h, &text).await;
    run.settled(5, Duration::from_secs(20)).await;
    let stats = run.finish().await;
    assert_eq!(stats.events, 5, "earliest replays everything retained: {stats:?}");
    assert_eq!(stats.skipped, 3, "the three already enqueued are skipped as done");
    assert_eq!(h.jobs().await.len(), 5);
    let logs = h.logs.text();
    assert!(
        logs.contains("refused the stored replay position"),
        "the fallback is logged loudly"
    );
    assert!(logs.contains("replayid.corrupted"), "with the error code");
}

/// A quiet channel's stored position follows the keepalives' latest replay id (events of other channels move
/// the bus), so it never ages out of retention.
#[tokio::test]
async fn keepalives_advance_the_stored_position_of_a_quiet_channel() {
    let h = Harness::new("sub-keepalive");
    let emu = emulator_with(EmulatorOptions {
        keepalive_interval: Duration::from_millis(200),
        ..EmulatorOptions::default()
    })
    .await;
    let run = start(&h, &config(&h, &emu, &redis_url(), "", "")).await;
    for n in 0..3 {
        let fulfilment = json!({"id": format!("pe-{n}-{}", h.tag), "channel": emulator::FULFILMENT_CHANNEL, "kind": "platform",
            "fields": {"CreatedDate": 1, "CreatedById": "005xx0000000001AAA", "Order_Id__c": h.order(n)}});
        emu.publish(&event(&fulfilment)).unwrap();
    }
    let key = checkpoint_key(switchyard::config::Mode::Cdc, emulator::ORDER_CHANNEL);
    let want = Some(3u64.to_be_bytes().to_vec());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored(&h, &redis_url(), &key).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the keepalive position was not stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(emu.keepalives() >= 1);
    let stats = run.finish().await;
    assert_eq!(stats.events, 0, "no CDC event was delivered");
}

/// A stream that goes silent (no events, no keepalives, no error) is torn down by the watchdog and resubscribed;
/// events flow again afterwards.
#[tokio::test]
async fn silent_stream_is_resubscribed_by_the_watchdog() {
    let h = Harness::new("sub-silent");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let run = start(&h, &config(&h, &emu, &redis_url(), ", watchdog_ms: 400", "")).await;
    emu.publish(&approval(&h, 1)).unwrap();
    run.settled(1, Duration::from_secs(10)).await;
    let before = emu.subscriptions();
    emu.inject(Fault::GoSilent);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        emu.subscriptions() > before,
        "the watchdog resubscribed ({before} -> {})",
        emu.subscriptions()
    );
    emu.inject(Fault::Resume);
    emu.publish(&approval(&h, 2)).unwrap();
    run.settled(2, Duration::from_secs(10)).await;
    let stats = run.finish().await;
    assert_eq!(stats.events, 2);
    assert_eq!(h.jobs().await.len(), 2);
    assert!(h.logs.text().contains("not even a keepalive"));
}

/// Events written with a new schema mid-stream decode (bitmaps included) against their own writer schema.
#[tokio::test]
async fn schema_change_mid_stream_decodes_bitmaps_against_the_new_schema() {
    let h = Harness::new("sub-schema");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let run = start(&h, &config(&h, &emu, &redis_url(), "", "")).await;
    emu.publish(&approval(&h, 1)).unwrap();
    run.settled(1, Duration::from_secs(10)).await;
    let v1 = emu.schema_id(emulator::ORDER_CHANNEL).unwrap();
    emu.inject(Fault::SwitchOrderSchemaToV2);
    assert_ne!(emu.schema_id(emulator::ORDER_CHANNEL).unwrap(), v1);
    emu.publish(&approval(&h, 2)).unwrap();
    let (id3, record3) = h.record(3, None);
    let key = format!("orders:detail:{id3}");
    h.set_key(&key).await;
    let edit = h.change(
        "tx-desc",
        std::slice::from_ref(&id3),
        &["Description", "LastModifiedDate"],
        json!({"Description": "New text", "LastModifiedDate": 1764230499000u64}),
        records(&[(id3.clone(), record3)]),
    );
    emu.publish(&event(&edit)).unwrap();
    run.settled(3, Duration::from_secs(10)).await;
    let stats = run.finish().await;
    assert_eq!(stats.malformed, 0, "{stats:?}");
    assert_eq!(h.jobs().await.len(), 2, "the approval under v2 enqueued");
    assert!(
        !h.key_exists(&key).await,
        "Description was decoded from the v2 bitmap and invalidated the cache"
    );
}

/// Redis stalls longer than the server's idle close: the subscriber stops requesting, the server closes the
/// stream, and once Redis answers again the subscriber resubscribes after the last event it handed on.
#[tokio::test]
async fn backpressure_longer_than_the_idle_close_loses_nothing() {
    let h = Harness::new("sub-backpressure");
    let redis = common::OwnRedis::start();
    let emu = emulator_with(EmulatorOptions {
        idle_timeout: Duration::from_millis(500),
        ..EmulatorOptions::default()
    })
    .await;
    // More events than two batches: the top-up leaves nothing outstanding while the pipeline is stuck.
    for n in 1..=300 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    let run = start(&h, &config(&h, &emu, &redis.url(), "", "delivery: { concurrency: 4 }")).await;
    // Once subscribed, writes stall for 2.5 s (five idle timeouts): the pipeline cannot settle, the subscriber stops
    // requesting, the server closes the idle stream. (Started before the service, the stall would only delay its
    // start: taking the channel lease writes to Redis.)
    subscribed(&emu, 1).await;
    redis.pause_writes(Duration::from_millis(2500));
    run.settled(300, Duration::from_secs(60)).await;
    let stats = run.finish().await;
    assert_eq!(stats.events, 300, "{stats:?}");
    assert_eq!(stats.skipped, 0);
    assert_eq!(stats.dead_letters, 0);
    assert!(
        emu.subscriptions() >= 2,
        "the idle-closed stream was resubscribed ({} subscriptions, {stats:?})",
        emu.subscriptions()
    );
    assert_eq!(redis.job_count(&h.bull_prefix()), 300);
}

/// A static token that Salesforce rejects stops the channel with a clear error; the service stays up.
#[tokio::test]
async fn rejected_static_token_stops_the_channel_clearly() {
    let h = Harness::new("sub-static");
    let emu = emulator_with(EmulatorOptions::default()).await;
    emu.inject(Fault::ExpireTokens);
    let text = config(&h, &emu, &redis_url(), "", "").replace(
        &format!(
            "salesforce: {{ login_url: \"{}\", client_id: {}, client_secret: {} }}",
            emu.base_url(),
            emulator::DEFAULT_CLIENT_ID,
            emulator::DEFAULT_CLIENT_SECRET
        ),
        &format!(
            "salesforce: {{ access_token: {}, instance_url: \"{}\", tenant_id: {} }}",
            emu.access_token(),
            emu.base_url(),
            emu.org_id()
        ),
    );
    let run = start(&h, &text).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let states: Vec<ChannelState> = run.service.channels.lock().unwrap().iter().map(|c| c.state()).collect();
        if let Some(ChannelState::Stopped(why)) = states.first() {
            assert!(why.contains("SF_ACCESS_TOKEN"), "{why}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the channel did not stop: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!run.task.is_finished(), "the service stays up");
    run.finish().await;
    assert!(!h.logs.text().contains(emu.access_token()), "the token is never logged");
}

/// `switchyard run --config examples/salesforce.yaml`, configured by environment alone, against `emu`.
fn spawn_run(h: &Harness, emu: &EmulatorHandle, mode: &str, log: &str) -> std::process::Child {
    common::salesforce_run(h, emu, log)
        .env("SWITCHYARD_HTTP_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_MODE", mode)
        // A restarted process waits for its predecessor's channel lease to lapse (a new pid is a new instance).
        .env("SWITCHYARD_LEASE_TTL_MS", "2000")
        .spawn()
        .unwrap()
}

/// Waits until `emu` has seen `n` subscriptions (the process is up and subscribed).
async fn subscribed(emu: &EmulatorHandle, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while emu.subscriptions() < n {
        assert!(tokio::time::Instant::now() < deadline, "no subscription");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `event` and waits until the process stored a position at or past it (it settled).
async fn publish_settled(h: &Harness, emu: &EmulatorHandle, event: &Event, mode: switchyard::config::Mode) {
    let replay = emu.publish(event).unwrap();
    let key = checkpoint_key(mode, &event.channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if stored(h, &redis_url(), &key).await.is_some_and(|p| p >= replay) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} did not settle", event.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    child.wait().unwrap()
}

/// The order checklist through the real path, started as `switchyard run --config examples/salesforce.yaml` with
/// only environment variables: CDC mode, then Platform Event mode on the same org, each mode with its own position.
#[tokio::test]
async fn order_checklist_end_to_end_in_both_modes_configured_by_environment() {
    use switchyard::config::Mode;
    let h = Harness::new("sub-e2e");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let mut cdc = spawn_run(&h, &emu, "cdc", "cdc.log");
    subscribed(&emu, 1).await;
    let with = |n: u32, whmcs: Option<&str>| records(&[h.record(n, whmcs)]);
    let o = |n: u32| vec![h.order(n)];
    // 1. Approval -> one job. 2. The same event redelivered -> no second job.
    let approval1 = event(&h.approval("tx-1", &o(1), Some("Approved"), with(1, None)));
    publish_settled(&h, &emu, &approval1, Mode::Cdc).await;
    publish_settled(&h, &emu, &approval1, Mode::Cdc).await;
    // 3. Already provisioned (WHMCS id set) -> no job. 4. Draft -> no job. 5. Order not found -> no job.
    publish_settled(
        &h,
        &emu,
        &event(&h.approval("tx-2", &o(2), Some("Approved"), with(2, Some("WH-2")))),
        Mode::Cdc,
    )
    .await;
    publish_settled(
        &h,
        &emu,
        &event(&h.approval("tx-3", &o(3), Some("Draft"), with(3, None))),
        Mode::Cdc,
    )
    .await;
    publish_settled(
        &h,
        &emu,
        &event(&h.approval("tx-4", &o(4), None, records(&[(h.order(4), Value::Null)]))),
        Mode::Cdc,
    )
    .await;
    // 6. Customer-facing edit -> cache invalidated. 7. Internal-only edit -> cache kept.
    let (k5, k6) = (
        format!("orders:detail:{}", h.order(5)),
        format!("orders:detail:{}", h.order(6)),
    );
    h.set_key(&k5).await;
    h.set_key(&k6).await;
    publish_settled(
        &h,
        &emu,
        &event(&h.change(
            "tx-5",
            &o(5),
            &["Description"],
            json!({"Description": "x"}),
            with(5, None),
        )),
        Mode::Cdc,
    )
    .await;
    publish_settled(
        &h,
        &emu,
        &event(&h.change(
            "tx-6",
            &o(6),
            &["Activation_Error_Code__c"],
            json!({"Activation_Error_Code__c": "E"}),
            with(6, None),
        )),
        Mode::Cdc,
    )
    .await;
    // 8. Cancelled, then re-approved after the first job provisioned it (WHMCS id set) -> no second job.
    publish_settled(
        &h,
        &emu,
        &event(&h.approval("tx-7", &o(7), Some("Approved"), with(7, None))),
        Mode::Cdc,
    )
    .await;
    publish_settled(
        &h,
        &emu,
        &event(&h.change(
            "tx-8",
            &o(7),
            &["Status"],
            json!({"Status": "Cancelled"}),
            with(7, Some("WH-7")),
        )),
        Mode::Cdc,
    )
    .await;
    publish_settled(
        &h,
        &emu,
        &event(&h.approval("tx-9", &o(7), Some("Reactivate"), with(7, Some("WH-7")))),
        Mode::Cdc,
    )
    .await;
    assert!(terminate(&mut cdc).success(), "SIGTERM exits 0");
    let jobs = h.jobs().await;
    let ids: Vec<&Value> = jobs.iter().map(|j| &j.2["sfOrderId"]).collect();
    assert_eq!(ids, vec![&json!(h.order(1)), &json!(h.order(7))], "{jobs:?}");
    assert_eq!(jobs[0].2["accountId"], json!(h.account(1)), "enriched over REST");
    assert!(!h.key_exists(&k5).await);
    assert!(h.key_exists(&k6).await);
    let cdc_position = stored(&h, &redis_url(), &checkpoint_key(Mode::Cdc, emulator::ORDER_CHANNEL)).await;

    // Platform Event mode on the same org: the fulfilment request's own idempotency key is the job id.
    let mut pe = spawn_run(&h, &emu, "platform-event", "pe.log");
    subscribed(&emu, emu.subscriptions() + 1).await;
    let (o8, r8) = h.record(8, None);
    let request = json!({"id": format!("pe-8-{}", h.tag), "channel": emulator::FULFILMENT_CHANNEL, "kind": "platform",
        "fields": {"CreatedDate": 1764230415000u64, "CreatedById": "005xx0000000001AAA", "Order_Id__c": o8,
                   "Idempotency_Key__c": format!("ofr-{o8}-1"), "Correlation_Id__c": "corr-8"},
        "record": {o8.clone(): r8}});
    publish_settled(&h, &emu, &event(&request), Mode::PlatformEvent).await;
    let orphan = json!({"id": format!("pe-9-{}", h.tag), "channel": emulator::FULFILMENT_CHANNEL, "kind": "platform",
        "fields": {"CreatedDate": 1764230415000u64, "CreatedById": "005xx0000000001AAA"}});
    publish_settled(&h, &emu, &event(&orphan), Mode::PlatformEvent).await;
    assert!(terminate(&mut pe).success());
    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let job = jobs
        .iter()
        .find(|j| j.2["sfOrderId"] == json!(o8))
        .expect("the fulfilment job");
    assert_eq!(job.0, format!("ofr-{o8}-1"));
    assert_eq!(job.2["correlationId"], json!("corr-8"));
    let letters = h.dead_letters().await;
    assert!(
        letters
            .iter()
            .any(|l| l["reason"].as_str().unwrap_or("").contains("carries no Order_Id__c")),
        "{letters:?}"
    );
    assert_eq!(
        stored(&h, &redis_url(), &checkpoint_key(Mode::Cdc, emulator::ORDER_CHANNEL)).await,
        cdc_position,
        "the CDC position is kept while the other mode runs"
    );
}

/// A process killed with SIGKILL mid-stream and restarted resumes from the stored position: every approval
/// enqueued once, none lost. The stream keeps flowing while the process is down.
#[tokio::test]
async fn process_killed_mid_stream_resumes_from_the_stored_position() {
    let h = Harness::new("sub-kill");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let key = checkpoint_key(switchyard::config::Mode::Cdc, emulator::ORDER_CHANNEL);
    let mut first = spawn_run(&h, &emu, "cdc", "first.log");
    subscribed(&emu, 1).await;
    // Killed once it has enqueued some jobs and stored a position (before the first store, `fallback: latest`
    // would rightly start the next process after the events already published: README "Positions").
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut published = 0;
    loop {
        if published < 200 {
            published += 1;
            emu.publish(&approval(&h, published)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        if published % 10 == 0 && h.jobs().await.len() >= 40 && stored(&h, &redis_url(), &key).await.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress before the kill");
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = format!("{} jobs, {published} events published", h.jobs().await.len());
    // The rest of the stream arrives while no process runs.
    for n in published + 1..=200 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    let mut second = spawn_run(&h, &emu, "cdc", "second.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while h.jobs().await.len() < 200 {
        if tokio::time::Instant::now() >= deadline {
            let log = std::fs::read_to_string(h.dir.path().join("first.log")).unwrap_or_default()
                + std::fs::read_to_string(h.dir.path().join("second.log"))
                    .unwrap_or_default()
                    .as_str();
            panic!(
                "only {} jobs ({at_kill} at the kill); logs:\n{log}",
                h.jobs().await.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(terminate(&mut second).success());
    let jobs = h.jobs().await;
    let mut ids: Vec<String> = jobs
        .iter()
        .map(|j| j.2["sfOrderId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every approval once ({at_kill} at the kill)");
    assert_eq!(jobs.len(), 200, "no duplicate job");
    let log = std::fs::read_to_string(h.dir.path().join("second.log")).unwrap();
    assert!(log.contains("Resuming after the stored position"), "{log}");
    assert!(h.dead_letters().await.is_empty());
}

/// `switchyard record` writes its events to `--out` and its log to standard error: a log reader that goes away after
/// one line (`record … 2>&1 | head -1`) neither stops nor breaks the recording. It ends at `--max-events` with 0 and
/// every event in the file.
#[tokio::test]
async fn record_with_its_log_piped_into_a_reader_that_stops_still_records_everything() {
    use std::io::BufRead;
    let h = Harness::new("sub-record-pipe");
    let events: Vec<Event> = (1..=200).map(|n| approval(&h, n)).collect();
    let emu = emulator_with(EmulatorOptions {
        events: events.clone(),
        ..EmulatorOptions::default()
    })
    .await;
    let config = h.dir.path().join("record.yaml");
    std::fs::write(&config, self::config(&h, &emu, &redis_url(), "", "")).unwrap();
    let out = h.dir.path().join("recorded.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "record",
            "--from",
            "earliest",
            "--max-events",
            "200",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        // One log line per event at debug: far more than the one line the reader takes.
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "a JSON log line: {first}");
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("record did not end after its log reader went away")
    });
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let ids: Vec<String> = text.lines().map(|l| Event::from_json(l).unwrap().id).collect();
    let published: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, published, "every event recorded, in order");
}

/// `switchyard record` turns the stream into JSONL that decides the same as the live path.
#[tokio::test]
async fn record_writes_jsonl_that_replays_to_the_same_decisions() {
    let h = Harness::new("sub-record");
    let lifecycle = std::fs::read_to_string(repo().join("examples/events/order-lifecycle.jsonl")).unwrap();
    let events: Vec<Event> = lifecycle
        .lines()
        .filter_map(|l| Event::from_json(l).ok())
        .filter(|e| e.channel == emulator::ORDER_CHANNEL)
        .collect();
    let emu = emulator_with(EmulatorOptions {
        events: events.clone(),
        ..EmulatorOptions::default()
    })
    .await;
    let config = h.dir.path().join("record.yaml");
    std::fs::write(&config, self::config(&h, &emu, &redis_url(), "", "")).unwrap();
    let out = h.dir.path().join("recorded.jsonl");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "record",
            "--from",
            "earliest",
            "--max-events",
            &events.len().to_string(),
            "--redact",
            "Description",
            "--config",
        ])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .stderr(std::fs::File::create(h.dir.path().join("record.log")).unwrap())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let recorded: Vec<Event> = text.lines().map(|l| Event::from_json(l).unwrap()).collect();
    assert_eq!(recorded.len(), events.len());
    // The decoded events are the published ones (ids, header, changed fields), Description redacted.
    for (r, e) in recorded.iter().zip(&events) {
        assert_eq!(r.id, e.id);
        let fields = |e: &Event| {
            let mut f = e.header.as_ref().map(|x| x.changed_fields.clone()).unwrap_or_default();
            f.sort();
            f
        };
        assert_eq!(
            fields(r),
            fields(e),
            "{}: changed fields (in schema order on the wire)",
            e.id
        );
        if e.fields.contains_key("Description") {
            assert_eq!(r.fields["Description"], json!("***"));
        }
    }
    // Replayed with the recorded enricher, the file decides exactly as the live REST path does.
    let start = |enricher: &str| {
        let text = format!(
            "source: {{ kind: jsonl, jsonl: {{ path: {} }} }}\nrules: [{}]\nenricher: {enricher}\n\
             salesforce: {{ login_url: \"{}\", client_id: {}, client_secret: {} }}\n\
             sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
            out.display(),
            repo().join("rules").display(),
            emu.base_url(),
            emulator::DEFAULT_CLIENT_ID,
            emulator::DEFAULT_CLIENT_SECRET
        );
        let loaded = LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &|_| None).unwrap();
        async move { Service::start(loaded, false).await.unwrap() }
    };
    let (replayed, live) = (start("recorded").await, start("salesforce").await);
    let rules = replayed.rules.load_full();
    for event in &recorded {
        let mut from_file = event.clone();
        let mut bare = event.clone();
        bare.record.clear();
        let a = replayed.pipeline.plan_enriched(&rules, &mut from_file).await;
        let b = live.pipeline.plan_enriched(&rules, &mut bare).await;
        assert_eq!(
            format!("{:?}", a.decisions),
            format!("{:?}", b.decisions),
            "{}",
            event.id
        );
        assert_eq!(format!("{:?}", a.actions), format!("{:?}", b.actions), "{}", event.id);
    }
}

/// Config reload on a running process: `mode` switched cdc -> platform-event -> cdc by editing the config file,
/// with events of both modes published all along. Subscriptions are stopped and started to match; each mode resumes
/// from its own stored position, so nothing is lost (the CDC approvals published during Platform Event mode arrive
/// after the switch back) and nothing runs twice. A sink setting changed in the same file is rebuilt; a setting that
/// cannot change live is reported.
#[tokio::test]
async fn mode_switch_by_config_reload_and_back_loses_nothing_and_keeps_each_modes_position() {
    use switchyard::config::Mode;
    let h = Harness::new("sub-mode-reload");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let path = h.dir.path().join("config.yaml");
    let write = |mode: &str, queue: &str, extra: &str| {
        let text = config(
            &h,
            &emu,
            &redis_url(),
            "",
            &format!("mode: {mode}\nreload: {{ watch: false }}\n{extra}"),
        )
        .replace("queue: provisioning,", &format!("queue: {queue},"));
        std::fs::write(&path, text).unwrap();
    };
    // The reloads below are explicit (POST /reload does the same); a file watch would race them to each edit.
    write("cdc", "provisioning", "");
    let loaded = LoadedConfig::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let service = Arc::new(Service::start(loaded, false).await.unwrap());
    let (stop, shutdown) = watch::channel(false);
    let task = {
        let service = service.clone();
        tokio::spawn(async move { service.run(shutdown).await.unwrap() })
    };
    let run = Running { service, stop, task };
    let request = |n: u32| {
        let (id, record) = h.record(n, None);
        event(
            &json!({"id": format!("pe-{n}-{}", h.tag), "channel": emulator::FULFILMENT_CHANNEL, "kind": "platform",
            "fields": {"CreatedDate": 1764230415000u64, "CreatedById": "005xx0000000001AAA", "Order_Id__c": id,
                       "Idempotency_Key__c": format!("ofr-{id}"), "Correlation_Id__c": format!("corr-{n}")},
            "record": {id: record}}),
        )
    };
    let channels = |run: &Running| -> Vec<String> {
        let mut c: Vec<String> = run
            .service
            .channels
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.channel.clone())
            .collect();
        c.sort();
        c
    };
    subscribed(&emu, 2).await;
    assert_eq!(
        channels(&run),
        vec![
            emulator::ORDER_CHANNEL.to_string(),
            emulator::ORDER_ITEM_CHANNEL.to_string()
        ]
    );

    // CDC: approvals 1-10 settle.
    let mut tenth = Vec::new();
    for n in 1..=10 {
        tenth = emu.publish(&approval(&h, n)).unwrap();
    }
    run.settled(10, Duration::from_secs(30)).await;
    let cdc_key = checkpoint_key(Mode::Cdc, emulator::ORDER_CHANNEL);
    let pe_key = checkpoint_key(Mode::PlatformEvent, emulator::FULFILMENT_CHANNEL);

    // Switch to Platform Event mode, with the provisioning queue renamed and the HTTP listener added.
    write(
        "platform-event",
        "provisioning-pe",
        "http: { listen: \"127.0.0.1:0\" }\n",
    );
    let outcome = run.service.reloader.reload().await;
    assert!(outcome.ok && outcome.swapped, "{outcome:?}");
    assert!(
        outcome.applied.iter().any(|a| a == "mode: cdc -> platform-event"),
        "{outcome:?}"
    );
    assert!(
        outcome
            .applied
            .iter()
            .any(|a| a == "sinks rebuilt: enqueue-provisioning"),
        "only the changed sink is rebuilt: {outcome:?}"
    );
    assert!(
        outcome
            .applied
            .iter()
            .any(|a| a.contains(&format!("started: [{pe_key}], stopped: ["))
                && a.contains(&cdc_key)
                && a.contains(&checkpoint_key(Mode::Cdc, emulator::ORDER_ITEM_CHANNEL))),
        "{outcome:?}"
    );
    assert!(
        outcome.restart_required.iter().any(|r| r.starts_with("`http` changed")),
        "a setting that cannot change live is reported: {outcome:?}"
    );
    assert_eq!(channels(&run), vec![emulator::FULFILMENT_CHANNEL.to_string()]);
    // The stopped channel keeps its lease until the position past its settled events is stored (a position
    // written under a released lease would be refused, and this mode would resume from an older one).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored(&h, &redis_url(), &cdc_key).await.as_ref() != Some(&tenth) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CDC position past approval 10 was stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cdc_at_switch = Some(tenth);
    // While in Platform Event mode: fulfilment requests 11-15 are processed; CDC approvals 16-20 wait on the bus.
    for n in 11..=15 {
        emu.publish(&request(n)).unwrap();
    }
    for n in 16..=20 {
        emu.publish(&approval(&h, n)).unwrap();
    }
    run.settled(15, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *run.service.pipeline.settled.borrow(),
        15,
        "no CDC event is read in Platform Event mode"
    );
    assert_eq!(
        stored(&h, &redis_url(), &cdc_key).await,
        cdc_at_switch,
        "the CDC position is kept while the other mode runs"
    );

    // A broken config keeps everything running as it is, and says where.
    write("sideways", "provisioning", "");
    let outcome = run.service.reloader.reload().await;
    assert!(!outcome.ok && !outcome.swapped, "{outcome:?}");
    assert!(
        outcome
            .problems
            .iter()
            .any(|p| p.contains("config.yaml:") && p.contains("sideways")),
        "{outcome:?}"
    );
    assert_eq!(channels(&run), vec![emulator::FULFILMENT_CHANNEL.to_string()]);

    // And back to CDC: the approvals published meanwhile are delivered from the stored CDC position.
    write("cdc", "provisioning", "");
    let outcome = run.service.reloader.reload().await;
    assert!(outcome.ok && outcome.swapped, "{outcome:?}");
    assert!(
        outcome.applied.iter().any(|a| a == "mode: platform-event -> cdc"),
        "{outcome:?}"
    );
    assert!(outcome.restart_required.is_empty(), "{outcome:?}");
    run.settled(20, Duration::from_secs(30)).await;
    let pe_position = stored(&h, &redis_url(), &pe_key).await;
    assert!(pe_position.is_some(), "the Platform Event position was stored");
    let stats = run.finish().await;
    assert_eq!(stats.events, 20, "{stats:?}");
    assert_eq!(
        stored(&h, &redis_url(), &pe_key).await,
        pe_position,
        "each mode keeps its own position"
    );

    let cdc_jobs = h.jobs().await;
    let mut ids: Vec<String> = cdc_jobs
        .iter()
        .map(|j| j.2["sfOrderId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (1..=10).chain(16..=20).map(|n| order(&h, n)).collect();
    want.sort();
    assert_eq!(ids, want, "every CDC approval once, before and after the round trip");
    let options = bullmq::QueueOptions::new()
        .connection(bullmq::options::RedisConnectionOptions::new().url(redis_url()))
        .prefix(h.bull_prefix());
    let pe_queue = bullmq::Queue::with_options("provisioning-pe", options).await.unwrap();
    let pe_jobs = pe_queue.get_waiting(0, -1).await.unwrap();
    let mut pe_ids: Vec<String> = pe_jobs.iter().map(|j| j.id().to_string()).collect();
    pe_ids.sort();
    let mut want: Vec<String> = (11..=15).map(|n| format!("ofr-{}", h.record(n, None).0)).collect();
    want.sort();
    assert_eq!(pe_ids, want, "the requests went to the queue the reloaded sink names");
    assert!(h.dead_letters().await.is_empty());
}

/// `switchyard emulator --events` serves the demo's own file, whose one malformed line it skips with a warning that
/// names the line, and the project's own client (`record`) decodes every event of it; with `--serve-malformed`
/// the line goes on the bus as a payload no schema decodes, which the client reports and does not record.
/// Starts `switchyard emulator --events EVENTS` with `extra` arguments on free ports, its log in `log`, and waits
/// until it serves (it prints its connection settings then). Returns the process and its gRPC and HTTP ports.
async fn spawn_emulator(
    events: &std::path::Path,
    extra: &[&str],
    log: &std::path::Path,
) -> (tokio::process::Child, u16, u16) {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["emulator", "--listen", &format!("127.0.0.1:{grpc}"), "--http-listen"])
        .arg(format!("127.0.0.1:{http}"))
        .arg("--events")
        .arg(events)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = out.next_line().await.unwrap() {
            if line.starts_with("export SF_CLIENT_SECRET") {
                return;
            }
        }
        panic!("the emulator ended: {}", std::fs::read_to_string(log).unwrap());
    });
    ready.await.expect("the emulator serves within 30 s");
    // Keep reading: a closed stdout ends the emulator (as it ends any command whose reader went away).
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    (child, grpc, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_serves_the_demo_file_skipping_or_serving_its_malformed_line() {
    let h = Harness::new("emulator_demo_file");
    let demo = repo().join("examples/events/order-lifecycle.jsonl");
    let text = std::fs::read_to_string(&demo).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let valid = lines.iter().filter(|l| Event::from_json(l).is_ok()).count();
    let bad_line = text
        .lines()
        .position(|l| !l.trim().is_empty() && Event::from_json(l).is_err())
        .unwrap()
        + 1;
    assert!(valid + 1 == lines.len(), "the demo file has exactly one malformed line");
    for serve_malformed in [false, true] {
        let log = h.dir.path().join(format!("emulator-{serve_malformed}.log"));
        let extra: &[&str] = if serve_malformed { &["--serve-malformed"] } else { &[] };
        let (mut emulator, grpc, http) = spawn_emulator(&demo, extra, &log).await;
        let said = std::fs::read_to_string(&log).unwrap();
        if serve_malformed {
            assert!(said.contains("served as an undecodable payload"), "{said}");
        } else {
            let at = format!("{}:{bad_line}: not an event", demo.display());
            assert!(said.contains(&at), "the warning names the line: {said}");
        }
        let config = h.dir.path().join(format!("record-{serve_malformed}.yaml"));
        std::fs::write(
            &config,
            format!(
                "source:\n  kind: pubsub\n  pubsub: {{ endpoint: \"http://127.0.0.1:{grpc}\", replay: {{ start: earliest }} }}\n\
                 rules: [{rules}]\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
                 invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
                 salesforce: {{ login_url: \"http://127.0.0.1:{http}\", client_id: {id}, client_secret: {secret} }}\n\
                 checkpoint: {{ store: memory }}\n",
                rules = repo().join("rules").display(),
                id = emulator::DEFAULT_CLIENT_ID,
                secret = emulator::DEFAULT_CLIENT_SECRET,
            ),
        )
        .unwrap();
        // `record` subscribes to the channels the rules live on in CDC mode (Order and OrderItem), each in order.
        let want: Vec<String> = lines
            .iter()
            .filter_map(|l| Event::from_json(l).ok())
            .filter(|e| e.channel != emulator::FULFILMENT_CHANNEL)
            .map(|e| e.id)
            .collect();
        let recorded = h.dir.path().join(format!("recorded-{serve_malformed}.jsonl"));
        let record_log = h.dir.path().join(format!("record-{serve_malformed}.log"));
        let mut record = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["record", "--from", "earliest", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&recorded)
            .stderr(std::fs::File::create(&record_log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Until every event is written (and, when served, the undecodable payload after them was seen); then stop.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let written = std::fs::read_to_string(&recorded).map_or(0, |t| t.lines().count());
            let seen = std::fs::read_to_string(&record_log)
                .unwrap_or_default()
                .contains("cannot be decoded");
            if written >= want.len() && (seen || !serve_malformed) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "record wrote {written} of {} events: {}",
                want.len(),
                std::fs::read_to_string(&record_log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = record.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::time::timeout(Duration::from_secs(30), record.wait())
            .await
            .unwrap()
            .unwrap();
        let record_said = std::fs::read_to_string(&record_log).unwrap();
        assert!(status.success(), "{record_said}");
        let got: Vec<Event> = std::fs::read_to_string(&recorded)
            .unwrap()
            .lines()
            .map(|l| Event::from_json(l).unwrap())
            .collect();
        let of = |events: &[Event], channel: &str| -> Vec<String> {
            events
                .iter()
                .filter(|e| e.channel == channel)
                .map(|e| e.id.clone())
                .collect()
        };
        let published: Vec<Event> = lines.iter().filter_map(|l| Event::from_json(l).ok()).collect();
        for channel in [emulator::ORDER_CHANNEL, emulator::ORDER_ITEM_CHANNEL] {
            assert_eq!(of(&got, channel), of(&published, channel), "{channel}: {record_said}");
        }
        assert_eq!(got.len(), want.len());
        assert_eq!(
            record_said.contains("cannot be decoded is not recorded"),
            serve_malformed,
            "{record_said}"
        );
        emulator.kill().await.unwrap();
    }
}

/// OrderItem changes over real gRPC (the emulator serves `/data/OrderItemChangeEvent` with its own schema): a
/// customer-facing change of a line invalidates its parent order's cache keys, the OrderId read from the line
/// over REST when the event does not carry it, or taken from a CREATE; an internal change touches nothing.
#[tokio::test]
async fn order_item_changes_invalidate_the_parent_order_over_grpc() {
    let h = Harness::new("sub-order-items");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let run = start(&h, &config(&h, &emu, &redis_url(), "", "")).await;
    let (order1, order2, order3) = (order(&h, 1), order(&h, 2), order(&h, 3));
    let keys: Vec<String> = [&order1, &order2, &order3]
        .iter()
        .map(|o| format!("orders:detail:{o}"))
        .collect();
    for key in &keys {
        h.set_key(key).await;
    }
    let line = |n: u32| format!("802{}{n:03}AAA", &order(&h, 0)[3..12]);
    let item = |tx: &str, id: &str, change: &str, changed: &[&str], fields: Value, record: Value| {
        let mut e = h.change(tx, &[id.to_string()], changed, fields, record);
        e["channel"] = json!(emulator::ORDER_ITEM_CHANNEL);
        e["header"]["entity"] = json!("OrderItem");
        e["header"]["change_type"] = json!(change);
        event(&e)
    };
    // The quantity of a line of order 1: OrderId is not in the event, the REST read of the line finds it.
    let l1 = line(1);
    emu.publish(&item(
        "tx-qty",
        &l1,
        "UPDATE",
        &["Quantity", "TotalPrice", "LastModifiedDate"],
        json!({"Quantity": 3.0, "TotalPrice": 89.97, "LastModifiedDate": 1764230499000u64}),
        records(&[(l1.clone(), json!({"OrderId": order1}))]),
    ))
    .unwrap();
    // An internal field of a line of order 2: nothing the customer sees.
    let l2 = line(2);
    emu.publish(&item(
        "tx-internal",
        &l2,
        "UPDATE",
        &["Provisioning_Status__c", "LastModifiedDate"],
        json!({"Provisioning_Status__c": "Provisioned", "LastModifiedDate": 1764230499000u64}),
        records(&[(l2.clone(), json!({"OrderId": order2}))]),
    ))
    .unwrap();
    // A new line of order 3, which names its order.
    let l3 = line(3);
    emu.publish(&item(
        "tx-create",
        &l3,
        "CREATE",
        &[],
        json!({"OrderId": order3, "Quantity": 1.0, "UnitPrice": 19.99, "Product2Id": "01txx0000000001AAA"}),
        records(&[(l3.clone(), json!({"OrderId": order3}))]),
    ))
    .unwrap();
    run.settled(3, Duration::from_secs(20)).await;
    let stats = run.finish().await;
    assert_eq!(stats.malformed, 0, "{stats:?}");
    assert!(!h.key_exists(&keys[0]).await, "a quantity change invalidates its order");
    assert!(
        h.key_exists(&keys[1]).await,
        "an internal change leaves the order's cache alone"
    );
    assert!(
        !h.key_exists(&keys[2]).await,
        "a new line invalidates the order it names"
    );
    assert_eq!(emu.rest_reads_of(&l3), 0, "a CREATE names its order: no read");
    assert!(
        emu.rest_reads_of(&l1) >= 1,
        "the line of an UPDATE is read for its order"
    );
}

/// Multi-entity channels over real gRPC: the emulator serves `/data/ChangeEvents` and the custom channel
/// `/data/Orders__chn` (Order enriched with AccountId, OrderItem with OrderId), each event written with its own
/// entity's schema, so one stream carries two schema ids. Routes select by `entity:`; an enriched field arrives in
/// `fields` but never in `changed_fields`, so `changed("AccountId")` fires only when the account really changed.
#[tokio::test]
async fn multi_entity_and_custom_channels_route_by_entity_and_never_count_enriched_fields_as_changed() {
    let h = Harness::new("sub-multi-entity");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let rules = h.dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let custom = emulator::ORDERS_CUSTOM_CHANNEL;
    let all = emulator::CHANGE_EVENTS_CHANNEL;
    std::fs::write(
        rules.join("multi.yaml"),
        format!(
            r#"version: 1
routes:
  - name: orders-on-custom
    channel: {custom}
    entity: Order
    when: "true"
    then: [{{ sink: log, message: "order {{{{record_id}}}}" }}]
  - name: provision-on-custom
    channel: {custom}
    entity: Order
    when: became("Activation_Status__c", "Activating")
    then:
      - sink: enqueue-provisioning
        job: {{ sfOrderId: "{{{{record_id}}}}", accountId: "{{{{event.AccountId}}}}" }}
        idempotency_key: "activation-{{{{record_id}}}}-{{{{header.commit_timestamp}}}}"
  - name: account-moved
    channel: {custom}
    entity: Order
    when: changed("AccountId")
    then: [{{ sink: invalidate-cache, keys: ["orders:account:{{{{event.AccountId}}}}"] }}]
  - name: lines-on-custom
    channel: {custom}
    entity: OrderItem
    when: changed_any(["Quantity", "UnitPrice"])
    then: [{{ sink: invalidate-cache, keys: ["orders:detail:{{{{event.OrderId}}}}"] }}]
  - name: status-on-all
    channel: {all}
    entity: Order
    when: changed("Status")
    then: [{{ sink: invalidate-cache, keys: ["orders:status:{{{{record_id}}}}"] }}]
  - name: lines-on-all
    channel: {all}
    entity: OrderItem
    when: changed("Quantity")
    then: [{{ sink: invalidate-cache, keys: ["orders:item:{{{{record_id}}}}"] }}]
"#
        ),
    )
    .unwrap();
    let text = common::pubsub_config(&h, &emu, &redis_url(), &rules, "", "");
    let run = start(&h, &text).await;
    let (o1, o2, o3, o4) = (order(&h, 1), order(&h, 2), order(&h, 3), order(&h, 4));
    let (a1, a3) = (h.account(1), h.account(3));
    let line = |n: u32| format!("802{}{n:03}AAA", &order(&h, 0)[3..12]);
    let (l1, l2) = (line(1), line(2));
    let keys = [
        format!("orders:account:{a1}"),
        format!("orders:detail:{o2}"),
        format!("orders:account:{a3}"),
        format!("orders:status:{o4}"),
        format!("orders:item:{l2}"),
    ];
    for key in &keys {
        h.set_key(key).await;
    }
    let on = |mut e: Value, channel: &str, entity: &str| {
        e["channel"] = json!(channel);
        e["header"]["entity"] = json!(entity);
        event(&e)
    };
    // An approval of order 1 on the custom channel: AccountId is enriched from the org's record (unchanged).
    let approval = h.approval(
        "tx-m1",
        std::slice::from_ref(&o1),
        None,
        records(&[(o1.clone(), json!({"AccountId": a1}))]),
    );
    emu.publish(&on(approval, custom, "Order")).unwrap();
    // A line of order 2 on the custom channel: OrderId is enriched, so no read is needed.
    let item = h.change(
        "tx-m2",
        std::slice::from_ref(&l1),
        &["Quantity", "LastModifiedDate"],
        json!({"Quantity": 2.0, "LastModifiedDate": 1764230499000u64}),
        records(&[(l1.clone(), json!({"OrderId": o2}))]),
    );
    emu.publish(&on(item, custom, "OrderItem")).unwrap();
    // Order 3 really moved to another account.
    let moved = h.change(
        "tx-m3",
        std::slice::from_ref(&o3),
        &["AccountId", "LastModifiedDate"],
        json!({"AccountId": a3, "LastModifiedDate": 1764230499000u64}),
        records(&[(o3.clone(), json!({"AccountId": a3}))]),
    );
    emu.publish(&on(moved, custom, "Order")).unwrap();
    // The standard multi-entity channel: an Order and an OrderItem change, each with its schema.
    let status = h.change(
        "tx-m4",
        std::slice::from_ref(&o4),
        &["Status"],
        json!({"Status": "Activated"}),
        json!({}),
    );
    emu.publish(&on(status, all, "Order")).unwrap();
    let quantity = h.change(
        "tx-m5",
        std::slice::from_ref(&l2),
        &["Quantity"],
        json!({"Quantity": 5.0}),
        json!({}),
    );
    emu.publish(&on(quantity, all, "OrderItem")).unwrap();
    assert!(
        emu.publish(&on(
            h.change(
                "tx-m6",
                std::slice::from_ref(&o4),
                &["Status"],
                json!({"Status": "Draft"}),
                json!({})
            ),
            all,
            "Account"
        ))
        .is_err(),
        "the emulator refuses an entity its channel does not carry"
    );

    run.settled(5, Duration::from_secs(20)).await;
    let stats = run.finish().await;
    assert_eq!(stats.malformed, 0, "every event decodes with its own schema: {stats:?}");
    assert_eq!(
        stats.routes_fired.get("orders-on-custom"),
        Some(&2),
        "Order routes see only Order events: {stats:?}"
    );
    assert_eq!(stats.routes_fired.get("lines-on-custom"), Some(&1), "{stats:?}");
    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        jobs[0].2["accountId"],
        json!(a1),
        "the enriched AccountId reaches the job: {jobs:?}"
    );
    assert!(
        h.key_exists(&keys[0]).await,
        "an enriched, unchanged AccountId does not fire changed()"
    );
    assert!(
        !h.key_exists(&keys[1]).await,
        "the enriched OrderId names the line's order"
    );
    assert_eq!(emu.rest_reads_of(&l1), 0, "nothing had to be read");
    assert!(!h.key_exists(&keys[2]).await, "a real account change fires changed()");
    assert!(!h.key_exists(&keys[3]).await, "an Order change on /data/ChangeEvents");
    assert!(
        !h.key_exists(&keys[4]).await,
        "an OrderItem change on /data/ChangeEvents"
    );
    let ids: std::collections::HashSet<String> = [emulator::ORDER_CHANNEL, emulator::ORDER_ITEM_CHANNEL]
        .iter()
        .map(|c| emu.schema_id(c).unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "Order and OrderItem have their own schema ids");
}

/// A managed subscription (ManagedSubscribe) over real gRPC: Salesforce (the emulator) keeps the position. 1,000
/// activations across a dropped stream and a restart give exactly 1,000 jobs and 1,000 events processed (the
/// events redelivered after the drop were in flight and are not handed on twice); the committed position, sampled
/// all along, never runs ahead of the stored (settled) one; a stop commits the last settled position, so the
/// restarted process resumes right after it.
#[tokio::test]
async fn managed_subscription_commits_only_settled_positions_across_a_drop_and_a_restart() {
    let h = Harness::new("sub-managed");
    let name = "Switchyard_Orders";
    let emu = Arc::new(
        emulator_with(EmulatorOptions {
            managed: vec![emulator::ManagedSubscription {
                developer_name: name.into(),
                topic: emulator::ORDER_CHANNEL.into(),
                default_earliest: true,
                running: true,
            }],
            ..EmulatorOptions::default()
        })
        .await,
    );
    let key = checkpoint_key(switchyard::config::Mode::Cdc, emulator::ORDER_CHANNEL);
    // The committed position must never lead the stored one: sampled in this order (stored only grows).
    let sampling = watch::channel(false);
    let sampler = {
        let (emu, h_prefix, key, mut stop) = (emu.clone(), h.key_prefix(), key.clone(), sampling.1.clone());
        tokio::spawn(async move {
            let conn = redis::aio::ConnectionManager::new(redis::Client::open(redis_url()).unwrap())
                .await
                .unwrap();
            let store = CheckpointStore::redis(switchyard::state::Conn::Server(conn), &h_prefix);
            let (mut samples, mut ahead) = (0u32, Vec::new());
            while !*stop.borrow() {
                let committed = emu.managed_committed(name);
                let stored = store.get(&key).await.unwrap();
                if let Some(c) = committed {
                    samples += 1;
                    if stored.as_ref().is_none_or(|s| *s < c) {
                        ahead.push((c, stored));
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(5), stop.changed()).await;
            }
            (samples, ahead)
        })
    };
    let managed = format!(", subscriptions: {{ orders: {name} }}");
    for n in 1..=500 {
        emu.publish(&common::activation(&h, n)).unwrap();
    }
    emu.inject(Fault::DropStreamAfter(230));
    let run = start(&h, &config(&h, &emu, &redis_url(), &managed, "")).await;
    run.settled(500, Duration::from_secs(60)).await;
    let first = run.finish().await;
    assert_eq!(
        first.events, 500,
        "each event handed on once, the drop's redeliveries included: {first:?}"
    );
    assert_eq!(
        emu.managed_committed(name),
        Some(emu.latest_replay_id()),
        "stopping committed the last settled position"
    );
    let streams = emu.managed_streams();
    assert!(streams >= 2, "the dropped stream was resubscribed ({streams} streams)");

    // The rest arrive while no process runs; the next one resumes where Salesforce says.
    for n in 501..=1000 {
        emu.publish(&common::activation(&h, n)).unwrap();
    }
    let delivered_before = emu.delivered();
    let run = start(&h, &config(&h, &emu, &redis_url(), &managed, "")).await;
    run.settled(500, Duration::from_secs(60)).await;
    let second = run.finish().await;
    assert_eq!(
        second.events, 500,
        "nothing before the committed position came again: {second:?}"
    );
    assert_eq!(emu.delivered() - delivered_before, 500);
    sampling.0.send_replace(true);
    let (samples, ahead) = sampler.await.unwrap();
    assert!(samples > 10, "the committed position was sampled ({samples} samples)");
    assert!(
        ahead.is_empty(),
        "the committed position ran ahead of the settled one: {ahead:?}"
    );
    let commits = emu.managed_commits(name);
    assert!(
        commits.windows(2).all(|w| w[0] <= w[1]),
        "commits only move forward: {commits:?}"
    );

    let jobs = h.jobs().await;
    let ids: std::collections::HashSet<&str> = jobs.iter().map(|j| j.2["sfOrderId"].as_str().unwrap()).collect();
    assert_eq!(jobs.len(), 1000, "one job per activation");
    assert_eq!(ids.len(), 1000);
    assert!(h.dead_letters().await.is_empty());
}

/// A managed subscription Salesforce does not know (or one in the STOP state) stops its channel with the error
/// code, and the rest of the service keeps running; a second client on an active subscription is refused.
#[tokio::test]
async fn unknown_or_stopped_managed_subscriptions_stop_their_channel_clearly() {
    let h = Harness::new("sub-managed-errors");
    let emu = emulator_with(EmulatorOptions {
        managed: vec![emulator::ManagedSubscription {
            developer_name: "Paused_Orders".into(),
            topic: emulator::ORDER_CHANNEL.into(),
            default_earliest: false,
            running: false,
        }],
        ..EmulatorOptions::default()
    })
    .await;
    for (name, code) in [
        ("No_Such_Subscription", "managed.subscription.developer.name.not.found"),
        ("Paused_Orders", "managed.subscription.config.stopped"),
    ] {
        let managed = format!(", subscriptions: {{ orders: {name} }}");
        let run = start(&h, &config(&h, &emu, &redis_url(), &managed, "")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let state = loop {
            let statuses = run.service.channels.lock().unwrap().clone();
            let orders = statuses
                .iter()
                .find(|s| s.channel == emulator::ORDER_CHANNEL)
                .map(|s| s.state());
            if let Some(orders) = orders
                && (matches!(orders, ChannelState::Stopped(_)) || tokio::time::Instant::now() > deadline)
            {
                break orders;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the orders channel never started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ChannelState::Stopped(why) = state else {
            panic!("{name}: the channel did not stop: {state:?}");
        };
        assert!(why.contains(code), "{name}: {why}");
        run.finish().await;
    }
}

/// A service on the shipped rules whose provisioning queue cannot take a job: its key is a string, so every XADD
/// answers WRONGTYPE until the (short) retry budget runs out and the enqueue is dead-lettered.
async fn start_with_a_broken_queue(h: &Harness, emu: &EmulatorHandle) -> Running {
    let queue_key = format!("{}broken-queue", h.key_prefix());
    h.set_key(&queue_key).await;
    let text = config(
        h,
        emu,
        &redis_url(),
        "",
        "delivery: { retry: { initial_backoff_ms: 10, max_backoff_ms: 40, budget_ms: 400 } }\n",
    )
    .replace(
        "kind: queue, queue: provisioning,",
        &format!("kind: queue, format: stream, queue: \"{queue_key}\","),
    );
    assert!(text.contains("format: stream"), "{text}");
    start(h, &text).await
}

/// Issue 23 part 4: a provisioning job that cannot be enqueued (the queue's key is not a stream, so every XADD
/// fails until the retry budget runs out) is dead-lettered once, and the route's `on_failure` writes the failure
/// back to the Order through the emulator's REST API: exactly one PATCH, with the failure fields and the
/// `Sforce-Call-Options` client. The write's own CDC event comes back over gRPC, is decided under the shipped
/// rules, and neither provisions, writes back again, nor invalidates the customer's cache (internal fields only).
#[tokio::test]
async fn an_enqueue_dead_lettered_writes_the_failure_back_to_the_order_once_without_a_loop() {
    let h = Harness::new("sub-write-back");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let run = start_with_a_broken_queue(&h, &emu).await;
    let o1 = order(&h, 1);
    emu.publish(&approval(&h, 1)).unwrap();
    // The approval, then the change event of the write-back itself.
    run.settled(2, Duration::from_secs(30)).await;
    // Nothing else follows: give a loop the time to show itself.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let updates = emu.updates();
    assert_eq!(updates.len(), 1, "exactly one PATCH: {updates:?}");
    let u = &updates[0];
    assert_eq!((u.object.as_str(), u.id.as_str()), ("Order", o1.as_str()));
    assert_eq!(u.client.as_deref(), Some("switchyard-provisioning"));
    assert_eq!(u.fields["Activation_Status__c"], json!("Failed"));
    assert_eq!(u.fields["Activation_Error_Code__c"], json!("SWITCHYARD_ENQUEUE_FAILED"));
    let message = u.fields["Activation_Error_Message__c"].as_str().unwrap();
    assert!(
        message.contains("enqueue-provisioning") && message.contains("WRONGTYPE") && message.chars().count() <= 255,
        "{message}"
    );
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1, "only the enqueue is dead-lettered: {letters:?}");
    assert!(
        letters[0].to_string().contains("enqueue-provisioning"),
        "{}",
        letters[0]
    );
    let stats = run.finish().await;
    assert_eq!(stats.events, 2, "{stats:?}");
    assert_eq!(stats.dead_letters, 1, "{stats:?}");
    assert_eq!(stats.routes_fired.get("provision-on-activating"), Some(&1), "{stats:?}");
    assert_eq!(stats.actions_done.get("salesforce-update"), Some(&1), "{stats:?}");
    // The approval changed Status (customer-facing); the write-back only internal fields: one invalidation.
    assert_eq!(stats.actions_done.get("invalidate-cache"), Some(&1), "{stats:?}");
    assert_eq!(emu.updates().len(), 1);
    emu.shutdown().await.unwrap();
}

/// `switchyard emulator --managed NAME=TOPIC` gives the org managed subscriptions: a service that maps both CDC
/// channels to them reads every demo event once, commits its settled position on stop, and a second service (with
/// no stored position of its own: a memory checkpoint) resumes where the emulator process says, reading nothing
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_cli_serves_managed_subscriptions_that_keep_the_position_across_services() {
    let h = Harness::new("emulator_cli_managed");
    let demo = repo().join("examples/events/order-lifecycle.jsonl");
    let cdc = std::fs::read_to_string(&demo)
        .unwrap()
        .lines()
        .filter_map(|l| Event::from_json(l).ok())
        .filter(|e| e.channel != emulator::FULFILMENT_CHANNEL)
        .count() as u64;
    let managed = [
        "--managed",
        "Switchyard_Orders=/data/OrderChangeEvent",
        "--managed",
        "Switchyard_Items=/data/OrderItemChangeEvent",
    ];
    let (mut child, grpc, http) = spawn_emulator(&demo, &managed, &h.dir.path().join("emulator.log")).await;
    let text = format!(
        "source:\n  kind: pubsub\n  pubsub: {{ endpoint: \"http://127.0.0.1:{grpc}\", \
         subscriptions: {{ orders: Switchyard_Orders, order-items: Switchyard_Items }} }}\n\
         rules: [{rules}]\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
         salesforce: {{ login_url: \"http://127.0.0.1:{http}\", client_id: {id}, client_secret: {secret} }}\n\
         checkpoint: {{ store: memory }}\n",
        rules = repo().join("rules").display(),
        id = emulator::DEFAULT_CLIENT_ID,
        secret = emulator::DEFAULT_CLIENT_SECRET,
    );
    let first = start(&h, &text).await;
    first.settled(cdc, Duration::from_secs(60)).await;
    let stats = first.finish().await;
    assert_eq!(stats.events + stats.malformed, cdc, "{stats:?}");
    // The committed positions live in the emulator process: a new service starts after them.
    let second = start(&h, &text).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = second.finish().await;
    assert_eq!(again.events + again.malformed, 0, "nothing is read twice: {again:?}");
    child.kill().await.unwrap();
}

/// `record` on a custom channel keeps what the stream said per entity (each event's own schema id, the enriched
/// field in `fields` but not in `changed_fields`), and `replay` of that recording decides each event with the routes
/// of its entity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_and_replay_keep_entities_schemas_and_enriched_fields_of_a_custom_channel() {
    let h = Harness::new("record-custom");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let rules = h.dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let custom = emulator::ORDERS_CUSTOM_CHANNEL;
    std::fs::write(
        rules.join("custom.yaml"),
        format!(
            r#"version: 1
routes:
  - name: order-account-changed
    channel: {custom}
    entity: Order
    when: changed("AccountId")
    then: [{{ sink: log, message: "order {{{{record_id}}}} moved" }}]
  - name: order-status
    channel: {custom}
    entity: Order
    when: changed("Status")
    then: [{{ sink: log, message: "order {{{{record_id}}}} status" }}]
  - name: line-quantity
    channel: {custom}
    entity: OrderItem
    when: changed("Quantity")
    then: [{{ sink: invalidate-cache, keys: ["orders:detail:{{{{event.OrderId}}}}"] }}]
"#
        ),
    )
    .unwrap();
    let (o1, a1) = (order(&h, 1), h.account(1));
    let l1 = format!("802{}001AAA", &order(&h, 0)[3..12]);
    let on = |mut e: Value, entity: &str| {
        e["channel"] = json!(custom);
        e["header"]["entity"] = json!(entity);
        event(&e)
    };
    let status = h.change(
        "tx-r1",
        std::slice::from_ref(&o1),
        &["Status"],
        json!({"Status": "Activated"}),
        records(&[(o1.clone(), json!({"AccountId": a1}))]),
    );
    emu.publish(&on(status, "Order")).unwrap();
    let line = h.change(
        "tx-r2",
        std::slice::from_ref(&l1),
        &["Quantity"],
        json!({"Quantity": 3.0}),
        records(&[(l1.clone(), json!({"OrderId": o1}))]),
    );
    emu.publish(&on(line, "OrderItem")).unwrap();
    let config = h.dir.path().join("config.yaml");
    std::fs::write(&config, common::pubsub_config(&h, &emu, &redis_url(), &rules, "", "")).unwrap();
    let out = h.dir.path().join("recorded.jsonl");
    let record = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["record", "--from", "earliest", "--max-events", "2", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output();
    let record = tokio::time::timeout(Duration::from_secs(60), record)
        .await
        .unwrap()
        .unwrap();
    assert!(record.status.success(), "{}", String::from_utf8_lossy(&record.stderr));
    let got: Vec<Event> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| Event::from_json(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    let (order_event, line_event) = (&got[0], &got[1]);
    let entity = |e: &Event| e.header.as_ref().unwrap().entity.clone();
    assert_eq!(
        (entity(order_event), entity(line_event)),
        ("Order".into(), "OrderItem".into())
    );
    assert_ne!(order_event.schema_id, line_event.schema_id, "each entity's own schema");
    // Enriched: present, not changed.
    assert_eq!(order_event.fields["AccountId"], json!(a1));
    assert!(
        !order_event
            .header
            .as_ref()
            .unwrap()
            .changed_fields
            .contains(&"AccountId".to_string())
    );
    assert_eq!(line_event.fields["OrderId"], json!(o1));
    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["replay", "--events"])
        .arg(&out)
        .arg("--rules")
        .arg(&rules)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&replay.stdout).to_string();
    assert!(
        replay.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        said.contains("order-status") && said.contains("line-quantity"),
        "{said}"
    );
    assert!(
        !said.contains("order-account-changed"),
        "an enriched field did not change: {said}"
    );
    emu.shutdown().await.unwrap();
}

/// The write-back retries and dead-letters like every sink: a 503 from Salesforce is retried and the Order is
/// written once; a 400 (a validation rule refusing the write) dead-letters the write-back itself, which does not
/// start another `on_failure`.
#[tokio::test]
async fn a_write_back_is_retried_on_503_and_dead_lettered_on_400_without_another_on_failure() {
    let h = Harness::new("sub-write-back-faults");
    let emu = emulator_with(EmulatorOptions::default()).await;
    let run = start_with_a_broken_queue(&h, &emu).await;
    let (o1, o2) = (order(&h, 1), order(&h, 2));
    emu.inject(Fault::FailRestUpdates { status: 503, times: 1 });
    emu.publish(&approval(&h, 1)).unwrap();
    // The approval and the write-back's own change event.
    run.settled(2, Duration::from_secs(30)).await;
    let updates = emu.updates();
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(updates[0].id, o1);
    emu.inject(Fault::FailRestUpdates { status: 400, times: 1 });
    emu.publish(&approval(&h, 2)).unwrap();
    run.settled(3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(emu.updates().len(), 1, "the refused write changed nothing");
    let letters = h.dead_letters().await;
    let of = |id: &str| letters.iter().filter(|l| l.to_string().contains(id)).count();
    assert_eq!((of(&o1), of(&o2)), (1, 2), "{letters:?}");
    let refused = letters
        .iter()
        .find(|l| l.to_string().contains("FIELD_CUSTOM_VALIDATION_EXCEPTION"))
        .unwrap_or_else(|| panic!("the write-back's letter says why: {letters:?}"));
    assert!(refused.to_string().contains(&o2), "{refused}");
    let stats = run.finish().await;
    assert_eq!(stats.events, 3, "{stats:?}");
    assert_eq!(stats.dead_letters, 3, "{stats:?}");
    assert_eq!(stats.actions_done.get("salesforce-update"), Some(&1), "{stats:?}");
    emu.shutdown().await.unwrap();
}
