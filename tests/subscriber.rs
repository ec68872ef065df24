//! The Pub/Sub subscriber against the emulator over real gRPC on loopback, with real Redis: flow control,
//! resubscribes, replay positions, recovery by error code, schema changes, backpressure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, records, redis_url, repo};
use serde_json::{Value, json};
use switchyard::checkpoint::CheckpointStore;
use switchyard::config::LoadedConfig;
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions, Fault};
use switchyard::event::Event;
use switchyard::pipeline::Stats;
use switchyard::service::Service;
use switchyard::sources::pubsub::subscriber::{ChannelState, checkpoint_key};
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

/// The config of a pubsub run against `emu`; `pubsub` adds settings to `source.pubsub`, `extra` top-level lines.
fn config(h: &Harness, emu: &EmulatorHandle, redis: &str, pubsub: &str, extra: &str) -> String {
    format!(
        "source:\n  kind: pubsub\n  pubsub: {{ endpoint: \"{endpoint}\", initial_backoff_ms: 20, max_backoff_ms: 200, \
         replay: {{ start: stored, fallback: earliest }}{pubsub} }}\n\
         rules: [{rules}]\nredis: {{ url: \"{redis}\", key_prefix: \"{kp}\" }}\n\
         sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order, prefix: {bp} }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n\
         salesforce: {{ login_url: \"{login}\", client_id: {id}, client_secret: {secret} }}\n\
         {extra}",
        endpoint = emu.endpoint(),
        rules = repo().join("rules").display(),
        kp = h.key_prefix(),
        bp = h.bull_prefix(),
        login = emu.base_url(),
        id = emulator::DEFAULT_CLIENT_ID,
        secret = emulator::DEFAULT_CLIENT_SECRET,
    )
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
    CheckpointStore::redis(conn, &h.key_prefix()).get(key).await.unwrap()
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
    // Writes stall for 2.5 s: five idle timeouts.
    redis.pause_writes(Duration::from_millis(2500));
    let run = start(&h, &config(&h, &emu, &redis.url(), "", "delivery: { concurrency: 4 }")).await;
    run.settled(300, Duration::from_secs(60)).await;
    let stats = run.finish().await;
    assert_eq!(stats.events, 300, "{stats:?}");
    assert_eq!(stats.skipped, 0);
    assert_eq!(stats.dead_letters, 0);
    assert!(emu.subscriptions() >= 2, "the idle-closed stream was resubscribed");
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
