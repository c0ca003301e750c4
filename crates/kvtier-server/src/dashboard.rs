//! The web dashboard: a single page (HTML, JS and CSS embedded in the binary from
//! `crates/kvtier-server/assets/dashboard/`, no CDN, no build step) and the JSON time series it
//! charts.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/`, `/dashboard` | the dashboard page |
//! | GET | `/dashboard/app.js`, `/dashboard/style.css` | its script and style sheet |
//! | GET | `/api/timeseries[?since=SEQ]` | the telemetry ring ([`crate::telemetry::TimeSeries`]): samples newer than `SEQ` |
//! | GET | `/api/hit-rate-curve` | the live hit-rate curve ([`crate::analysis::hit_curve::CurveReport`]): estimated hit rate at 0.25×–8× L1's size and at each L2 capacity |
//! | POST | `/api/debug/fault` | **test-only**, mounted only with `ServerConfig::fault_injection` (`kvtier serve --enable-fault-injection`, a hidden flag): `{"component":"l1_eviction_controller"}` (the default) stops that component as if it had crashed, so its status node turns unhealthy; with `"stall_seconds": S` its next round hangs for S seconds instead |
//!
//! The page reads `/api/status` (the same tree `kvtier status` shows) and `/api/timeseries`
//! every 2 s, and `/api/hit-rate-curve` every 10 s. The static files ([`STATIC_ROUTES`]) carry no data; every figure comes from the
//! JSON routes. When the admin API requires a bearer token, the page takes it from `?token=` (or
//! a form it shows after a 401), keeps it in `sessionStorage`, removes it from the address bar,
//! and sends `Authorization: Bearer …` on every fetch; without a valid token it says that the
//! server requires one.
//!
//! Responses of the page carry a strict `Content-Security-Policy` (scripts, styles and fetches
//! from this origin only), `Referrer-Policy: no-referrer` (the address may hold the token) and
//! `Cache-Control: no-cache` (a new binary's page is picked up at once).

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::server::StatusSource;

const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../assets/dashboard/style.css");

/// Routes that serve only the embedded static files (no server data): safe to answer without
/// the admin token, which a browser cannot attach when it navigates to the page.
pub const STATIC_ROUTES: [&str; 4] = [
    "/",
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/style.css",
];

/// Every route this module may mount (for bounded per-route metric labels).
pub const ROUTES: [&str; 7] = [
    "/",
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/api/timeseries",
    "/api/hit-rate-curve",
    "/api/debug/fault",
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The dashboard's routes, to be merged into the admin API's router (whatever its state type).
/// `/api/debug/fault` is mounted only when the configuration enables fault injection.
pub fn routes<S: Clone + Send + Sync + 'static>(source: StatusSource) -> Router<S> {
    let mut router = Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/style.css", get(style_css))
        .route("/api/timeseries", get(timeseries))
        .route("/api/hit-rate-curve", get(hit_rate_curve));
    if source.config().fault_injection {
        tracing::warn!("fault injection is enabled (POST /api/debug/fault); for tests only");
        router = router.route("/api/debug/fault", post(fault));
    }
    router.with_state(source)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
    ];
    (headers, body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn bad_request(reason: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"status": "error", "reason": reason})),
    )
        .into_response()
}

/// `since` is parsed by hand so that a bad value gets the API's JSON error, not axum's text.
async fn timeseries(
    State(source): State<StatusSource>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let since = match query.get("since").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return bad_request(format!(
                "since must be a non-negative integer (a sample sequence number), got {:?}",
                query.get("since").map_or("", String::as_str)
            ));
        }
    };
    axum::Json(source.telemetry().since(since)).into_response()
}

/// The live hit-rate curve (O(points × histogram buckets) under the estimator's leaf lock).
async fn hit_rate_curve(State(source): State<StatusSource>) -> Response {
    axum::Json(source.hit_curve_report()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    #[serde(default = "default_component")]
    component: String,
    /// Seconds the component's next round hangs instead of crashing it.
    #[serde(default)]
    stall_seconds: Option<f64>,
}

fn default_component() -> String {
    "l1_eviction_controller".into()
}

/// Test-only: makes a component fail the way a crash would, so health reporting can be
/// checked end to end on a live server.
async fn fault(
    State(source): State<StatusSource>,
    body: Option<axum::Json<FaultBody>>,
) -> Response {
    let (component, stall) = match body {
        Some(axum::Json(b)) => (b.component, b.stall_seconds),
        None => (default_component(), None),
    };
    let stall = match stall.map(Duration::try_from_secs_f64).transpose() {
        Ok(s) => s,
        Err(e) => return bad_request(format!("stall_seconds: {e}")),
    };
    match source.engine().inject_fault(&component, stall) {
        Ok(()) => axum::Json(json!({"status": "ok", "injected": component})).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}
