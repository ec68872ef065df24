//! Hot reload: the start-up path on every change, an atomic swap, the old rules kept on a bad edit, and
//! one rules version per event while a stream flows. Real Redis, real file-system events.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Harness, records};
use serde_json::json;
use switchyard::app::service::Service;
use switchyard::config::LoadedConfig;
use switchyard::delivery::Stats;

fn rules(prefix: &str) -> String {
    format!(
        "version: 1\nroutes:\n  - name: provision\n    channel: orders\n    when: became(\"Activation_Status__c\", \"Activating\")\n    then:\n      - sink: enqueue-provisioning\n        job: {{ v: \"{prefix}\" }}\n        idempotency_key: \"{prefix}-{{{{record_id}}}}\"\n"
    )
}

/// A `rules` folder in the harness's directory holding `orders.yaml` = [`rules`]`(prefix)`.
fn rules_dir(h: &Harness, prefix: &str) -> std::path::PathBuf {
    let dir = h.dir.path().join("rules");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("orders.yaml"), rules(prefix)).unwrap();
    dir
}

async fn service(h: &Harness, dir: &Path, events: &Path) -> Arc<Service> {
    let text = h
        .config_with_rules(events, dir, "reload: { debounce_ms: 100 }\n")
        .replace("jsonl: {", "jsonl: { follow: true,");
    let loaded = LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &|_| None).unwrap();
    Arc::new(Service::start(loaded, false).await.unwrap())
}

async fn wait_version(service: &Service, pred: impl Fn(&str) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pred(&service.rules.load().version) {
        assert!(Instant::now() < deadline, "no reload: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Service::run` on a task until [`Running::stop`].
struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Stats>,
}

impl Running {
    fn start(service: &Arc<Service>) -> Self {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let service = service.clone();
        let task = tokio::spawn(async move { service.run(shutdown).await.unwrap() });
        Running { stop, task }
    }

    /// Stops the service and waits up to `within` for its run to end.
    async fn stop(self, within: Duration) -> Stats {
        self.stop.send(true).unwrap();
        tokio::time::timeout(within, self.task).await.unwrap().unwrap()
    }
}

/// A route on the order channel that logs when Status changed.
fn log_route(name: &str) -> String {
    format!(
        "version: 1\nroutes:\n  - name: {name}\n    channel: orders\n    when: changed(\"Status\")\n    then:\n      - sink: log\n        message: x\n"
    )
}

fn route_names(service: &Service) -> Vec<String> {
    service.rules.load().routes.iter().map(|r| r.name.clone()).collect()
}

#[tokio::test]
async fn a_broken_edit_keeps_the_old_rules_and_says_where_and_the_next_good_edit_is_taken() {
    let h = Harness::new("reload_broken");
    let dir = rules_dir(&h, "v1");
    let events = h.write_events("events.jsonl", &[]);
    let service = service(&h, &dir, &events).await;
    let v1 = service.rules.load().version.clone();

    for (broken, expected) in [
        (
            "version: 1\nroutes:\n  - name: x\n    channel: orders\n    when: changed(\"A\") &&\n    then: []\n",
            "orders.yaml:5:",
        ),
        (
            "version: 1\nroutes:\n  - name: x\n    channel: orders\n    when: 'true'\n    then:\n      - sink: nope\n        message: m\n",
            "orders.yaml:7:15: error: route `x`: unknown sink `nope`",
        ),
        ("version: 1\nroutes: [\n", "orders.yaml:"),
        // The static checks of predicates refuse a reload as they refuse `validate`.
        (
            "version: 1\nroutes:\n  - name: x\n    channel: orders\n    when: event.Status\n    then: []\n",
            "orders.yaml:5:11: error: route `x`: `when`: the predicate is a field's value",
        ),
        (
            "version: 1\nroutes:\n  - name: x\n    channel: orders\n    when: became(\"Status\")\n    then: []\n",
            "orders.yaml:5:11: error: route `x`: `when`: `became` takes 2 arguments",
        ),
    ] {
        std::fs::write(dir.join("orders.yaml"), broken).unwrap();
        let outcome = service.reloader.reload().await;
        assert!(!outcome.ok && !outcome.swapped, "{outcome:?}");
        assert!(
            outcome
                .problems
                .iter()
                .any(|p| p.contains(expected) && p.contains(": error: ")),
            "{expected}: {outcome:?}"
        );
        assert_eq!(service.rules.load().version, v1, "the old rules keep running");
    }
    // An unknown function, found without running it (the fixtures would find it too).
    std::fs::write(dir.join("orders.yaml"), rules("v1").replace("became(", "becamee(")).unwrap();
    std::fs::write(
        dir.join("orders.test.yaml"),
        "cases:\n  - name: approval\n    events:\n      - {id: \"t:1\", channel: /data/OrderChangeEvent, header: {entity: Order, change_type: UPDATE, record_ids: [801xx0000000001AAA], changed_fields: [Activation_Status__c]}, fields: {Activation_Status__c: Activating}}\n    expect: {routes: {provision: 1}}\n",
    )
    .unwrap();
    let outcome = service.reloader.reload().await;
    assert!(!outcome.ok, "{outcome:?}");
    assert!(
        outcome.problems.iter().any(|p| p.contains(
            "orders.yaml:5:11: error: route `provision`: `when`: unknown function `becamee`; did you mean `became`?"
        )),
        "{outcome:?}"
    );
    assert_eq!(service.rules.load().version, v1);

    std::fs::write(dir.join("orders.yaml"), rules("v2")).unwrap();
    let outcome = service.reloader.reload().await;
    assert!(outcome.ok && outcome.swapped, "{outcome:?}");
    assert_eq!(outcome.changed, vec!["provision".to_string()]);
    assert_ne!(service.rules.load().version, v1);
    assert_eq!(service.reloader.describe()["last_reload"]["swapped"], true);
}

#[tokio::test]
async fn with_avro_schemas_in_the_config_a_literal_of_another_type_is_refused_by_a_reload() {
    let h = Harness::new("reload_avro");
    let dir = rules_dir(&h, "v1");
    let events = h.write_events("events.jsonl", &[]);
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/avro");
    let text = h.config_with_rules(&events, &dir, &format!("avro_schemas: {}\n", schemas.display()));
    let loaded = LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &|_| None).unwrap();
    let service = Arc::new(Service::start(loaded, false).await.unwrap());
    let v1 = service.rules.load().version.clone();

    std::fs::write(
        dir.join("orders.yaml"),
        rules("v1").replace(
            "became(\"Activation_Status__c\", \"Activating\")",
            "event.TotalAmount > \"100\"",
        ),
    )
    .unwrap();
    let outcome = service.reloader.reload().await;
    assert!(!outcome.ok && !outcome.swapped, "{outcome:?}");
    assert!(
        outcome.problems.iter().any(|p| p.contains(
            "orders.yaml:5:11: error: route `provision`: `when`: `event.TotalAmount` is a `double` in the channel's Avro schema, but is compared with the string \"100\""
        )),
        "{outcome:?}"
    );
    assert_eq!(service.rules.load().version, v1, "the old rules keep running");

    std::fs::write(
        dir.join("orders.yaml"),
        rules("v1").replace(
            "became(\"Activation_Status__c\", \"Activating\")",
            "event.TotalAmount > 100",
        ),
    )
    .unwrap();
    let outcome = service.reloader.reload().await;
    assert!(outcome.ok && outcome.swapped, "{outcome:?}");
}

#[tokio::test]
async fn file_changes_are_seen_rename_new_file_delete_and_symlink_swap() {
    let h = Harness::new("reload_watch");
    // Kubernetes ConfigMap layout: rules/orders.yaml -> ..data/orders.yaml, ..data -> ..v1
    let dir = h.dir.path().join("rules");
    let v1 = dir.join("..v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("orders.yaml"), rules("v1")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/orders.yaml", dir.join("orders.yaml")).unwrap();
    let events = h.write_events("events.jsonl", &[]);
    let service = service(&h, &dir, &events).await;
    let running = Running::start(&service);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = service.rules.load().version.clone();

    // ConfigMap update: a new versioned folder, then an atomic swap of the `..data` symlink.
    let v2 = dir.join("..v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("orders.yaml"), rules("v2")).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_version(&service, |v| v != first, "symlink swap").await;
    let second = service.rules.load().version.clone();

    // An editor's save-by-rename.
    std::fs::remove_file(dir.join("orders.yaml")).unwrap();
    std::fs::write(dir.join(".orders.yaml.swp"), rules("v3")).unwrap();
    std::fs::rename(dir.join(".orders.yaml.swp"), dir.join("orders.yaml")).unwrap();
    wait_version(&service, |v| v != second, "save by rename").await;

    // A new file in the folder, then its deletion.
    std::fs::write(dir.join("extra.yaml"), log_route("extra")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !route_names(&service).contains(&"extra".to_string()) {
        assert!(Instant::now() < deadline, "new file not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(dir.join("extra.yaml")).unwrap();
    while route_names(&service).contains(&"extra".to_string()) {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "deleted file not dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop(Duration::from_secs(10)).await;
}

/// A config reload that adds a rules folder moves the file watch there too: later edits in the new folder reload
/// without a signal.
#[tokio::test]
async fn a_rules_folder_added_by_a_config_reload_is_watched_too() {
    let h = Harness::new("reload_rewatch");
    let (a, b, conf) = (
        h.dir.path().join("a"),
        h.dir.path().join("b"),
        h.dir.path().join("conf"),
    );
    for d in [&a, &b, &conf] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(a.join("orders.yaml"), rules("v1")).unwrap();
    std::fs::write(b.join("extra.yaml"), log_route("extra")).unwrap();
    let events = h.write_events("events.jsonl", &[]);
    let config = conf.join("c.yaml");
    let text = h
        .config_with_rules(&events, &a, "reload: { debounce_ms: 100 }\n")
        .replace("jsonl: {", "jsonl: { follow: true,");
    std::fs::write(&config, &text).unwrap();
    let service = Arc::new(
        Service::start(LoadedConfig::load(&config).unwrap(), false)
            .await
            .unwrap(),
    );
    let running = Running::start(&service);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wait_route = async |name: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !route_names(&service).iter().any(|r| r == name) {
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}",
                service.reloader.describe()["last_reload"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // The config edit itself is seen (its folder is watched) and brings folder b's rules in.
    let both = format!("rules: [{}, {}]", a.display(), b.display());
    std::fs::write(&config, text.replace(&format!("rules: [{}]", a.display()), &both)).unwrap();
    wait_route("extra", "the config edit adding folder b").await;
    // Past any late event of the config edit, so that only a watch on folder b can see the next edit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // An edit in folder b, which the process did not watch when it started.
    std::fs::write(b.join("extra.yaml"), log_route("extra-renamed")).unwrap();
    wait_route("extra-renamed", "an edit in the added folder").await;
    // Each edit is one reload: the reload's own reads of the files (inotify reports opens) trigger nothing.
    let reloads = service.reloader.describe()["reloads"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        service.reloader.describe()["reloads"],
        json!(reloads),
        "no reload without an edit"
    );
    assert!(reloads <= 3, "{reloads} reloads for two edits");

    running.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn rules_changed_while_10000_events_flow_give_each_event_one_version() {
    let h = Harness::new("reload_stream");
    let dir = rules_dir(&h, "v1");
    let events_path = h.write_events("events.jsonl", &[]);
    let service = service(&h, &dir, &events_path).await;
    let running = Running::start(&service);
    // Let the service start its watch before the stream and the edit begin.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = 10_000u32;
    let ids: Vec<String> = (0..total)
        .map(|n| format!("801{:0>10}{n:05}", &h.tag[..h.tag.len().min(10)]))
        .collect();
    let mut file = std::fs::OpenOptions::new().append(true).open(&events_path).unwrap();
    for (n, id) in ids.iter().enumerate() {
        use std::io::Write;
        let e = h.approval(
            &format!("a{n}"),
            std::slice::from_ref(id),
            None,
            records(&[(id.clone(), json!({}))]),
        );
        writeln!(file, "{e}").unwrap();
        if n == total as usize / 2 {
            file.flush().unwrap();
            std::fs::write(dir.join("orders.yaml"), rules("v2")).unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = h.jobs().await;
        if jobs.len() >= total as usize {
            // Each event ran under exactly one version: v1 for a prefix of the stream, v2 for the rest.
            let version_of = |id: &str| {
                jobs.iter()
                    .find(|j| j.0.ends_with(id))
                    .map(|j| j.2["v"].as_str().unwrap().to_string())
            };
            let versions: Vec<String> = ids
                .iter()
                .map(|id| version_of(id).expect("one job per event"))
                .collect();
            let first_v2 = versions.iter().position(|v| v == "v2").unwrap_or_else(|| {
                panic!(
                    "the new rules never took over: {}",
                    service.reloader.describe()["last_reload"]
                )
            });
            assert!(first_v2 > 0, "the old rules handled the start");
            assert!(
                versions[first_v2..].iter().all(|v| v == "v2"),
                "no event after the swap ran the old rules"
            );
            assert_eq!(jobs.len(), total as usize, "every event settled exactly once");
            break;
        }
        assert!(Instant::now() < deadline, "only {} of {total} jobs", jobs.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = running.stop(Duration::from_secs(30)).await.settled;
    assert_eq!(settled, total as u64);
}

#[tokio::test]
async fn fifty_reloads_in_quick_succession_end_on_the_last_file() {
    let h = Harness::new("reload_many");
    let dir = rules_dir(&h, "v0");
    let events = h.write_events("events.jsonl", &[]);
    let service = service(&h, &dir, &events).await;
    let running = Running::start(&service);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=50 {
        std::fs::write(dir.join("orders.yaml"), rules(&format!("v{n}"))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = switchyard::rules::load::version_of(&[switchyard::rules::load::RuleSource {
        path: dir.join("orders.yaml"),
        text: rules("v50"),
    }]);
    wait_version(&service, |v| v == last, "the last file").await;
    running.stop(Duration::from_secs(10)).await;
}

/// The same over the Pub/Sub path: 10,000 approvals published to the emulator and read over gRPC while the rules
/// change; every event settled exactly once, each under one version, the old rules before the swap and the new ones
/// after it.
#[tokio::test]
async fn rules_changed_while_10000_pubsub_events_flow_give_each_event_one_version() {
    use switchyard::emulator::{self, EmulatorOptions};
    let h = Harness::new("reload_pubsub");
    let dir = rules_dir(&h, "v1");
    let emu = emulator::start(EmulatorOptions::default()).await.unwrap();
    // Nothing stored yet: the stream is read from the earliest event.
    let text = common::pubsub_config(
        &h,
        &emu,
        &common::redis_url(),
        &dir,
        "",
        "enricher: none\nreload: { debounce_ms: 100 }\n",
    );
    let loaded = LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &|_| None).unwrap();
    let service = Arc::new(Service::start(loaded, false).await.unwrap());
    let running = Running::start(&service);
    let total = 10_000u32;
    let ids: Vec<String> = (0..total)
        .map(|n| format!("801{:0>10}{n:05}", &h.tag[..h.tag.len().min(10)]))
        .collect();
    let publish = |n: usize, id: &String| {
        let e = h.approval(&format!("p{n}"), std::slice::from_ref(id), None, json!({}));
        let event = switchyard::event::Event::from_json(&e.to_string()).unwrap();
        emu.publish(&event).unwrap();
    };
    let half = total as usize / 2;
    for (n, id) in ids.iter().enumerate().take(half) {
        publish(n, id);
    }
    // The edit lands while the first half is being read and handled (some of it already was, under v1); the
    // second half is published after it.
    let started = Instant::now();
    while h.jobs().await.len() < 100 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v1 = service.rules.load().version.clone();
    std::fs::write(dir.join("orders.yaml"), rules("v2")).unwrap();
    wait_version(&service, |v| v != v1, "v1 -> v2 while events flow").await;
    for (n, id) in ids.iter().enumerate().skip(half) {
        publish(n, id);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let jobs = loop {
        let jobs = h.jobs().await;
        if jobs.len() >= total as usize {
            break jobs;
        }
        assert!(Instant::now() < deadline, "only {} of {total} jobs", jobs.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: std::collections::HashMap<&str, &str> = jobs
        .iter()
        .map(|j| (j.0.rsplit('-').next().unwrap(), j.2["v"].as_str().unwrap()))
        .collect();
    let versions: Vec<&str> = ids.iter().map(|id| by_id[id.as_str()]).collect();
    let first_v2 = versions
        .iter()
        .position(|v| *v == "v2")
        .expect("the new rules took over");
    assert!(first_v2 >= 100, "the old rules handled the start");
    assert!(
        versions[first_v2..].iter().all(|v| *v == "v2"),
        "no event after the swap ran the old rules"
    );
    assert!(
        versions[half..].iter().all(|v| *v == "v2"),
        "events published after the swap ran the new rules"
    );
    assert_eq!(jobs.len(), total as usize, "every event settled exactly once");
    let settled = running.stop(Duration::from_secs(30)).await.settled;
    assert_eq!(settled, total as u64);
}
