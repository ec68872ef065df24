//! Who may do what on the HTTP listener.
//!
//! Three kinds of request: the probes (`/healthz`, `/readyz`, `/metrics`) are open, so that orchestrators and
//! Prometheus need no secret; reads (`/rules`, `/api/...`, the console) are open on a loopback bind and need the
//! bearer token `http.token` on any other (unless `http.allow_unauthenticated`); mutations (every method but GET
//! and HEAD) always need the token, refuse cross-site requests, and have their body read here, capped in size and
//! time, before a handler sees them. The token is compared in constant time and never logged or echoed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::HttpConfig;

/// The largest request body accepted: a mutation carries at most a few ids or an event to explain.
pub const MAX_BODY: usize = 64 * 1024;

/// How long a client may take to send a mutation's body once its headers are in (slow clients hold a connection
/// and a task; nothing legitimate is that slow on the networks this listener serves).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The probes every orchestrator and scraper reaches without a token.
const OPEN: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The console's stylesheet and script: the same for everyone, and needed by its sign-in page.
const ASSETS: &str = "/ui/assets/";

/// POSTs that change nothing (an event to explain travels in a body): allowed as reads are, still same-site only,
/// and their bodies capped like every other.
const QUERIES: [&str; 2] = ["/api/explain", "/ui/try"];

/// The listener's policy, fixed when it binds.
pub struct Access {
    /// SHA-256 of `http.token`: comparing digests in constant time does not reveal the token's length either.
    token: Option<[u8; 32]>,
    /// Reads need the token too: the listener binds beyond loopback and `http.allow_unauthenticated` is off.
    reads_need_token: bool,
}

/// Why a listener may not start: a non-loopback bind without a token (and without the explicit opt-out).
#[derive(Debug, thiserror::Error)]
#[error(
    "the HTTP listener binds {0}, which other machines can reach, and the config has no `http.token`: set \
     `http: {{ token: \"${{SWITCHYARD_HTTP_TOKEN}}\" }}` (or `allow_unauthenticated: true` to serve reads to \
     anyone who reaches the port; mutations stay refused without a token)"
)]
pub struct Unprotected(pub SocketAddr);

impl Access {
    /// The policy for a listener bound at `bound` (the address as bound: a host name in `listen` has resolved).
    pub fn new(config: &HttpConfig, bound: SocketAddr) -> Result<Self, Unprotected> {
        let loopback = bound.ip().is_loopback();
        let token = config.token.as_ref().map(|t| digest(t.expose().as_bytes()));
        if !loopback && token.is_none() && !config.allow_unauthenticated {
            return Err(Unprotected(bound));
        }
        Ok(Access {
            token,
            reads_need_token: !loopback && !config.allow_unauthenticated,
        })
    }

    /// Whether reads (`/rules`, `/api/...`) ask for the token, for the console to say so.
    pub fn reads_need_token(&self) -> bool {
        self.reads_need_token
    }

    /// Whether the config has a token (without one, no change is accepted).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `headers` carry the configured token as `Authorization: Bearer ...`.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return false;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
        else {
            return false;
        };
        bool::from(digest(given.as_bytes()).ct_eq(expected))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The credentials of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Why a mutation comes from another site, when it does: a browser says so in `Sec-Fetch-Site`, and in an
/// `Origin` that is not this listener's own `Host`. Clients that are not browsers (curl, the CLI) send neither.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if !matches!(site, "same-origin" | "none") {
            return Some(format!("Sec-Fetch-Site is `{site}`"));
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("?");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .map(|rest| rest.trim_end_matches('/'));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => None,
        _ => Some(format!(
            "Origin `{origin}` is not this listener (`{}`)",
            host.unwrap_or("no Host")
        )),
    }
}

/// A refusal as JSON `{"error": ...}`, logged with who asked (never with what they sent as a token).
fn refuse(status: StatusCode, peer: Option<SocketAddr>, req: &Request, why: String) -> Response {
    tracing::warn!(
        method = %req.method(),
        path = req.uri().path(),
        peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
        status = status.as_u16(),
        "HTTP request refused: {why}."
    );
    let mut response = (status, axum::Json(json!({ "error": why }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"switchyard\""),
        );
    }
    response
}

/// The middleware in front of every route (see the module comment for the rules).
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        let why = format!("the request body is larger than {} KiB", MAX_BODY / 1024);
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, peer, &req, why);
    }
    let path = req.uri().path();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if read && (OPEN.contains(&path) || path.starts_with(ASSETS)) {
        return next.run(req).await;
    }
    let reads_refused = access.reads_need_token && !access.authorized(req.headers());
    if read {
        if reads_refused {
            if path == "/ui" || path.starts_with("/ui/") {
                // A browser's navigation carries no bearer token: its page asks for it and fetches again.
                return super::ui::sign_in();
            }
            let why = "this listener binds beyond loopback: reads need `Authorization: Bearer` with `http.token`";
            return refuse(StatusCode::UNAUTHORIZED, peer, &req, why.into());
        }
        return next.run(req).await;
    }
    let query = *req.method() == Method::POST && QUERIES.contains(&path);
    if let Some(why) = cross_site(req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            peer,
            &req,
            format!("a cross-site request may not change anything ({why})"),
        );
    }
    if query {
        if reads_refused {
            let why = "this listener binds beyond loopback: reads need `Authorization: Bearer` with `http.token`";
            return refuse(StatusCode::UNAUTHORIZED, peer, &req, why.into());
        }
    } else if access.token.is_none() {
        let why = "changes over HTTP need `http.token` in the config (none is set, so none are accepted)";
        return refuse(StatusCode::FORBIDDEN, peer, &req, why.into());
    } else if !access.authorized(req.headers()) {
        let why = "changes need `Authorization: Bearer` with `http.token`";
        return refuse(StatusCode::UNAUTHORIZED, peer, &req, why.into());
    }
    // The whole body now, capped and with a deadline, so that no handler waits on a slow or endless client.
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, http_body_util::Limited::new(body, MAX_BODY).collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let req = Request::from_parts(parts, Body::empty());
            let (status, why) = if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} KiB", MAX_BODY / 1024),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                )
            };
            return refuse(status, peer, &req, why);
        }
        Err(_) => {
            let req = Request::from_parts(parts, Body::empty());
            let why = format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs());
            return refuse(StatusCode::REQUEST_TIMEOUT, peer, &req, why);
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn config(token: Option<&str>, allow: bool) -> HttpConfig {
        HttpConfig {
            listen: "127.0.0.1:0".into(),
            token: token.map(crate::config::Secret::new),
            allow_unauthenticated: allow,
        }
    }

    #[test]
    fn a_non_loopback_bind_needs_a_token_or_the_explicit_opt_out() {
        let outside: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        assert!(Access::new(&config(None, false), outside).is_err());
        assert!(!Access::new(&config(None, false), loopback).unwrap().reads_need_token());
        assert!(!Access::new(&config(None, true), outside).unwrap().reads_need_token());
        assert!(
            Access::new(&config(Some("0123456789abcdef"), false), outside)
                .unwrap()
                .reads_need_token()
        );
    }

    #[test]
    fn only_the_configured_bearer_token_is_authorized() {
        let access = Access::new(&config(Some("0123456789abcdef"), false), "127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(access.authorized(&headers(&[("authorization", "Bearer 0123456789abcdef")])));
        assert!(access.authorized(&headers(&[("authorization", "bearer 0123456789abcdef")])));
        assert!(!access.authorized(&headers(&[("authorization", "Bearer 0123456789abcdeF")])));
        assert!(!access.authorized(&headers(&[("authorization", "Basic 0123456789abcdef")])));
        assert!(!access.authorized(&headers(&[("authorization", "0123456789abcdef")])));
        assert!(!access.authorized(&headers(&[])));
        let none = Access::new(&config(None, false), "127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(!none.authorized(&headers(&[("authorization", "Bearer ")])));
    }

    #[test]
    fn cross_site_requests_are_told_apart_from_same_origin_and_non_browser_ones() {
        assert!(cross_site(&headers(&[])).is_none());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-origin")])).is_none());
        assert!(cross_site(&headers(&[("sec-fetch-site", "none")])).is_none());
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_some());
        let same = [("origin", "http://127.0.0.1:9464"), ("host", "127.0.0.1:9464")];
        assert!(cross_site(&headers(&same)).is_none());
        let other = [("origin", "https://evil.example"), ("host", "127.0.0.1:9464")];
        assert!(cross_site(&headers(&other)).unwrap().contains("evil.example"));
        assert!(cross_site(&headers(&[("origin", "null"), ("host", "127.0.0.1:9464")])).is_some());
        assert!(cross_site(&headers(&[("origin", "http://127.0.0.1:9464")])).is_some());
    }
}
