//! The container image, built and run on this machine: `scripts/image --local-bases` builds the repository's
//! `Dockerfile` with podman on base images it makes from Debian's packages (debootstrap) and this machine's Rust
//! toolchain (there is no registry to pull `rust:` or `debian:` from). Then, as a user of the image would:
//! - the image's metadata: user 65532, `switchyard` as entrypoint, a health check;
//! - `run` (the embedded demo) with a read-only root filesystem and no capabilities prints the same decisions as
//!   the binary on this machine, and exits 0;
//! - the process in the container is not root;
//! - a real config and the rules mounted read-only at /etc/switchyard (the emulator source, the HTTP listener):
//!   `podman healthcheck run` (the image's HEALTHCHECK, `switchyard health`) reports healthy while it streams,
//!   and `podman stop` (SIGTERM) ends it with exit 0.
//!
//! Needs root, `podman` and `debootstrap` (`apt-get install podman debootstrap`). Without them the test is skipped
//! with a loud message, unless `SWITCHYARD_IMAGE_REQUIRED` is set: then it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Harness, free_port, repo};

const TAG: &str = "localhost/switchyard:test";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the image cannot be built here, if it cannot.
fn missing() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("containers are a Linux matter".into());
    }
    if !have("podman") {
        return Some("`podman` is not installed (apt-get install podman)".into());
    }
    if !have("debootstrap") {
        return Some("`debootstrap` is not installed (apt-get install debootstrap)".into());
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("debootstrap needs root to make the base images".into());
    }
    None
}

fn image_tools_ready() -> bool {
    let required = std::env::var_os("SWITCHYARD_IMAGE_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0");
    let Some(why) = missing() else { return true };
    assert!(!required, "SWITCHYARD_IMAGE_REQUIRED is set but {why}");
    eprintln!("\n**********************************************************************");
    eprintln!("SKIPPED the container image test: {why}.");
    eprintln!("**********************************************************************\n");
    false
}

/// `tests/image/containers.conf` when podman cannot start a container with its defaults on this machine (a VM
/// without CAP_SYS_RESOURCE, hybrid cgroups: this project's CI), else nothing. Asked once, of the built image.
fn containers_conf() -> Option<&'static Path> {
    static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
    CONF.get_or_init(|| {
        let plain = Command::new("podman")
            .args(["run", "--rm", "--network=none", TAG, "--version"])
            .env_remove("CONTAINERS_CONF")
            .output()
            .is_ok_and(|o| o.status.success());
        (!plain && std::env::var_os("CONTAINERS_CONF").is_none()).then(|| repo().join("tests/image/containers.conf"))
    })
    .as_deref()
}

fn podman(args: &[&str]) -> Output {
    let mut cmd = Command::new("podman");
    if let Some(conf) = containers_conf() {
        cmd.env("CONTAINERS_CONF", conf);
    }
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
}

fn ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A container removed when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

#[test]
fn the_image_builds_runs_the_demo_as_non_root_and_reports_healthy() {
    if !image_tools_ready() {
        return;
    }
    let repo = repo();

    // 1. Build the Dockerfile (the bases are made once and kept in podman's storage).
    let started = Instant::now();
    let build = Command::new(repo.join("scripts/image"))
        .args(["--local-bases", "--tag", TAG])
        .output()
        .expect("scripts/image runs");
    let log = ok(&build, "scripts/image --local-bases");
    let summary = log
        .lines()
        .find(|l| l.starts_with("scripts/image: built"))
        .unwrap_or_else(|| panic!("scripts/image printed no summary:\n{log}"));
    eprintln!("{summary} (test step: {:?})", started.elapsed());

    // 2. What the image says about itself.
    let inspect = ok(&podman(&["image", "inspect", TAG]), "podman image inspect");
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let image = &inspect[0];
    assert_eq!(image["Config"]["User"], "65532:65532");
    assert_eq!(image["Config"]["Entrypoint"], serde_json::json!(["switchyard"]));
    assert_eq!(
        image["Config"]["Cmd"],
        serde_json::json!(["run", "--config", "/etc/switchyard/config.yaml"])
    );
    assert_eq!(image["Config"]["WorkingDir"], "/var/lib/switchyard");
    assert_eq!(
        image["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "switchyard", "health"]),
        "the image's health check: {image}"
    );

    // 3. The embedded demo, locked down as the Kubernetes manifest runs it: the same decisions as the binary here.
    let demo = ok(
        &podman(&[
            "run",
            "--rm",
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--network=none",
            TAG,
            "run",
        ]),
        "the embedded demo in the image",
    );
    let here = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("run")
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .output()
        .expect("the binary runs");
    let here = ok(&here, "the embedded demo on this machine");
    assert!(
        demo.contains("provision-on-activating"),
        "the demo printed no provisioning decision:\n{demo}"
    );
    assert_eq!(
        demo, here,
        "the image's demo printed something else than the binary here"
    );

    // 4. Not root, inside.
    let ids = ok(&podman(&["run", "--rm", "--entrypoint", "id", TAG]), "id in the image");
    assert!(ids.starts_with("uid=65532(switchyard) gid=65532(switchyard)"), "{ids}");

    // 5. A real deployment's shape: a Pub/Sub source (the project's emulator on this machine's loopback), positions
    // and jobs in the real Redis, the HTTP listener; the config and the rules mounted read-only at /etc/switchyard.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(a_real_config_in_the_container(&repo));
}

async fn a_real_config_in_the_container(repo: &Path) {
    use switchyard::emulator::{self, EmulatorOptions};
    let h = Harness::new("image");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    let port = free_port();
    let text = common::pubsub_config(
        &h,
        &emu,
        &common::redis_url(),
        Path::new("/etc/switchyard/rules"),
        "",
        &format!("enricher: salesforce\nhttp: {{ listen: \"127.0.0.1:{port}\" }}\n"),
    );
    let config = h.dir.path().join("config.yaml");
    std::fs::write(&config, text).unwrap();
    let name = format!("switchyard-image-test-{}", h.tag);
    let mount = |from: &Path, to: &str| format!("{}:{to}:ro", from.display());
    let started = ok(
        &podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--network=host",
            "-e",
            "RUST_LOG=info",
            "-e",
            &format!("SWITCHYARD_HEALTH_URL=http://127.0.0.1:{port}"),
            "-v",
            &mount(&config, "/etc/switchyard/config.yaml"),
            "-v",
            &mount(&repo.join("rules"), "/etc/switchyard/rules"),
            TAG,
        ]),
        "podman run -d (the image's default command)",
    );
    let container = Container(started.trim().to_string());

    // The image's HEALTHCHECK (`switchyard health`) turns healthy once the listener answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let check = podman(&["healthcheck", "run", &container.0]);
        if check.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never healthy: {}{}\nlogs:\n{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
            logs(&container.0)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let top = ok(&podman(&["top", &container.0, "user", "comm"]), "podman top");
    assert!(
        top.lines().skip(1).all(|l| !l.trim_start().starts_with("root")) && top.contains("switchyard"),
        "a process in the container runs as root:\n{top}"
    );

    // 20 approvals over gRPC: 20 jobs in Redis, each once.
    for n in 1..=20 {
        emu.publish(&common::activation(&h, n)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let jobs = loop {
        let jobs = h.jobs().await;
        if jobs.len() >= 20 {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "only {} jobs from the container; logs:\n{}",
            jobs.len(),
            logs(&container.0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut ids: Vec<&str> = jobs.iter().map(|j| j.0.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((jobs.len(), ids.len()), (20, 20), "{jobs:?}");
    let probe = ok(
        &podman(&["exec", &container.0, "switchyard", "health"]),
        "switchyard health in the container",
    );
    assert!(
        probe.starts_with("ok: ") && probe.contains("/data/OrderChangeEvent streaming"),
        "{probe}"
    );

    // SIGTERM (podman stop) drains and exits 0.
    ok(&podman(&["stop", "-t", "30", &container.0]), "podman stop");
    let code = ok(
        &podman(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]),
        "podman inspect",
    );
    let logs = logs(&container.0);
    assert_eq!(code.trim(), "0", "SIGTERM did not end it cleanly:\n{logs}");
    assert!(
        !logs.contains("\"level\":\"ERROR\""),
        "errors in the container's log:\n{logs}"
    );
}

fn logs(container: &str) -> String {
    let out = podman(&["logs", container]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
