//! Wall time and memory of the release binary, measured from outside the process:
//! - `switchyard replay` of 1,000,000 recorded events (alone, and `--against` a second rule set as the CI
//!   workflow runs it): wall time, CPU time (user + system: on a shared machine the wall time counts the
//!   other processes' turns too) and peak RSS (`/usr/bin/time -f "%e %U %S %M"`, i.e. getrusage);
//! - the idle service: `switchyard run` on a followed, empty JSONL file with the HTTP listener up, with the
//!   in-memory backend and with Redis (`REDIS_URL`), VmRSS read from /proc once it has idled for 3 s.
//!
//! `cargo bench --bench footprint` (no criterion: one run each, printed as a table). The events file is
//! generated from the bench mix (`benches/common`) into a temporary folder and deleted afterwards.
//! `SWITCHYARD_BIN=/path/to/switchyard` measures another build with the same events.

mod common;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EVENTS: usize = 1_000_000;
/// Events generated per chunk: keeps the generator's own memory small.
const CHUNK: usize = 10_000;

fn main() {
    // `cargo bench -- <filter>` passes arguments; this target takes none but must not fail on them.
    // SWITCHYARD_BIN measures another build (e.g. main's) with the same events.
    let built = env!("CARGO_BIN_EXE_switchyard").to_string();
    let bin = &std::env::var("SWITCHYARD_BIN").unwrap_or(built);
    let dir = tempfile::tempdir().expect("temp dir");
    let events = dir.path().join("events.jsonl");
    let started = Instant::now();
    {
        let mut out = BufWriter::new(std::fs::File::create(&events).expect("events file"));
        for chunk in 0..EVENTS / CHUNK {
            // A distinct run per chunk keeps ids unique across the file.
            for e in common::event_mix(CHUNK, chunk as u64 + 1) {
                serde_json::to_writer(&mut out, &e).expect("write event");
                out.write_all(b"\n").expect("write event");
            }
        }
        out.flush().expect("flush events");
    }
    let bytes = std::fs::metadata(&events).expect("events file").len();
    eprintln!(
        "generated {EVENTS} events ({} MB) in {:.1} s",
        bytes / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    let rules = common::repo().join("rules/orders.yaml");
    println!("| measurement | wall time | CPU time | peak RSS |");
    println!("| --- | --- | --- | --- |");
    let (wall, cpu, rss) = timed(bin, &["replay", "--events", p(&events), "--rules", p(&rules)]);
    println!("| replay 1M events | {wall:.2} s | {cpu:.2} s | {} MB |", rss / 1024);
    let (wall, cpu, rss) = timed(
        bin,
        &[
            "replay",
            "--events",
            p(&events),
            "--rules",
            p(&rules),
            "--against",
            p(&rules),
        ],
    );
    println!(
        "| replay 1M events --against (two rule sets) | {wall:.2} s | {cpu:.2} s | {} MB |",
        rss / 1024
    );

    let empty = dir.path().join("idle.jsonl");
    std::fs::write(&empty, "").expect("idle events file");
    println!(
        "| idle service, in-memory backend | - | - | {} MB |",
        idle(bin, dir.path(), &empty, None) / 1024
    );
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    println!(
        "| idle service, Redis backend | - | - | {} MB |",
        idle(bin, dir.path(), &empty, Some(&url)) / 1024
    );
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Runs the binary under /usr/bin/time; returns (wall seconds, CPU seconds, peak RSS in KiB).
fn timed(bin: &str, args: &[&str]) -> (f64, f64, u64) {
    let output = Command::new("/usr/bin/time")
        .args(["-f", "%e %U %S %M", bin])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("/usr/bin/time runs (Debian package `time`)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{bin} {args:?} failed: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let mut parts = last.split_whitespace();
    let mut seconds = || {
        parts
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .expect("a time in seconds")
    };
    let (wall, user, system) = (seconds(), seconds(), seconds());
    let rss = parts.next().and_then(|s| s.parse().ok()).expect("max RSS");
    (wall, user + system, rss)
}

/// Starts `switchyard run` on a followed empty file, waits until it idles, reads VmRSS (KiB), stops it.
fn idle(bin: &str, dir: &Path, events: &Path, redis: Option<&str>) -> u64 {
    let name = if redis.is_some() { "idle-redis" } else { "idle-memory" };
    let redis = redis
        .map(|url| {
            format!(
                "redis: {{ url: \"{url}\", key_prefix: \"bench-idle-{}:\" }}\n",
                std::process::id()
            )
        })
        .unwrap_or_default();
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            r#"mode: cdc
source: {{ kind: jsonl, jsonl: {{ path: "{events}", follow: true }} }}
rules: ["{rules}"]
{redis}sinks:
  enqueue-provisioning: {{ kind: queue, format: bullmq, queue: provisioning, job_name: provision-order, prefix: bench-idle }}
  invalidate-cache: {{ kind: cache-invalidate }}
  log: {{ kind: log }}
enricher: recorded
checkpoint: {{ store: memory }}
http: {{ listen: "127.0.0.1:0" }}
"#,
            events = p(events),
            rules = p(&common::repo().join("rules/orders.yaml")),
        ),
    )
    .expect("idle config");
    let mut child = Command::new(bin)
        .args(["run", "--config", p(&config), "--no-watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("switchyard run starts");
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let alive = child.try_wait().expect("child status").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "switchyard run exited early with {config:?}");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}
