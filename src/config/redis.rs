//! The `redis` section and the Redis endpoints of sinks: URL (with ACL user and password), TLS, timeouts.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Secret;

/// The main Redis: idempotency markers, dead letters, positions, and every sink without its own `redis`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL of a single server: `redis://[user:password@]host:port/db`, or `rediss://` for TLS. An ACL user
    /// goes before the password (`redis://switchyard:${REDIS_PASSWORD}@redis:6379/0`). Its password never appears
    /// in logs or errors. Give `url`, or `sentinels` and `master`, or `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"redis://127.0.0.1:6379")]
    pub url: Option<Secret>,
    /// Redis Sentinel: the sentinels (`host:port`) that know which server is the primary of `master` now. On a
    /// failover switchyard asks them again and moves to the new primary; it never writes to a replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(example = serde_json::json!(["sentinel-0:26379", "sentinel-1:26379", "sentinel-2:26379"]))]
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under (`sentinel monitor NAME …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"mymaster")]
    pub master: Option<String>,
    /// Redis Cluster: seed nodes (`host:port`); the others are found from them. Keys switchyard writes carry a hash
    /// tag (see README, "Deploying": the key layout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(example = serde_json::json!(["redis-0:6379", "redis-1:6379", "redis-2:6379"]))]
    pub cluster: Vec<String>,
    /// ACL user of the data nodes (with `sentinels` or `cluster`; a `url` carries its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"switchyard")]
    pub username: Option<String>,
    /// Password of the data nodes (with `sentinels` or `cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"${REDIS_PASSWORD}")]
    pub password: Option<Secret>,
    /// ACL user of the sentinels, when they require one (often not the data nodes' user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"sentinel-user")]
    pub sentinel_username: Option<String>,
    /// Password of the sentinels (`requirepass` / ACL of the sentinel processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"${SENTINEL_PASSWORD}")]
    pub sentinel_password: Option<Secret>,
    /// Database number on the primary (with `sentinels`; a Cluster has only database 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(example = 0)]
    pub db: i64,
    /// Prefix of the keys switchyard itself writes (idempotency markers, dead letters, positions). Sink keys
    /// are rendered by the rules.
    #[serde(default = "default_key_prefix")]
    #[schemars(example = &"switchyard:")]
    pub key_prefix: String,
    /// How long one connection attempt may take (TCP, TLS handshake, AUTH) before it counts as failed.
    #[serde(default = "default_redis_connect_timeout_ms")]
    #[schemars(example = 5000)]
    pub connect_timeout_ms: u64,
    /// How long one command may wait for its reply; past it the call fails as transient and is retried.
    #[serde(default = "default_redis_command_timeout_ms")]
    #[schemars(example = 5000)]
    pub command_timeout_ms: u64,
    /// TLS settings for a `rediss://` URL whose server certificate is not signed by a public CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"ca_file": "/etc/switchyard/redis-ca.pem"}))]
    pub tls: Option<RedisTls>,
}

impl RedisConfig {
    /// The server this section names.
    pub fn endpoint(&self) -> RedisEndpoint {
        RedisEndpoint {
            url: self.url.clone(),
            sentinels: self.sentinels.clone(),
            master: self.master.clone(),
            cluster: self.cluster.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            sentinel_username: self.sentinel_username.clone(),
            sentinel_password: self.sentinel_password.clone(),
            db: self.db,
            connect_timeout_ms: self.connect_timeout_ms,
            command_timeout_ms: self.command_timeout_ms,
            tls: self.tls.clone(),
        }
    }
}

/// A Redis server of its own for one sink (BullMQ needs `maxmemory-policy noeviction`; a cache usually
/// runs with an evicting policy, so the two often live on different servers).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisEndpoint {
    /// Redis URL of a single server (`redis://`, or `rediss://` for TLS; `user:password@` for an ACL user). Give
    /// `url`, or `sentinels` and `master`, or `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"rediss://cache:${CACHE_REDIS_PASSWORD}@cache.internal:6380")]
    pub url: Option<Secret>,
    /// Redis Sentinel: the sentinels (`host:port`) that know which server is the primary of `master` now. On a
    /// failover switchyard asks them again and moves to the new primary; it never writes to a replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(example = serde_json::json!(["sentinel-0:26379", "sentinel-1:26379", "sentinel-2:26379"]))]
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under (`sentinel monitor NAME …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"mymaster")]
    pub master: Option<String>,
    /// Redis Cluster: seed nodes (`host:port`); the others are found from them. Keys switchyard writes carry a hash
    /// tag (see README, "Deploying": the key layout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(example = serde_json::json!(["redis-0:6379", "redis-1:6379", "redis-2:6379"]))]
    pub cluster: Vec<String>,
    /// ACL user of the data nodes (with `sentinels` or `cluster`; a `url` carries its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"switchyard")]
    pub username: Option<String>,
    /// Password of the data nodes (with `sentinels` or `cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"${REDIS_PASSWORD}")]
    pub password: Option<Secret>,
    /// ACL user of the sentinels, when they require one (often not the data nodes' user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"sentinel-user")]
    pub sentinel_username: Option<String>,
    /// Password of the sentinels (`requirepass` / ACL of the sentinel processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", example = &"${SENTINEL_PASSWORD}")]
    pub sentinel_password: Option<Secret>,
    /// Database number on the primary (with `sentinels`; a Cluster has only database 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(example = 0)]
    pub db: i64,
    /// How long one connection attempt may take.
    #[serde(default = "default_redis_connect_timeout_ms")]
    #[schemars(example = 5000)]
    pub connect_timeout_ms: u64,
    /// How long one command may wait for its reply.
    #[serde(default = "default_redis_command_timeout_ms")]
    #[schemars(example = 5000)]
    pub command_timeout_ms: u64,
    /// TLS settings for a `rediss://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"ca_file": "/etc/switchyard/redis-ca.pem"}))]
    pub tls: Option<RedisTls>,
}

/// TLS for Redis: with a `rediss://` URL, the server certificate is checked against the system's public CAs, or
/// against `ca_file` when it is set. With `sentinels` or `cluster`, this section turns TLS on (to the sentinels
/// and the data nodes alike).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// A PEM file of the CA that signed the server certificate (relative to the config file); the public CAs
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = &"/etc/switchyard/redis-ca.pem")]
    pub ca_file: Option<PathBuf>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn default_redis_connect_timeout_ms() -> u64 {
    5_000
}

fn default_redis_command_timeout_ms() -> u64 {
    5_000
}

fn default_key_prefix() -> String {
    "switchyard:".into()
}

/// How an endpoint reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology<'a> {
    /// One server by URL.
    Server(&'a Secret),
    /// The primary of `master`, as the sentinels say.
    Sentinel { sentinels: &'a [String], master: &'a str },
    /// A Redis Cluster from its seed nodes.
    Cluster(&'a [String]),
}

impl RedisEndpoint {
    /// Which of `url`, `sentinels` + `master` or `cluster` this endpoint names, or why it names none (or several).
    pub fn topology(&self) -> Result<Topology<'_>, String> {
        let named = [self.url.is_some(), !self.sentinels.is_empty(), !self.cluster.is_empty()];
        match (named, &self.url, self.master.as_deref()) {
            ([true, false, false], Some(url), None) => Ok(Topology::Server(url)),
            ([true, false, false], Some(_), Some(_)) => {
                Err("`master` goes with `sentinels`; a `url` names one server".into())
            }
            ([false, true, false], _, Some(master)) => Ok(Topology::Sentinel {
                sentinels: &self.sentinels,
                master,
            }),
            ([false, true, false], _, None) => {
                Err("`sentinels` needs `master`: the name the sentinels monitor the primary under".into())
            }
            ([false, false, true], _, None) => Ok(Topology::Cluster(&self.cluster)),
            ([false, false, true], _, Some(_)) => Err("`master` goes with `sentinels`, not `cluster`".into()),
            ([false, false, false], _, _) => {
                Err("give `url` (one server), `sentinels` and `master` (Sentinel) or `cluster` (Redis Cluster)".into())
            }
            _ => Err("give only one of `url`, `sentinels` or `cluster`".into()),
        }
    }

    /// Where it points, for messages and `/readyz`: the URL with its password masked, or the sentinels and master,
    /// or the cluster's seed nodes. Never a password.
    pub fn describe(&self) -> String {
        match self.topology() {
            Ok(Topology::Server(url)) => redact_url(url.expose()),
            Ok(Topology::Sentinel { sentinels, master }) => {
                format!("sentinel master `{master}` via {}", sentinels.join(","))
            }
            Ok(Topology::Cluster(nodes)) => format!("cluster {}", nodes.join(",")),
            Err(_) => "(no Redis address)".into(),
        }
    }

    /// What two endpoints share a connection on: the same address and credentials.
    pub fn identity(&self) -> String {
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned()).unwrap_or_default();
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}",
            secret(&self.url),
            self.sentinels.join(","),
            self.master.as_deref().unwrap_or_default(),
            self.cluster.join(","),
            self.username.as_deref().unwrap_or_default(),
            secret(&self.password),
            self.sentinel_username.as_deref().unwrap_or_default(),
            secret(&self.sentinel_password),
            self.db
        )
    }
}

/// Whether `key_prefix` (or a BullMQ prefix) carries a Redis Cluster hash tag, `{…}` with something inside, so that
/// every key under it lives in one slot.
pub fn has_hash_tag(prefix: &str) -> bool {
    prefix
        .find('{')
        .and_then(|open| prefix[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

/// A Redis URL with its password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!(
                "{}://{}{}{}",
                &url[..scheme],
                user,
                if userinfo.contains(':') { ":***" } else { "" },
                &url[at..]
            )
        }
        _ => url.to_string(),
    }
}
