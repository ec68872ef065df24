//! The Salesforce side of the config: how to authenticate (shared by gRPC and REST), the REST enricher's limits,
//! and the Pub/Sub source's flow control, replay and reconnect settings.
//!
//! Every connection setting is usually `${SF_...}` in the file (see `examples/salesforce.yaml`); an empty value
//! (`${SF_JWT_KEY_FILE:-}`) counts as not set, so one file serves every auth flow.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::Secret;

/// The Pub/Sub API endpoint every sample uses; port 443 also works where 7443 is blocked.
pub const DEFAULT_PUBSUB_ENDPOINT: &str = "https://api.pubsub.salesforce.com:7443";
/// The REST API version when none is configured.
pub const DEFAULT_API_VERSION: &str = "62.0";
/// Salesforce caps outstanding requested events at 100 per subscription, across all FetchRequests.
pub const MAX_BATCH_SIZE: u32 = 100;

/// How switchyard authenticates to Salesforce. One token serves the Pub/Sub gRPC calls and the REST reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// The OAuth flow. `auto` picks `access-token` when `access_token` is set, `jwt-bearer` when `jwt_key_file`
    /// is set, else `client-credentials`.
    #[serde(default)]
    #[schemars(example = &"auto")]
    pub auth: AuthFlow,
    /// Where tokens come from: the org's My Domain URL for client credentials (login.salesforce.com refuses that
    /// flow), `https://login.salesforce.com` or `https://test.salesforce.com` for JWT bearer.
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"https://mycompany.my.salesforce.com")]
    pub login_url: Option<String>,
    /// The connected app's consumer key (client credentials, JWT bearer).
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"${SF_CLIENT_ID:-}")]
    pub client_id: Option<String>,
    /// The connected app's consumer secret (client credentials). Never logged.
    #[serde(default, deserialize_with = "non_empty_secret")]
    #[schemars(with = "Option<String>", example = &"${SF_CLIENT_SECRET:-}")]
    pub client_secret: Option<Secret>,
    /// The user a JWT bearer token is issued for (the `sub` claim).
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"integration@mycompany.com")]
    pub username: Option<String>,
    /// PEM file with the RSA private key whose certificate is uploaded to the connected app (JWT bearer).
    /// Relative paths resolve against the config file's folder.
    #[serde(default, deserialize_with = "non_empty_path")]
    #[schemars(example = &"/etc/switchyard/jwt.key")]
    pub jwt_key_file: Option<PathBuf>,
    /// The JWT `aud` claim. Default: `login_url`.
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"https://login.salesforce.com")]
    pub jwt_audience: Option<String>,
    /// A ready access token (`access-token` flow). It cannot be renewed: when Salesforce rejects it, the channel
    /// stops with a clear error. Never logged.
    #[serde(default, deserialize_with = "non_empty_secret")]
    #[schemars(with = "Option<String>", example = &"${SF_ACCESS_TOKEN:-}")]
    pub access_token: Option<Secret>,
    /// The instance URL (`https://mycompany.my.salesforce.com`). Required with `access-token`; the OAuth flows
    /// take it from the token response.
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"https://mycompany.my.salesforce.com")]
    pub instance_url: Option<String>,
    /// The org id (`tenantid` header). Default: from the token's identity URL, else from
    /// `/services/oauth2/userinfo`.
    #[serde(default, deserialize_with = "non_empty")]
    #[schemars(example = &"00Dxx0000000001AAA")]
    pub tenant_id: Option<String>,
    /// The REST API version (`62.0`).
    #[serde(default = "default_api_version", deserialize_with = "api_version")]
    #[schemars(example = &"62.0")]
    pub api_version: String,
    /// Limits of the REST enricher.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"timeout_ms": 10000, "concurrency": 8, "attempts": 4}))]
    pub rest: RestConfig,
    /// The client name sent with every write-back (`salesforce-update`) as `Sforce-Call-Options: client=<name>`.
    /// Salesforce puts it in the `changeOrigin` of the change event the write causes, which is how the shipped
    /// rules' loop guard (`ignored_change_origins`) tells switchyard's own writes apart.
    #[serde(default = "default_call_options_client")]
    #[schemars(example = &"switchyard-provisioning")]
    pub call_options_client: String,
}

fn default_call_options_client() -> String {
    "switchyard-provisioning".into()
}

/// The OAuth flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthFlow {
    /// Chosen from the settings present (see `auth`).
    #[default]
    Auto,
    /// OAuth client credentials against the My Domain URL.
    ClientCredentials,
    /// OAuth JWT bearer: an RS256 assertion signed with `jwt_key_file`.
    JwtBearer,
    /// A static `access_token` with `instance_url` (and `tenant_id`).
    AccessToken,
}

impl AuthFlow {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFlow::Auto => "auto",
            AuthFlow::ClientCredentials => "client-credentials",
            AuthFlow::JwtBearer => "jwt-bearer",
            AuthFlow::AccessToken => "access-token",
        }
    }
}

/// Limits of the REST enricher.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestConfig {
    /// Time allowed for one read, in milliseconds.
    #[serde(default = "default_rest_timeout")]
    #[schemars(example = 10000)]
    pub timeout_ms: u64,
    /// Reads in flight at once, over all events.
    #[serde(default = "default_rest_concurrency")]
    #[schemars(example = 8)]
    pub concurrency: usize,
    /// Tries per read (timeouts, 5xx and 429 are retried with backoff); then the route fails (dead letter).
    #[serde(default = "default_rest_attempts")]
    #[schemars(example = 4)]
    pub attempts: u32,
    /// First retry pause in milliseconds; doubles up to 5 s, with jitter.
    #[serde(default = "default_rest_backoff")]
    #[schemars(example = 200)]
    pub initial_backoff_ms: u64,
}

impl Default for RestConfig {
    fn default() -> Self {
        Self {
            timeout_ms: default_rest_timeout(),
            concurrency: default_rest_concurrency(),
            attempts: default_rest_attempts(),
            initial_backoff_ms: default_rest_backoff(),
        }
    }
}

fn default_api_version() -> String {
    DEFAULT_API_VERSION.into()
}
fn default_rest_timeout() -> u64 {
    10_000
}
fn default_rest_concurrency() -> usize {
    8
}
fn default_rest_attempts() -> u32 {
    4
}
fn default_rest_backoff() -> u64 {
    200
}

/// The Pub/Sub source: endpoint, flow control, replay positions, reconnects and the watchdog.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PubsubConfig {
    /// The gRPC endpoint: `https://host:port` (TLS, public CAs) or `http://host:port` (loopback tests).
    #[serde(default = "default_endpoint", deserialize_with = "endpoint")]
    #[schemars(example = &"${SF_PUBSUB_ENDPOINT:-https://api.pubsub.salesforce.com:7443}")]
    pub endpoint: String,
    /// Subscribe at all. `false` (`SF_EVENTS_ENABLED=false`) keeps the service up (health, reload) with no
    /// subscription.
    #[serde(default = "default_true", deserialize_with = "flag")]
    #[schemars(with = "bool", example = &"${SF_EVENTS_ENABLED:-true}")]
    pub enabled: bool,
    /// Events requested per FetchRequest and the most ever outstanding (Salesforce caps it at 100).
    #[serde(default = "default_batch_size")]
    #[schemars(example = 100)]
    pub batch_size: u32,
    /// Where a subscription starts.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"start": "stored", "fallback": "latest", "on_invalid": "earliest"}))]
    pub replay: ReplayConfig,
    /// Resubscribe when nothing (not even a keepalive) arrived for this long while events were requested.
    /// Salesforce sends a keepalive within 270 s, in practice about every 60 s.
    #[serde(default = "default_watchdog")]
    #[schemars(example = 300000)]
    pub watchdog_ms: u64,
    /// First pause before a resubscribe after an error; doubles up to `max_backoff_ms`, with jitter. Reset by
    /// the first response of a new stream.
    #[serde(default = "default_reconnect_initial")]
    #[schemars(example = 1000)]
    pub initial_backoff_ms: u64,
    /// Longest pause between resubscribes.
    #[serde(default = "default_reconnect_max")]
    #[schemars(example = 60000)]
    pub max_backoff_ms: u64,
    /// Warn (and show in metrics) when the stored position is older than this: Salesforce keeps events 72 hours,
    /// a position older than that cannot be resumed.
    #[serde(default = "default_age_warning")]
    #[schemars(example = 48)]
    pub position_age_warning_hours: u64,
    /// Managed subscriptions: channel (alias or name) -> the `DeveloperName` of its `ManagedEventSubscription`. Such a
    /// channel is read with ManagedSubscribe: Salesforce keeps its position, switchyard commits a replay id
    /// (CommitReplayRequest) once every event up to it has settled, and a restart resumes where the server says.
    /// The subscription's own `defaultReplay` and `errorRecoveryReplay` apply, not `replay`.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"orders": "Switchyard_Orders"}))]
    pub subscriptions: std::collections::BTreeMap<String, String>,
}

impl Default for PubsubConfig {
    fn default() -> Self {
        Self {
            endpoint: default_endpoint(),
            enabled: true,
            batch_size: default_batch_size(),
            replay: ReplayConfig::default(),
            watchdog_ms: default_watchdog(),
            initial_backoff_ms: default_reconnect_initial(),
            max_backoff_ms: default_reconnect_max(),
            position_age_warning_hours: default_age_warning(),
            subscriptions: Default::default(),
        }
    }
}

/// Where a subscription starts, and what happens when its stored position is refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// `stored` (resume after the last settled event), `latest` (new events only) or `earliest` (everything
    /// retained, up to 72 hours).
    #[serde(default)]
    #[schemars(example = &"stored")]
    pub start: ReplayStart,
    /// With `start: stored` and nothing stored yet: `latest` or `earliest`.
    #[serde(default)]
    #[schemars(example = &"latest")]
    pub fallback: ReplayPreset,
    /// When Salesforce refuses the stored position (`replayid.corrupted`, e.g. older than 72 hours): `earliest`
    /// (reprocess what is retained; idempotency keys prevent duplicate jobs) or `latest` (accept a gap).
    #[serde(default = "default_on_invalid")]
    #[schemars(example = &"earliest")]
    pub on_invalid: ReplayPreset,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayStart {
    /// After the stored position; `fallback` when there is none.
    #[default]
    Stored,
    /// New events only.
    Latest,
    /// Every retained event.
    Earliest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayPreset {
    /// The tip of the stream.
    #[default]
    Latest,
    /// The oldest retained event.
    Earliest,
}

fn default_on_invalid() -> ReplayPreset {
    ReplayPreset::Earliest
}
fn default_endpoint() -> String {
    DEFAULT_PUBSUB_ENDPOINT.into()
}
fn default_true() -> bool {
    true
}
fn default_batch_size() -> u32 {
    MAX_BATCH_SIZE
}
fn default_watchdog() -> u64 {
    300_000
}
fn default_reconnect_initial() -> u64 {
    1_000
}
fn default_reconnect_max() -> u64 {
    60_000
}
fn default_age_warning() -> u64 {
    48
}

/// An empty string (an unset `${VAR:-}`) is no value.
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
}

pub(crate) fn non_empty_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(non_empty(d)?.map(Secret::new))
}

fn non_empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(non_empty(d)?.map(PathBuf::from))
}

fn api_version<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    // `62`, `62.0` (a YAML number) and `v62.0` are common spellings of the same version.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Version {
        Number(f64),
        Text(String),
    }
    let value = match Option::<Version>::deserialize(d)? {
        Some(Version::Number(n)) => format!("{n:.1}"),
        Some(Version::Text(t)) if !t.trim().is_empty() => t.trim().to_string(),
        _ => default_api_version(),
    };
    let value = value.trim_start_matches(['v', 'V']).to_string();
    Ok(if value.contains('.') {
        value
    } else {
        format!("{value}.0")
    })
}

fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(non_empty(d)?.unwrap_or_else(default_endpoint))
}

/// `true`/`false` as YAML booleans or as strings (`${SF_EVENTS_ENABLED:-true}` substitutes text).
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "expected true or false, found `{other}`"
            ))),
        },
    }
}

impl SalesforceConfig {
    /// The flow `auth` names, or the one `auto` picks; an error names the settings that are missing.
    pub fn flow(&self) -> Result<AuthFlow, String> {
        let flow = match self.auth {
            AuthFlow::Auto if self.access_token.is_some() => AuthFlow::AccessToken,
            AuthFlow::Auto if self.jwt_key_file.is_some() => AuthFlow::JwtBearer,
            AuthFlow::Auto if self.client_id.is_some() || self.client_secret.is_some() => AuthFlow::ClientCredentials,
            AuthFlow::Auto => {
                return Err("`salesforce` has no credentials: set `access_token` + `instance_url` \
                    (SF_ACCESS_TOKEN, SF_INSTANCE_URL), `client_id` + `client_secret` + `login_url` (SF_CLIENT_ID, \
                    SF_CLIENT_SECRET, SF_LOGIN_URL), or `client_id` + `username` + `jwt_key_file` + `login_url` \
                    (SF_CLIENT_ID, SF_USERNAME, SF_JWT_KEY_FILE, SF_LOGIN_URL)"
                    .into());
            }
            other => other,
        };
        let missing: Vec<&str> = match flow {
            AuthFlow::ClientCredentials => [
                ("login_url (SF_LOGIN_URL, the My Domain URL)", self.login_url.is_none()),
                ("client_id (SF_CLIENT_ID)", self.client_id.is_none()),
                ("client_secret (SF_CLIENT_SECRET)", self.client_secret.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect(),
            AuthFlow::JwtBearer => [
                ("login_url (SF_LOGIN_URL)", self.login_url.is_none()),
                ("client_id (SF_CLIENT_ID)", self.client_id.is_none()),
                ("username (SF_USERNAME)", self.username.is_none()),
                ("jwt_key_file (SF_JWT_KEY_FILE)", self.jwt_key_file.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect(),
            AuthFlow::AccessToken => [
                ("access_token (SF_ACCESS_TOKEN)", self.access_token.is_none()),
                ("instance_url (SF_INSTANCE_URL)", self.instance_url.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect(),
            AuthFlow::Auto => unreachable!("resolved above"),
        };
        if missing.is_empty() {
            Ok(flow)
        } else {
            Err(format!(
                "`salesforce.auth: {}` needs {}",
                flow.as_str(),
                missing.join(", ")
            ))
        }
    }
}
