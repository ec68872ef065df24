//! Salesforce Pub/Sub API, part 1: the wire. The generated gRPC types ([`proto`]), Avro decoding and encoding of
//! event payloads against a schema registry keyed by schema id ([`avro`]), and the CDC field bitmaps ([`bitmap`]).
//! The facts behind the choices are in shared/reference/salesforce-pubsub.md.

pub mod avro;
pub mod bitmap;
pub mod proto;
pub mod subscriber;

/// Largest gRPC message we accept or send. tonic's default is 4 MiB, but one event may be up to 1 MB and a
/// FetchResponse carries a whole batch of them, so a full batch of large CDC events would fail with
/// RESOURCE_EXHAUSTED at the default. Applied to the client and to the emulator's server alike.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Most events a subscription may have requested and not yet received: Salesforce treats anything above as 100
/// ("across all requests", flow-control guide), so a client should never ask for more and the emulator caps there.
pub const MAX_OUTSTANDING: i32 = 100;

/// gRPC metadata keys Salesforce reads on every RPC; tonic needs them lower case.
pub mod headers {
    pub const ACCESS_TOKEN: &str = "accesstoken";
    pub const INSTANCE_URL: &str = "instanceurl";
    pub const TENANT_ID: &str = "tenantid";
    /// Trailer with the Salesforce error code; recovery is decided from it, not from the gRPC code.
    pub const ERROR_CODE: &str = "error-code";
    /// Trailer with the id that correlates a failure with Salesforce's logs.
    pub const RPC_ID: &str = "rpc-id";
}

/// The Salesforce `error-code` trailer values this crate produces or reacts to.
pub mod error_codes {
    pub const AUTH: &str = "sfdc.platform.eventbus.grpc.service.auth.error";
    pub const AUTH_HEADERS_INVALID: &str = "sfdc.platform.eventbus.grpc.service.auth.headers.invalid";
    pub const SERVICE_UNAVAILABLE: &str = "sfdc.platform.eventbus.grpc.service.unavailable";
    pub const REPLAY_ID_CORRUPTED: &str = "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted";
    pub const REPLAY_ID_VALIDATION_FAILED: &str =
        "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.validation.failed";
    pub const REQUESTED_EVENTS_INVALID: &str =
        "sfdc.platform.eventbus.grpc.subscription.fetch.requested.events.invalid";
    pub const TOPIC_MISMATCH: &str = "sfdc.platform.eventbus.grpc.subscription.fetch.topic.mismatch";
    pub const TOPIC_NOT_FOUND: &str = "sfdc.platform.eventbus.grpc.topic.not.found";
    pub const SCHEMA_VALIDATION_FAILED: &str = "sfdc.platform.eventbus.grpc.schema.validation.failed";
    pub const UNIMPLEMENTED: &str = "sfdc.platform.eventbus.grpc.service.unimplemented";
    pub const MANAGED_NAME_NOT_FOUND: &str =
        "sfdc.platform.eventbus.grpc.managed.subscription.developer.name.not.found";
    pub const MANAGED_ID_NOT_FOUND: &str = "sfdc.platform.eventbus.grpc.managed.subscription.id.not.found";
    pub const MANAGED_ALREADY_ACTIVE: &str = "sfdc.platform.eventbus.grpc.managed.subscription.already.active";
    pub const MANAGED_STOPPED: &str = "sfdc.platform.eventbus.grpc.managed.subscription.config.stopped";
    pub const MANAGED_COMMIT_RESTRICTED: &str =
        "sfdc.platform.eventbus.grpc.managed.subscription.fetch.request.commit.request.restricted";
    pub const MANAGED_COMMIT_INVALID: &str = "sfdc.platform.eventbus.grpc.managed.subscription.commit.replayid.invalid";
}

/// HTTP/2 PING interval and timeout: a half-open connection (NAT, a dead peer) is noticed within a minute
/// instead of after the OS's TCP timeout, which can be hours (reference §3.2).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Connecting (TCP + TLS) must not hang forever, e.g. a TLS endpoint that is really plaintext.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Why a channel to a Pub/Sub endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("`{0}` is not an endpoint; use https://host:port (Salesforce) or http://host:port (a local emulator)")]
    Endpoint(String),
    #[error("cannot connect to {endpoint}: {source}")]
    Transport {
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// Opens a gRPC channel to a Pub/Sub endpoint: TLS with the public WebPKI roots (rustls, verification always
/// on) for `https://`, plain HTTP/2 for `http://` (loopback emulators), HTTP/2 keepalive pings either way.
pub async fn connect(endpoint: &str) -> Result<tonic::transport::Channel, ConnectError> {
    use tonic::transport::{Channel, ClientTlsConfig};
    let transport = |source| ConnectError::Transport {
        endpoint: endpoint.to_string(),
        source,
    };
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        return Err(ConnectError::Endpoint(endpoint.to_string()));
    }
    let mut builder = Channel::from_shared(endpoint.to_string())
        .map_err(|_| ConnectError::Endpoint(endpoint.to_string()))?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_timeout(CONNECT_TIMEOUT);
    if endpoint.starts_with("https://") {
        builder = builder
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .map_err(transport)?;
    }
    builder.connect().await.map_err(transport)
}

/// A Pub/Sub client over `channel` with the raised message limits.
pub fn client(channel: tonic::transport::Channel) -> proto::pub_sub_client::PubSubClient<tonic::transport::Channel> {
    proto::pub_sub_client::PubSubClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
