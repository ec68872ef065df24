//! End to end on the real local Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`): Avro bytes of a
//! delivered batch -> decode -> route -> enrichment (recorded) -> queue (BullMQ) and cache (UNLINK) sinks
//! with idempotency leases and done markers; against native baseline (b), the same path written by hand
//! with the same guarantees, pipelined per batch; and the engine with `journal: { enabled: false }`, so that the
//! decision journal's cost is the difference of the two engine figures. One current-thread runtime for both: the engine's
//! concurrency (`delivery.concurrency` events in flight) multiplexes its Redis calls over one connection.
//!
//! `cargo bench --bench e2e`. Every iteration uses fresh record ids and commit timestamps, so every
//! queue action really enqueues (no idempotent skips); the bench deletes its keys when it ends.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{encode, event_mix, native_decide, registry};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use serde_json::Value;
use switchyard::app::service::Service;
use switchyard::config::LoadedConfig;
use switchyard::delivery::{ActionResult, journal};
use switchyard::event::{Event, EventKind};
use switchyard::plan::Op;
use switchyard::sources::pubsub::avro::SchemaRegistry;

/// Events per delivered batch: the Pub/Sub API's maximum per fetch.
const BATCH: usize = 100;
/// The idempotency lease and done-marker TTLs of the engine's defaults, used by the baseline too.
const LEASE_MS: u64 = 30_000;
const DONE_MS: u64 = 96 * 3600 * 1000;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One batch: the CDC events of the mix (a CDC subscription never delivers platform events), encoded.
fn batch(registry: &SchemaRegistry, run: u64) -> (Vec<Event>, Vec<common::Wire>) {
    let events: Vec<Event> = event_mix(BATCH + BATCH / 10, run)
        .into_iter()
        .filter(|e| e.kind() == EventKind::Change)
        .take(BATCH)
        .collect();
    let wire = encode(registry, &events);
    (events, wire)
}

struct Bench {
    tag: String,
    service: Service,
    registry: SchemaRegistry,
    conn: redis::aio::ConnectionManager,
    queue: bullmq::Queue,
    /// Distinct per iteration (fresh keys) across both benches.
    run: std::sync::atomic::AtomicU64,
}

impl Bench {
    /// `journal`: whether the engine keeps its decision journal (the default) or runs with
    /// `journal: { enabled: false }`.
    async fn start(journal: bool) -> Bench {
        let tag = format!(
            "bench-e2e-{}-{}",
            std::process::id(),
            if journal { "journal" } else { "nojournal" }
        );
        let journal = if journal { "" } else { "journal: { enabled: false }\n" };
        let config = format!(
            r#"mode: cdc
source: {{ kind: stdin }}
rules: ["{rules}"]
redis: {{ url: "{url}", key_prefix: "{tag}:" }}
sinks:
  enqueue-provisioning: {{ kind: queue, format: bullmq, queue: provisioning, job_name: provision-order, prefix: "{tag}" }}
  invalidate-cache: {{ kind: cache-invalidate }}
  log: {{ kind: log }}
enricher: recorded
on_unmatched: ignore
checkpoint: {{ store: memory }}
{journal}"#,
            rules = common::repo().join("rules/orders.yaml").display(),
            url = redis_url(),
        );
        let path = std::env::temp_dir().join(format!("{tag}.yaml"));
        std::fs::write(&path, config).expect("temp config is writable");
        let loaded = LoadedConfig::load(&path).unwrap_or_else(|p| panic!("bench config: {p}"));
        let service = Service::start(loaded, false)
            .await
            .unwrap_or_else(|e| panic!("cannot start the engine against {}: {e}", redis_url()));
        let client = redis::Client::open(redis_url()).expect("redis url");
        let conn = client.get_connection_manager().await.expect("redis is reachable");
        let options = bullmq::QueueOptions::new()
            .connection(bullmq::options::RedisConnectionOptions::new().url(redis_url()))
            .prefix(format!("{tag}-native"));
        let queue = bullmq::Queue::with_options("provisioning", options)
            .await
            .expect("bullmq queue");
        Bench {
            tag,
            service,
            registry: registry(),
            conn,
            queue,
            run: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn next_run(&self) -> u64 {
        self.run.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine: what the pipeline does for each event of a delivered batch, with up to
    /// `delivery.concurrency` events in flight (distinct records, so no per-record waiting), and its decision
    /// journal when the config keeps one: an entry per event, handed to the journal's writer as the pipeline
    /// does (the measured loop waits for the writer after its last batch, so the journal's whole cost is inside
    /// the measured time).
    async fn engine(&self, events: &[Event], wire: &[common::Wire]) -> usize {
        let journal = self.service.stores.journal.as_ref();
        let pipeline = &self.service.pipeline;
        let rules = self.service.rules.load_full();
        let concurrency = self.service.config.config.delivery.concurrency;
        let done = futures_util::stream::iter(wire.iter().zip(events))
            .map(|(w, recorded)| {
                let rules = rules.clone();
                async move {
                    let mut event = self.registry.decode(&w.channel, &w.raw()).expect("decodes");
                    // The recorded enricher reads the records the event was recorded with.
                    event.record = recorded.record.clone();
                    let plan = pipeline.plan_enriched(&rules, &mut event).await;
                    let results = pipeline.dispatcher.run(&plan, &event, None).await;
                    for r in &results {
                        assert!(matches!(r, ActionResult::Done { .. }), "engine action not done: {r:?}");
                    }
                    if let Some(journal) = journal {
                        let position = format!("{}@{}", w.channel, switchyard::hex::encode(&w.replay_id));
                        let settled = Some((&plan, results.as_slice(), &[][..]));
                        journal.record(journal::entry(&rules, event, &position, settled, &journal.mask));
                    }
                    results.len()
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<usize>>()
            .await;
        done.into_iter().sum()
    }

    /// Native baseline (b): decode, decide by hand, then three pipelined round trips per batch: take the
    /// leases (SET NX PX), enqueue the acquired jobs (BullMQ add over one multiplexed connection), mark
    /// them done (SET PX) and UNLINK the cache keys.
    async fn native(&self, wire: &[common::Wire]) -> usize {
        let mut jobs = Vec::new();
        let mut cache_keys: Vec<Vec<String>> = Vec::new();
        let mut actions = 0;
        for w in wire {
            let event = self.registry.decode(&w.channel, &w.raw()).expect("decodes");
            for action in native_decide(&event, &w.records) {
                actions += 1;
                match action.op {
                    Op::Enqueue {
                        idempotency_key,
                        job_id,
                        data,
                        ..
                    } => jobs.push((idempotency_key, job_id, data)),
                    Op::Invalidate { keys, .. } => cache_keys.push(keys),
                    Op::Log { message, .. } => tracing::info!(event_id = %event.id, "{message}"),
                    Op::DeadLetter { .. } | Op::Webhook { .. } | Op::SalesforceUpdate { .. } => {
                        unreachable!("the CDC mix has no dead-letter, webhook or write-back action")
                    }
                }
            }
        }
        let mut conn = self.conn.clone();
        let idem = |key: &str| format!("{}-native:idem:enqueue-provisioning:{key}", self.tag);
        let token = format!("lease:{}:{}", std::process::id(), self.next_run());
        let mut claim = redis::pipe();
        for (key, _, _) in &jobs {
            claim
                .cmd("SET")
                .arg(idem(key))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LEASE_MS);
        }
        let claimed: Vec<Option<String>> = claim.query_async(&mut conn).await.expect("claim");
        let acquired: Vec<&(String, String, Value)> = jobs
            .iter()
            .zip(&claimed)
            .filter(|(_, c)| c.is_some())
            .map(|(j, _)| j)
            .collect();
        assert_eq!(acquired.len(), jobs.len(), "fresh keys are never leased or done");
        let bulk = acquired
            .iter()
            .map(|(_, job_id, data)| {
                let opts = bullmq::JobOptions {
                    job_id: Some(job_id.clone()),
                    ..Default::default()
                };
                bullmq::BulkJob::with_options("provision-order", data, opts)
            })
            .collect();
        self.queue.add_bulk(bulk).await.expect("enqueue");
        let mut finish = redis::pipe();
        for (key, _, _) in &acquired {
            finish
                .cmd("SET")
                .arg(idem(key))
                .arg("done")
                .arg("PX")
                .arg(DONE_MS)
                .ignore();
        }
        for keys in &cache_keys {
            finish.cmd("UNLINK").arg(keys).ignore();
        }
        let () = finish.query_async(&mut conn).await.expect("done markers and cache");
        actions
    }

    /// Deletes every key the bench wrote (its own prefixes only).
    async fn clean(&self) {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.tag))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("unlink");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

/// Redis's own CPU seconds so far (`INFO cpu`: used_cpu_user + used_cpu_sys).
async fn redis_cpu(conn: &mut redis::aio::ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.expect("INFO cpu");
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Where the wall time of one path goes: its own CPU, Redis's CPU, and the rest (waiting to be scheduled,
/// loopback). Printed after the criterion figures, per event.
#[derive(Default)]
struct Split {
    events: u64,
    wall: Duration,
    own_cpu: Duration,
    redis_cpu: f64,
}

impl Split {
    fn print(&self, name: &str) {
        let per = |d: f64| d * 1e6 / self.events as f64;
        eprintln!(
            "{name}: {:.1} µs wall per event = {:.1} µs switchyard-process CPU + {:.1} µs redis-server CPU + the rest waiting",
            per(self.wall.as_secs_f64()),
            per(self.own_cpu.as_secs_f64()),
            per(self.redis_cpu)
        );
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bench = Arc::new(rt.block_on(Bench::start(true)));
    let quiet = Arc::new(rt.block_on(Bench::start(false)));
    assert!(bench.service.stores.journal.is_some() && quiet.service.stores.journal.is_none());
    // The paths decide the same actions (checked on the CPU bench too); check the Redis side once.
    let (events, wire) = batch(&bench.registry, bench.next_run());
    let (a, b, off) = rt.block_on(async {
        let engine = bench.engine(&events, &wire).await;
        let (events, wire) = batch(&quiet.registry, quiet.next_run());
        let off = quiet.engine(&events, &wire).await;
        (engine, bench.native(&wire).await, off)
    });
    assert_eq!(a, b, "engine and baseline run the same number of actions");
    assert_eq!(a, off, "the journal changes no action");
    eprintln!("e2e batch: {BATCH} CDC events, {a} actions (queue + log + cache)");

    let mut g = c.benchmark_group("e2e redis");
    g.throughput(Throughput::Elements(BATCH as u64));
    const PATHS: [&str; 3] = ["engine", "engine, journal off", "native (b)"];
    let mut splits = [Split::default(), Split::default(), Split::default()];
    for (name, split) in PATHS.into_iter().zip(splits.iter_mut()) {
        let which = if name == "engine, journal off" { &quiet } else { &bench };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut conn = which.conn.clone();
                // The batches are made before the clock starts; the journal's writer stores what the batches
                // recorded while later ones run (as in the service), and the clock stops once it is done.
                let batches: Vec<_> = (0..iters).map(|_| batch(&which.registry, which.next_run())).collect();
                let redis_before = rt.block_on(redis_cpu(&mut conn));
                let cpu = cpu_time::ProcessTime::now();
                let started = Instant::now();
                rt.block_on(async {
                    for (events, wire) in &batches {
                        match name {
                            "native (b)" => which.native(wire).await,
                            _ => which.engine(events, wire).await,
                        };
                    }
                    if let Some(journal) = &which.service.stores.journal {
                        journal.flush().await;
                    }
                });
                let total = started.elapsed();
                split.own_cpu += cpu.elapsed();
                split.redis_cpu += rt.block_on(redis_cpu(&mut conn)) - redis_before;
                split.wall += total;
                split.events += iters * BATCH as u64;
                total
            })
        });
    }
    g.finish();
    for (name, split) in PATHS.into_iter().zip(&splits) {
        split.print(name);
    }
    if let Some((writes, calls)) = bench.service.stores.idempotency.write_stats()
        && calls > 0
    {
        eprintln!(
            "engine: {writes} idempotency claims and done markers in {calls} Redis calls ({:.1} per call)",
            writes as f64 / calls as f64
        );
    }
    if let Some(journal) = &bench.service.stores.journal {
        eprintln!(
            "engine: {} journal entries dropped (a full queue; 0 means every entry was stored)",
            journal.dropped()
        );
    }
    rt.block_on(bench.clean());
    rt.block_on(quiet.clean());
}

criterion_group! {
    name = e2e;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(6)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(e2e);
