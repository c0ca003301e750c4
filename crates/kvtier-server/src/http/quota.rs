//! Per-`cache_salt` L1 quotas over HTTP, with LMCache 0.5.6's routes, bodies and status codes
//! (what `lmcache quota set|get|list|delete --url http://HOST:PORT` sends):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | PUT | `/quota/{cache_salt}` | `{"limit_gb": <number ≥ 0>}` | 200 `{"cache_salt", "limit_gb", "status": "ok"}`; 400 `{"error"}` for a body that is not JSON, lacks `limit_gb`, or holds a negative, non-finite or non-numeric value |
//! | GET | `/quota/{cache_salt}` | | 200 `{"cache_salt", "limit_gb", "current_usage_gb", "exists"}` (`limit_gb` 0 when none is set) |
//! | DELETE | `/quota/{cache_salt}` | | 200 `{"cache_salt", "status": "removed" \| "not_found"}` |
//! | GET | `/quota` | | 200 `{"users": {salt: {"limit_gb", "current_usage_gb"}}}` for every salt with a quota |
//!
//! `_default` in the path stands for un-salted traffic (`cache_salt = ""`). GB means GiB
//! (2^30 bytes), as in LMCache. A salt that is not a valid `cache_salt` (over 128 characters,
//! or holding `@ / \ NUL`) is refused with 400. The routes sit behind the bearer token like
//! every data route. Quotas take effect at once (see `kvtier_core::l1::tenants`): unlike
//! LMCache, a store over its quota is refused rather than trimmed at the next eviction cycle,
//! and salts without a quota are not limited. Handlers run on the async runtime: `set_quota`
//! holds the L1 lock for O(1) plus the objects it evicts, the readers take only the tenant
//! directory's leaf lock.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kvtier_core::key::validate_cache_salt;
use kvtier_core::l1::{DEFAULT_SALT_NAME, salt_name};
use serde_json::{Value, json};

use crate::server::StatusSource;

/// Bytes per GB as LMCache counts them.
const GIB: f64 = (1u64 << 30) as f64;

/// Route labels for `/metrics` (`route="/quota/{cache_salt}"`; never the salt itself).
pub fn route_label(path: &str) -> Option<&'static str> {
    if path == "/quota" {
        Some("/quota")
    } else if path.starts_with("/quota/") {
        Some("/quota/{cache_salt}")
    } else {
        None
    }
}

/// The quota routes, to be merged into the admin API's router (whatever its state type).
pub fn routes<S: Clone + Send + Sync + 'static>(source: StatusSource) -> Router<S> {
    Router::new()
        .route("/quota", get(list))
        .route("/quota/{cache_salt}", get(get_one).put(set).delete(delete))
        .with_state(source)
}

fn answer(code: StatusCode, v: &Value) -> Response {
    (code, axum::Json(v)).into_response()
}

/// Why a quota request is refused with 400 (the messages are LMCache's).
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error(transparent)]
    Salt(#[from] kvtier_core::key::KeyError),
    #[error("invalid JSON body")]
    NotJson,
    #[error("body must be {{'limit_gb': <float>}}")]
    NoLimit,
    #[error("limit_gb must be numeric")]
    NotNumeric,
    #[error("limit_gb must be finite")]
    NotFinite,
    #[error("limit_gb must be non-negative")]
    Negative,
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        answer(
            StatusCode::BAD_REQUEST,
            &json!({ "error": self.to_string() }),
        )
    }
}

/// The salt a path segment names (`_default` → `""`), validated.
fn salt_of(segment: &str) -> Result<Arc<str>, BadRequest> {
    let salt = if segment == DEFAULT_SALT_NAME {
        ""
    } else {
        segment
    };
    validate_cache_salt(salt)?;
    Ok(Arc::from(salt))
}

/// `limit_gb` from a PUT body, with LMCache's refusals (it accepts what Python's `float()`
/// accepts: numbers, numeric strings, booleans).
fn limit_of(body: &[u8]) -> Result<f64, BadRequest> {
    let v: Value = serde_json::from_slice(body).map_err(|_| BadRequest::NotJson)?;
    let raw = v
        .as_object()
        .and_then(|o| o.get("limit_gb"))
        .ok_or(BadRequest::NoLimit)?;
    let gb = match raw {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
    .ok_or(BadRequest::NotNumeric)?;
    if !gb.is_finite() {
        return Err(BadRequest::NotFinite);
    }
    if gb < 0.0 {
        return Err(BadRequest::Negative);
    }
    Ok(gb)
}

async fn set(
    State(source): State<StatusSource>,
    Path(segment): Path<String>,
    body: Bytes,
) -> Response {
    let salt = match salt_of(&segment) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let gb = match limit_of(&body) {
        Ok(gb) => gb,
        Err(e) => return e.into_response(),
    };
    // Saturating float-to-int conversion: a huge finite limit becomes "everything".
    let bytes = (gb * GIB) as u64;
    let engine = Arc::clone(source.engine());
    let l1 = Arc::clone(engine.l1());
    let done = tokio::task::spawn_blocking(move || l1.set_quota(&salt, Some(bytes))).await;
    if let Err(e) = done {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": format!("setting the quota failed: {e}") }),
        );
    }
    answer(
        StatusCode::OK,
        &json!({ "cache_salt": segment, "limit_gb": gb, "status": "ok" }),
    )
}

async fn get_one(State(source): State<StatusSource>, Path(segment): Path<String>) -> Response {
    let salt = match salt_of(&segment) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let tenant = source.engine().l1().tenants().find(&salt);
    let limit = tenant.as_ref().and_then(|t| t.limit());
    let used = tenant.as_ref().map_or(0, |t| t.counters.bytes.get());
    answer(
        StatusCode::OK,
        &json!({
            "cache_salt": salt_name(&salt),
            "limit_gb": limit.unwrap_or(0) as f64 / GIB,
            "current_usage_gb": used as f64 / GIB,
            "exists": limit.is_some(),
        }),
    )
}

async fn delete(State(source): State<StatusSource>, Path(segment): Path<String>) -> Response {
    let salt = match salt_of(&segment) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let name = salt_name(&salt).to_owned();
    let l1 = Arc::clone(source.engine().l1());
    let removed = match tokio::task::spawn_blocking(move || l1.set_quota(&salt, None)).await {
        Ok(r) => r,
        Err(e) => {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": format!("removing the quota failed: {e}") }),
            );
        }
    };
    answer(
        StatusCode::OK,
        &json!({
            "cache_salt": name,
            "status": if removed { "removed" } else { "not_found" },
        }),
    )
}

async fn list(State(source): State<StatusSource>) -> Response {
    let mut users = serde_json::Map::new();
    for t in source.engine().l1().tenants().snapshot() {
        if let Some(limit) = t.limit() {
            users.insert(
                salt_name(&t.salt).to_owned(),
                json!({
                    "limit_gb": limit as f64 / GIB,
                    "current_usage_gb": t.counters.bytes.get() as f64 / GIB,
                }),
            );
        }
    }
    answer(StatusCode::OK, &json!({ "users": users }))
}
