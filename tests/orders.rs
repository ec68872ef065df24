//! The order-provisioning checklist, each through the whole pipeline against a real Redis:
//! JSONL source -> router -> recorded enricher -> router -> dispatcher -> BullMQ queue / cache / log.

mod common;

use common::{Harness, records};
use serde_json::{Value, json};

const ACTIVATION_LOG: &str = "Order activation moved to Activating via CDC, enqueuing fulfillment";
const SKIP_LOG: &str = "Order already has WHMCS Order ID, skipping provisioning";

#[tokio::test]
async fn normal_approval_enqueues_exactly_one_job_with_the_right_data() {
    let h = Harness::new("normal_approval");
    let (id, rec) = h.record(1, None);
    let event = h.approval(
        "approve",
        std::slice::from_ref(&id),
        Some("Approved"),
        records(&[(id.clone(), rec)]),
    );
    let commit = event["header"]["commit_timestamp"].clone();
    h.run(&[event]).await;

    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let (job_id, name, data) = &jobs[0];
    let key = format!("activation-{id}-{commit}");
    assert_eq!(job_id, &key);
    assert_eq!(name, "provision-order");
    assert_eq!(
        data,
        &json!({"sfOrderId": id, "accountId": h.account(1), "idempotencyKey": key, "correlationId": format!("cdc-order-{id}")})
    );
    let logs = h.logs.text();
    assert!(logs.contains(ACTIVATION_LOG), "{logs}");
    assert!(logs.contains(&format!("record_id=\"{id}\"")), "{logs}");
}

#[tokio::test]
async fn order_that_already_has_a_whmcs_id_is_not_provisioned() {
    let h = Harness::new("duplicate_prevention");
    let (id, rec) = h.record(1, Some("WH-5001"));
    h.run(&[h.approval(
        "approve",
        std::slice::from_ref(&id),
        Some("Approved"),
        records(&[(id.clone(), rec)]),
    )])
    .await;
    assert!(h.jobs().await.is_empty());
    assert!(h.logs.text().contains(SKIP_LOG), "{}", h.logs.text());
}

#[tokio::test]
async fn order_that_is_not_found_is_not_provisioned_and_says_so() {
    let h = Harness::new("not_found");
    let id = h.order(1);
    h.run(&[h.approval(
        "approve",
        std::slice::from_ref(&id),
        Some("Approved"),
        json!({ id.clone(): null }),
    )])
    .await;
    assert!(h.jobs().await.is_empty());
    let logs = h.logs.text();
    assert!(
        logs.contains(&format!("Order {id} not found in Salesforce, skipping provisioning")),
        "{logs}"
    );
    assert!(
        !logs.contains(SKIP_LOG),
        "a missing order is not reported as already provisioned: {logs}"
    );
}

#[tokio::test]
async fn cancel_then_reapprove_provisions_only_the_first_approval() {
    let h = Harness::new("cancel_reapprove");
    let id = h.order(1);
    let ids = std::slice::from_ref(&id);
    let first = h.approval("approve-1", ids, Some("Approved"), records(&[h.record(1, None)]));
    let provisioned = h.change(
        "provisioned",
        ids,
        &["Activation_Status__c", "WHMCS_Order_ID__c", "LastModifiedDate"],
        json!({"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": "WH-7001"}),
        json!({}),
    );
    let cancel = h.change(
        "cancel",
        ids,
        &["Status", "LastModifiedDate"],
        json!({"Status": "Cancelled"}),
        records(&[h.record(1, Some("WH-7001"))]),
    );
    let again = h.approval(
        "approve-2",
        ids,
        Some("Reactivate"),
        records(&[h.record(1, Some("WH-7001"))]),
    );
    h.run(&[first, provisioned, cancel, again]).await;

    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].2["sfOrderId"], json!(id));
    let logs = h.logs.text();
    assert_eq!(logs.matches(ACTIVATION_LOG).count(), 1, "{logs}");
    assert_eq!(logs.matches(SKIP_LOG).count(), 1, "{logs}");
}

#[tokio::test]
async fn billing_city_change_invalidates_the_cached_order_and_account_list() {
    let h = Harness::new("cache_city");
    let (id, account) = (h.order(1), h.account(1));
    let (detail, list) = (format!("orders:detail:{id}"), format!("orders:account:{account}"));
    h.set_key(&detail).await;
    h.set_key(&list).await;
    let event = h.change(
        "city",
        std::slice::from_ref(&id),
        &["BillingAddress.City", "LastModifiedDate"],
        json!({"BillingAddress": {"City": "Osaka"}}),
        records(&[h.record(1, None)]),
    );
    h.run(&[event]).await;
    assert!(!h.key_exists(&detail).await);
    assert!(!h.key_exists(&list).await);
    assert!(h.jobs().await.is_empty());
}

#[tokio::test]
async fn internal_only_change_leaves_cache_and_queue_alone() {
    let h = Harness::new("cache_internal");
    let id = h.order(1);
    let detail = format!("orders:detail:{id}");
    h.set_key(&detail).await;
    let event = h.change(
        "activated",
        std::slice::from_ref(&id),
        &[
            "Activation_Status__c",
            "Activation_Error_Code__c",
            "WHMCS_Order_ID__c",
            "LastModifiedDate",
        ],
        json!({"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": "WH-1"}),
        json!({}),
    );
    let stats = h.run(&[event]).await;
    assert!(
        h.key_exists(&detail).await,
        "an internal-only change must not invalidate the cache"
    );
    assert!(h.jobs().await.is_empty());
    assert_eq!(stats.unmatched, 1);
}

#[tokio::test]
async fn status_completed_invalidates_the_cache_and_enqueues_nothing() {
    let h = Harness::new("cache_completed");
    let id = h.order(1);
    let detail = format!("orders:detail:{id}");
    h.set_key(&detail).await;
    let event = h.change(
        "completed",
        std::slice::from_ref(&id),
        &["Status", "LastModifiedDate"],
        json!({"Status": "Completed"}),
        records(&[h.record(1, Some("WH-1"))]),
    );
    h.run(&[event]).await;
    assert!(!h.key_exists(&detail).await);
    assert!(h.jobs().await.is_empty());
}

#[tokio::test]
async fn the_same_event_delivered_twice_enqueues_one_job() {
    let h = Harness::new("redelivery");
    let id = h.order(1);
    let event = h.approval(
        "approve",
        std::slice::from_ref(&id),
        None,
        records(&[h.record(1, None)]),
    );
    h.run(&[event.clone(), event.clone()]).await;
    // And once more after a restart: a new process, the same event.
    h.run(&[event]).await;
    assert_eq!(h.jobs().await.len(), 1);
}

#[tokio::test]
async fn draft_status_with_activating_enqueues_nothing() {
    let h = Harness::new("draft");
    let id = h.order(1);
    h.run(&[h.approval(
        "approve",
        std::slice::from_ref(&id),
        Some("Draft"),
        records(&[h.record(1, None)]),
    )])
    .await;
    assert!(h.jobs().await.is_empty());
    assert!(!h.logs.text().contains(ACTIVATION_LOG));
}

#[tokio::test]
async fn unrelated_edit_to_an_order_still_activating_enqueues_nothing() {
    let h = Harness::new("unrelated_edit");
    let id = h.order(1);
    let event = h.change(
        "description",
        std::slice::from_ref(&id),
        &["Description", "LastModifiedDate"],
        json!({"Description": "Gift wrap", "Activation_Status__c": "Activating"}),
        records(&[h.record(1, None)]),
    );
    h.run(&[event]).await;
    assert!(h.jobs().await.is_empty());
}

#[tokio::test]
async fn one_event_with_three_record_ids_enqueues_three_jobs() {
    let h = Harness::new("three_ids");
    let ids: Vec<String> = (1..=3).map(|n| h.order(n)).collect();
    let recs: Vec<(String, Value)> = (1..=3).map(|n| h.record(n, None)).collect();
    h.run(&[h.approval("mass", &ids, Some("Approved"), records(&recs))])
        .await;
    let jobs = h.jobs().await;
    let mut got: Vec<String> = jobs
        .iter()
        .map(|j| j.2["sfOrderId"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ids);
}

#[tokio::test]
async fn malformed_line_is_reported_with_its_line_and_the_other_events_are_processed() {
    let h = Harness::new("malformed");
    let id = h.order(1);
    let good = h.approval(
        "approve",
        std::slice::from_ref(&id),
        None,
        records(&[h.record(1, None)]),
    );
    let path = h.dir.path().join("events.jsonl");
    std::fs::write(&path, format!("{{\"id\": \"broken\", \"channel\"\n{good}\n")).unwrap();
    let stats = h.run_file(&path, "").await;
    assert_eq!((stats.malformed, stats.events), (1, 1));
    assert_eq!(h.jobs().await.len(), 1);
    let logs = h.logs.text();
    assert!(logs.contains(&format!("{}:1", path.display())), "{logs}");
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["raw"], json!("{\"id\": \"broken\", \"channel\""));
}

#[tokio::test]
async fn platform_event_mode_enqueues_from_the_fulfilment_event_and_ignores_cdc() {
    let h = Harness::new("platform_mode");
    let (id, rec) = h.record(1, None);
    let pe = json!({
        "id": format!("5b1f3c2e-{}", h.tag), "channel": "/event/Order_Fulfilment_Requested__e",
        "fields": {"Order_Id__c": id, "Idempotency_Key__c": format!("ofr-{id}-1"), "Correlation_Id__c": "corr-1",
                   "CreatedDate": 1764230400000u64, "CreatedById": "005xx0000000001AAA"},
        "record": { id.clone(): rec.clone() }
    });
    let no_key = json!({"id": format!("uuid-2-{}", h.tag), "channel": "/event/Order_Fulfilment_Requested__e",
        "fields": {"Order_Id__c": h.order(2)}, "record": { h.order(2): {"WHMCS_Order_ID__c": null, "AccountId": null} }});
    let cdc = h.approval("approve", &[h.order(3)], None, records(&[h.record(3, None)]));
    h.run_with(&[pe, no_key.clone(), cdc], "mode: platform-event\n").await;

    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0].0, format!("ofr-{id}-1"));
    assert_eq!(
        jobs[0].2,
        json!({"sfOrderId": id, "accountId": h.account(1), "idempotencyKey": format!("ofr-{id}-1"), "correlationId": "corr-1"})
    );
    // No Idempotency_Key__c: the key (and job id) fall back to the event uuid.
    assert_eq!(jobs[1].0, no_key["id"].as_str().unwrap());
}

#[tokio::test]
async fn platform_event_without_order_id_is_dead_lettered() {
    let h = Harness::new("platform_no_order");
    let pe = json!({"id": format!("uuid-{}", h.tag), "channel": "/event/Order_Fulfilment_Requested__e", "fields": {"Order_Id__c": null}});
    h.run_with(&[pe], "mode: platform-event\n").await;
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0]["reason"],
        json!(format!(
            "Order_Fulfilment_Requested__e uuid-{} carries no Order_Id__c",
            h.tag
        ))
    );
    assert!(letters[0]["event"]["id"].is_string());
}
