//! What the emulator holds: one event log per topic, the schemas by id, the injected faults and counters for tests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::JwtClaims;
use crate::event::{Event, RecordFields};
use crate::sources::pubsub::avro::CompiledSchema;

use super::EmulatorError;

/// An event as stored on the bus: already Avro, with the writer schema of the moment it was published.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub replay: u64,
    pub event_id: String,
    pub schema_id: String,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Topic {
    /// The schema new events are written with; GetTopic reports its id.
    pub schema: Arc<CompiledSchema>,
    /// Ordered by replay id.
    pub log: Vec<Stored>,
    /// A multi-entity channel (`/data/ChangeEvents`, a custom `__chn` channel): each member entity's schema. An
    /// event is written with its entity's schema, so one stream carries several schema ids. Empty: one schema.
    pub members: HashMap<String, Arc<CompiledSchema>>,
    /// A custom channel's enriched fields per entity: written with every change, from the org's record when the
    /// change does not carry them, and never marked changed.
    pub enriched: HashMap<String, Vec<String>>,
}

impl Topic {
    pub fn single(schema: Arc<CompiledSchema>) -> Topic {
        Topic {
            schema,
            log: Vec::new(),
            members: HashMap::new(),
            enriched: HashMap::new(),
        }
    }

    /// The schema an event of `entity` is written with on this channel; `None`: the channel does not carry it.
    pub fn schema_for(&self, entity: Option<&str>) -> Option<&Arc<CompiledSchema>> {
        match entity {
            Some(entity) if !self.members.is_empty() => self.members.get(entity),
            _ => Some(&self.schema),
        }
    }
}

/// Faults a test asks for; each one-shot fault clears itself when it fires.
#[derive(Debug, Default, Clone)]
pub(crate) struct Faults {
    /// Events still to deliver (over all streams) before the delivering stream is failed.
    pub drop_after: Option<usize>,
    pub corrupt_next_replay_id: bool,
    pub fail_auth_once: bool,
    pub silent: bool,
    /// Statuses the next REST reads answer with, one each.
    pub rest_failures: VecDeque<u16>,
    /// Statuses the next REST updates answer with, one each.
    pub update_failures: VecDeque<u16>,
    /// A delay for the next `n` REST reads.
    pub rest_delays: Option<(Duration, usize)>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Replay ids are one counter over all topics, as on the real bus where many streams share one log.
    pub last_replay: u64,
    pub topics: HashMap<String, Topic>,
    pub schemas: HashMap<String, Arc<CompiledSchema>>,
    pub faults: Faults,
    /// Access tokens the emulator accepts (gRPC `accesstoken`, REST `Authorization: Bearer`).
    pub tokens: HashSet<String>,
    /// Tokens issued by the token endpoint so far.
    pub issued: u64,
    /// The org's records by id, as the REST API reads them (`None`: deleted or never existed).
    pub records: HashMap<String, RecordFields>,
    /// REST reads per record id.
    pub reads: HashMap<String, u64>,
    /// The claims of the last JWT bearer assertion received.
    pub last_jwt: Option<JwtClaims>,
    /// The org's managed subscriptions and their committed positions.
    pub managed: Vec<super::managed::Managed>,
    /// The REST updates (PATCH) the org accepted, in order.
    pub updates: Vec<Update>,
}

/// A REST update the org accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub object: String,
    pub id: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The API client named by `Sforce-Call-Options: client=...`.
    pub client: Option<String>,
}

/// Counters that tests assert on.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub max_outstanding: AtomicI32,
    pub max_requested: AtomicI64,
    pub delivered: AtomicU64,
    pub keepalives: AtomicU64,
    pub subscriptions: AtomicU64,
    /// ManagedSubscribe streams that got past their first request.
    pub managed_streams: AtomicU64,
    pub rpcs: AtomicU64,
    pub token_requests: AtomicU64,
    pub rest_reads: AtomicU64,
}

/// Timings and the expected credentials, fixed at start.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub access_token: String,
    pub oauth: super::OAuthSettings,
    pub keepalive_interval: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: Settings,
    state: Mutex<State>,
    pub stats: Stats,
    /// The last replay id; subscriptions wait on it for new events.
    pub appended: watch::Sender<u64>,
    /// Bumped whenever faults change, so a silent stream notices that it may speak again.
    pub faults_changed: watch::Sender<u64>,
    /// Set once on shutdown; every task of the emulator watches it.
    pub shutdown: watch::Sender<bool>,
    /// `http://127.0.0.1:port` of the HTTP side (login URL and instance URL), set once it listens.
    pub http_base: OnceLock<String>,
}

impl Shared {
    pub fn new(settings: Settings, state: State) -> Self {
        Self {
            settings,
            state: Mutex::new(state),
            stats: Stats::default(),
            appended: watch::Sender::new(0),
            faults_changed: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            http_base: OnceLock::new(),
        }
    }

    /// The state lock is held only for short, non-async sections, so a panic elsewhere cannot leave it half-updated
    /// in a way that matters to a test double: recover from poisoning instead of cascading the panic.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new `rpc-id`, shaped like Salesforce's UUIDs so logs look familiar.
    pub fn rpc_id(&self) -> String {
        let n = self.stats.rpcs.fetch_add(1, Ordering::Relaxed) + 1;
        format!("00000000-0000-4000-8000-{n:012x}")
    }

    /// The login and instance URL of the HTTP side.
    pub fn base_url(&self) -> String {
        self.http_base.get().cloned().unwrap_or_default()
    }

    pub fn token_valid(&self, token: Option<&str>) -> bool {
        token.is_some_and(|t| self.state().tokens.contains(t))
    }

    /// Encodes `event` with its topic's current schema and appends it; returns the replay id. The event's recorded
    /// `record` map is the org's state from now on (what REST reads return), as if the change had just committed.
    pub fn publish(&self, event: &Event) -> Result<u64, EmulatorError> {
        let replay = {
            let mut state = self.state();
            for (id, fields) in &event.record {
                state.records.insert(id.clone(), fields.clone());
            }
            let topic = state
                .topics
                .get(&event.channel)
                .ok_or_else(|| EmulatorError::UnknownChannel(event.channel.clone()))?;
            let entity = event.header.as_ref().map(|h| h.entity.as_str());
            let topic_schema = topic
                .schema_for(entity)
                .cloned()
                .ok_or_else(|| EmulatorError::NotAMember {
                    channel: event.channel.clone(),
                    entity: entity.unwrap_or_default().to_owned(),
                    members: topic.members.keys().cloned().collect::<Vec<_>>().join(", "),
                })?;
            let enriched = entity.and_then(|e| topic.enriched.get(e));
            let payload = match enriched {
                Some(names) => topic_schema.encode(&with_enriched(event, names, &state.records))?,
                None => topic_schema.encode(event)?,
            };
            let stored = Stored {
                replay: 0,
                event_id: event.id.clone(),
                schema_id: topic_schema.fingerprint().to_owned(),
                payload,
            };
            append(&mut state, &event.channel, stored)?
        };
        self.appended.send_replace(replay);
        Ok(replay)
    }

    /// Appends an already encoded event (the Publish RPC); the payload was validated by the caller.
    pub fn publish_raw(&self, channel: &str, stored: Stored) -> Result<u64, EmulatorError> {
        let replay = append(&mut self.state(), channel, stored)?;
        self.appended.send_replace(replay);
        Ok(replay)
    }

    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.state().faults);
        self.faults_changed.send_modify(|generation| *generation += 1);
    }

    pub fn record_outstanding(&self, requested: i64, outstanding: i32) {
        self.stats.max_requested.fetch_max(requested, Ordering::Relaxed);
        self.stats.max_outstanding.fetch_max(outstanding, Ordering::Relaxed);
    }
}

/// `event` with a custom channel's enriched fields filled in: the value the change carries, else the org's
/// current value of its (first) record. The header is left alone: an enriched field that did not change is not in
/// `changedFields`, which is how a subscriber tells the two apart.
fn with_enriched(event: &Event, names: &[String], records: &HashMap<String, RecordFields>) -> Event {
    let mut event = event.clone();
    let current = event
        .header
        .as_ref()
        .and_then(|h| h.record_ids.first())
        .and_then(|id| records.get(id))
        .and_then(Option::as_ref);
    for name in names {
        if !event.fields.contains_key(name)
            && let Some(value) = current.and_then(|fields| fields.get(name))
        {
            event.fields.insert(name.clone(), value.clone());
        }
    }
    event
}

fn append(state: &mut State, channel: &str, mut stored: Stored) -> Result<u64, EmulatorError> {
    let replay = state.last_replay + 1;
    let topic = state
        .topics
        .get_mut(channel)
        .ok_or_else(|| EmulatorError::UnknownChannel(channel.to_owned()))?;
    stored.replay = replay;
    topic.log.push(stored);
    state.last_replay = replay;
    Ok(replay)
}
