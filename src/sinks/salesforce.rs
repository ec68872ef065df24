//! The built-in `salesforce-update` sink: write back to Salesforce. `PATCH
//! {instance}/services/data/v{api}/sobjects/{object}/{id}` with the action's fields as JSON, under the config's
//! `salesforce` credentials (the token the source and the enricher share), and `Sforce-Call-Options:
//! client=<call_options_client>`, which Salesforce stamps on the change event the write causes (`changeOrigin`),
//! so rules can tell switchyard's own writes apart.
//!
//! One call per attempt; the dispatcher retries what is transient (timeouts, connections, 408, 429, 5xx) and
//! dead-letters the rest. A refused token is renewed once per call (single-flight, see `auth`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::USER_AGENT;
use serde_json::{Map, Value};

use super::SinkOutcome;
use crate::auth::{Auth, Credentials, describe, rest_message};
use crate::config::SalesforceConfig;
use crate::failure::Failure;

/// The header Salesforce reads the API client's name from.
pub const CALL_OPTIONS_HEADER: &str = "sforce-call-options";

pub struct SalesforceUpdateSink {
    /// `None`: the config has no `salesforce` section; every write-back is dead-lettered, saying so.
    org: Option<Org>,
}

struct Org {
    auth: Arc<Auth>,
    http: reqwest::Client,
    api_version: String,
    call_options: String,
}

/// One PATCH's outcome.
enum Answer {
    Done,
    Unauthorized,
    Failed(Failure),
}

impl SalesforceUpdateSink {
    /// Writes to the org of `auth`, with the settings of `config`.
    pub fn new(auth: Arc<Auth>, config: &SalesforceConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.rest.timeout_ms))
            // A redirected PATCH is not followed: the instance URL comes from the token response.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            org: Some(Org {
                auth,
                http,
                api_version: config.api_version.clone(),
                call_options: format!("client={}", config.call_options_client),
            }),
        })
    }

    /// The sink of a config without a `salesforce` section.
    pub fn unconfigured() -> Self {
        Self { org: None }
    }

    pub async fn update(&self, object: &str, id: &str, fields: &Map<String, Value>) -> Result<SinkOutcome, Failure> {
        let Some(org) = &self.org else {
            return Err(Failure::Permanent(format!(
                "cannot update {object} {id}: the config has no `salesforce` section (credentials to write back with)"
            )));
        };
        if !is_api_name(object) {
            return Err(Failure::Permanent(format!("`{object}` is not an object's API name")));
        }
        if !(id.len() == 15 || id.len() == 18) || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Failure::Permanent(format!("`{id}` is not a Salesforce record id")));
        }
        if let Some(bad) = fields.keys().find(|f| !is_api_name(f)) {
            return Err(Failure::Permanent(format!("`{bad}` is not a field's API name")));
        }
        let auth_failure = |e: crate::auth::AuthError| {
            let message = format!("updating {object} {id}: {e}");
            if e.is_transient() {
                Failure::Transient(message)
            } else {
                Failure::Permanent(message)
            }
        };
        let creds = org.auth.credentials().await.map_err(auth_failure)?;
        match org.patch(&creds, object, id, fields).await {
            Answer::Done => Ok(SinkOutcome::Done),
            Answer::Failed(f) => Err(f),
            Answer::Unauthorized => {
                // One renewal per call: a second 401 with a fresh token is not an expiry.
                let renewed = org.auth.renew(&creds).await.map_err(auth_failure)?;
                match org.patch(&renewed, object, id, fields).await {
                    Answer::Done => Ok(SinkOutcome::Done),
                    Answer::Failed(f) => Err(f),
                    Answer::Unauthorized => Err(Failure::Permanent(format!(
                        "updating {object} {id} was refused (401) with a renewed token too"
                    ))),
                }
            }
        }
    }
}

impl Org {
    async fn patch(&self, creds: &Credentials, object: &str, id: &str, fields: &Map<String, Value>) -> Answer {
        let url = format!(
            "{}/services/data/v{}/sobjects/{object}/{id}",
            creds.instance_url, self.api_version
        );
        let sent = self
            .http
            .patch(&url)
            .bearer_auth(creds.access_token.expose())
            .header(CALL_OPTIONS_HEADER, &self.call_options)
            .header(USER_AGENT, concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .json(fields)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Answer::Failed(Failure::Transient(format!("updating {object} {id}: {}", describe(&e))));
            }
        };
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Answer::Done;
        }
        if status == 401 {
            return Answer::Unauthorized;
        }
        let body = response.bytes().await.unwrap_or_default();
        let message = format!("updating {object} {id} answered HTTP {status}: {}", rest_message(&body));
        Answer::Failed(match status {
            408 | 429 | 500..=599 => Failure::Transient(message),
            _ => Failure::Permanent(message),
        })
    }
}

/// An object or field API name: nothing that could change the URL.
fn is_api_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
