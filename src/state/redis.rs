//! Connections to Redis with production settings: ACL user and password in the URL, `rediss://` TLS
//! (optionally against a private CA), connect and command timeouts. Also the PING readiness checks.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{LoadedConfig, RedisEndpoint};

/// Reconnection attempts per cycle after a connection drops: the manager starts a new cycle on the next
/// command after a cycle is exhausted, so this bounds one cycle's length, not recovery.
const RECONNECT_ATTEMPTS: usize = 6;

/// Why a Redis connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to Redis at {url}: {}", redact_url(&source.to_string()))]
    Redis { url: String, source: redis::RedisError },
    #[error("cannot connect to Redis at {url}: no connection within {ms} ms (connect_timeout_ms)")]
    RedisTimeout { url: String, ms: u64 },
    #[error("cannot read the Redis CA file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
}

/// A Redis client for `endpoint`, with its TLS settings.
pub fn client(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<redis::Client, ConnectError> {
    let url = endpoint.url.expose();
    let built = match root_cert(loaded, endpoint)? {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        ),
        None => redis::Client::open(url),
    };
    built.map_err(|source| ConnectError::Redis {
        url: redact_url(url),
        source,
    })
}

/// The PEM of `tls.ca_file`, when the endpoint names one.
pub fn root_cert(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<Option<Vec<u8>>, ConnectError> {
    let Some(tls) = &endpoint.tls else {
        return Ok(None);
    };
    let path = loaded.resolve(&tls.ca_file);
    std::fs::read(&path)
        .map(Some)
        .map_err(|source| ConnectError::CaFile { path, source })
}

/// Connects (within `connect_timeout_ms`) and returns a self-reconnecting connection whose commands time
/// out after `command_timeout_ms`.
pub async fn connect(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<ConnectionManager, ConnectError> {
    let client = client(loaded, endpoint)?;
    let connect_timeout = Duration::from_millis(endpoint.connect_timeout_ms);
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(RECONNECT_ATTEMPTS)
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(Duration::from_millis(endpoint.command_timeout_ms)));
    // The manager retries the first connection too; a server that never answers (or a rediss:// URL
    // against a plaintext port, whose handshake hangs) fails start-up after the connect timeout instead.
    match tokio::time::timeout(connect_timeout, ConnectionManager::new_with_config(client, config)).await {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(source)) => Err(ConnectError::Redis {
            url: redact_url(endpoint.url.expose()),
            source,
        }),
        Err(_) => Err(ConnectError::RedisTimeout {
            url: redact_url(endpoint.url.expose()),
            ms: endpoint.connect_timeout_ms,
        }),
    }
}

/// One Redis server `/readyz` PINGs.
#[derive(Clone)]
pub struct RedisCheck {
    /// What uses it: `redis` (the main one) or `sink <name>`.
    pub name: String,
    /// Its URL with the password masked.
    pub url: String,
    conn: ConnectionManager,
    timeout: Duration,
}

impl RedisCheck {
    pub fn new(name: impl Into<String>, endpoint: &RedisEndpoint, conn: ConnectionManager) -> Self {
        RedisCheck {
            name: name.into(),
            url: redact_url(endpoint.url.expose()),
            conn,
            timeout: Duration::from_millis(endpoint.command_timeout_ms),
        }
    }

    /// The check name of a sink's own Redis.
    pub fn sink_name(sink: &str) -> String {
        format!("sink {sink}")
    }

    /// PING within the command timeout; the error says why not.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(redact_url(&e.to_string())),
            Err(_) => Err(format!("no reply to PING within {} ms", self.timeout.as_millis())),
        }
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn redis_passwords_never_reach_messages() {
        assert_eq!(
            super::redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(super::redact_url("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(super::redact_url("redis://host:6379"), "redis://host:6379");
    }
}
