//! The CLI as a process: `validate`, `run` refusing bad rules, `schema`, and the embedded demo.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env_remove("RUST_LOG").env_remove("SWITCHYARD_MODE");
    cmd
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the switchyard binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Each broken rules file and the exact problem `validate` must report for it.
const BROKEN: &[(&str, &str)] = &[
    (
        "yaml-error.yaml",
        "tests/fixtures/broken/yaml-error.yaml:8:18: error: expected string scalar",
    ),
    (
        "rhai-syntax.yaml",
        "tests/fixtures/broken/rhai-syntax.yaml:7:77: error: route `provision-on-activating`: `when` does not compile: Expecting ')' for a matching ( in this expression",
    ),
    (
        "unknown-sink.yaml",
        "tests/fixtures/broken/unknown-sink.yaml:7:15: error: route `provision-on-activating`: unknown sink `enqueue-provisoning` (did you mean `enqueue-provisioning`?)",
    ),
    (
        "unknown-root.yaml",
        "tests/fixtures/broken/unknown-root.yaml:9:40: error: route `provision-on-activating`: unknown template root `recordid` (did you mean `record_id`?)",
    ),
    (
        "undefined-variable.yaml",
        "tests/fixtures/broken/undefined-variable.yaml:9:28: error: route `provision-on-activating`: `when`: undefined variable `trigger_statusess` (did you mean `trigger_statuses`?)",
    ),
    (
        "record-in-when.yaml",
        "tests/fixtures/broken/record-in-when.yaml:5:68: error: route `provision-on-activating`: `record` is not available in `when`",
    ),
    (
        "wrong-action-keys.yaml",
        "tests/fixtures/broken/wrong-action-keys.yaml:7:15: error: route `invalidate`: sink `invalidate-cache` (cache-invalidate) does not take `message`",
    ),
];

#[test]
fn validate_accepts_the_shipped_rules() {
    let out = run(&["validate", "rules/"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).is_empty(), "no problems expected: {}", stdout(&out));
    let out = run(&["validate", "--config", "examples/demo.yaml"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn validate_names_file_line_and_column_of_each_bad_edit() {
    for (file, expected) in BROKEN {
        let path = format!("tests/fixtures/broken/{file}");
        let out = run(&["validate", &path]);
        assert_eq!(out.status.code(), Some(1), "{file}: {}", stdout(&out));
        assert!(
            stdout(&out).lines().any(|l| l.starts_with(expected)),
            "{file}: expected a line starting with\n  {expected}\ngot\n{}",
            stdout(&out)
        );
    }
}

#[test]
fn validate_reports_every_file_at_once() {
    let out = run(&["validate", "tests/fixtures/broken/"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    for (_, expected) in BROKEN {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
}

#[test]
fn validate_prints_github_annotations_and_json() {
    let out = run(&[
        "validate",
        "--format",
        "github",
        "tests/fixtures/broken/unknown-sink.yaml",
    ]);
    assert!(stdout(&out).starts_with("::error file=tests/fixtures/broken/unknown-sink.yaml,line=7,col=15::route `provision-on-activating`: unknown sink"), "{}", stdout(&out));
    let out = run(&[
        "validate",
        "--format",
        "json",
        "tests/fixtures/broken/unknown-sink.yaml",
    ]);
    let problems: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(problems[0]["line"], 7);
    assert_eq!(problems[0]["column"], 15);
    assert_eq!(problems[0]["severity"], "error");
}

fn config_with_rules(dir: &Path, rules: &Path) -> PathBuf {
    let events = dir.join("events.jsonl");
    std::fs::write(&events, "").unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "source: {{ kind: jsonl, jsonl: {{ path: {} }} }}\nrules: [{}]\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
            events.display(),
            rules.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn run_refuses_to_start_with_the_same_message_as_validate() {
    let dir = tempfile::tempdir().unwrap();
    for (file, expected) in BROKEN {
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/broken")
            .join(file);
        let config = config_with_rules(dir.path(), &rules);
        let out = run(&["run", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        let expected_tail = expected.trim_start_matches("tests/fixtures/broken/");
        assert!(
            stderr(&out).contains(expected_tail),
            "{file}: expected\n  {expected_tail}\nin\n{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("not starting"), "{}", stderr(&out));
    }
}

#[test]
fn run_refuses_a_config_with_an_unset_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "source: { kind: stdin }\nrules: [rules/]\nredis: { url: \"${SWITCHYARD_TEST_UNSET_REDIS}\" }\n",
    )
    .unwrap();
    let out = run(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("config.yaml:3:16: error: environment variable `SWITCHYARD_TEST_UNSET_REDIS` is not set"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn schema_output_equals_the_checked_in_schemas() {
    for (kind, file) in [
        ("rules", "schemas/rules.schema.json"),
        ("config", "schemas/config.schema.json"),
        ("tests", "schemas/rules-test.schema.json"),
    ] {
        let out = run(&["schema", kind]);
        assert!(out.status.success());
        let checked_in = std::fs::read_to_string(file).unwrap();
        assert!(
            stdout(&out) == checked_in,
            "{file} is stale: regenerate it with `cargo run -- schema {kind} > {file}`"
        );
    }
}

#[test]
fn embedded_demo_runs_without_redis_and_prints_decisions_and_a_summary() {
    let out = run(&["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("provision-on-activating [801xx0000000001AAA]: then"),
        "{text}"
    );
    assert!(
        text.contains("-> enqueue-provisioning: job activation-801xx0000000001AAA-1764230401000  [ok]"),
        "{text}"
    );
    assert!(
        text.contains("examples/events/order-lifecycle.jsonl:15: malformed event"),
        "{text}"
    );
    assert!(text.contains("In-memory queue: 5 job(s)"), "{text}");
    // The file-based demo config reaches the same decisions as the embedded one.
    let out_file = run(&["run", "--config", "examples/demo.yaml"]);
    assert!(out_file.status.success(), "{}", stderr(&out_file));
    assert_eq!(stdout(&out_file), text);
}

/// Every command that prints, piped into a reader that closes after one line (`| head -1`), ends quietly with 0:
/// no panic (exit 101) and no hang. The outputs are far larger than a pipe's buffer, so each command is still
/// writing when the reader goes away.
#[test]
fn commands_piped_into_a_reader_that_stops_end_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let demo = std::fs::read_to_string(repo.join("examples/events/order-lifecycle.jsonl")).unwrap();
    let valid: Vec<&str> = demo
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.get("id").is_some()))
        .collect();
    let events = dir.path().join("many.jsonl");
    std::fs::write(&events, valid.repeat(400).join("\n") + "\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "source: {{ kind: jsonl, jsonl: {{ path: {} }} }}\nrules: [{}]\nprint_decisions: true\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
            events.display(),
            repo.join("rules/").display()
        ),
    )
    .unwrap();
    let (events, config) = (events.to_str().unwrap(), config.to_str().unwrap());
    let commands: [&[&str]; 5] = [
        &["run", "--config", config, "--no-watch"],
        &["run"],
        &["explain", "--event", events],
        &["replay", "--events", events, "--rules", "rules/"],
        &["schema", "config"],
    ];
    for args in commands {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .current_dir(&repo)
            .env("RUST_LOG", "warn")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty(), "{args:?} printed nothing");
        // The reader is dropped: the pipe is closed with the command still writing.
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                panic!("{args:?} did not end within 30 s of its reader closing");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `scripts/bench-peers` stays runnable and fair: json-rules-engine and hand-written JavaScript (scripts/peers)
/// decide exactly what `switchyard replay` decides with the shipped rules, over the benches' order mix. Needs
/// `npm ci` in scripts/peers (CI does it); skipped with a message without it, unless `SWITCHYARD_INTEROP_REQUIRED`
/// is set (CI sets it): then it fails.
#[test]
fn the_peer_comparison_decides_like_the_shipped_rules() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let required = std::env::var_os("SWITCHYARD_INTEROP_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let modules = repo.join("scripts/peers/node_modules/json-rules-engine").is_dir();
    if !(node && modules) {
        assert!(
            !required,
            "SWITCHYARD_INTEROP_REQUIRED is set but node or scripts/peers/node_modules is missing"
        );
        eprintln!("skipped: the peer comparison needs node and `npm ci` in scripts/peers");
        return;
    }
    let out = Command::new("python3")
        .arg(repo.join("scripts/bench-peers"))
        .args([
            "--events",
            "2000",
            "--runs",
            "1",
            "--bin",
            env!("CARGO_BIN_EXE_switchyard"),
        ])
        .output()
        .expect("python3 runs scripts/bench-peers");
    let text = stdout(&out);
    assert!(out.status.success(), "bench-peers failed:\n{text}\n{}", stderr(&out));
    assert!(text.contains("2000 events replayed (0 malformed)"), "{text}");
    // The mix's 2,000 events: 600 activations to provision (300 single, 100 bulk of 3) and 50 gap re-checks; its 200
    // platform events decide nothing in CDC mode.
    assert!(
        text.contains("route provision-on-activating: fired 600 time(s)"),
        "{text}"
    );
    assert!(text.contains("sink enqueue-provisioning: 650 action(s)"), "{text}");
    assert!(!text.contains("fulfilment"), "{text}");
    assert!(text.contains("same decisions:"), "{text}");
}
