//! The HTTP admin API (axum on the server's tokio runtime, never on request-path threads).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/` | the web dashboard (see [`crate::dashboard`], which also serves `/api/timeseries`) |
//! | GET | `/api/status`, `/status` | the whole status tree (JSON) |
//! | GET | `/api/healthcheck`, `/healthcheck` | readiness (default, `?probe=ready`): 200 `{"status":"healthy"}` only when the tree is healthy, else 503 with the unhealthy paths and reasons; liveness (`?probe=live`): 200 unless a node says the process no longer works (a dead poll, eviction or housekeeping thread), else 503 with those paths; never needs the token |
//! | GET | `/metrics` | Prometheus / OpenMetrics text (see [`metrics`]) |
//! | GET | `/config` | the effective configuration, secrets redacted |
//! | GET | `/version` | name, version, LMCache protocol version |
//! | POST | `/api/clear-cache` | force-clears L1 (LMCache 0.4.1 semantics) |
//! | GET, POST, DELETE | LMCache's operator routes (`/loglevel`, `/threads`, `/periodic-threads[-health]`, `/config/adapters`, `/cache/objects`, `/cache/prefetches`) | see [`admin`] |
//! | POST | `/cache/clear` | `{"tier":"l1"\|"all","force":false}` (body optional; LMCache 0.5.6 semantics) |
//! | PUT/GET/DELETE, GET | `/quota/{cache_salt}`, `/quota` | per-`cache_salt` L1 quotas (see [`quota`]) |
//! | GET | `/api/lookups` | recent lookups and their miss reasons (see [`lookups`]) |
//!
//! Anything else answers a JSON 404 (or 405 for a known path with the wrong method). With a
//! token configured every route but the health checks and the dashboard's static files (which
//! hold no data; a browser cannot attach the token when it opens the page) needs it (see
//! [`auth`]).
//!
//! Handlers are thin: the status tree is built from counters and snapshots (see
//! `kvtier_core::status`), so polling it never takes a hot-path lock for longer than an O(1)
//! read. Cache clearing is O(objects) under the L1 lock, so it runs on tokio's blocking pool, not
//! on an async worker.

pub mod admin;
pub mod auth;
pub mod lookups;
pub mod metrics;
pub mod quota;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;

pub use auth::{AuthToken, HttpConfigError, is_loopback_host};
use metrics::HttpStats;

use crate::engine::lmcache_driven::checksums::{ChecksumError, ChecksumRequest};
use crate::server::StatusSource;

/// HTTP settings.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 picks a free one).
    pub port: u16,
    /// Bearer token every route but the health checks requires (`None`: no access control).
    /// Shown as `"<redacted>"` by `Debug` and `Serialize`.
    pub auth_token: Option<AuthToken>,
    /// Allow a non-loopback `host` without a token.
    pub allow_insecure: bool,
}

impl HttpConfig {
    /// A loopback-only configuration without a token.
    pub fn local(port: u16) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port,
            auth_token: None,
            allow_insecure: false,
        }
    }

    /// Refuses a non-loopback bind without a token unless `allow_insecure` is set.
    pub fn check_exposure(&self) -> Result<(), HttpConfigError> {
        if self.auth_token.is_none() && !self.allow_insecure && !is_loopback_host(&self.host) {
            return Err(HttpConfigError::InsecureBind {
                host: self.host.clone(),
            });
        }
        Ok(())
    }
}

/// Why the HTTP API did not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A setting is refused.
    #[error(transparent)]
    Config(#[from] HttpConfigError),
    /// Binding or registering the listener failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// `host:port` asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stats: Arc<HttpStats>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
}

impl HttpServer {
    /// Checks the configuration, binds and starts serving on `runtime`.
    pub fn start(
        cfg: HttpConfig,
        source: StatusSource,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, HttpError> {
        cfg.check_exposure()?;
        let bind_err = |source| HttpError::Bind {
            addr: format!("{}:{}", cfg.host, cfg.port),
            source,
        };
        let listener =
            std::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let authenticated = cfg.auth_token.is_some();
        let stats = Arc::clone(source.http_stats());
        let _first = stats.addr.set(addr);
        stats.authenticated.store(authenticated, Relaxed);
        stats.serving.store(true, Relaxed);
        let app = router(source, cfg.auth_token);
        let (tx, rx) = oneshot::channel::<()>();
        let task = {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_err)?;
            let alive = Arc::clone(&stats);
            runtime.spawn(async move {
                /// Clears `serving` however the task ends (return, error, panic, abort).
                struct Serving(Arc<HttpStats>);
                impl Drop for Serving {
                    fn drop(&mut self) {
                        self.0.serving.store(false, Relaxed);
                    }
                }
                let _serving = Serving(alive);
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _stopped = rx.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "http server stopped with an error");
                }
            })
        };
        if !authenticated && !is_loopback_host(&cfg.host) {
            tracing::warn!(%addr, "http admin api exposed without authentication (--http-insecure)");
        }
        tracing::info!(%addr, authenticated, "http admin api listening");
        Ok(Self {
            addr,
            stats,
            stop: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
            runtime: runtime.clone(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes open requests, and waits for the server task.
    pub fn shutdown(&self) {
        self.stats.stopping.store(true, Relaxed);
        if let Some(tx) = self.stop.lock().take() {
            let _sent = tx.send(());
        }
        if let Some(task) = self.task.lock().take() {
            // Blocking on the runtime from inside it would panic; abort instead in that case.
            if tokio::runtime::Handle::try_current().is_ok() {
                task.abort();
            } else {
                let _joined = self.runtime.block_on(task);
            }
        }
    }
}

/// Every route, for bounded metric labels (with [`crate::dashboard::ROUTES`]). Anything else is
/// counted as `unmatched`.
const ROUTES: [&str; 10] = [
    "/api/status",
    "/status",
    "/api/healthcheck",
    "/healthcheck",
    "/version",
    "/config",
    "/metrics",
    "/api/clear-cache",
    "/cache/clear",
    "/cache/checksums",
];

/// Routes that never need the token (orchestrator probes).
const OPEN_ROUTES: [&str; 2] = ["/api/healthcheck", "/healthcheck"];

#[derive(Debug)]
struct AppState {
    source: StatusSource,
    token: Option<AuthToken>,
    stats: Arc<HttpStats>,
    registry: prometheus_client::registry::Registry,
}

type Shared = State<Arc<AppState>>;

fn router(source: StatusSource, token: Option<AuthToken>) -> Router {
    let stats = Arc::clone(source.http_stats());
    let dashboard = crate::dashboard::routes(source.clone());
    let admin = admin::routes(source.clone());
    let state = Arc::new(AppState {
        registry: metrics::registry(source.clone()),
        source,
        token,
        stats,
    });
    Router::new()
        .merge(dashboard)
        .merge(quota::routes(state.source.clone()))
        .merge(lookups::routes(state.source.clone()))
        .merge(admin)
        .route("/api/status", get(status))
        .route("/status", get(status))
        .route("/api/healthcheck", get(healthcheck))
        .route("/healthcheck", get(healthcheck))
        .route("/version", get(version))
        .route("/config", get(config))
        .route("/metrics", get(metrics_text))
        .route("/api/clear-cache", post(clear_cache))
        .route("/cache/clear", post(cache_clear))
        .route("/cache/checksums", post(cache_checksums))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .with_state(state)
}

fn json_response(code: StatusCode, value: &serde_json::Value) -> Response {
    (code, axum::Json(value)).into_response()
}

fn error(code: StatusCode, reason: impl Into<String>) -> Response {
    json_response(code, &json!({"status": "error", "reason": reason.into()}))
}

/// Access control and per-route accounting around every handler (fallbacks included).
async fn guard(State(st): Shared, req: Request, next: Next) -> Response {
    let route = ROUTES
        .iter()
        .chain(&crate::dashboard::ROUTES)
        .chain(&admin::ROUTES)
        .chain(&lookups::ROUTES)
        .copied()
        .find(|r| *r == req.uri().path())
        .or_else(|| quota::route_label(req.uri().path()))
        .unwrap_or("unmatched");
    let allowed = match &st.token {
        None => true,
        Some(token) => {
            OPEN_ROUTES.contains(&route)
                || crate::dashboard::STATIC_ROUTES.contains(&route)
                || token.authorizes(
                    req.headers()
                        .get(header::AUTHORIZATION)
                        .map(HeaderValue::as_bytes),
                )
        }
    };
    let response = if allowed {
        next.run(req).await
    } else {
        st.stats.auth_failures.fetch_add(1, Relaxed);
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token (send `Authorization: Bearer <token>`)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"kvtier\""),
        );
        r
    };
    st.stats.record(route, response.status().as_u16());
    response
}

async fn status(State(s): Shared) -> Response {
    // Serialise the node directly (no intermediate `Value` tree).
    match serde_json::to_vec(&s.source.status()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the status tree: {e}"),
        ),
    }
}

/// `?probe=` of the health check.
#[derive(Debug, Deserialize)]
struct Probe {
    probe: Option<String>,
}

async fn healthcheck(State(s): Shared, Query(q): Query<Probe>) -> Response {
    let tree = s.source.status();
    match q.probe.as_deref() {
        None | Some("ready") => {}
        Some("live") => {
            let dead = tree.not_live_paths("engine");
            if dead.is_empty() {
                return json_response(StatusCode::OK, &json!({"status": "live"}));
            }
            let paths: Vec<serde_json::Value> = dead
                .into_iter()
                .map(|(path, reason)| json!({"path": path, "reason": reason}))
                .collect();
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not_live", "not_live": paths}),
            );
        }
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("probe={other:?}: expected \"live\" or \"ready\""),
            );
        }
    }
    if tree.is_healthy() {
        return json_response(StatusCode::OK, &json!({"status": "healthy"}));
    }
    let unhealthy: Vec<serde_json::Value> = tree
        .unhealthy_paths("engine")
        .into_iter()
        .map(|(path, reason)| json!({"path": path, "reason": reason}))
        .collect();
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "status": "unhealthy",
            "reason": tree.unhealthy_reason(),
            "unhealthy": unhealthy,
        }),
    )
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "kvtier",
            "version": env!("CARGO_PKG_VERSION"),
            "lmcache_protocol": "0.5.6",
        }),
    )
}

async fn config(State(s): Shared) -> Response {
    match serde_json::to_value(s.source.config()) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the configuration: {e}"),
        ),
    }
}

async fn metrics_text(State(s): Shared) -> Response {
    match metrics::render(&s.registry) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed"),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    #[serde(default = "default_tier")]
    tier: String,
    #[serde(default)]
    force: bool,
}

fn default_tier() -> String {
    "l1".into()
}

/// Runs an L1 clear on the blocking pool (it is O(objects) under the L1 lock).
async fn run_clear(s: &AppState, force: bool) -> Result<kvtier_core::l1::ClearOutcome, Response> {
    let engine = Arc::clone(s.source.engine());
    tokio::task::spawn_blocking(move || engine.clear(force))
        .await
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("clear failed: {e}"),
            )
        })
}

async fn clear_cache(State(s): Shared) -> Response {
    match run_clear(&s, true).await {
        Ok(out) => json_response(
            StatusCode::OK,
            &json!({"status": "ok", "removed": out.removed, "doomed": out.doomed}),
        ),
        Err(r) => r,
    }
}

async fn cache_clear(State(s): Shared, body: Bytes) -> Response {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        ClearBody {
            tier: default_tier(),
            force: false,
        }
    } else {
        match serde_json::from_slice::<ClearBody>(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid body (expected {{\"tier\":\"l1\",\"force\":false}}): {e}"),
                );
            }
        }
    };
    if body.tier != "l1" && body.tier != "all" {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown tier {:?} (expected \"l1\" or \"all\")", body.tier),
        );
    }
    match run_clear(&s, body.force).await {
        Ok(out) => json_response(
            StatusCode::OK,
            &json!({
                "status": "ok",
                "cleared": {"tier": body.tier, "removed": out.removed, "doomed": out.doomed, "kept": out.kept}
            }),
        ),
        Err(r) => r,
    }
}

async fn not_found(req: Request<Body>) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"status": "error", "reason": "not found", "path": req.uri().path()}),
    )
}

async fn method_not_allowed(req: Request<Body>) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The HTTP status LMCache uses for each checksum error.
fn checksum_status(e: &ChecksumError) -> StatusCode {
    match e {
        ChecksumError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ChecksumError::NotRegistered(_) => StatusCode::NOT_FOUND,
        ChecksumError::Refused(..) => StatusCode::NOT_IMPLEMENTED,
        // kvtier's own: LMCache's server dies of the SIGBUS instead.
        ChecksumError::Faulted(..) => StatusCode::CONFLICT,
    }
}

/// `POST /cache/checksums` (LMCache 0.5.6): MD5 digests of a lmcache_driven instance's engine
/// blocks, as `lmcache bench server` uses to verify retrieves. Hashing runs on the blocking pool.
async fn cache_checksums(
    State(s): Shared,
    axum::Json(body): axum::Json<ChecksumRequest>,
) -> Response {
    let engine = Arc::clone(s.source.engine());
    let result = tokio::task::spawn_blocking(move || engine.lmcache_driven_checksums(&body)).await;
    match result {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => json_response(checksum_status(&e), &json!({"detail": e.to_string()})),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"detail": format!("checksum task failed: {e}")}),
        ),
    }
}
