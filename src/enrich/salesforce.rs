//! The Salesforce REST enricher: `GET {instance}/services/data/v{api}/sobjects/{object}/{id}?fields=...` with the
//! shared token, bounded concurrency, a timeout per read and retries for what a retry can fix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::auth::{Auth, AuthError, describe, rest_message as salesforce_message};
use crate::clock::jitter;
use crate::config::{RestConfig, SalesforceConfig};
use crate::event::RecordFields;
use crate::obs::metrics as m;
use crate::router::EnrichRequest;

/// Retry pauses double up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{object} `{id}` is not a valid Salesforce {what}")]
    InvalidName {
        object: String,
        id: String,
        what: &'static str,
    },
    #[error("reading {object} {id} failed after {attempts} attempt(s): {last}")]
    Exhausted {
        object: String,
        id: String,
        attempts: u32,
        last: String,
    },
    #[error("reading {object} {id} was refused ({status}): {message}")]
    Refused {
        object: String,
        id: String,
        status: u16,
        message: String,
    },
    #[error("reading {object} {id}: {0}", object = .1, id = .2)]
    Auth(#[source] AuthError, String, String),
}

/// One read's outcome, before the retry decision.
enum Attempt {
    Found(Map<String, Value>),
    NotFound,
    /// Worth another try (timeout, connection, 5xx, 429).
    Transient(String),
    /// The token was refused: renew it, then try again.
    Unauthorized,
    /// A retry cannot help (400 bad field, 403 no access).
    Permanent(u16, String),
}

pub struct SalesforceEnricher {
    auth: Arc<Auth>,
    http: reqwest::Client,
    api_version: String,
    limits: RestConfig,
    permits: Semaphore,
}

impl SalesforceEnricher {
    pub fn new(auth: Arc<Auth>, config: &SalesforceConfig) -> Result<Self, AuthError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.rest.timeout_ms))
            .build()
            .map_err(|e| AuthError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            auth,
            http,
            api_version: config.api_version.clone(),
            limits: config.rest.clone(),
            permits: Semaphore::new(config.rest.concurrency.max(1)),
        })
    }

    /// Reads one record: its requested fields (missing ones as null), `None` when it does not exist.
    pub async fn read(&self, request: &EnrichRequest) -> Result<RecordFields, ReadError> {
        let object = &request.object;
        let id = &request.record_id;
        if !is_name(object) {
            return Err(self.invalid(request, "object name"));
        }
        if !(id.len() == 15 || id.len() == 18) || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(self.invalid(request, "record id"));
        }
        if let Some(bad) = request.fields.iter().find(|f| !is_name(f)) {
            return Err(ReadError::InvalidName {
                object: object.clone(),
                id: bad.clone(),
                what: "field name",
            });
        }
        let mut pause = Duration::from_millis(self.limits.initial_backoff_ms.max(1));
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let creds = self
                .auth
                .credentials()
                .await
                .map_err(|e| ReadError::Auth(e, object.clone(), id.clone()));
            let outcome = match creds {
                Ok(creds) => {
                    let started = Instant::now();
                    let outcome = {
                        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
                        self.get(&creds, request).await
                    };
                    metrics::histogram!(m::ENRICH_SECONDS).record(started.elapsed().as_secs_f64());
                    if matches!(outcome, Attempt::Unauthorized) && !renewed {
                        // One renewal per read: a second 401 with a fresh token is not an expiry.
                        renewed = true;
                        self.count(object, "unauthorized");
                        self.auth
                            .renew(&creds)
                            .await
                            .map_err(|e| ReadError::Auth(e, object.clone(), id.clone()))?;
                        attempt -= 1;
                        continue;
                    }
                    outcome
                }
                Err(ReadError::Auth(e, ..)) if e.is_transient() => Attempt::Transient(e.to_string()),
                Err(e) => return Err(e),
            };
            match outcome {
                Attempt::Found(fields) => {
                    self.count(object, "ok");
                    return Ok(Some(fields));
                }
                Attempt::NotFound => {
                    self.count(object, "not-found");
                    return Ok(None);
                }
                Attempt::Unauthorized => {
                    self.count(object, "unauthorized");
                    return Err(ReadError::Refused {
                        object: object.clone(),
                        id: id.clone(),
                        status: 401,
                        message: "the renewed token was refused too".into(),
                    });
                }
                Attempt::Permanent(status, message) => {
                    self.count(object, "error");
                    return Err(ReadError::Refused {
                        object: object.clone(),
                        id: id.clone(),
                        status,
                        message,
                    });
                }
                Attempt::Transient(last) => {
                    self.count(object, "retry");
                    if attempt >= self.limits.attempts {
                        self.count(object, "error");
                        return Err(ReadError::Exhausted {
                            object: object.clone(),
                            id: id.clone(),
                            attempts: attempt,
                            last,
                        });
                    }
                    tracing::debug!(%object, record_id = %id, attempt, error = %last, "REST read failed; retrying.");
                    tokio::time::sleep(jitter(pause)).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn get(&self, creds: &crate::auth::Credentials, request: &EnrichRequest) -> Attempt {
        let url = format!(
            "{}/services/data/v{}/sobjects/{}/{}",
            creds.instance_url, self.api_version, request.object, request.record_id
        );
        let response = self
            .http
            .get(&url)
            .query(&[("fields", request.fields.join(","))])
            .bearer_auth(creds.access_token.expose())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => return Attempt::Transient(describe(&e)),
        };
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return Attempt::Transient(describe(&e)),
        };
        match status {
            200 => match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(mut record)) => {
                    let fields = request
                        .fields
                        .iter()
                        .map(|f| (f.clone(), record.remove(f).unwrap_or(Value::Null)))
                        .collect();
                    Attempt::Found(fields)
                }
                _ => Attempt::Permanent(status, "the response is not a JSON object".into()),
            },
            404 => Attempt::NotFound,
            401 => Attempt::Unauthorized,
            408 | 429 | 500..=599 => Attempt::Transient(format!("HTTP {status}: {}", salesforce_message(&body))),
            _ => Attempt::Permanent(status, salesforce_message(&body)),
        }
    }

    fn invalid(&self, request: &EnrichRequest, what: &'static str) -> ReadError {
        ReadError::InvalidName {
            object: request.object.clone(),
            id: request.record_id.clone(),
            what,
        }
    }

    fn count(&self, object: &str, result: &'static str) {
        metrics::counter!(m::ENRICH_CALLS, "object" => object.to_string(), "result" => result).increment(1);
    }
}

/// API names: letters, digits, underscores (and `.` for relationship paths); nothing that could change the URL.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}
