//! The `webhook` sink: POST the action's JSON body, with configured headers (secrets from the environment,
//! never printed), `Idempotency-Key`, and an optional HMAC-SHA256 signature.
//!
//! Signature: `X-Switchyard-Timestamp: <unix seconds>` and `X-Switchyard-Signature: sha256=<hex>`, the
//! lowercase hex HMAC-SHA256 of `<timestamp>.<body bytes>` under the shared secret. A receiver recomputes it
//! over the raw body, compares in constant time, and refuses old timestamps (replays).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use serde_json::Value;
use sha2::Sha256;

use super::{BuildError, SinkOutcome};
use crate::config::WebhookSinkConfig;
use crate::failure::Failure;

pub const SIGNATURE_HEADER: &str = "x-switchyard-signature";
pub const TIMESTAMP_HEADER: &str = "x-switchyard-timestamp";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// How much of an error response's body goes into the error (and so the dead letter).
const ERROR_BODY_CHARS: usize = 300;

pub struct WebhookSink {
    name: String,
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    signing_key: Option<Vec<u8>>,
}

/// The signature header value for `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl WebhookSink {
    pub fn new(name: &str, config: &WebhookSinkConfig) -> Result<WebhookSink, BuildError> {
        let bad = |message: String| BuildError::Webhook {
            sink: name.to_string(),
            message,
        };
        let url = reqwest::Url::parse(config.url.expose()).map_err(|e| bad(format!("the url is not a URL: {e}")))?;
        let mut headers = HeaderMap::new();
        for (key, value) in &config.headers {
            let key =
                HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad(format!("`{key}` is not a header name")))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| bad(format!("the value of header `{key}` is not a valid header value")))?;
            // Configured values carry tokens: keep them out of reqwest's Debug output.
            value.set_sensitive(true);
            headers.insert(key, value);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            // A redirected POST becomes a GET in most clients; a receiver that redirects is misconfigured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        Ok(WebhookSink {
            name: name.to_string(),
            url,
            client,
            headers,
            signing_key: config.signature.as_ref().map(|s| s.secret.expose().as_bytes().to_vec()),
        })
    }

    pub async fn post(
        &self,
        idempotency_key: Option<&str>,
        body: &Value,
        headers: &[(String, String)],
    ) -> Result<SinkOutcome, Failure> {
        let body = serde_json::to_vec(body).map_err(|e| Failure::Permanent(e.to_string()))?;
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("switchyard/", env!("CARGO_PKG_VERSION")));
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_HEADER, key);
        }
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(secret) = &self.signing_key {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            request = request
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, signature(secret, timestamp, &body));
        }
        let response = request.body(body).send().await.map_err(|e| self.classify(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(SinkOutcome::Done);
        }
        let text = response.text().await.unwrap_or_default();
        let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
        let message = format!("webhook `{}` answered HTTP {status}: {excerpt}", self.name);
        if transient_status(status) {
            Err(Failure::Transient(message))
        } else {
            Err(Failure::Permanent(message))
        }
    }

    /// Timeouts, refused and dropped connections can pass; a request that cannot be built cannot.
    fn classify(&self, err: reqwest::Error) -> Failure {
        let builder = err.is_builder();
        // The URL may carry a token in its query: never put it in a message.
        let message = format!("webhook `{}`: {}", self.name, err.without_url());
        if builder {
            Failure::Permanent(message)
        } else {
            Failure::Transient(message)
        }
    }
}

/// 408 (request timeout), 429 (rate limited) and 5xx are worth retrying; other statuses say the request
/// itself is wrong.
pub fn transient_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_for_retry() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(transient_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert!(!transient_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec-test
        assert_eq!(
            signature(b"whsec-test", 1_700_000_000, br#"{"a":1}"#),
            "sha256=fed7a1a6c799a6367d73724d76bc70c16678908a32a879cd1ded6565ac05cece"
        );
        assert_ne!(signature(b"k", 1, b"{}"), signature(b"k", 2, b"{}"));
    }
}
