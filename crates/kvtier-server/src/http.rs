//! The HTTP admin API (axum on the server's tokio runtime, never on request-path threads).
//!
//! Routes: `GET /api/status` (alias `/status`): the status tree; `GET /api/healthcheck` (alias
//! `/healthcheck`): 200 `{"status":"healthy"}` only when the tree is healthy, else 503 with the
//! unhealthy paths and reasons; `GET /version`; `GET /config`; `POST /api/clear-cache` and
//! `POST /cache/clear` (`{"tier":"l1","force":false}`).
//!
//! Handlers are thin: status is built from counters (see `kvtier_core::status`), so polling it
//! never takes a hot-path lock.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::server::StatusSource;

/// HTTP settings.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 picks a free one).
    pub port: u16,
}

/// A running HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
}

impl HttpServer {
    /// Binds and starts serving on `runtime`.
    pub fn start(
        cfg: HttpConfig,
        source: StatusSource,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let app = router(source);
        let (tx, rx) = oneshot::channel::<()>();
        let task = {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            runtime.spawn(async move {
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
        tracing::info!(%addr, "http admin api listening");
        Ok(Self {
            addr,
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
        if let Some(tx) = self.stop.lock().take() {
            let _sent = tx.send(());
        }
        if let Some(task) = self.task.lock().take() {
            let handle = self.runtime.clone();
            // Called from a plain thread; wait on a helper thread if we are inside the runtime.
            if tokio::runtime::Handle::try_current().is_ok() {
                task.abort();
            } else {
                let _joined = handle.block_on(task);
            }
        }
    }
}

fn router(source: StatusSource) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/api/status", get(status))
        .route("/status", get(status))
        .route("/api/healthcheck", get(healthcheck))
        .route("/healthcheck", get(healthcheck))
        .route("/version", get(version))
        .route("/config", get(config))
        .route("/api/clear-cache", post(clear_cache))
        .route("/cache/clear", post(cache_clear))
        .route("/cache/checksums", post(cache_checksums))
        .with_state(Arc::new(source))
}

type Shared = State<Arc<StatusSource>>;

async fn root() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"status": "ok", "service": "kvtier", "version": env!("CARGO_PKG_VERSION")}),
    )
}

async fn status(State(s): Shared) -> Json<serde_json::Value> {
    Json(s.status().to_value())
}

async fn healthcheck(State(s): Shared) -> Response {
    let tree = s.status();
    if tree.is_healthy() {
        return (
            StatusCode::OK,
            Json(serde_json::json!({"status": "healthy"})),
        )
            .into_response();
    }
    let unhealthy: Vec<serde_json::Value> = tree
        .unhealthy_paths("engine")
        .into_iter()
        .map(|(path, reason)| serde_json::json!({"path": path, "reason": reason}))
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"status": "unhealthy", "unhealthy": unhealthy})),
    )
        .into_response()
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "name": "kvtier"}))
}

async fn config(State(s): Shared) -> Json<serde_json::Value> {
    Json(serde_json::to_value(s.config()).unwrap_or(serde_json::Value::Null))
}

#[derive(Debug, Deserialize)]
struct ClearBody {
    #[serde(default = "default_tier")]
    tier: String,
    #[serde(default)]
    force: bool,
}

fn default_tier() -> String {
    "l1".into()
}

async fn clear_cache(State(s): Shared) -> Json<serde_json::Value> {
    let out = s.engine().l1().clear(true);
    Json(serde_json::json!({"status": "ok", "removed": out.removed, "doomed": out.doomed}))
}

async fn cache_clear(State(s): Shared, body: Option<Json<ClearBody>>) -> Response {
    let body = body.map_or(
        ClearBody {
            tier: default_tier(),
            force: false,
        },
        |Json(b)| b,
    );
    if body.tier != "l1" && body.tier != "all" {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"status": "error", "reason": format!("unknown tier {:?} (expected \"l1\" or \"all\")", body.tier)})),
        )
            .into_response();
    }
    let out = s.engine().l1().clear(body.force);
    Json(serde_json::json!({
        "status": "ok",
        "cleared": {"tier": body.tier, "removed": out.removed, "doomed": out.doomed, "kept": out.kept}
    }))
    .into_response()
}

/// `POST /cache/checksums` (LMCache 0.5.6): MD5 digests of a lmcache_driven instance's engine
/// blocks. Hashing runs on the blocking pool, not on the runtime's workers.
async fn cache_checksums(
    State(s): Shared,
    Json(body): Json<crate::engine::lmcache_driven::ChecksumRequest>,
) -> Response {
    let engine = Arc::clone(s.engine());
    let result = tokio::task::spawn_blocking(move || engine.lmcache_driven_checksums(&body)).await;
    match result {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => {
            let code =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (code, Json(serde_json::json!({"detail": e.to_string()}))).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"detail": format!("checksum task failed: {e}")})),
        )
            .into_response(),
    }
}
