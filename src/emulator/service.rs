//! The gRPC service: auth on every RPC, GetSchema, GetTopic, Publish, PublishStream, and Subscribe (the stream
//! itself lives in `subscribe.rs`).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::sources::pubsub::avro::RawEvent;
use crate::sources::pubsub::proto::pub_sub_server::PubSub;
use crate::sources::pubsub::proto::{
    Error as ProtoError, ErrorCode, FetchRequest, FetchResponse, ManagedFetchRequest, ManagedFetchResponse,
    PublishRequest, PublishResponse, PublishResult, SchemaInfo, SchemaRequest, TopicInfo, TopicRequest,
};
use crate::sources::pubsub::{error_codes, headers};

use super::state::{Shared, Stored};
use super::{managed, subscribe};

/// Responses a stream may have queued before its task waits for the client to read; demand (num_requested), not
/// this buffer, is what limits how much a subscriber receives.
const STREAM_BUFFER: usize = 8;

pub(crate) struct Service {
    pub shared: Arc<Shared>,
}

/// A Salesforce-style failure: the gRPC code, plus `error-code`, `rpc-id` and `type` trailers, and the rpc id in the
/// message as Salesforce writes it.
pub(crate) fn failure(code: Code, error_code: &str, message: &str, rpc_id: &str, rpc: &str) -> Status {
    let mut trailers = MetadataMap::new();
    for (key, value) in [
        (headers::ERROR_CODE, error_code),
        (headers::RPC_ID, rpc_id),
        ("type", rpc),
    ] {
        // Our codes and ids are plain ASCII; a value that is not would only lose its trailer.
        if let Ok(value) = MetadataValue::try_from(value) {
            trailers.insert(key, value);
        }
    }
    Status::with_metadata(code, format!("{message} rpcId: {rpc_id}"), trailers)
}

impl Service {
    /// Checks the three auth headers Salesforce requires on every RPC.
    fn authenticate(&self, metadata: &MetadataMap, rpc_id: &str, rpc: &str) -> Result<(), Status> {
        let header = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
        };
        let fail_once = {
            let mut state = self.shared.state();
            std::mem::take(&mut state.faults.fail_auth_once)
        };
        let (Some(token), Some(_), Some(_)) = (
            header(headers::ACCESS_TOKEN),
            header(headers::INSTANCE_URL),
            header(headers::TENANT_ID),
        ) else {
            return Err(failure(
                Code::Unauthenticated,
                error_codes::AUTH_HEADERS_INVALID,
                "The accesstoken, instanceurl and tenantid headers are required.",
                rpc_id,
                rpc,
            ));
        };
        if fail_once || !self.shared.token_valid(Some(token)) {
            tracing::debug!(
                rpc,
                rpc_id,
                injected = fail_once,
                "The emulator rejected an access token."
            );
            return Err(failure(
                Code::Unauthenticated,
                error_codes::AUTH,
                "The session is invalid or expired.",
                rpc_id,
                rpc,
            ));
        }
        Ok(())
    }

    fn publish_batch(&self, request: PublishRequest, rpc_id: &str, rpc: &str) -> Result<PublishResponse, Status> {
        let topic_schema = {
            let state = self.shared.state();
            state
                .topics
                .get(&request.topic_name)
                .map(|t| t.schema.fingerprint().to_owned())
        };
        let Some(topic_schema) = topic_schema else {
            return Err(topic_not_found(&request.topic_name, rpc_id, rpc));
        };
        let mut results = Vec::with_capacity(request.events.len());
        for (index, event) in request.events.into_iter().enumerate() {
            let event_id = if event.id.is_empty() {
                format!("{rpc_id}-{index}")
            } else {
                event.id
            };
            let schema = self.shared.state().schemas.get(&event.schema_id).cloned();
            // Decoding checks the payload the way a subscriber will read it, so a bad publish fails here and not
            // in somebody's stream.
            let checked = match schema {
                None => Err(format!("The schema id `{}` is unknown.", event.schema_id)),
                Some(schema) => {
                    let raw = RawEvent {
                        event_id: &event_id,
                        schema_id: &event.schema_id,
                        payload: &event.payload,
                        replay_id: &[],
                    };
                    schema
                        .decode(&request.topic_name, &raw)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            };
            let result = checked.and_then(|()| {
                let stored = Stored {
                    replay: 0,
                    event_id: event_id.clone(),
                    schema_id: event.schema_id.clone(),
                    payload: event.payload,
                };
                self.shared
                    .publish_raw(&request.topic_name, stored)
                    .map_err(|e| e.to_string())
            });
            results.push(match result {
                Ok(replay) => PublishResult {
                    replay_id: replay.to_be_bytes().to_vec(),
                    error: None,
                    correlation_key: event_id,
                },
                Err(msg) => PublishResult {
                    replay_id: Vec::new(),
                    error: Some(ProtoError {
                        code: ErrorCode::Publish as i32,
                        msg,
                    }),
                    correlation_key: event_id,
                },
            });
        }
        Ok(PublishResponse {
            results,
            schema_id: topic_schema,
            rpc_id: rpc_id.to_owned(),
        })
    }
}

pub(crate) fn topic_not_found(topic: &str, rpc_id: &str, rpc: &str) -> Status {
    failure(
        Code::NotFound,
        error_codes::TOPIC_NOT_FOUND,
        &format!("The topic `{topic}` was not found."),
        rpc_id,
        rpc,
    )
}

#[tonic::async_trait]
impl PubSub for Service {
    type SubscribeStream = ReceiverStream<Result<FetchResponse, Status>>;
    type PublishStreamStream = ReceiverStream<Result<PublishResponse, Status>>;
    type ManagedSubscribeStream = ReceiverStream<Result<ManagedFetchResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<FetchRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "Subscribe")?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        subscribe::start(self.shared.clone(), request.into_inner(), rpc_id, tx).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_schema(&self, request: Request<SchemaRequest>) -> Result<Response<SchemaInfo>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "GetSchema")?;
        let schema_id = request.into_inner().schema_id;
        let schema = self.shared.state().schemas.get(&schema_id).cloned();
        match schema {
            Some(schema) => Ok(Response::new(SchemaInfo {
                schema_json: schema.json().to_owned(),
                schema_id,
                rpc_id,
            })),
            None if schema_id.is_empty() => Err(failure(
                Code::InvalidArgument,
                error_codes::SCHEMA_VALIDATION_FAILED,
                "Schema validation failed. The schema ID can't be blank.",
                &rpc_id,
                "GetSchema",
            )),
            None => Err(failure(
                Code::NotFound,
                error_codes::SCHEMA_VALIDATION_FAILED,
                &format!("The schema `{schema_id}` was not found."),
                &rpc_id,
                "GetSchema",
            )),
        }
    }

    async fn get_topic(&self, request: Request<TopicRequest>) -> Result<Response<TopicInfo>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "GetTopic")?;
        let tenant = request
            .metadata()
            .get(headers::TENANT_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let topic_name = request.into_inner().topic_name;
        let schema_id = self
            .shared
            .state()
            .topics
            .get(&topic_name)
            .map(|t| t.schema.fingerprint().to_owned());
        match schema_id {
            Some(schema_id) => Ok(Response::new(TopicInfo {
                topic_name,
                tenant_guid: tenant,
                can_publish: true,
                can_subscribe: true,
                schema_id,
                rpc_id,
            })),
            None => Err(topic_not_found(&topic_name, &rpc_id, "GetTopic")),
        }
    }

    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "Publish")?;
        self.publish_batch(request.into_inner(), &rpc_id, "Publish")
            .map(Response::new)
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "PublishStream")?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = Service {
            shared: self.shared.clone(),
        };
        let mut shutdown = self.shared.shutdown.subscribe();
        // Ends when the client closes its side, the client goes away (a send fails), a request is rejected, or
        // the emulator shuts down.
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    request = inbound.message() => request,
                };
                let reply = match request {
                    Ok(Some(request)) => service.publish_batch(request, &rpc_id, "PublishStream"),
                    Ok(None) | Err(_) => break,
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn managed_subscribe(
        &self,
        request: Request<Streaming<ManagedFetchRequest>>,
    ) -> Result<Response<Self::ManagedSubscribeStream>, Status> {
        let rpc_id = self.shared.rpc_id();
        self.authenticate(request.metadata(), &rpc_id, "ManagedSubscribe")?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        managed::start(self.shared.clone(), request.into_inner(), rpc_id, tx).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
