//! CPU benches, one core: Avro decode, routing, the native baseline (a) in the same run, and the decision
//! journal's entry.
//!
//! `cargo bench --bench engine`. Throughput is in events (elements) per second of CPU time of the bench
//! thread over the mix of `common::event_mix`; the ratio engine / native is read from the same run (see
//! BENCHMARKS.md).

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::CpuTime;
use common::{Extra, assert_same_decisions, encode, event_mix, native_decide, records_for, registry, rules};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::authoring::testing::plan_recorded;
use switchyard::delivery::{ActionResult, journal};
use switchyard::router;

/// Events per iteration: enough to cover the mix many times over, few enough for quick samples.
const EVENTS: usize = 1000;

fn benches(c: &mut Criterion<CpuTime>) {
    let events = event_mix(EVENTS, 0);
    let registry = registry();
    let wire = encode(&registry, &events);
    let shipped = rules(Extra::None);
    let other = rules(Extra::OtherChannels);
    let same = rules(Extra::SameChannel);
    assert_same_decisions(&shipped, &registry, &wire);
    for (name, r) in [("+100 other channels", &other), ("+100 same channel", &same)] {
        for e in &events {
            assert_eq!(
                plan_recorded(r, e).actions,
                plan_recorded(&shipped, e).actions,
                "{name}: the extra routes never fire"
            );
        }
    }
    // How many extra `when` evaluations the same-channel set adds per event of the mix (a CDC event is
    // evaluated once per record id).
    let extra_evals: usize = events
        .iter()
        .filter(|e| e.channel == common::ORDER_CHANNEL)
        .map(|e| 100 * e.record_ids().len())
        .sum();
    eprintln!(
        "mix: {}; {:.2} extra candidate evaluations per event with +100 same-channel routes; payload {} bytes on average",
        common::MIX_DESCRIPTION,
        extra_evals as f64 / events.len() as f64,
        wire.iter().map(|w| w.payload.len()).sum::<usize>() / wire.len()
    );

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("avro+bitmaps->Event", |b| {
        b.iter(|| {
            for w in &wire {
                black_box(registry.decode(&w.channel, &w.raw()).expect("decodes"));
            }
        })
    });
    g.finish();

    // Route alone, from already decoded events with their recorded enrichment, as `replay` does.
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(EVENTS as u64));
    for (name, r) in [
        ("shipped", &shipped),
        ("+100 other channels", &other),
        ("+100 same channel", &same),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for e in &events {
                    black_box(plan_recorded(r, e));
                }
            })
        });
    }
    g.bench_function("native", |b| {
        b.iter(|| {
            for e in &events {
                black_box(native_decide(e, &records_for(e)));
            }
        })
    });
    g.finish();

    // Decode + route: Avro bytes to the actions to run, the enrichment given (as the enricher returns it).
    let mut g = c.benchmark_group("decode+route");
    g.throughput(Throughput::Elements(EVENTS as u64));
    for (name, r) in [
        ("shipped", &shipped),
        ("+100 other channels", &other),
        ("+100 same channel", &same),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for w in &wire {
                    let event = registry.decode(&w.channel, &w.raw()).expect("decodes");
                    let needs = router::needs(r, &event);
                    black_box(router::plan(r, &event, needs, &w.records));
                }
            })
        });
    }
    g.bench_function("native (a)", |b| {
        b.iter(|| {
            for w in &wire {
                let event = registry.decode(&w.channel, &w.raw()).expect("decodes");
                black_box(native_decide(&event, &w.records));
            }
        })
    });
    g.finish();

    // The decision journal's part of the process's work per event, after dispatch: its entry (what every route did,
    // the event cut to the fields the rules read), and then that entry as the writer's JSON. The plans are made,
    // and the events cloned, outside the measured time.
    let plans: Vec<_> = events.iter().map(|e| plan_recorded(&shipped, e)).collect();
    let done: Vec<Vec<ActionResult>> = plans
        .iter()
        .map(|p| vec![ActionResult::Done { attempts: 1 }; p.actions.len()])
        .collect();
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Elements(EVENTS as u64));
    for json in [false, true] {
        g.bench_function(if json { "entry+json" } else { "entry" }, |b| {
            b.iter_batched(
                || events.clone(),
                |events| {
                    let mut bytes = Vec::with_capacity(EVENTS * 512);
                    for ((event, plan), results) in events.into_iter().zip(&plans).zip(&done) {
                        let settled = Some((plan, results.as_slice(), &[][..]));
                        let entry = journal::entry(&shipped, event, "/data/OrderChangeEvent@00", settled, &[]);
                        if json {
                            serde_json::to_writer(&mut bytes, &entry).expect("serializes");
                        }
                        black_box(entry);
                    }
                    bytes
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // Loading the rule set: what start-up and every reload pay (parse, compile, native forms, static checks).
    let mut g = c.benchmark_group("load");
    g.bench_function("shipped rules", |b| b.iter(|| black_box(rules(Extra::None))));
    g.bench_function("shipped + 100 routes", |b| {
        b.iter(|| black_box(rules(Extra::SameChannel)))
    });
    g.finish();
}

criterion_group! {
    name = engine;
    // CPU time of the bench thread: one core's cost, even while other processes share the machine.
    config = Criterion::default().with_measurement(CpuTime).sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(engine);
