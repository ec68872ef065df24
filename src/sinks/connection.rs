//! Connections to Redis with production settings: ACL user and password in the URL, `rediss://` TLS
//! (optionally against a private CA), connect and command timeouts. Also the PING readiness checks.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{BuildError, redact_url};
use crate::config::{LoadedConfig, RedisEndpoint};

/// Reconnection attempts per cycle after a connection drops: the manager starts a new cycle on the next
/// command after a cycle is exhausted, so this bounds one cycle's length, not recovery.
const RECONNECT_ATTEMPTS: usize = 6;

/// A Redis client for `endpoint`, with its TLS settings.
pub fn client(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<redis::Client, BuildError> {
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
    built.map_err(|source| BuildError::Redis {
        url: redact_url(url),
        source,
    })
}

/// The PEM of `tls.ca_file`, when the endpoint names one.
pub fn root_cert(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<Option<Vec<u8>>, BuildError> {
    let Some(tls) = &endpoint.tls else {
        return Ok(None);
    };
    let path = loaded.resolve(&tls.ca_file);
    std::fs::read(&path)
        .map(Some)
        .map_err(|source| BuildError::CaFile { path, source })
}

/// Connects (within `connect_timeout_ms`) and returns a self-reconnecting connection whose commands time
/// out after `command_timeout_ms`.
pub async fn connect(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<ConnectionManager, BuildError> {
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
        Ok(Err(source)) => Err(BuildError::Redis {
            url: redact_url(endpoint.url.expose()),
            source,
        }),
        Err(_) => Err(BuildError::RedisTimeout {
            url: redact_url(endpoint.url.expose()),
            ms: endpoint.connect_timeout_ms,
        }),
    }
}

/// The BullMQ connection options for `endpoint` (URL with credentials, private CA).
pub fn bullmq_options(
    loaded: &LoadedConfig,
    endpoint: &RedisEndpoint,
) -> Result<bullmq::options::RedisConnectionOptions, BuildError> {
    let mut options = bullmq::options::RedisConnectionOptions::new().url(endpoint.url.expose());
    if let Some(pem) = root_cert(loaded, endpoint)? {
        options = options.tls_certs(bullmq::options::TlsCerts {
            root_cert: Some(pem),
            client_cert: None,
            client_key: None,
        });
    }
    Ok(options)
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
