//! Connections to Redis with production settings: one server by URL, the primary of a Sentinel-managed set
//! (following failovers), or a Redis Cluster; ACL users and passwords, TLS (optionally against a private CA),
//! connect and command timeouts. Also the PING readiness checks.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use redis::RedisFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};

use crate::config::{LoadedConfig, RedisEndpoint, Topology};
pub use crate::config::{has_hash_tag, redact_url};

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
    #[error("cannot connect to Redis: {0} is not a usable address")]
    Config(String),
    #[error("cannot read the Redis CA file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
}

/// A Redis client for a single-server `endpoint`, with its TLS settings.
pub fn client(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<redis::Client, ConnectError> {
    let Ok(Topology::Server(url)) = endpoint.topology() else {
        return Err(ConnectError::Config(endpoint.describe()));
    };
    let url = url.expose();
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
    let Some(path) = endpoint.tls.as_ref().and_then(|tls| tls.ca_file.as_ref()) else {
        return Ok(None);
    };
    let path = loaded.resolve(path);
    std::fs::read(&path)
        .map(Some)
        .map_err(|source| ConnectError::CaFile { path, source })
}

/// A connection to Redis as the config names it: one server, the primary a set of sentinels names, or a Cluster.
/// Cheap to clone (clones share the connection); reconnects by itself; every store and sink takes one.
#[derive(Clone)]
pub enum Conn {
    Server(ConnectionManager),
    Sentinel(Arc<SentinelPrimary>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Server(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
            Conn::Sentinel(primary) => Box::pin(async move {
                let (generation, mut conn) = primary.current();
                let result = conn.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    primary.after_error(generation, e).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Server(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(primary) => Box::pin(async move {
                let (generation, mut conn) = primary.current();
                let result = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &result {
                    primary.after_error(generation, e).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
            Conn::Sentinel(primary) => primary.current().1.get_db(),
        }
    }
}

impl Conn {
    /// The keys matching `pattern`, by SCAN (never KEYS) in batches of about `count`: see [`Scan::next_batch`].
    /// On a Cluster SCAN sees one node's keys, so every primary is walked in turn.
    pub async fn scan(&self, pattern: &str, count: usize) -> redis::RedisResult<Scan> {
        let nodes = match self {
            Conn::Cluster(cluster) => primaries(cluster).await?.into_iter().map(Some).collect(),
            _ => vec![None],
        };
        Ok(Scan {
            conn: self.clone(),
            pattern: pattern.to_owned(),
            count,
            nodes,
            cursor: 0,
        })
    }
}

/// A SCAN in progress (see [`Conn::scan`]).
pub struct Scan {
    conn: Conn,
    pattern: String,
    count: usize,
    /// The nodes still to walk, the current one first (`None`: the one server or primary).
    nodes: Vec<Option<(String, u16)>>,
    cursor: u64,
}

impl Scan {
    /// The next non-empty batch of keys, or `None` once every node is walked.
    pub async fn next_batch(&mut self) -> redis::RedisResult<Option<Vec<String>>> {
        while let Some(node) = self.nodes.first().cloned() {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(self.cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(self.count);
            let (next, found): (u64, Vec<String>) = match (&mut self.conn, node) {
                (Conn::Cluster(cluster), Some((host, port))) => {
                    let at = SingleNodeRoutingInfo::ByAddress { host, port };
                    let reply = cluster.route_command(cmd, RoutingInfo::SingleNode(at)).await?;
                    redis::from_redis_value(reply)?
                }
                (conn, _) => cmd.query_async(conn).await?,
            };
            if next == 0 {
                self.nodes.remove(0);
            }
            self.cursor = next;
            if !found.is_empty() {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// The primaries of a Cluster (`host`, `port`), from `CLUSTER NODES`.
async fn primaries(cluster: &ClusterConnection) -> redis::RedisResult<Vec<(String, u16)>> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut cluster.clone())
        .await?;
    Ok(nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            // `host:port@cport[,hostname]`
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect())
}

/// Whether `err` means the connection no longer reaches a writable primary: the server is gone (refused, reset,
/// timed out) or it answers as a replica (`READONLY`) or as a primary that lost its replicas' quorum.
pub fn lost_primary(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_timeout()
        || matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "NOREPLICAS"))
}

/// The primary of a Sentinel-managed Redis: a connection to the server the sentinels name, replaced by one to the
/// new primary when a command finds the old one gone or turned replica. The failed command's error is returned as
/// it is (transient to delivery, so retried); the retry goes to the primary found meanwhile.
pub struct SentinelPrimary {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<(u64, ConnectionManager)>,
    manager: ConnectionManagerConfig,
    connect_timeout: Duration,
    /// `sentinel master `name` via …`, for messages.
    describe: String,
    /// When the sentinels were last asked: at most every [`REDISCOVER_EVERY`].
    asked: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a failing connection may ask the sentinels again (they need some seconds to elect a new primary).
const REDISCOVER_EVERY: Duration = Duration::from_millis(250);

impl SentinelPrimary {
    fn current(&self) -> (u64, ConnectionManager) {
        self.current
            .lock()
            .expect("the sentinel connection lock is never poisoned")
            .clone()
    }

    /// Asks the sentinels for the primary and connects to it (within the connect timeout).
    async fn discover(
        sentinel: &mut SentinelClient,
        manager: &ConnectionManagerConfig,
        connect_timeout: Duration,
    ) -> Result<(String, ConnectionManager), redis::RedisError> {
        let ask = async {
            let client = sentinel.async_get_client().await?;
            let addr = client.get_connection_info().addr().to_string();
            let conn = ConnectionManager::new_with_config(client, manager.clone()).await?;
            Ok::<_, redis::RedisError>((addr, conn))
        };
        match tokio::time::timeout(connect_timeout, ask).await {
            Ok(found) => found,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no primary within connect_timeout_ms",
            ))),
        }
    }

    /// After `err` on the connection of `generation`: when it means the primary is lost, asks the sentinels which
    /// server is the primary now and moves there (one caller at a time; the others use what it found).
    async fn after_error(&self, generation: u64, err: &redis::RedisError) {
        if !lost_primary(err) {
            return;
        }
        let mut sentinel = self.sentinel.lock().await;
        if self.current().0 != generation {
            return;
        }
        {
            let mut asked = self.asked.lock().expect("never poisoned");
            if asked.is_some_and(|at| at.elapsed() < REDISCOVER_EVERY) {
                return;
            }
            *asked = Some(std::time::Instant::now());
        }
        match Self::discover(&mut sentinel, &self.manager, self.connect_timeout).await {
            Ok((addr, conn)) => {
                let mut current = self.current.lock().expect("never poisoned");
                *current = (current.0 + 1, conn);
                tracing::warn!(redis = %self.describe, primary = %addr, error = %redact_url(&err.to_string()),
                    "The Redis primary was lost; the sentinels name this one now, and commands go there.");
            }
            Err(e) => tracing::warn!(redis = %self.describe, error = %redact_url(&e.to_string()),
                "The Redis primary was lost and the sentinels name no reachable primary yet; asking again with the next command."),
        }
    }
}

/// Connects (within `connect_timeout_ms`) and returns a self-reconnecting connection whose commands time
/// out after `command_timeout_ms`: to the one server of a `url`, to the primary the `sentinels` name (following
/// failovers), or to a `cluster`.
pub async fn connect(loaded: &LoadedConfig, endpoint: &RedisEndpoint) -> Result<Conn, ConnectError> {
    let connect_timeout = Duration::from_millis(endpoint.connect_timeout_ms);
    let command_timeout = Duration::from_millis(endpoint.command_timeout_ms);
    let manager = ConnectionManagerConfig::new()
        .set_number_of_retries(RECONNECT_ATTEMPTS)
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(command_timeout));
    let failed = |source: redis::RedisError| ConnectError::Redis {
        url: endpoint.describe(),
        source,
    };
    let timed_out = || ConnectError::RedisTimeout {
        url: endpoint.describe(),
        ms: endpoint.connect_timeout_ms,
    };
    match endpoint
        .topology()
        .map_err(|_| ConnectError::Config(endpoint.describe()))?
    {
        Topology::Server(_) => {
            let client = client(loaded, endpoint)?;
            // The manager retries the first connection too; a server that never answers (or a rediss:// URL
            // against a plaintext port, whose handshake hangs) fails start-up after the connect timeout instead.
            match tokio::time::timeout(connect_timeout, ConnectionManager::new_with_config(client, manager)).await {
                Ok(Ok(conn)) => Ok(Conn::Server(conn)),
                Ok(Err(source)) => Err(failed(source)),
                Err(_) => Err(timed_out()),
            }
        }
        Topology::Sentinel { sentinels, master } => {
            let mut sentinel = sentinel_client(endpoint, sentinels, master, root_cert(loaded, endpoint)?)?;
            let (addr, conn) = SentinelPrimary::discover(&mut sentinel, &manager, connect_timeout)
                .await
                .map_err(failed)?;
            tracing::info!(redis = %endpoint.describe(), primary = %addr, "Connected to the Redis primary the sentinels name.");
            Ok(Conn::Sentinel(Arc::new(SentinelPrimary {
                sentinel: tokio::sync::Mutex::new(sentinel),
                current: std::sync::Mutex::new((0, conn)),
                manager,
                connect_timeout,
                describe: endpoint.describe(),
                asked: std::sync::Mutex::new(None),
            })))
        }
        Topology::Cluster(nodes) => {
            let tls = endpoint.tls.is_some();
            let urls = nodes
                .iter()
                .map(|node| format!("{}://{node}", if tls { "rediss" } else { "redis" }));
            let mut builder = redis::cluster::ClusterClient::builder(urls)
                .retries(RECONNECT_ATTEMPTS as u32)
                .connection_timeout(connect_timeout)
                .response_timeout(command_timeout);
            if let Some(user) = &endpoint.username {
                builder = builder.username(user);
            }
            if let Some(password) = &endpoint.password {
                builder = builder.password(password.expose());
            }
            if tls {
                builder = builder.tls(redis::TlsMode::Secure);
            }
            if let Some(pem) = root_cert(loaded, endpoint)? {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                });
            }
            let client = builder.build().map_err(failed)?;
            match tokio::time::timeout(connect_timeout, client.get_async_connection()).await {
                Ok(Ok(conn)) => Ok(Conn::Cluster(conn)),
                Ok(Err(source)) => Err(failed(source)),
                Err(_) => Err(timed_out()),
            }
        }
    }
}

/// The address of the primary the sentinels of `endpoint` name now (for a client that manages its own
/// connection, such as BullMQ's): `(host, port)`. `root_cert` is the PEM of `tls.ca_file` (see [`root_cert`]).
pub async fn sentinel_primary(
    endpoint: &RedisEndpoint,
    root_cert: Option<Vec<u8>>,
) -> Result<(String, u16), ConnectError> {
    let Ok(Topology::Sentinel { sentinels, master }) = endpoint.topology() else {
        return Err(ConnectError::Config(endpoint.describe()));
    };
    let mut sentinel = sentinel_client(endpoint, sentinels, master, root_cert)?;
    let ask = sentinel.async_get_client();
    let client = match tokio::time::timeout(Duration::from_millis(endpoint.connect_timeout_ms), ask).await {
        Ok(Ok(client)) => client,
        Ok(Err(source)) => {
            return Err(ConnectError::Redis {
                url: endpoint.describe(),
                source,
            });
        }
        Err(_) => {
            return Err(ConnectError::RedisTimeout {
                url: endpoint.describe(),
                ms: endpoint.connect_timeout_ms,
            });
        }
    };
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. } => {
            Ok((host.clone(), *port))
        }
        other => Err(ConnectError::Config(format!(
            "{} (the sentinels name {other})",
            endpoint.describe()
        ))),
    }
}

/// A client of `endpoint`'s sentinels, its TLS checked against `root_cert` (the PEM of `tls.ca_file`) when given.
fn sentinel_client(
    endpoint: &RedisEndpoint,
    sentinels: &[String],
    master: &str,
    root_cert: Option<Vec<u8>>,
) -> Result<SentinelClient, ConnectError> {
    let addrs = sentinels.iter().filter_map(|node| {
        let (host, port) = node.rsplit_once(':')?;
        Some(redis::ConnectionAddr::Tcp(host.to_owned(), port.parse().ok()?))
    });
    let failed = |source: redis::RedisError| ConnectError::Redis {
        url: endpoint.describe(),
        source,
    };
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master).map_err(failed)?;
    if endpoint.db != 0 {
        builder = builder.set_client_to_redis_db(endpoint.db);
    }
    if let Some(user) = &endpoint.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &endpoint.password {
        builder = builder.set_client_to_redis_password(password.expose());
    }
    if let Some(user) = &endpoint.sentinel_username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &endpoint.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password.expose());
    }
    if endpoint.tls.is_some() {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(pem) = root_cert {
            let certs = || redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            builder = builder
                .set_client_to_redis_certificates(certs())
                .set_client_to_sentinel_certificates(certs());
        }
    }
    builder.build().map_err(failed)
}

/// One Redis server `/readyz` PINGs.
#[derive(Clone)]
pub struct RedisCheck {
    /// What uses it: `redis` (the main one) or `sink <name>`.
    pub name: String,
    /// Its URL with the password masked.
    pub url: String,
    conn: Conn,
    timeout: Duration,
}

impl RedisCheck {
    pub fn new(name: impl Into<String>, endpoint: &RedisEndpoint, conn: Conn) -> Self {
        RedisCheck {
            name: name.into(),
            url: endpoint.describe(),
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

#[cfg(test)]
mod tests {
    #[test]
    fn hash_tags_are_found_as_redis_cluster_reads_them() {
        assert!(super::has_hash_tag("{switchyard}:"));
        assert!(super::has_hash_tag("{bull}"));
        assert!(super::has_hash_tag("app:{orders}:"));
        assert!(!super::has_hash_tag("switchyard:"));
        assert!(!super::has_hash_tag("{}switchyard:"));
        assert!(!super::has_hash_tag("switchyard{:"));
    }

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
