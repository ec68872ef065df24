//! The `redis` section and the Redis endpoints of sinks: URL (with ACL user and password), TLS, timeouts.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Secret;

/// The main Redis: idempotency markers, dead letters, positions, and every sink without its own `redis`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL: `redis://[user:password@]host:port/db`, or `rediss://` for TLS. An ACL user goes before the
    /// password (`redis://switchyard:${REDIS_PASSWORD}@redis:6379/0`). Its password never appears in logs or
    /// errors.
    #[schemars(with = "String", example = &"redis://127.0.0.1:6379")]
    pub url: Secret,
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
    /// Redis URL (`redis://`, or `rediss://` for TLS; `user:password@` for an ACL user).
    #[schemars(with = "String", example = &"rediss://cache:${CACHE_REDIS_PASSWORD}@cache.internal:6380")]
    pub url: Secret,
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

/// TLS for Redis (`rediss://`): the server certificate is checked against the system's public CAs, or
/// against `ca_file` when it is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// A PEM file of the CA that signed the server certificate (relative to the config file).
    #[schemars(example = &"/etc/switchyard/redis-ca.pem")]
    pub ca_file: PathBuf,
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
