//! The emulator's HTTP side: the OAuth token endpoint (client credentials and JWT bearer), userinfo, and sobject
//! reads served from the records of its input events, so the whole Salesforce path runs on loopback.
//!
//! Shapes follow Salesforce: token errors are `{"error", "error_description"}` with 400; REST errors are
//! `[{"message", "errorCode"}]` with 401 (`INVALID_SESSION_ID`) or 404 (`NOT_FOUND`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::auth::JwtClaims;
use crate::event::{ChangeHeader, ChangeType, Event, EventKind};

use super::state::Shared;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/oauth2/userinfo", get(userinfo))
        .route(
            "/services/data/{version}/sobjects/{object}/{id}",
            get(sobject).patch(update),
        )
        .with_state(shared)
}

fn token_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn rest_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!([{"message": message, "errorCode": code}]))).into_response()
}

async fn token(State(shared): State<Arc<Shared>>, Form(form): Form<HashMap<String, String>>) -> Response {
    shared.stats.token_requests.fetch_add(1, Ordering::Relaxed);
    let oauth = &shared.settings.oauth;
    let base = shared.base_url();
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            if form.get("client_id") != Some(&oauth.client_id)
                || form.get("client_secret") != Some(&oauth.client_secret)
            {
                return token_error("invalid_client", "invalid client credentials");
            }
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let Some(public_key) = &oauth.jwt_public_key_pem else {
                return token_error("invalid_grant", "JWT bearer is not configured on this emulator");
            };
            let Ok(key) = DecodingKey::from_rsa_pem(public_key.as_bytes()) else {
                return token_error("invalid_grant", "the emulator's JWT public key does not parse");
            };
            let mut validation = Validation::new(Algorithm::RS256);
            validation.set_audience(&[base.as_str()]);
            validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
            let assertion = form.get("assertion").map(String::as_str).unwrap_or_default();
            let claims = match jsonwebtoken::decode::<JwtClaims>(assertion, &key, &validation) {
                Ok(data) => data.claims,
                Err(e) => return token_error("invalid_grant", &format!("invalid assertion: {e}")),
            };
            shared.state().last_jwt = Some(claims.clone());
            if claims.iss != oauth.client_id {
                return token_error("invalid_client_id", "client identifier invalid");
            }
            if claims.sub != oauth.username {
                return token_error("invalid_grant", "user hasn't approved this consumer");
            }
        }
        _ => return token_error("unsupported_grant_type", "grant type not supported"),
    }
    let access_token = {
        let mut state = shared.state();
        state.issued += 1;
        // Shaped like a real token: the org id, `!`, an opaque part.
        let token = format!("{}!emulator.{}.{:08x}", oauth.org_id, state.issued, rand_u32());
        state.tokens.insert(token.clone());
        token
    };
    Json(json!({
        "access_token": access_token,
        "instance_url": base,
        "id": format!("{base}/id/{}/{}", oauth.org_id, oauth.user_id),
        "token_type": "Bearer",
        "issued_at": crate::clock::now_ms().to_string(),
        "signature": "ZW11bGF0b3I=",
        "scope": "api",
    }))
    .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ")
}

async fn userinfo(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !shared.token_valid(bearer(&headers)) {
        return rest_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        );
    }
    let oauth = &shared.settings.oauth;
    Json(json!({
        "organization_id": oauth.org_id,
        "user_id": oauth.user_id,
        "preferred_username": oauth.username,
    }))
    .into_response()
}

async fn sobject(
    State(shared): State<Arc<Shared>>,
    Path((version, object, id)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    shared.stats.rest_reads.fetch_add(1, Ordering::Relaxed);
    let (fail, delay) = {
        let mut state = shared.state();
        *state.reads.entry(id.clone()).or_default() += 1;
        let delay = match &mut state.faults.rest_delays {
            Some((delay, n)) if *n > 0 => {
                *n -= 1;
                Some(*delay)
            }
            _ => None,
        };
        // A slow read is the fault of this read; a queued failure waits for the next one.
        let fail = if delay.is_none() {
            state.faults.rest_failures.pop_front()
        } else {
            None
        };
        (fail, delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if !shared.token_valid(bearer(&headers)) {
        return rest_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        );
    }
    if let Some(status) = fail {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return rest_error(status, "SERVER_UNAVAILABLE", "The emulator was told to fail this read");
    }
    if !version.starts_with('v') {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    }
    let record = shared.state().records.get(&id).cloned().flatten();
    let Some(record) = record else {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    let mut body = serde_json::Map::new();
    body.insert(
        "attributes".into(),
        json!({"type": object, "url": format!("/services/data/{version}/sobjects/{object}/{id}")}),
    );
    body.insert("Id".into(), Value::String(id.clone()));
    match query.get("fields") {
        Some(fields) => {
            for field in fields.split(',').filter(|f| !f.is_empty()) {
                body.insert(field.to_string(), record.get(field).cloned().unwrap_or(Value::Null));
            }
        }
        None => body.extend(record),
    }
    Json(Value::Object(body)).into_response()
}

/// `PATCH /sobjects/{object}/{id}`: updates the org's record and, like an org with CDC on, publishes the change
/// event the write causes on every change channel that carries the object: an UPDATE whose changed fields are the
/// fields written and whose `changeOrigin` names the API client from `Sforce-Call-Options: client=...`. Answers
/// 204 like Salesforce; 404 for a record the org does not have; 400 `INVALID_FIELD` for a field its schema lacks.
async fn update(
    State(shared): State<Arc<Shared>>,
    Path((version, object, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !shared.token_valid(bearer(&headers)) {
        return rest_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        );
    }
    let Some(api) = version.strip_prefix('v') else {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    if let Some(status) = shared.state().faults.update_failures.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return match status {
            StatusCode::BAD_REQUEST => rest_error(
                status,
                "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                "The emulator's validation rule refused this update",
            ),
            _ => rest_error(
                status,
                "SERVER_UNAVAILABLE",
                "The emulator was told to fail this update",
            ),
        };
    }
    let fields = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(fields)) if !fields.is_empty() => fields,
        _ => {
            return rest_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "The request body must be a JSON object of the fields to update",
            );
        }
    };
    let client = headers
        .get("sforce-call-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').find_map(|o| o.trim().strip_prefix("client=")))
        .map(str::to_string);
    let (previous, updated, channels) = {
        let mut state = shared.state();
        let Some(Some(previous)) = state.records.get(&id).cloned() else {
            return rest_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
        };
        let mut updated = previous.clone();
        updated.extend(fields.clone());
        state.updates.push(super::state::Update {
            object: object.clone(),
            id: id.clone(),
            fields: fields.clone(),
            client: client.clone(),
        });
        let channels: Vec<String> = state
            .topics
            .iter()
            .filter(|(name, topic)| topic.members.contains_key(&object) || **name == per_object_channel(&object))
            .map(|(name, _)| name.clone())
            .collect();
        (previous, updated, channels)
    };
    let now = crate::clock::now_ms() as i64;
    let origin = match &client {
        Some(client) => format!("com/salesforce/api/rest/{api};client={client}"),
        None => format!("com/salesforce/api/rest/{api}"),
    };
    let transaction = format!("{:016x}", now as u64 ^ u64::from(rand_u32()));
    for channel in channels {
        let event = Event {
            id: format!("{transaction}:1"),
            channel,
            kind: Some(EventKind::Change),
            replay_id: None,
            schema_id: None,
            header: Some(ChangeHeader {
                entity: object.clone(),
                change_type: ChangeType::Update,
                record_ids: vec![id.clone()],
                changed_fields: fields.keys().cloned().collect(),
                nulled_fields: fields
                    .iter()
                    .filter(|(_, v)| v.is_null())
                    .map(|(k, _)| k.clone())
                    .collect(),
                diff_fields: Vec::new(),
                change_origin: Some(origin.clone()),
                transaction_key: Some(transaction.clone()),
                sequence_number: Some(1),
                commit_timestamp: Some(now),
                commit_number: Some(now),
                commit_user: Some(shared.settings.oauth.user_id.clone()),
            }),
            fields: fields.clone(),
            record: [(id.clone(), Some(updated.clone()))].into_iter().collect(),
        };
        if let Err(e) = shared.publish(&event) {
            // The org refuses a field its schema does not have; nothing is changed.
            shared.state().records.insert(id.clone(), Some(previous));
            shared.state().updates.pop();
            return rest_error(StatusCode::BAD_REQUEST, "INVALID_FIELD", &e.to_string());
        }
    }
    shared.state().records.insert(id, Some(updated));
    StatusCode::NO_CONTENT.into_response()
}

/// The standard CDC channel of an object: `/data/OrderChangeEvent`, `/data/Invoice__ChangeEvent` for `Invoice__c`.
fn per_object_channel(object: &str) -> String {
    match object.strip_suffix("__c") {
        Some(custom) => format!("/data/{custom}__ChangeEvent"),
        None => format!("/data/{object}ChangeEvent"),
    }
}

/// Not cryptographic: only makes tokens differ between emulator runs.
fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
