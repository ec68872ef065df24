//! Salesforce auth and the REST enricher against the emulator's HTTP side, over real HTTP on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, repo};
use serde_json::json;
use switchyard::app::service::Service;
use switchyard::auth::{Auth, AuthError};
use switchyard::config::{LoadedConfig, SalesforceConfig, Secret};
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions, Fault, OAuthSettings};
use switchyard::enrich::Enricher;
use switchyard::event::Event;
use switchyard::sources::pubsub::{self, headers};

const SECRET: &str = "s3cr3t-client-secret-do-not-print";

async fn emulator_with(oauth: OAuthSettings) -> EmulatorHandle {
    emulator::start(EmulatorOptions {
        oauth,
        ..EmulatorOptions::default()
    })
    .await
    .unwrap()
}

fn oauth() -> OAuthSettings {
    OAuthSettings {
        client_secret: SECRET.into(),
        jwt_public_key_pem: Some(std::fs::read_to_string(repo().join("tests/fixtures/jwt/test-only.pub.pem")).unwrap()),
        ..OAuthSettings::default()
    }
}

fn client_credentials(emu: &EmulatorHandle) -> SalesforceConfig {
    SalesforceConfig {
        login_url: Some(emu.base_url()),
        client_id: Some(emulator::DEFAULT_CLIENT_ID.into()),
        client_secret: Some(Secret::new(SECRET)),
        ..SalesforceConfig::default()
    }
}

fn jwt(emu: &EmulatorHandle, username: &str) -> SalesforceConfig {
    SalesforceConfig {
        login_url: Some(emu.base_url()),
        client_id: Some(emulator::DEFAULT_CLIENT_ID.into()),
        username: Some(username.into()),
        jwt_key_file: Some(repo().join("tests/fixtures/jwt/test-only.key.pem")),
        ..SalesforceConfig::default()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn client_credentials_token_carries_instance_url_and_org_id() {
    let emu = emulator_with(oauth()).await;
    let auth = Auth::new(&client_credentials(&emu), &repo()).unwrap();
    assert_eq!(auth.flow_name(), "client-credentials");
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.instance_url, emu.base_url());
    assert_eq!(creds.tenant_id, emu.org_id(), "the org id comes from the identity URL");
    // Cached: a second caller does not ask again.
    auth.credentials().await.unwrap();
    assert_eq!(emu.token_requests(), 1);

    let mut wrong = client_credentials(&emu);
    wrong.client_secret = Some(Secret::new("not-the-secret"));
    let err = Auth::new(&wrong, &repo()).unwrap().credentials().await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Refused { status: 400, error, .. } if error == "invalid_client"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn jwt_bearer_assertion_is_rs256_with_the_expected_claims() {
    let emu = emulator_with(oauth()).await;
    let auth = Auth::new(&jwt(&emu, emulator::DEFAULT_USERNAME), &repo()).unwrap();
    assert_eq!(auth.flow_name(), "jwt-bearer");
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.tenant_id, emu.org_id());
    // The emulator verified the signature with the public key before looking at the claims.
    let claims = emu.last_jwt_claims().expect("the token endpoint saw an assertion");
    assert_eq!(claims.iss, emulator::DEFAULT_CLIENT_ID);
    assert_eq!(claims.sub, emulator::DEFAULT_USERNAME);
    assert_eq!(claims.aud, emu.base_url(), "aud defaults to the login URL");
    let now = unix_now();
    assert!(
        claims.exp > now && claims.exp <= now + 301,
        "exp {} is not within five minutes of {now}",
        claims.exp
    );

    let err = Auth::new(&jwt(&emu, "someone-else@example.com"), &repo())
        .unwrap()
        .credentials()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_grant"), "{err}");

    let mut missing = jwt(&emu, "x");
    missing.jwt_key_file = Some(repo().join("tests/fixtures/jwt/absent.pem"));
    let err = Auth::new(&missing, &repo())
        .err()
        .expect("a missing key file is refused at start");
    assert!(err.to_string().contains("absent.pem"), "{err}");
}

#[tokio::test]
async fn static_token_reads_the_org_id_from_userinfo_and_cannot_be_renewed() {
    let emu = emulator_with(oauth()).await;
    let config = SalesforceConfig {
        access_token: Some(Secret::new(emu.access_token())),
        instance_url: Some(emu.base_url()),
        ..SalesforceConfig::default()
    };
    let auth = Auth::new(&config, &repo()).unwrap();
    assert_eq!(auth.flow_name(), "access-token");
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.tenant_id, emu.org_id(), "userinfo's organization_id");
    assert_eq!(emu.token_requests(), 0, "a static token needs no token endpoint");
    let err = auth.renew(&creds).await.unwrap_err();
    assert!(matches!(err, AuthError::StaticTokenRejected));
    assert!(err.to_string().contains("SF_ACCESS_TOKEN"), "{err}");
}

/// One expired token, noticed by many REST readers and a gRPC caller at once, costs exactly one token request,
/// and the renewed token works for both.
#[tokio::test]
async fn expired_token_is_renewed_once_for_concurrent_rest_and_grpc_callers() {
    let emu = emulator_with(oauth()).await;
    let auth = Arc::new(Auth::new(&client_credentials(&emu), &repo()).unwrap());
    let first = auth.credentials().await.unwrap();
    let grpc = |creds: Arc<switchyard::auth::Credentials>| {
        let endpoint = emu.endpoint();
        async move {
            let mut client = pubsub::client(pubsub::connect(&endpoint).await.unwrap());
            let mut request = tonic::Request::new(pubsub::proto::TopicRequest {
                topic_name: emulator::ORDER_CHANNEL.into(),
            });
            let md = request.metadata_mut();
            md.insert(headers::ACCESS_TOKEN, creds.access_token.expose().parse().unwrap());
            md.insert(headers::INSTANCE_URL, creds.instance_url.parse().unwrap());
            md.insert(headers::TENANT_ID, creds.tenant_id.parse().unwrap());
            client.get_topic(request).await
        }
    };
    grpc(first.clone()).await.expect("the first token works over gRPC");
    emu.inject(Fault::ExpireTokens);
    let refused = grpc(first.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let renewals: Vec<_> = (0..20)
        .map(|_| {
            let auth = auth.clone();
            let first = first.clone();
            tokio::spawn(async move { auth.renew(&first).await.unwrap() })
        })
        .collect();
    let mut generations = Vec::new();
    for r in renewals {
        generations.push(r.await.unwrap().generation);
    }
    assert!(
        generations.iter().all(|g| *g == first.generation + 1),
        "{generations:?}"
    );
    assert_eq!(emu.token_requests(), 2, "the first token and exactly one renewal");
    let renewed = auth.credentials().await.unwrap();
    grpc(renewed).await.expect("the renewed token works over gRPC");
}

/// The extra config lines that make a harness run enrich over REST against `emu`.
fn rest_config(emu: &EmulatorHandle, rest: &str) -> String {
    format!(
        "enricher: salesforce\nsalesforce:\n  login_url: {}\n  client_id: {}\n  client_secret: {SECRET}\n  rest: {rest}\n",
        emu.base_url(),
        emulator::DEFAULT_CLIENT_ID,
    )
}

const FAST_REST: &str = "{ timeout_ms: 400, attempts: 3, initial_backoff_ms: 10 }";

#[tokio::test]
async fn enrichment_reads_once_per_record_and_only_when_a_when_passed() {
    let h = Harness::new("enrich-once");
    let emu = emulator_with(oauth()).await;
    let (o1, o2, o3) = (h.order(1), h.order(2), h.order(3));
    emu.set_record(
        &o1,
        Some(
            json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(1)})
                .as_object()
                .unwrap()
                .clone(),
        ),
    );
    emu.set_record(
        &o2,
        Some(
            json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(2)})
                .as_object()
                .unwrap()
                .clone(),
        ),
    );
    // o3 does not exist: 404.
    let events = [
        // Approval: both the cache route (Status changed) and the provisioning routes need o1: one read.
        h.approval("tx-1", std::slice::from_ref(&o1), Some("Approved"), json!({})),
        // Internal-only edit: no route's `when` holds, no read.
        h.change(
            "tx-2",
            std::slice::from_ref(&o2),
            &["Activation_Error_Code__c", "LastModifiedDate"],
            json!({"Activation_Error_Code__c": "E1"}),
            json!({}),
        ),
        // Approval of a missing order: one read, 404, the not-found route.
        h.approval("tx-3", std::slice::from_ref(&o3), Some("Approved"), json!({})),
    ];
    let stats = h.run_with(&events, &rest_config(&emu, FAST_REST)).await;
    assert_eq!(emu.rest_reads_of(&o1), 1);
    assert_eq!(emu.rest_reads_of(&o2), 0);
    assert_eq!(emu.rest_reads_of(&o3), 1);
    assert_eq!(emu.rest_reads(), 2);
    let jobs = h.jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].2["sfOrderId"], json!(o1));
    assert_eq!(
        jobs[0].2["accountId"],
        json!(h.account(1)),
        "the job carries the field read over REST"
    );
    assert_eq!(stats.routes_fired.get("activation-order-not-found"), Some(&1));
    assert_eq!(stats.dead_letters, 0);
}

#[tokio::test]
async fn rest_5xx_and_timeouts_are_retried_and_exhaustion_dead_letters_the_route() {
    let h = Harness::new("enrich-retry");
    let emu = emulator_with(oauth()).await;
    let (o1, o2) = (h.order(1), h.order(2));
    for (o, n) in [(&o1, 1), (&o2, 2)] {
        emu.set_record(
            o,
            Some(
                json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(n)})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        );
    }
    // o1: a read that outlives the 400 ms timeout, then a 503, then success.
    emu.inject(Fault::SlowRestReads {
        delay: Duration::from_millis(1500),
        times: 1,
    });
    emu.inject(Fault::FailRestReads { status: 503, times: 1 });
    h.run_with(
        &[h.approval("tx-1", std::slice::from_ref(&o1), None, json!({}))],
        &rest_config(&emu, FAST_REST),
    )
    .await;
    assert_eq!(emu.rest_reads_of(&o1), 3, "timeout, 503, then the read that worked");
    assert_eq!(h.jobs().await.len(), 1);

    // o2: every read fails; after 3 attempts the route fails and the event is dead-lettered, not dropped.
    emu.inject(Fault::FailRestReads { status: 500, times: 3 });
    let second = h.write_events(
        "second.jsonl",
        &[h.approval("tx-2", std::slice::from_ref(&o2), None, json!({}))],
    );
    let stats = h.run_file(&second, &rest_config(&emu, FAST_REST)).await;
    assert_eq!(emu.rest_reads_of(&o2), 3);
    assert_eq!(h.jobs().await.len(), 1, "no job without the record");
    assert!(stats.dead_letters >= 1, "{stats:?}");
    let letters = h.dead_letters().await;
    let reasons: Vec<&str> = letters.iter().filter_map(|l| l["reason"].as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("after 3 attempt(s)") && r.contains(&o2)),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn the_records_read_are_kept_with_the_event_in_dead_letters() {
    let h = Harness::new("enrich-recorded");
    let emu = emulator_with(oauth()).await;
    let o1 = h.order(1);
    emu.set_record(
        &o1,
        Some(
            json!({"AccountId": h.account(1), "Status": "Draft"})
                .as_object()
                .unwrap()
                .clone(),
        ),
    );
    let rules = r#"
version: 1
routes:
  - name: park-for-review
    channel: orders
    when: changed("Description")
    enrich: { object: Order, fields: [AccountId, Status] }
    then:
      - sink: dead-letter
        reason: "review {{record_id}} of account {{record.AccountId}}"
"#;
    let event = h.change(
        "tx-1",
        std::slice::from_ref(&o1),
        &["Description"],
        json!({"Description": "x"}),
        json!({}),
    );
    h.run_rules(rules, &[event], &rest_config(&emu, FAST_REST)).await;
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0]["reason"],
        json!(format!("review {o1} of account {}", h.account(1)))
    );
    assert_eq!(
        letters[0]["event"]["record"][&o1],
        json!({"AccountId": h.account(1), "Status": "Draft"}),
        "the REST result travels with the event"
    );
}

/// The done-when of the enricher: on the recorded lifecycle, REST enrichment against an org whose records are
/// what each event recorded makes exactly the calls the rules need and reaches the recorded decisions.
#[tokio::test]
async fn salesforce_enricher_reaches_the_same_decisions_as_the_recorded_one() {
    let _h = Harness::new("enrich-same-decisions");
    let emu = emulator_with(oauth()).await;
    let dir = tempfile::tempdir().unwrap();
    let config_text = |enricher: &str| {
        format!(
            "source: {{ kind: jsonl, jsonl: {{ path: events.jsonl }} }}\nrules: [{}]\nenricher: {enricher}\n\
             salesforce: {{ login_url: {}, client_id: {}, client_secret: {SECRET} }}\n\
             sinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
             invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
            repo().join("rules").display(),
            emu.base_url(),
            emulator::DEFAULT_CLIENT_ID
        )
    };
    let start = |enricher: &str| {
        let loaded = LoadedConfig::parse(&dir.path().join("c.yaml"), &config_text(enricher), &|_| None).unwrap();
        async move { Service::start(loaded, false).await.unwrap() }
    };
    let recorded = start("recorded").await;
    let rest = start("salesforce").await;
    assert!(matches!(rest.pipeline.enricher, Enricher::Salesforce(_)));
    let text = std::fs::read_to_string(repo().join("examples/events/order-lifecycle.jsonl")).unwrap();
    let mut compared = 0;
    for line in text.lines() {
        let Ok(event) = Event::from_json(line) else { continue };
        if event.channel != emulator::ORDER_CHANNEL {
            continue;
        }
        // The org as of this event: what the event recorded.
        for (id, fields) in &event.record {
            emu.set_record(id, fields.clone());
        }
        let rules = recorded.rules.load_full();
        let mut with_record = event.clone();
        let expected = recorded.pipeline.plan_enriched(&rules, &mut with_record).await;
        let needed = switchyard::router::needs(&rules, &event).requests(&rules).len() as u64;
        let mut bare = event.clone();
        bare.record.clear();
        let before = emu.rest_reads();
        let actual = rest.pipeline.plan_enriched(&rules, &mut bare).await;
        assert_eq!(emu.rest_reads() - before, needed, "{}: REST reads", event.id);
        assert_eq!(
            format!("{:?}", actual.decisions),
            format!("{:?}", expected.decisions),
            "{}",
            event.id
        );
        assert_eq!(
            format!("{:?}", actual.actions),
            format!("{:?}", expected.actions),
            "{}",
            event.id
        );
        // What was read is what the event recorded, for the fields the routes asked for.
        for (id, read) in &bare.record {
            let recorded = &with_record.record[id];
            match (read, recorded) {
                (Some(read), Some(recorded)) => {
                    for (field, value) in read {
                        assert_eq!(Some(value), recorded.get(field), "{}: {id}.{field}", event.id);
                    }
                }
                (None, None) => {}
                other => panic!("{}: {id}: read {other:?}", event.id),
            }
        }
        compared += 1;
    }
    assert_eq!(compared, 14);
}

/// No secret reaches logs, errors or dead letters: not the client secret, not a token, whether the token request
/// is refused or a static token is.
#[tokio::test]
async fn no_secret_appears_in_logs_errors_or_dead_letters() {
    let h = Harness::new("enrich-secrets");
    let emu = emulator_with(oauth()).await;
    let o1 = h.order(1);
    emu.set_record(
        &o1,
        Some(
            json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(1)})
                .as_object()
                .unwrap()
                .clone(),
        ),
    );
    let token = {
        let auth = Auth::new(&client_credentials(&emu), &repo()).unwrap();
        auth.credentials().await.unwrap().access_token.expose().to_string()
    };
    // 1. A good token, then a wrong secret (token endpoint refuses).
    h.run_with(
        &[h.approval("tx-1", std::slice::from_ref(&o1), None, json!({}))],
        &rest_config(&emu, FAST_REST),
    )
    .await;
    let wrong = format!(
        "enricher: salesforce\nsalesforce:\n  login_url: {}\n  client_id: x\n  client_secret: {SECRET}-wrong\n  rest: {FAST_REST}\n",
        emu.base_url()
    );
    let second = h.write_events(
        "second.jsonl",
        &[h.approval("tx-2", std::slice::from_ref(&o1), None, json!({}))],
    );
    h.run_file(&second, &wrong).await;
    // 2. A static token that Salesforce no longer accepts.
    emu.inject(Fault::ExpireTokens);
    let static_token = format!(
        "enricher: salesforce\nsalesforce:\n  access_token: {}\n  instance_url: {}\n  tenant_id: {}\n  rest: {FAST_REST}\n",
        emu.access_token(),
        emu.base_url(),
        emu.org_id()
    );
    let third = h.write_events(
        "third.jsonl",
        &[h.approval("tx-3", std::slice::from_ref(&o1), None, json!({}))],
    );
    h.run_file(&third, &static_token).await;
    let letters = serde_json::to_string(&h.dead_letters().await).unwrap();
    let logs = h.logs.text();
    assert!(letters.contains("invalid_client"), "the refusal is reported: {letters}");
    assert!(
        letters.contains("SF_ACCESS_TOKEN"),
        "the static token's rejection is explained: {letters}"
    );
    for (what, secret) in [
        ("client secret", SECRET),
        ("issued token", token.as_str()),
        ("static token", emu.access_token()),
    ] {
        assert!(!logs.contains(secret), "the {what} is in the logs");
        assert!(!letters.contains(secret), "the {what} is in a dead letter");
    }
    assert!(!logs.contains("!emulator."), "an issued token is in the logs");
    assert!(!letters.contains("!emulator."), "an issued token is in a dead letter");
}

/// A REST read whose token expired gets a new token once and succeeds.
#[tokio::test]
async fn rest_read_with_an_expired_token_renews_it_and_succeeds() {
    let h = Harness::new("enrich-401");
    let emu = emulator_with(oauth()).await;
    let (o1, o2) = (h.order(1), h.order(2));
    for (o, n) in [(&o1, 1), (&o2, 2)] {
        emu.set_record(
            o,
            Some(
                json!({"WHMCS_Order_ID__c": null, "AccountId": h.account(n)})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        );
    }
    let text = format!(
        "source: {{ kind: stdin }}\nrules: [{}]\n{}\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  \
         invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n",
        repo().join("rules").display(),
        rest_config(&emu, FAST_REST)
    );
    let loaded = LoadedConfig::parse(&h.dir.path().join("c.yaml"), &text, &|_| None).unwrap();
    let service = Service::start(loaded, false).await.unwrap();
    let rules = service.rules.load_full();
    let mut first = Event::from_json(
        &h.approval("tx-1", std::slice::from_ref(&o1), None, json!({}))
            .to_string(),
    )
    .unwrap();
    let plan = service.pipeline.plan_enriched(&rules, &mut first).await;
    assert!(
        plan.actions.iter().any(|a| a.sink == "enqueue-provisioning"),
        "{plan:?}"
    );
    emu.inject(Fault::ExpireTokens);
    let mut second = Event::from_json(
        &h.approval("tx-2", std::slice::from_ref(&o2), None, json!({}))
            .to_string(),
    )
    .unwrap();
    let plan = service.pipeline.plan_enriched(&rules, &mut second).await;
    assert!(
        plan.actions.iter().any(|a| a.sink == "enqueue-provisioning"),
        "{plan:?}"
    );
    assert_eq!(emu.token_requests(), 2, "one token, then exactly one renewal");
    assert_eq!(emu.rest_reads_of(&o2), 2, "the 401, then the read with the new token");
}
