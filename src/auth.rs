//! Salesforce OAuth tokens, shared by the Pub/Sub gRPC calls and the REST enricher.
//!
//! One token at a time. Callers take [`Auth::credentials`]; a caller whose token was refused (gRPC
//! UNAUTHENTICATED / `service.auth.error`, REST 401) asks [`Auth::renew`] with the credentials it used. Renewal is
//! single-flight: the first caller fetches a new token while the others wait, and every caller that presents the
//! refused generation gets the same new token, so an expired token costs exactly one token request however many
//! gRPC streams and REST reads noticed it (no thundering herd).
//!
//! Flows (reference/salesforce-pubsub.md §2.3): client credentials against the My Domain URL, JWT bearer (an RS256
//! assertion), and a static access token, which cannot be renewed. The org id (`tenantid`) comes from the config,
//! else from the identity URL of the token response, else from `/services/oauth2/userinfo`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::{AuthFlow, SalesforceConfig, Secret};
use crate::obs::metrics as m;

/// A token request or userinfo call takes at most this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lifetime of a JWT bearer assertion; Salesforce's samples use five minutes.
const JWT_LIFETIME_SECS: u64 = 300;

/// A token and where to use it.
pub struct Credentials {
    pub access_token: Secret,
    /// `https://mycompany.my.salesforce.com`, without a trailing slash.
    pub instance_url: String,
    /// The org id, sent as `tenantid`.
    pub tenant_id: String,
    /// Which token this is (1, 2, ...): renewing with a stale generation returns the newer token.
    pub generation: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_token", &self.access_token)
            .field("instance_url", &self.instance_url)
            .field("tenant_id", &self.tenant_id)
            .field("generation", &self.generation)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the Salesforce settings are incomplete: {0}")]
    Config(String),
    #[error("cannot read the JWT key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the token request to {url} failed: {reason}")]
    Network { url: String, reason: String },
    #[error("Salesforce refused the token request ({status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error(
        "Salesforce rejected the static access token (SF_ACCESS_TOKEN) and it cannot be renewed: set a new one, or \
         configure client credentials or JWT bearer"
    )]
    StaticTokenRejected,
    #[error("cannot tell the org id (tenantid): {0}; set `salesforce.tenant_id` (SF_TENANT_ID)")]
    Tenant(String),
}

impl AuthError {
    /// Whether trying again later can help (network trouble, a 5xx from the token endpoint).
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Network { .. } => true,
            AuthError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

enum Flow {
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: Secret,
    },
    JwtBearer {
        token_url: String,
        client_id: String,
        username: String,
        audience: String,
        key: Box<EncodingKey>,
    },
    Static {
        access_token: Secret,
        instance_url: String,
    },
}

/// The token source. Cheap to share (`Arc<Auth>`).
pub struct Auth {
    flow: Flow,
    tenant_id: Option<String>,
    http: reqwest::Client,
    /// The current credentials. The lock is held across a token request: that is what makes renewal single-flight.
    current: Mutex<Option<Arc<Credentials>>>,
    generation: AtomicU64,
}

/// The claims of a JWT bearer assertion (reference §2.3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
    /// The identity URL `https://login.salesforce.com/id/<orgId>/<userId>`.
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct TokenError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

impl Auth {
    /// Builds the token source; reads the JWT key file, if any. No network until the first token is needed.
    pub fn new(config: &SalesforceConfig, base_dir: &std::path::Path) -> Result<Self, AuthError> {
        let flow = config.flow().map_err(AuthError::Config)?;
        let login = || {
            config
                .login_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_string())
                .ok_or_else(|| AuthError::Config("`login_url` is not set".into()))
        };
        let flow = match flow {
            AuthFlow::ClientCredentials => Flow::ClientCredentials {
                token_url: format!("{}/services/oauth2/token", login()?),
                client_id: config.client_id.clone().unwrap_or_default(),
                client_secret: config.client_secret.clone().unwrap_or_else(|| Secret::new("")),
            },
            AuthFlow::JwtBearer => {
                let path = config.jwt_key_file.clone().unwrap_or_default();
                let path = if path.is_absolute() { path } else { base_dir.join(path) };
                let pem = std::fs::read(&path).map_err(|e| AuthError::Key {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| AuthError::Key {
                    path: path.display().to_string(),
                    reason: format!("not an RSA private key in PEM form ({e})"),
                })?;
                let login = login()?;
                Flow::JwtBearer {
                    token_url: format!("{login}/services/oauth2/token"),
                    client_id: config.client_id.clone().unwrap_or_default(),
                    username: config.username.clone().unwrap_or_default(),
                    audience: config.jwt_audience.clone().unwrap_or(login),
                    key: Box::new(key),
                }
            }
            AuthFlow::AccessToken | AuthFlow::Auto => Flow::Static {
                access_token: config.access_token.clone().unwrap_or_else(|| Secret::new("")),
                instance_url: config
                    .instance_url
                    .clone()
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string(),
            },
        };
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| AuthError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Auth {
            flow,
            tenant_id: config.tenant_id.clone(),
            http,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    /// The flow in use, for logs.
    pub fn flow_name(&self) -> &'static str {
        match self.flow {
            Flow::ClientCredentials { .. } => "client-credentials",
            Flow::JwtBearer { .. } => "jwt-bearer",
            Flow::Static { .. } => "access-token",
        }
    }

    /// The current credentials, fetching a token first when there is none yet.
    pub async fn credentials(&self) -> Result<Arc<Credentials>, AuthError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let fresh = Arc::new(self.fetch().await?);
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// A new token after `rejected` was refused. Callers holding an older generation than the current one get the
    /// current one without a request.
    pub async fn renew(&self, rejected: &Credentials) -> Result<Arc<Credentials>, AuthError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref()
            && c.generation != rejected.generation
        {
            return Ok(c.clone());
        }
        if matches!(self.flow, Flow::Static { .. }) {
            metrics::counter!(m::AUTH_TOKENS, "result" => "static-rejected").increment(1);
            return Err(AuthError::StaticTokenRejected);
        }
        tracing::info!(
            flow = self.flow_name(),
            "Salesforce refused the access token; requesting a new one."
        );
        let fresh = Arc::new(self.fetch().await?);
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    async fn fetch(&self) -> Result<Credentials, AuthError> {
        let result = self.request_token().await;
        let label = match &result {
            Ok(_) => "ok",
            Err(e) if e.is_transient() => "transient-error",
            Err(_) => "error",
        };
        metrics::counter!(m::AUTH_TOKENS, "result" => label).increment(1);
        let (access_token, instance_url, identity) = result?;
        let tenant_id = match (&self.tenant_id, identity.as_deref().and_then(org_from_identity)) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t,
            (None, None) => self.userinfo_org(&access_token, &instance_url).await?,
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(flow = self.flow_name(), %instance_url, %tenant_id, generation, "Salesforce access token ready.");
        Ok(Credentials {
            access_token,
            instance_url,
            tenant_id,
            generation,
        })
    }

    async fn request_token(&self) -> Result<(Secret, String, Option<String>), AuthError> {
        let (url, form): (&str, Vec<(&str, String)>) = match &self.flow {
            Flow::Static {
                access_token,
                instance_url,
            } => return Ok((access_token.clone(), instance_url.clone(), None)),
            Flow::ClientCredentials {
                token_url,
                client_id,
                client_secret,
            } => (
                token_url,
                vec![
                    ("grant_type", "client_credentials".into()),
                    ("client_id", client_id.clone()),
                    ("client_secret", client_secret.expose().to_string()),
                ],
            ),
            Flow::JwtBearer {
                token_url,
                client_id,
                username,
                audience,
                key,
            } => {
                let claims = JwtClaims {
                    iss: client_id.clone(),
                    sub: username.clone(),
                    aud: audience.clone(),
                    exp: unix_now() + JWT_LIFETIME_SECS,
                };
                let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                    .map_err(|e| AuthError::Config(format!("cannot sign the JWT assertion: {e}")))?;
                (
                    token_url,
                    vec![
                        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                        ("assertion", assertion),
                    ],
                )
            }
        };
        let network = |e: reqwest::Error| AuthError::Network {
            url: url.to_string(),
            reason: describe(&e),
        };
        let response = self.http.post(url).form(&form).send().await.map_err(network)?;
        let status = response.status();
        let body = response.bytes().await.map_err(network)?;
        if !status.is_success() {
            let parsed: Option<TokenError> = serde_json::from_slice(&body).ok();
            return Err(AuthError::Refused {
                status: status.as_u16(),
                error: parsed
                    .as_ref()
                    .and_then(|p| p.error.clone())
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string()),
                description: parsed.and_then(|p| p.error_description),
            });
        }
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| AuthError::Refused {
            status: status.as_u16(),
            error: "unreadable token response".into(),
            description: Some(e.to_string()),
        })?;
        Ok((
            Secret::new(token.access_token),
            token.instance_url.trim_end_matches('/').to_string(),
            token.id,
        ))
    }

    /// `GET /services/oauth2/userinfo` -> `organization_id`.
    async fn userinfo_org(&self, token: &Secret, instance_url: &str) -> Result<String, AuthError> {
        let url = format!("{instance_url}/services/oauth2/userinfo");
        let response = self
            .http
            .get(&url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| AuthError::Tenant(format!("GET {url}: {}", describe(&e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(AuthError::Tenant(format!("GET {url} answered {status}")));
        }
        #[derive(Deserialize)]
        struct UserInfo {
            organization_id: Option<String>,
        }
        let info: UserInfo = response
            .json()
            .await
            .map_err(|e| AuthError::Tenant(format!("GET {url}: {}", describe(&e))))?;
        info.organization_id
            .filter(|o| !o.is_empty())
            .ok_or_else(|| AuthError::Tenant(format!("GET {url} has no organization_id")))
    }
}

/// The org id in an identity URL `.../id/<orgId>/<userId>`.
fn org_from_identity(id: &str) -> Option<String> {
    let mut parts = id.trim_end_matches('/').rsplit('/');
    let _user = parts.next()?;
    let org = parts.next()?;
    (parts.next() == Some("id") && (org.len() == 15 || org.len() == 18)).then(|| org.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A reqwest error with its causes, without the request's headers (which hold the token).
pub fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Salesforce's REST errors are `[{"message": "...", "errorCode": "..."}]`.
pub fn rest_message(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(errors)) => errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["errorCode"].as_str().unwrap_or("ERROR"),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_id_comes_from_the_identity_url() {
        assert_eq!(
            org_from_identity("https://login.salesforce.com/id/00Dxx0000000001AAA/005xx0000000001AAA").as_deref(),
            Some("00Dxx0000000001AAA")
        );
        assert_eq!(
            org_from_identity("https://login.salesforce.com/services/oauth2/token"),
            None
        );
    }

    #[test]
    fn credentials_debug_hides_the_token() {
        let c = Credentials {
            access_token: Secret::new("00Dxx!SECRET"),
            instance_url: "https://x".into(),
            tenant_id: "00Dxx".into(),
            generation: 1,
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }
}
