//! `switchyard explain` (snapshots of the checklist scenarios, text and JSON) and `switchyard replay`
//! (the decision diff of a rule change, identical rules, bounded memory over 100,000 events).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

fn rules_version() -> String {
    let out = run(&["validate", "rules/"]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    text.split("version ").nth(1).unwrap()[..12].to_string()
}

#[test]
fn explain_output_matches_the_snapshots_of_the_checklist_scenarios() {
    let version = rules_version();
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    for scenario in ["approval", "duplicate", "draft", "unrelated-edit", "cache"] {
        for (format, ext) in [("text", "txt"), ("json", "json")] {
            let event = format!("tests/fixtures/explain/{scenario}.jsonl");
            let out = run(&["explain", "--format", format, "--event", &event]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got = String::from_utf8_lossy(&out.stdout).replace(&version, "VERSION");
            let snapshot = root().join(format!("tests/fixtures/explain/{scenario}.{ext}"));
            if update {
                std::fs::write(&snapshot, &got).unwrap();
            }
            let want = std::fs::read_to_string(&snapshot).unwrap();
            assert!(
                got == want,
                "{scenario} ({format}) differs from {}:\n{got}",
                snapshot.display()
            );
        }
    }
}

#[test]
fn explain_says_which_clause_failed() {
    let out = run(&["explain", "--event", "tests/fixtures/explain/draft.jsonl"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("route provision-on-activating [801xx0000000006AAA]: when is false"),
        "{text}"
    );
    assert!(
        text.contains("(event.Status == () || event.Status in trigger_statuses) = false"),
        "{text}"
    );
    let out = run(&["explain", "--event", "tests/fixtures/explain/duplicate.jsonl"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("is_blank(record.WHMCS_Order_ID__c) = false"), "{text}");
}

#[test]
fn replay_diff_reports_exactly_the_events_a_removed_guard_changes() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root().join("rules/orders.yaml")).unwrap();
    let variant = shipped.replace(
        "guard: has_record() && is_blank(record.WHMCS_Order_ID__c)",
        "guard: has_record()",
    );
    assert_ne!(variant, shipped);
    std::fs::write(dir.path().join("orders.yaml"), variant).unwrap();
    let variant_path = dir.path().join("orders.yaml");
    let out = run(&[
        "replay",
        "--events",
        "examples/events/order-lifecycle.jsonl",
        "--rules",
        variant_path.to_str().unwrap(),
        "--against",
        "rules/orders.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    let changed: Vec<&str> = text.lines().filter(|l| l.starts_with("~ ")).collect();
    assert_eq!(
        changed,
        vec![
            "~ tx-1002:1 (examples/events/order-lifecycle.jsonl:3)",
            "~ tx-1007:1 (examples/events/order-lifecycle.jsonl:8)"
        ],
        "{text}"
    );
    assert!(
        text.contains("  route provision-on-activating [801xx0000000002AAA]: else -> then"),
        "{text}"
    );
    assert!(text.contains("2 event(s) decide differently"), "{text}");

    let same = run(&[
        "replay",
        "--events",
        "examples/events/order-lifecycle.jsonl",
        "--rules",
        "rules/",
        "--against",
        "rules/orders.yaml",
    ]);
    assert_eq!(same.status.code(), Some(0), "{}", String::from_utf8_lossy(&same.stdout));
    assert!(String::from_utf8_lossy(&same.stdout).contains("no decision differs"));
}

/// Peak resident memory of a running process, in kB (Linux).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn replay_of_100000_events_runs_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let template = std::fs::read_to_string(root().join("examples/events/order-lifecycle.jsonl")).unwrap();
    let lines: Vec<&str> = template.lines().filter(|l| l.ends_with('}')).collect();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for n in 0..100_000 {
            writeln!(f, "{}", lines[n % lines.len()]).unwrap();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .current_dir(root())
        .args(["replay", "--rules", "rules/", "--events"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut peak, deadline) = (0, Instant::now() + Duration::from_secs(300));
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
        assert!(Instant::now() < deadline, "replay did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("100000 events replayed"), "{text}");
    // The file is ~70 MB; a replay that held it (or its decisions) would exceed this by far.
    assert!(peak < 64 * 1024, "peak RSS {peak} kB");
}
