//! BullMQ interop, proven with the real thing: `switchyard run` (the binary) enqueues the order checklist's
//! jobs into a real Redis, then a stock Node BullMQ `Worker` (`tests/interop/`, bullmq 6.5.1) consumes them.
//!
//! Needs `npm ci` in `tests/interop` (CI does it). Without `node_modules` the test is skipped with a loud
//! message, unless `SWITCHYARD_INTEROP_REQUIRED` is set (CI sets it): then it fails.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use common::{Harness, interop_dir, node_ready, records, redis_url, repo};
use serde_json::{Value, json};

#[tokio::test]
async fn a_stock_node_bullmq_worker_receives_and_completes_exactly_the_expected_jobs() {
    if !node_ready() {
        return;
    }
    let h = Harness::new("bullmq_interop");
    let (o1, o2, o3, o4, o5) = (h.order(1), h.order(2), h.order(3), h.order(4), h.order(5));
    // Normal approval: one job.
    let approve1 = h.approval(
        "approve-1",
        std::slice::from_ref(&o1),
        Some("Approved"),
        records(&[h.record(1, None)]),
    );
    // Already provisioned (has a WHMCS id): no job.
    let approve2 = h.approval(
        "approve-2",
        std::slice::from_ref(&o2),
        Some("Approved"),
        records(&[h.record(2, Some("WH-2"))]),
    );
    // The same event delivered twice (a redelivery): one job.
    let approve3 = h.approval(
        "approve-3",
        std::slice::from_ref(&o3),
        None,
        records(&[h.record(3, None)]),
    );
    // Approve, provisioned, cancel, re-approve: only the first approval provisions.
    let approve4 = h.approval(
        "approve-4",
        std::slice::from_ref(&o4),
        Some("Approved"),
        records(&[h.record(4, None)]),
    );
    let provisioned4 = h.change(
        "provisioned-4",
        std::slice::from_ref(&o4),
        &["Activation_Status__c", "WHMCS_Order_ID__c", "LastModifiedDate"],
        json!({"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": "WH-4"}),
        json!({}),
    );
    let cancel4 = h.change(
        "cancel-4",
        std::slice::from_ref(&o4),
        &["Status", "LastModifiedDate"],
        json!({"Status": "Cancelled"}),
        records(&[h.record(4, Some("WH-4"))]),
    );
    let reapprove4 = h.approval(
        "reapprove-4",
        std::slice::from_ref(&o4),
        Some("Reactivate"),
        records(&[h.record(4, Some("WH-4"))]),
    );
    // A customer-facing change: cache invalidation only.
    let city5 = h.change(
        "city-5",
        std::slice::from_ref(&o5),
        &["BillingAddress.City", "LastModifiedDate"],
        json!({"BillingAddress": {"City": "Osaka"}}),
        records(&[h.record(5, None)]),
    );
    let events = [
        approve1.clone(),
        approve2,
        approve3.clone(),
        approve4.clone(),
        approve3.clone(),
        provisioned4,
        cancel4,
        reapprove4,
        city5,
    ];
    let path = h.write_events("events.jsonl", &events);
    let config = format!(
        "source: {{ kind: jsonl, jsonl: {{ path: {events} }} }}\nrules: [{rules}]\n\
         redis: {{ url: \"{url}\", key_prefix: \"{kp}\" }}\n\
         sinks:\n  enqueue-provisioning:\n    kind: queue\n    queue: provisioning\n    job_name: provision-order\n    prefix: {bp}\n    \
         job_options: {{ attempts: 3, backoff: {{ type: exponential, delay: 1000 }}, remove_on_complete: {{ age: 3600, count: 100 }}, remove_on_fail: {{ age: 86400 }} }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
        events = path.display(),
        rules = repo().join("rules").display(),
        url = redis_url(),
        kp = h.key_prefix(),
        bp = h.bull_prefix(),
    );
    let config_path = h.dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--no-watch", "--log-format", "json", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let job = |event: &Value, n: u32| {
        let id = h.order(n);
        let key = format!("activation-{id}-{}", event["header"]["commit_timestamp"]);
        let data = json!({"sfOrderId": id, "accountId": h.account(n), "idempotencyKey": key,
                          "correlationId": format!("cdc-order-{id}")});
        (key, data)
    };
    let expected: BTreeMap<String, Value> = [job(&approve1, 1), job(&approve3, 3), job(&approve4, 4)]
        .into_iter()
        .collect();

    let worker = Command::new("node")
        .arg("worker.js")
        .current_dir(interop_dir())
        .env("REDIS_URL", redis_url())
        .env("PREFIX", h.bull_prefix())
        .env("QUEUE", "provisioning")
        .env("EXPECT", expected.len().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&worker.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "worker output is not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&worker.stderr)
        )
    });
    assert!(
        worker.status.success(),
        "the worker did not complete {} jobs: {report:#}\n{}",
        expected.len(),
        String::from_utf8_lossy(&worker.stderr)
    );

    let processed = report["processed"].as_array().unwrap();
    let received: BTreeMap<String, Value> = processed
        .iter()
        .map(|j| (j["id"].as_str().unwrap().to_string(), j["data"].clone()))
        .collect();
    assert_eq!(processed.len(), expected.len(), "each job exactly once: {report:#}");
    assert_eq!(received, expected, "job ids and data as the rules render them");
    for j in processed {
        assert_eq!(j["name"], "provision-order");
        assert_eq!(j["opts"]["attempts"], 3, "{j}");
        assert_eq!(
            j["opts"]["backoff"],
            json!({"type": "exponential", "delay": 1000}),
            "{j}"
        );
        assert_eq!(j["opts"]["removeOnComplete"], json!({"age": 3600, "count": 100}), "{j}");
        assert_eq!(j["opts"]["removeOnFail"], json!({"age": 86400}), "{j}");
        let id = j["id"].as_str().unwrap();
        assert_eq!(
            report["results"][id]["returnvalue"],
            json!({"provisioned": j["data"]["sfOrderId"]}),
            "completed with the worker's return value: {report:#}"
        );
    }
    let counts = &report["counts"];
    assert_eq!(
        counts,
        &json!({"waiting": 0, "active": 0, "delayed": 0, "prioritized": 0, "completed": 3, "failed": 0}),
        "nothing left over, nothing failed"
    );

    // switchyard has exited, so nothing can arrive late: the queue holds exactly the completed jobs.
    let mut conn = h.redis().await;
    let completed: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}:provisioning:completed", h.bull_prefix()))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut completed_sorted = completed.clone();
    completed_sorted.sort();
    assert_eq!(completed_sorted, expected.keys().cloned().collect::<Vec<_>>());
    let waiting: i64 = redis::cmd("LLEN")
        .arg(format!("{}:provisioning:wait", h.bull_prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(waiting, 0);
}
