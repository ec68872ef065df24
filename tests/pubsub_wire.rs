//! The Pub/Sub wire end to end: Avro vectors written by an independent implementation (fastavro), and JSONL events
//! through the in-process emulator over real gRPC on loopback, back through our decoder.

use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use serde_json::Value as Json;
use switchyard::emulator::{self, EmulatorHandle, EmulatorOptions, FULFILMENT_CHANNEL, Fault, ORDER_CHANNEL};
use switchyard::event::Event;
use switchyard::hex::decode as replay_id_from_hex;
use switchyard::sources::pubsub::avro::{CompiledSchema, DecodeError, RawEvent, SchemaRegistry};
use switchyard::sources::pubsub::proto::pub_sub_client::PubSubClient;
use switchyard::sources::pubsub::proto::{
    FetchRequest, FetchResponse, ProducerEvent, PublishRequest, ReplayPreset, SchemaRequest, TopicRequest,
};
use switchyard::sources::pubsub::{MAX_MESSAGE_BYTES, MAX_OUTSTANDING, error_codes, headers};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// Long enough for a loaded 2-core CI machine, short enough that a hang fails fast.
const PATIENCE: Duration = Duration::from_secs(10);

const CDC_EVENT: &str = r#"{"id": "tx-42:1", "channel": "/data/OrderChangeEvent", "header": {"entity": "Order",
 "change_type": "UPDATE", "record_ids": ["801xx0000000001AAA"],
 "changed_fields": ["Status", "Activation_Status__c", "WHMCS_Order_ID__c", "BillingAddress.City", "LastModifiedDate"],
 "nulled_fields": ["WHMCS_Order_ID__c"], "diff_fields": [], "change_origin": "com/salesforce/api/rest/62.0",
 "transaction_key": "tx-42", "sequence_number": 1, "commit_timestamp": 1764230400000, "commit_number": 42,
 "commit_user": "005xx0000000001AAA"},
 "fields": {"Status": "Approved", "Activation_Status__c": "Activating", "WHMCS_Order_ID__c": null,
            "BillingAddress": {"City": "Osaka"}, "LastModifiedDate": 1764230400000, "TotalAmount": 1200.5}}"#;

const PLATFORM_EVENT: &str = r#"{"id": "3f0c2a7e-5d7b-4b7e-9a51-3c1e2d4f6a88",
 "channel": "/event/Order_Fulfilment_Requested__e",
 "fields": {"CreatedDate": 1764230400123, "CreatedById": "005xx000001X8UzAAK", "Order_Id__c": "801xx000003GYxAAAW",
            "Idempotency_Key__c": "ofr-801xx000003GYxAAAW-1", "Correlation_Id__c": "c0ffee00-1111-2222-3333-444455556666"}}"#;

fn order_event(n: usize) -> Event {
    let json = CDC_EVENT
        .replace("tx-42:1", &format!("tx-{n}:1"))
        .replace("\"tx-42\"", &format!("\"tx-{n}\""));
    Event::from_json(&json).expect("test event is valid")
}

/// Adds the three auth headers Salesforce wants on every RPC.
#[derive(Clone)]
struct Auth {
    token: MetadataValue<Ascii>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(headers::ACCESS_TOKEN, self.token.clone());
        metadata.insert(
            headers::INSTANCE_URL,
            MetadataValue::from_static("https://example.my.salesforce.com"),
        );
        metadata.insert(headers::TENANT_ID, MetadataValue::from_static("00Dxx0000000001EAA"));
        Ok(request)
    }
}

type Client = PubSubClient<InterceptedService<Channel, Auth>>;

async fn connect(handle: &EmulatorHandle, token: &str) -> Client {
    connect_endpoint(&handle.endpoint(), token).await
}

async fn connect_endpoint(endpoint: &str, token: &str) -> Client {
    let channel = switchyard::sources::pubsub::connect(endpoint)
        .await
        .expect("the emulator accepts connections");
    let auth = Auth {
        token: token.parse().expect("ascii token"),
    };
    PubSubClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn start(events: Vec<Event>) -> EmulatorHandle {
    emulator::start(EmulatorOptions {
        events,
        keepalive_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(30),
        ..EmulatorOptions::default()
    })
    .await
    .expect("the emulator starts")
}

struct Subscription {
    requests: mpsc::Sender<FetchRequest>,
    responses: Streaming<FetchResponse>,
}

impl Subscription {
    async fn open(client: &mut Client, first: FetchRequest) -> Result<Self, Status> {
        let (requests, rx) = mpsc::channel(16);
        requests.send(first).await.expect("the request stream is open");
        let responses = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { requests, responses })
    }

    async fn request(&self, n: i32) {
        let more = FetchRequest {
            num_requested: n,
            ..FetchRequest::default()
        };
        self.requests.send(more).await.expect("the request stream is open");
    }

    /// The next response, `Ok(None)` when the stream ended, `Err` for a status.
    async fn next(&mut self) -> Result<Option<FetchResponse>, Status> {
        timeout(PATIENCE, self.responses.message())
            .await
            .expect("the emulator answers in time")
    }
}

fn first_request(topic: &str, preset: ReplayPreset, replay_id: Vec<u8>, n: i32) -> FetchRequest {
    FetchRequest {
        topic_name: topic.to_owned(),
        replay_preset: preset as i32,
        replay_id,
        num_requested: n,
        auth_refresh: String::new(),
    }
}

fn trailer<'a>(status: &'a Status, key: &str) -> &'a str {
    status.metadata().get(key).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Comparable form: the bus assigns replay and schema ids, and bitmaps carry no order of their own.
fn normalised(mut event: Event) -> Event {
    event.replay_id = None;
    event.schema_id = None;
    if let Some(header) = event.header.as_mut() {
        header.changed_fields.sort();
        header.nulled_fields.sort();
        header.diff_fields.sort();
    }
    event
}

/// Decodes a response's events, fetching unknown schemas with GetSchema as a real subscriber would.
async fn decode_all(
    client: &mut Client,
    registry: &mut SchemaRegistry,
    channel: &str,
    response: &FetchResponse,
) -> Vec<Event> {
    let mut events = Vec::new();
    for consumer in &response.events {
        let raw = RawEvent::from_consumer(consumer).expect("event present");
        if !registry.contains(raw.schema_id) {
            let info = client
                .get_schema(SchemaRequest {
                    schema_id: raw.schema_id.to_owned(),
                })
                .await
                .expect("GetSchema answers")
                .into_inner();
            registry
                .insert(&info.schema_id, &info.schema_json)
                .expect("schema parses");
        }
        events.push(registry.decode(channel, &raw).expect("event decodes"));
    }
    events
}

#[test]
fn fastavro_vectors_decode_to_the_expected_events() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/tests/fixtures/avro/vectors.json")).expect("vectors exist");
    let file: Json = serde_json::from_str(&text).expect("vectors are JSON");
    let vectors = file["vectors"].as_array().expect("a vectors array");
    assert!(vectors.len() >= 3);
    let mut registry = SchemaRegistry::new();
    let mut compared = 0;
    for vector in vectors {
        let name = vector["name"].as_str().unwrap_or_default();
        let schema_json = std::fs::read_to_string(format!("{root}/{}", vector["schema"].as_str().unwrap_or_default()))
            .expect("schema file exists");
        let schema_id = vector["schema_id"].as_str().unwrap_or_default();
        let schema = registry.insert(schema_id, &schema_json).expect("schema parses");
        assert_eq!(
            schema.fingerprint(),
            schema_id,
            "{name}: our fingerprint agrees with fastavro's"
        );
        let payload = replay_id_from_hex(vector["payload_hex"].as_str().unwrap_or_default()).expect("hex payload");
        let replay = replay_id_from_hex(vector["replay_id"].as_str().unwrap_or_default()).expect("hex replay id");
        let raw = RawEvent {
            event_id: vector["event_id"].as_str().unwrap_or_default(),
            schema_id,
            payload: &payload,
            replay_id: &replay,
        };
        let decoded = registry.decode(vector["channel"].as_str().unwrap_or_default(), &raw);
        let decoded = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut expected: Event = serde_json::from_value(vector["expected"].clone()).expect("expected is an Event");
        expected.normalize().expect("expected is valid");
        assert_eq!(decoded, expected, "{name}");

        // Our encoder writes the same bytes as fastavro wherever the bitmaps use Salesforce's upper-case hex.
        let upper = vector["bitmaps"].as_object().is_none_or(|b| {
            b.values().flat_map(|v| v.as_array().into_iter().flatten()).all(|e| {
                let digits = e.as_str().unwrap_or_default().rsplit("0x").next().unwrap_or_default();
                !digits.chars().any(|c| ('a'..='f').contains(&c))
            })
        });
        compared += usize::from(upper);
        if upper {
            assert_eq!(
                schema.encode(&expected).expect("encodes"),
                payload,
                "{name}: byte-identical re-encoding"
            );
        }
    }
    assert!(compared >= 3, "most vectors are re-encoded byte for byte");
}

#[test]
fn corrupt_payload_unknown_schema_and_truncated_bitmap_are_typed_errors() {
    let root = env!("CARGO_MANIFEST_DIR");
    let json = std::fs::read_to_string(format!("{root}/schemas/avro/OrderChangeEvent.avsc")).expect("schema file");
    let mut registry = SchemaRegistry::new();
    let schema = CompiledSchema::parse(&json).expect("schema parses");
    registry.insert_compiled(schema.clone());
    let raw = |payload: &'static [u8], schema_id: &'static str| RawEvent {
        event_id: "e1",
        schema_id,
        payload,
        replay_id: &[1],
    };
    let id: &'static str = Box::leak(schema.fingerprint().to_owned().into_boxed_str());
    let corrupt = registry.decode(ORDER_CHANNEL, &raw(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01], id));
    assert!(
        matches!(corrupt, Err(DecodeError::CorruptPayload { .. })),
        "{corrupt:?}"
    );
    let unknown = registry.decode(ORDER_CHANNEL, &raw(&[], "AAAAAAAAAAAAAAAAAAAAAA"));
    assert!(matches!(unknown, Err(DecodeError::UnknownSchema { .. })), "{unknown:?}");

    // A valid record whose changedFields holds the truncated entry "3-".
    let payload = schema.encode(&order_event(1)).expect("encodes");
    let avro_schema = apache_avro::Schema::parse_str(&json).expect("schema parses");
    let reader = GenericDatumReader::builder(&avro_schema).build().expect("reader");
    let mut value = reader.read_value(&mut &payload[..]).expect("reads back");
    if let AvroValue::Record(fields) = &mut value
        && let Some((_, AvroValue::Record(header))) = fields.first_mut()
        && let Some((_, changed)) = header.iter_mut().find(|(name, _)| name == "changedFields")
    {
        *changed = AvroValue::Array(vec![AvroValue::String("3-".into())]);
    }
    let writer = GenericDatumWriter::builder(&avro_schema).build().expect("writer");
    let bad: &'static [u8] = Box::leak(writer.write_value_to_vec(value).expect("writes").into_boxed_slice());
    let err = registry
        .decode(ORDER_CHANNEL, &raw(bad, id))
        .expect_err("truncated bitmap");
    assert!(
        matches!(
            err,
            DecodeError::Bitmap {
                field: "changedFields",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[tokio::test]
async fn jsonl_events_round_trip_through_the_emulator_over_grpc() {
    let cdc = Event::from_json(CDC_EVENT).expect("valid");
    let platform = Event::from_json(PLATFORM_EVENT).expect("valid");
    let handle = start(vec![cdc.clone(), platform.clone()]).await;
    let mut client = connect(&handle, handle.access_token()).await;
    let mut registry = SchemaRegistry::new();

    for (channel, original) in [(ORDER_CHANNEL, &cdc), (FULFILMENT_CHANNEL, &platform)] {
        let topic = client
            .get_topic(TopicRequest {
                topic_name: channel.to_owned(),
            })
            .await
            .expect("GetTopic answers")
            .into_inner();
        let mut subscription =
            Subscription::open(&mut client, first_request(channel, ReplayPreset::Earliest, vec![], 10))
                .await
                .expect("subscribes");
        let response = subscription.next().await.expect("no error").expect("a response");
        assert_eq!(response.events.len(), 1, "{channel}");
        let decoded = decode_all(&mut client, &mut registry, channel, &response)
            .await
            .remove(0);
        assert_eq!(decoded.schema_id.as_deref(), Some(topic.schema_id.as_str()));
        assert_eq!(decoded.replay_id.as_deref().map(str::len), Some(16), "8 bytes as hex");
        assert_eq!(normalised(decoded), normalised(original.clone()), "{channel}");
    }
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn more_than_100_queued_events_never_exceed_100_outstanding() {
    let total = 250;
    let handle = start((0..total).map(order_event).collect()).await;
    let mut client = connect(&handle, handle.access_token()).await;
    // Over-ask on purpose: Salesforce treats anything above 100 outstanding as 100.
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Earliest, vec![], 150),
    )
    .await
    .expect("subscribes");
    let mut received = 0usize;
    let mut owed: i64 = 100;
    while received < total {
        let response = subscription.next().await.expect("no error").expect("a response");
        assert!(response.pending_num_requested <= MAX_OUTSTANDING);
        received += response.events.len();
        owed -= response.events.len() as i64;
        assert!(owed >= 0, "the emulator delivered more than it owed");
        assert_eq!(i64::from(response.pending_num_requested), owed);
        if owed == 0 {
            // Nothing more may arrive until we ask: no events, and no keepalives either.
            let quiet = timeout(Duration::from_millis(600), subscription.responses.message()).await;
            assert!(quiet.is_err(), "the emulator sent something without demand: {quiet:?}");
            subscription.request(100).await;
            owed = 100;
        }
    }
    assert_eq!(received, total);
    assert!(handle.max_outstanding() <= MAX_OUTSTANDING);
    assert_eq!(handle.max_outstanding(), MAX_OUTSTANDING);
    assert_eq!(handle.max_requested(), 150, "the over-ask is recorded before the cap");
    assert_eq!(handle.delivered(), total as u64);
}

#[tokio::test]
async fn corrupted_replay_id_fails_with_salesforce_trailers() {
    let handle = start(vec![order_event(1), order_event(2)]).await;
    let mut client = connect(&handle, handle.access_token()).await;

    // The classic mistake: the decimal replay id as a string.
    let first = first_request(ORDER_CHANNEL, ReplayPreset::Custom, b"12907414".to_vec(), 10);
    let status = match Subscription::open(&mut client, first).await {
        Err(status) => status,
        Ok(mut subscription) => subscription.next().await.expect_err("a corrupted replay id fails"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::REPLAY_ID_CORRUPTED);
    assert!(!trailer(&status, headers::RPC_ID).is_empty());
    assert!(status.message().contains("rpcId:"), "{}", status.message());

    // An injected fault rejects a good id once; the next try resumes after it.
    handle.inject(Fault::CorruptNextReplayId);
    let after_first = 1u64.to_be_bytes().to_vec();
    let first = first_request(ORDER_CHANNEL, ReplayPreset::Custom, after_first.clone(), 10);
    let status = Subscription::open(&mut client, first)
        .await
        .err()
        .expect("the injected fault fires");
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::REPLAY_ID_CORRUPTED);
    let first = first_request(ORDER_CHANNEL, ReplayPreset::Custom, after_first, 10);
    let mut subscription = Subscription::open(&mut client, first)
        .await
        .expect("the fault was one-shot");
    let response = subscription.next().await.expect("no error").expect("a response");
    assert_eq!(response.events.len(), 1, "CUSTOM starts after the given id");
    assert_eq!(response.events[0].replay_id, 2u64.to_be_bytes().to_vec());
}

#[tokio::test]
async fn get_schema_returns_the_writer_schema_of_a_topic() {
    let handle = start(vec![]).await;
    let mut client = connect(&handle, handle.access_token()).await;
    for channel in [ORDER_CHANNEL, FULFILMENT_CHANNEL] {
        let topic = client
            .get_topic(TopicRequest {
                topic_name: channel.to_owned(),
            })
            .await
            .expect("GetTopic answers")
            .into_inner();
        assert!(topic.can_subscribe);
        assert_eq!(topic.tenant_guid, "00Dxx0000000001EAA");
        let info = client
            .get_schema(SchemaRequest {
                schema_id: topic.schema_id.clone(),
            })
            .await
            .expect("GetSchema answers")
            .into_inner();
        assert_eq!(info.schema_id, topic.schema_id);
        let schema = CompiledSchema::parse(&info.schema_json).expect("the schema parses");
        assert_eq!(schema.fingerprint(), topic.schema_id, "schema ids are MD5 fingerprints");
        assert_eq!(topic.schema_id.len(), 22);
    }
    let status = client
        .get_schema(SchemaRequest {
            schema_id: "AAAAAAAAAAAAAAAAAAAAAA".into(),
        })
        .await
        .expect_err("unknown schema id");
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .get_topic(TopicRequest {
            topic_name: "/data/NopeChangeEvent".into(),
        })
        .await
        .expect_err("unknown topic");
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::TOPIC_NOT_FOUND);
}

#[tokio::test]
async fn wrong_token_and_injected_auth_failure_are_unauthenticated() {
    let handle = start(vec![]).await;
    let topic = || TopicRequest {
        topic_name: ORDER_CHANNEL.to_owned(),
    };
    let mut wrong = connect(&handle, "not-the-token").await;
    let status = wrong.get_topic(topic()).await.expect_err("wrong token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::AUTH);

    let mut client = connect(&handle, handle.access_token()).await;
    handle.inject(Fault::FailAuthOnce);
    let status = client.get_topic(topic()).await.expect_err("injected failure");
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::AUTH);
    client.get_topic(topic()).await.expect("one-shot: the next call passes");

    // A subscription is checked too.
    let status = Subscription::open(
        &mut wrong,
        first_request(ORDER_CHANNEL, ReplayPreset::Latest, vec![], 1),
    )
    .await
    .err()
    .expect("wrong token on Subscribe");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn keepalives_carry_the_latest_replay_id_while_demand_is_outstanding() {
    let handle = start(vec![order_event(1)]).await;
    let mut client = connect(&handle, handle.access_token()).await;
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Latest, vec![], 5),
    )
    .await
    .expect("subscribes");
    let keepalive = subscription.next().await.expect("no error").expect("a keepalive");
    assert!(keepalive.events.is_empty());
    assert_eq!(keepalive.latest_replay_id, handle.latest_replay_id());
    assert_eq!(keepalive.pending_num_requested, 5);
    assert!(!keepalive.rpc_id.is_empty());

    // A live publish reaches the open stream.
    handle.publish(&order_event(2)).expect("publishes");
    let response = subscription.next().await.expect("no error").expect("a batch");
    assert_eq!(response.events.len(), 1);
    assert_eq!(response.pending_num_requested, 4);
    assert_eq!(response.latest_replay_id, 2u64.to_be_bytes().to_vec());
}

#[tokio::test]
async fn a_stream_without_demand_is_closed_after_the_idle_timeout() {
    let handle = emulator::start(EmulatorOptions {
        events: vec![order_event(1)],
        keepalive_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        ..EmulatorOptions::default()
    })
    .await
    .expect("starts");
    let mut client = connect(&handle, handle.access_token()).await;
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Earliest, vec![], 1),
    )
    .await
    .expect("subscribes");
    let response = subscription.next().await.expect("no error").expect("the event");
    assert_eq!(response.pending_num_requested, 0);
    assert!(
        subscription.next().await.expect("a clean close").is_none(),
        "the stream ends"
    );
}

#[tokio::test]
async fn injected_drop_fails_the_stream_after_n_events_like_an_outage() {
    let handle = start((0..5).map(order_event).collect()).await;
    let mut client = connect(&handle, handle.access_token()).await;
    handle.inject(Fault::DropStreamAfter(2));
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Earliest, vec![], 10),
    )
    .await
    .expect("subscribes");
    let mut received = 0;
    let status = loop {
        match subscription.next().await {
            Ok(Some(response)) => received += response.events.len(),
            Ok(None) => panic!("the stream ended cleanly instead of failing"),
            Err(status) => break status,
        }
    };
    assert_eq!(received, 2);
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(trailer(&status, headers::ERROR_CODE), error_codes::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_silent_stream_sends_nothing_until_resumed() {
    let handle = start(vec![]).await;
    let mut client = connect(&handle, handle.access_token()).await;
    handle.inject(Fault::GoSilent);
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Latest, vec![], 5),
    )
    .await
    .expect("subscribes");
    handle.publish(&order_event(1)).expect("publishes");
    let quiet = timeout(Duration::from_millis(700), subscription.responses.message()).await;
    assert!(quiet.is_err(), "a silent stream sent {quiet:?}");
    handle.inject(Fault::Resume);
    let response = subscription.next().await.expect("no error").expect("the held event");
    assert_eq!(response.events.len(), 1);
}

#[tokio::test]
async fn schema_switch_mid_stream_is_decoded_by_schema_id() {
    let handle = start(vec![order_event(1)]).await;
    let v1 = handle.schema_id(ORDER_CHANNEL).expect("topic");
    handle.inject(Fault::SwitchOrderSchemaToV2);
    handle.publish(&order_event(2)).expect("publishes under v2");
    let v2 = handle.schema_id(ORDER_CHANNEL).expect("topic");
    assert_ne!(v1, v2);

    let mut client = connect(&handle, handle.access_token()).await;
    let mut registry = SchemaRegistry::new();
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Earliest, vec![], 10),
    )
    .await
    .expect("subscribes");
    let mut decoded = Vec::new();
    let mut schema_ids = Vec::new();
    while decoded.len() < 2 {
        let response = subscription.next().await.expect("no error").expect("a response");
        schema_ids.extend(
            response
                .events
                .iter()
                .filter_map(|e| e.event.as_ref())
                .map(|e| e.schema_id.clone()),
        );
        decoded.extend(decode_all(&mut client, &mut registry, ORDER_CHANNEL, &response).await);
    }
    assert_eq!(schema_ids, [v1, v2]);
    assert_eq!(registry.len(), 2, "one registry entry per schema id");
    for (n, event) in decoded.into_iter().enumerate() {
        assert_eq!(normalised(event), normalised(order_event(n + 1)));
    }
}

#[tokio::test]
async fn publish_rpc_appends_events_a_subscriber_then_reads() {
    let handle = start(vec![]).await;
    let mut client = connect(&handle, handle.access_token()).await;
    let schema_id = handle.schema_id(FULFILMENT_CHANNEL).expect("topic");
    let schema = handle.schemas().remove(&schema_id).expect("known schema");
    let event = Event::from_json(PLATFORM_EVENT).expect("valid");
    let payload = schema.encode(&event).expect("encodes");
    let reply = client
        .publish(PublishRequest {
            topic_name: FULFILMENT_CHANNEL.to_owned(),
            events: vec![
                ProducerEvent {
                    id: event.id.clone(),
                    schema_id: schema_id.clone(),
                    payload,
                    headers: vec![],
                },
                ProducerEvent {
                    id: "garbage".into(),
                    schema_id: schema_id.clone(),
                    payload: vec![0xff; 3],
                    headers: vec![],
                },
            ],
            auth_refresh: String::new(),
        })
        .await
        .expect("Publish answers")
        .into_inner();
    assert!(reply.results[0].error.is_none());
    assert_eq!(reply.results[0].correlation_key, event.id);
    assert!(
        reply.results[1].error.is_some(),
        "a corrupt payload is refused at publish"
    );

    let mut registry = SchemaRegistry::new();
    let mut subscription = Subscription::open(
        &mut client,
        first_request(FULFILMENT_CHANNEL, ReplayPreset::Earliest, vec![], 10),
    )
    .await
    .expect("subscribes");
    let response = subscription.next().await.expect("no error").expect("a response");
    let decoded = decode_all(&mut client, &mut registry, FULFILMENT_CHANNEL, &response).await;
    assert_eq!(
        decoded.into_iter().map(normalised).collect::<Vec<_>>(),
        [normalised(event)]
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_stops_listening() {
    let handle = start(vec![]).await;
    let addr = handle.addr();
    let mut client = connect(&handle, handle.access_token()).await;
    let mut subscription = Subscription::open(
        &mut client,
        first_request(ORDER_CHANNEL, ReplayPreset::Latest, vec![], 5),
    )
    .await
    .expect("subscribes");
    timeout(PATIENCE, handle.shutdown())
        .await
        .expect("shutdown does not wait for the open stream")
        .expect("clean shutdown");
    // The open stream ends (cleanly or with a transport error), it does not hang.
    let _ = timeout(PATIENCE, subscription.responses.message())
        .await
        .expect("the stream ends");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let handle = start(vec![]).await;
    let addr = handle.addr();
    drop(handle);
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the server still listens after its handle was dropped");
}

#[tokio::test]
async fn connect_speaks_plain_http2_to_http_endpoints_and_tls_to_https_ones() {
    let handle = emulator::start(EmulatorOptions::default()).await.unwrap();
    let channel = switchyard::sources::pubsub::connect(&handle.endpoint())
        .await
        .expect("plain HTTP/2 on loopback");
    let mut client = switchyard::sources::pubsub::client(channel);
    let mut request = tonic::Request::new(switchyard::sources::pubsub::proto::TopicRequest {
        topic_name: emulator::ORDER_CHANNEL.to_string(),
    });
    let md = request.metadata_mut();
    md.insert("accesstoken", handle.access_token().parse().unwrap());
    md.insert("instanceurl", "http://127.0.0.1".parse().unwrap());
    md.insert("tenantid", "00Dxx0000000001AAA".parse().unwrap());
    let topic = client
        .get_topic(request)
        .await
        .expect("GetTopic over the channel")
        .into_inner();
    assert_eq!(topic.topic_name, emulator::ORDER_CHANNEL);
    // The same server over https:// fails the TLS handshake (it speaks plaintext): TLS is really used,
    // and the failure is an error, not a hang.
    let tls = handle.endpoint().replace("http://", "https://");
    assert!(switchyard::sources::pubsub::connect(&tls).await.is_err());
    assert!(switchyard::sources::pubsub::connect("127.0.0.1:7443").await.is_err());
}

#[tokio::test]
async fn events_of_both_kinds_cross_grpc_from_the_switchyard_emulator_command_to_our_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        format!(
            "{}\n{}\n",
            CDC_EVENT.replace('\n', ""),
            PLATFORM_EVENT.replace('\n', "")
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["emulator", "--listen", &format!("127.0.0.1:{port}"), "--events"])
        .arg(&events)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the emulator did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = connect_endpoint(&endpoint, emulator::DEFAULT_ACCESS_TOKEN).await;
    let mut registry = SchemaRegistry::new();
    for (channel, original) in [(ORDER_CHANNEL, CDC_EVENT), (FULFILMENT_CHANNEL, PLATFORM_EVENT)] {
        let mut subscription =
            Subscription::open(&mut client, first_request(channel, ReplayPreset::Earliest, vec![], 10))
                .await
                .expect("subscribes");
        let response = subscription.next().await.expect("no error").expect("a response");
        let decoded = decode_all(&mut client, &mut registry, channel, &response)
            .await
            .remove(0);
        assert_eq!(
            normalised(decoded),
            normalised(Event::from_json(original).unwrap()),
            "{channel}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
