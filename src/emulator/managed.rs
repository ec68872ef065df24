//! ManagedSubscribe: a subscription whose position the server keeps. The emulator resolves the subscription by
//! developer name or id, starts after its committed replay id (or at its default replay), answers
//! `commit_replay_id_request`s with `commit_response`s, and otherwise serves the stream exactly as Subscribe does
//! (the same session behind an adapter: flow control, keepalives, idle close, faults).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::sources::pubsub::error_codes;
use crate::sources::pubsub::proto::{
    CommitReplayRequest, CommitReplayResponse, Error as ProtoError, ErrorCode, FetchRequest, FetchResponse,
    ManagedFetchRequest, ManagedFetchResponse,
};

use super::service::failure;
use super::state::Shared;
use super::subscribe::{check_demand, first_request, spawn_session};

const RPC: &str = "ManagedSubscribe";

/// A `ManagedEventSubscription` as the emulator's org has it (Tooling API record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedSubscription {
    pub developer_name: String,
    /// The topic it subscribes to (`/data/OrderChangeEvent`).
    pub topic: String,
    /// Where it starts while nothing is committed: `true` EARLIEST, `false` LATEST.
    pub default_earliest: bool,
    /// `state: RUN` (`false`: STOP, refused).
    pub running: bool,
}

impl std::str::FromStr for ManagedSubscription {
    type Err = String;

    /// `NAME=TOPIC`, optionally `@latest` (default replay LATEST instead of EARLIEST) or `@stopped` (state STOP):
    /// `Switchyard_Orders=/data/OrderChangeEvent`, `Late=/data/OrderChangeEvent@latest`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: write NAME=TOPIC (`Switchyard_Orders=/data/OrderChangeEvent`)"))?;
        let (topic, flag) = match rest.split_once('@') {
            Some((topic, flag)) => (topic, Some(flag)),
            None => (rest, None),
        };
        let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!(
                "`{name}` is not a developer name (letters, digits, underscores)"
            ));
        }
        if !(topic.starts_with("/data/") || topic.starts_with("/event/")) {
            return Err(format!("`{topic}` is not a channel (/data/... or /event/...)"));
        }
        let (default_earliest, running) = match flag {
            None => (true, true),
            Some("latest") => (false, true),
            Some("stopped") => (true, false),
            Some(other) => return Err(format!("`@{other}`: the flags are @latest and @stopped")),
        };
        Ok(ManagedSubscription {
            developer_name: name.to_string(),
            topic: topic.to_string(),
            default_earliest,
            running,
        })
    }
}

/// What the server keeps per managed subscription.
#[derive(Debug)]
pub(crate) struct Managed {
    pub spec: ManagedSubscription,
    /// The record id (`0ZXxx…`), accepted as `subscription_id`.
    pub id: String,
    /// The committed replay id, once a commit succeeded.
    pub committed: Option<u64>,
    /// Every successful commit, in order, for tests.
    pub commits: Vec<u64>,
    /// A stream is open on it (a second one is refused with `already.active`).
    pub active: bool,
}

impl Managed {
    pub fn new(spec: ManagedSubscription, n: usize) -> Managed {
        Managed {
            spec,
            id: format!("18xxx{n:010}AAA"),
            committed: None,
            commits: Vec::new(),
            active: false,
        }
    }
}

type Outbound = mpsc::Sender<Result<ManagedFetchResponse, Status>>;

/// Reads and checks the first ManagedFetchRequest, then runs the stream: a Subscribe session fed with the demand of
/// later requests, whose batches are forwarded as ManagedFetchResponses, with commits answered in between.
pub(crate) async fn start(
    shared: Arc<Shared>,
    mut inbound: Streaming<ManagedFetchRequest>,
    rpc_id: String,
    tx: Outbound,
) -> Result<(), Status> {
    let fail = |code, error_code, message: &str| failure(code, error_code, message, &rpc_id, RPC);
    let first = first_request(&shared, &mut inbound, "ManagedFetchRequest", &rpc_id, RPC).await?;
    if first.commit_replay_id_request.is_some() {
        return Err(fail(
            Code::InvalidArgument,
            error_codes::MANAGED_COMMIT_RESTRICTED,
            "A commit request isn't allowed in the first ManagedFetchRequest of a stream.",
        ));
    }
    check_demand(first.num_requested, &rpc_id, RPC)?;
    let (name, topic, position) = {
        let mut state = shared.state();
        let last = state.last_replay;
        let found = state.managed.iter_mut().find(|m| {
            (!first.developer_name.is_empty() && m.spec.developer_name == first.developer_name)
                || (!first.subscription_id.is_empty() && m.id == first.subscription_id)
        });
        let Some(managed) = found else {
            return Err(if first.developer_name.is_empty() {
                fail(
                    Code::NotFound,
                    error_codes::MANAGED_ID_NOT_FOUND,
                    &format!("No managed subscription has the id `{}`.", first.subscription_id),
                )
            } else {
                fail(
                    Code::NotFound,
                    error_codes::MANAGED_NAME_NOT_FOUND,
                    &format!(
                        "No managed subscription has the developer name `{}`.",
                        first.developer_name
                    ),
                )
            });
        };
        if !managed.spec.running {
            return Err(fail(
                Code::FailedPrecondition,
                error_codes::MANAGED_STOPPED,
                &format!(
                    "The managed subscription `{}` is in the STOP state.",
                    managed.spec.developer_name
                ),
            ));
        }
        if managed.active {
            return Err(fail(
                Code::FailedPrecondition,
                error_codes::MANAGED_ALREADY_ACTIVE,
                &format!(
                    "The managed subscription `{}` already has an active client.",
                    managed.spec.developer_name
                ),
            ));
        }
        managed.active = true;
        let position = match (managed.committed, managed.spec.default_earliest) {
            (Some(committed), _) => committed,
            (None, true) => 0,
            (None, false) => last,
        };
        (
            managed.spec.developer_name.clone(),
            managed.spec.topic.clone(),
            position,
        )
    };
    shared.stats.managed_streams.fetch_add(1, Ordering::Relaxed);

    let (demand_tx, demand_rx) = mpsc::channel::<Result<FetchRequest, Status>>(4);
    let (batches_tx, mut batches_rx) = mpsc::channel::<Result<FetchResponse, Status>>(4);
    let session = spawn_session(
        shared.clone(),
        topic,
        position,
        first.num_requested,
        ReceiverStream::new(demand_rx),
        (rpc_id.clone(), RPC),
        batches_tx,
    );
    // Requests: demand goes to the session, commits are answered here. Ends with the client's request stream
    // or when the client goes away: then the session ends at once, so the
    // subscription is free for the client's next stream (Salesforce notices a dropped client the same way).
    let requests = {
        let (shared, tx, name) = (shared.clone(), tx.clone(), name.clone());
        let session = session.abort_handle();
        tokio::spawn(async move {
            loop {
                let request = match inbound.message().await {
                    Ok(Some(request)) => request,
                    // A managed client closes its side only as it leaves: nothing more can be committed.
                    Ok(None) | Err(_) => {
                        session.abort();
                        break;
                    }
                };
                if let Some(commit) = &request.commit_replay_id_request {
                    let response = commit_response(&shared, &name, commit);
                    if tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
                if request.num_requested != 0 || request.commit_replay_id_request.is_none() {
                    let fetch = FetchRequest {
                        num_requested: request.num_requested,
                        ..FetchRequest::default()
                    };
                    if demand_tx.send(Ok(fetch)).await.is_err() {
                        break;
                    }
                }
            }
        })
    };
    // Batches: forwarded as they are; when the session ends, the stream ends and the subscription is free again.
    tokio::spawn(async move {
        while let Some(batch) = batches_rx.recv().await {
            let forwarded = batch.map(|b| ManagedFetchResponse {
                events: b.events,
                latest_replay_id: b.latest_replay_id,
                rpc_id: b.rpc_id,
                pending_num_requested: b.pending_num_requested,
                commit_response: None,
            });
            if tx.send(forwarded).await.is_err() {
                break;
            }
        }
        let _ = session.await;
        requests.abort();
        if let Some(m) = shared
            .state()
            .managed
            .iter_mut()
            .find(|m| m.spec.developer_name == name)
        {
            m.active = false;
        }
    });
    Ok(())
}

/// Applies one commit: a replay id the bus issued becomes the subscription's position (an invalid one is refused
/// in the response, and the stream goes on).
fn commit_response(shared: &Shared, name: &str, commit: &CommitReplayRequest) -> ManagedFetchResponse {
    let mut state = shared.state();
    let last = state.last_replay;
    let parsed = <[u8; 8]>::try_from(commit.replay_id.as_slice())
        .map(u64::from_be_bytes)
        .ok()
        .filter(|id| *id <= last);
    let error = match (parsed, state.managed.iter_mut().find(|m| m.spec.developer_name == name)) {
        (Some(id), Some(managed)) => {
            managed.committed = Some(id);
            managed.commits.push(id);
            None
        }
        _ => Some(ProtoError {
            code: ErrorCode::Commit as i32,
            msg: format!(
                "{}: the replay id {} was not issued by this bus.",
                error_codes::MANAGED_COMMIT_INVALID,
                crate::hex::encode(&commit.replay_id)
            ),
        }),
    };
    ManagedFetchResponse {
        events: Vec::new(),
        latest_replay_id: Vec::new(),
        rpc_id: String::new(),
        pending_num_requested: 0,
        commit_response: Some(CommitReplayResponse {
            commit_request_id: commit.commit_request_id.clone(),
            replay_id: commit.replay_id.clone(),
            error,
            process_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }),
    }
}
