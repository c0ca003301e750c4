//! `GET /api/lookups`: recent lookups and why each prefix ended where it did (see
//! [`crate::engine::explain`]); what `kvtier explain REQUEST_ID` reads.
//!
//! | query | answer |
//! |---|---|
//! | `?request_id=ID` | 200 `{"records": [...]}`: that request's lookups still kept, oldest first; 404 `{"status":"error","reason"}` when none is |
//! | `?limit=N` (default 50, at most 1000) | 200 `{"records": [...]}`: the newest N, newest first |
//!
//! 400 for a `limit` that is not a whole number in 1..=1000; 404 when lookup records are
//! disabled (`--lookup-records 0`). The handler copies record pointers under the records' leaf
//! lock and serialises outside it.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::server::StatusSource;

/// Routes of this module (for the per-route metric labels).
pub(super) const ROUTES: [&str; 1] = ["/api/lookups"];

/// Most records one answer holds.
pub const MAX_LIMIT: usize = 1000;

const DEFAULT_LIMIT: usize = 50;

/// The route, to be merged into the admin API's router (whatever its state type).
pub(super) fn routes<S: Clone + Send + Sync + 'static>(source: StatusSource) -> Router<S> {
    Router::new()
        .route("/api/lookups", get(lookups))
        .with_state(source)
}

#[derive(Debug, Deserialize)]
struct Params {
    request_id: Option<String>,
    limit: Option<String>,
}

fn answer(code: StatusCode, v: &serde_json::Value) -> Response {
    (code, axum::Json(v)).into_response()
}

fn refuse(code: StatusCode, reason: String) -> Response {
    answer(code, &json!({"status": "error", "reason": reason}))
}

async fn lookups(State(source): State<StatusSource>, Query(q): Query<Params>) -> Response {
    let explain = &source.engine().shared().explain;
    if !explain.enabled() {
        return refuse(
            StatusCode::NOT_FOUND,
            "lookup records are disabled (the server runs with --lookup-records 0)".into(),
        );
    }
    if let Some(id) = q.request_id {
        let records = explain.by_request(&id);
        if records.is_empty() {
            return refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "no lookup of request {id:?} is recorded (the server keeps the last {} \
                     lookups; it may be older, or it never looked up)",
                    explain.capacity()
                ),
            );
        }
        return answer(StatusCode::OK, &json!({ "records": records }));
    }
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "limit {:?} is not a whole number between 1 and {MAX_LIMIT}",
                    q.limit.unwrap_or_default()
                ),
            );
        }
    };
    answer(StatusCode::OK, &json!({ "records": explain.recent(limit) }))
}
