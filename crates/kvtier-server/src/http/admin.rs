//! LMCache 0.5.6's operator routes, with its paths, methods, answer shapes and status codes
//! (differences are listed in `docs/lmcache-compatibility.md`):
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/loglevel` | text: the log filter; `?level=L` sets it, `?logger_name=N&level=L` adds the directive `N=L` (400 for an unknown level) |
//! | GET | `/threads` | text: the process's OS threads (`?name=` filters, case-insensitive) |
//! | GET | `/periodic-threads` | JSON `{summary, threads}`: kvtier's background threads and tasks with liveness (`?level=`, `running_only`, `active_only`) |
//! | GET | `/periodic-threads/{name}` | one of them, 404 `{"error"}` when unknown |
//! | GET | `/periodic-threads-health` | `{healthy, unhealthy_count, unhealthy_threads}` |
//! | GET | `/config/adapters` | `{"adapters": [{index, type_name, tier, primary, reconfigurable}]}` |
//! | GET, DELETE | `/cache/objects` | 503 `{"detail"}`: no L2 adapter, or listing/deleting by key is not supported |
//! | POST | `/cache/prefetches`, GET `/cache/prefetches/{id}` | 503 `{"detail"}` without L2; 501 otherwise |
//!
//! The background threads are found in the status tree (every `PeriodicThread` node carries
//! `thread_name`/`thread_alive`, every `BackgroundTask` a `*task_alive` field), so a new thread
//! shows up here without a list to maintain.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::server::StatusSource;

/// The run-time log filter (`GET /loglevel`), provided by the binary that installed the
/// subscriber.
pub trait LogControl: Send + Sync + std::fmt::Debug {
    /// The filter in force (tracing `EnvFilter` syntax).
    fn current(&self) -> String;
    /// Replaces the filter.
    ///
    /// # Errors
    /// A message naming the bad filter.
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// Routes of this module (for the per-route metric labels).
pub(super) const ROUTES: [&str; 7] = [
    "/loglevel",
    "/threads",
    "/periodic-threads",
    "/periodic-threads-health",
    "/config/adapters",
    "/cache/objects",
    "/cache/prefetches",
];

/// The admin routes, on state `S` from which a [`StatusSource`] is taken.
pub(super) fn routes<S>(source: StatusSource) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/loglevel", get(loglevel))
        .route("/threads", get(threads))
        .route("/periodic-threads", get(periodic_threads))
        .route("/periodic-threads/{name}", get(periodic_thread))
        .route("/periodic-threads-health", get(periodic_threads_health))
        .route("/config/adapters", get(config_adapters))
        .route("/cache/objects", get(cache_objects).delete(cache_objects))
        .route("/cache/prefetches", axum::routing::post(cache_prefetches))
        .route("/cache/prefetches/{request_id}", get(cache_prefetches))
        .with_state(Arc::new(source))
}

type Src = State<Arc<StatusSource>>;

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn detail(code: StatusCode, msg: &str) -> Response {
    (code, axum::Json(json!({ "detail": msg }))).into_response()
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    logger_name: Option<String>,
    level: Option<String>,
}

/// Python level names (what LMCache's CLI and operators send) to tracing levels.
fn tracing_level(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARN" | "WARNING" => "warn",
        "ERROR" | "CRITICAL" | "FATAL" => "error",
        "OFF" | "NOTSET" => "off",
        _ => return None,
    })
}

async fn loglevel(State(src): Src, Query(q): Query<LogQuery>) -> Response {
    let Some(control) = src.config().log_control.as_deref() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the log filter is not adjustable in this process\n".into(),
        );
    };
    let current = control.current();
    let name = q.logger_name.filter(|n| !n.is_empty());
    match (name, q.level.filter(|l| !l.is_empty())) {
        (None, None) => text(
            StatusCode::OK,
            format!("=== Loggers and Levels ===\nfilter: {current}\n"),
        ),
        (Some(name), None) => text(StatusCode::OK, format!("{name}: {current}")),
        (name, Some(level)) => {
            let Some(lv) = tracing_level(&level) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid log level: {level}"),
                );
            };
            let (filter, target) = match &name {
                Some(n) => (format!("{current},{n}={lv}"), n.as_str()),
                None => (lv.to_owned(), "root"),
            };
            match control.set(&filter) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!("Set {target} level to {}", level.to_ascii_uppercase()),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, e),
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct ThreadQuery {
    name: Option<String>,
}

async fn threads(Query(q): Query<ThreadQuery>) -> Response {
    let mut out = String::new();
    let mut n = 0usize;
    let mut rows: Vec<(u64, String)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            rows.push((tid, name.trim().to_owned()));
        }
    }
    rows.sort();
    let filter = q.name.map(|s| s.to_lowercase());
    for (tid, name) in rows {
        if filter
            .as_ref()
            .is_some_and(|f| !name.to_lowercase().contains(f))
        {
            continue;
        }
        n += 1;
        out.push_str(&format!("Thread: {name} (tid {tid})\n\n"));
    }
    out.push_str(&format!("\n=== Thread Summary ===\nTotal threads: {n}\n"));
    text(StatusCode::OK, out)
}

/// One background thread or task found in the status tree.
#[derive(Debug, Clone)]
struct Bg {
    name: String,
    path: String,
    alive: bool,
    healthy: bool,
    runs: u64,
    failed: u64,
    last_error: Value,
    interval: Value,
}

impl Bg {
    /// LMCache's levels: the threads kvtier cannot serve correctly without are `critical`,
    /// L2's tasks `high`, the rest `low`.
    fn level(&self) -> &'static str {
        if self.name.contains("evict") || self.name.contains("housekeep") {
            "critical"
        } else if self.path.contains("l2") {
            "high"
        } else {
            "low"
        }
    }

    fn to_json(&self) -> Value {
        let runs = self.runs;
        json!({
            "name": self.name,
            "level": self.level(),
            "interval": self.interval,
            "is_running": self.alive,
            "is_active": self.healthy,
            "total_runs": runs,
            "failed_runs": self.failed,
            "success_rate": (runs > 0).then(|| (runs.saturating_sub(self.failed)) as f64 / runs as f64 * 100.0),
            "last_error": self.last_error,
            "status_path": self.path,
        })
    }
}

fn collect(v: &Value, path: &str, out: &mut Vec<Bg>) {
    match v {
        Value::Object(m) => {
            let healthy = m.get("is_healthy").and_then(Value::as_bool).unwrap_or(true);
            if let (Some(name), Some(alive)) = (
                m.get("thread_name").and_then(Value::as_str),
                m.get("thread_alive").and_then(Value::as_bool),
            ) {
                out.push(Bg {
                    name: name.to_owned(),
                    path: path.to_owned(),
                    alive,
                    healthy,
                    runs: m.get("rounds_total").and_then(Value::as_u64).unwrap_or(0),
                    failed: m
                        .get("round_errors_total")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    last_error: m.get("last_error").cloned().unwrap_or(Value::Null),
                    interval: m.get("interval_seconds").cloned().unwrap_or(Value::Null),
                });
            }
            for (k, val) in m {
                if let Some(prefix) = k.strip_suffix("task_alive") {
                    let alive = val.as_bool().unwrap_or(false);
                    let field = |f: &str| m.get(&format!("{prefix}{f}")).cloned();
                    let task = prefix.trim_end_matches('_');
                    out.push(Bg {
                        name: if task.is_empty() {
                            path.to_owned()
                        } else {
                            format!("{path}.{task}")
                        },
                        path: path.to_owned(),
                        alive,
                        healthy: alive,
                        runs: field("rounds").and_then(|v| v.as_u64()).unwrap_or(0),
                        failed: 0,
                        last_error: field("last_error").unwrap_or(Value::Null),
                        interval: Value::Null,
                    });
                }
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                collect(val, &child, out);
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                collect(val, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn background(src: &StatusSource) -> Vec<Bg> {
    let tree = serde_json::to_value(src.status()).unwrap_or(Value::Null);
    let mut out = Vec::new();
    collect(&tree, "", &mut out);
    out
}

#[derive(Debug, Deserialize)]
struct PeriodicQuery {
    level: Option<String>,
    #[serde(default)]
    running_only: bool,
    #[serde(default)]
    active_only: bool,
}

const LEVELS: [&str; 4] = ["critical", "high", "medium", "low"];

async fn periodic_threads(State(src): Src, Query(q): Query<PeriodicQuery>) -> Response {
    let level = match q.level.map(|l| l.to_lowercase()) {
        Some(l) if !LEVELS.contains(&l.as_str()) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({
                    "error": format!("Invalid level: {l}. Valid values: critical, high, medium, low")
                })),
            )
                .into_response();
        }
        l => l,
    };
    let all = background(&src);
    let mut by_level = BTreeMap::new();
    for l in LEVELS {
        let of = all.iter().filter(|b| b.level() == l);
        by_level.insert(
            l,
            json!({
                "total": of.clone().count(),
                "running": of.clone().filter(|b| b.alive).count(),
                "active": of.filter(|b| b.healthy).count(),
            }),
        );
    }
    let summary = json!({
        "total_count": all.len(),
        "running_count": all.iter().filter(|b| b.alive).count(),
        "active_count": all.iter().filter(|b| b.healthy).count(),
        "by_level": by_level,
    });
    let threads: Vec<Value> = all
        .iter()
        .filter(|b| level.as_deref().is_none_or(|l| b.level() == l))
        .filter(|b| !q.running_only || b.alive)
        .filter(|b| !q.active_only || b.healthy)
        .map(Bg::to_json)
        .collect();
    axum::Json(json!({ "summary": summary, "threads": threads })).into_response()
}

async fn periodic_thread(State(src): Src, Path(name): Path<String>) -> Response {
    match background(&src).into_iter().find(|b| b.name == name) {
        Some(b) => axum::Json(b.to_json()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": format!("Thread not found: {name}") })),
        )
            .into_response(),
    }
}

async fn periodic_threads_health(State(src): Src) -> Response {
    let bad: Vec<Value> = background(&src)
        .into_iter()
        .filter(|b| !b.healthy && matches!(b.level(), "critical" | "high"))
        .map(|b| {
            json!({
                "name": b.name,
                "level": b.level(),
                "last_run_ago": Value::Null,
                "interval": b.interval,
                "last_error": b.last_error,
            })
        })
        .collect();
    axum::Json(json!({
        "healthy": bad.is_empty(),
        "unhealthy_count": bad.len(),
        "unhealthy_threads": bad,
    }))
    .into_response()
}

async fn config_adapters(State(src): Src) -> Response {
    let adapters: Vec<Value> = src
        .config()
        .l2
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({
                "index": i,
                "type_name": a.kind(),
                "tier": "l2",
                "primary": i == 0,
                "reconfigurable": false,
            })
        })
        .collect();
    axum::Json(json!({ "adapters": adapters })).into_response()
}

async fn cache_objects(State(src): Src) -> Response {
    if src.config().l2.adapters.is_empty() {
        return detail(StatusCode::SERVICE_UNAVAILABLE, "no L2 adapters configured");
    }
    detail(
        StatusCode::SERVICE_UNAVAILABLE,
        "adapter does not support listing or deleting objects by key",
    )
}

async fn cache_prefetches(State(src): Src) -> Response {
    if src.config().l2.adapters.is_empty() {
        return detail(StatusCode::SERVICE_UNAVAILABLE, "no L2 adapters configured");
    }
    detail(
        StatusCode::NOT_IMPLEMENTED,
        "warm prefetches over HTTP are not implemented by kvtier; a lookup prefetches from L2",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_threads_and_tasks_in_a_tree() {
        let tree = json!({
            "is_healthy": true,
            "evictor": {"is_healthy": true, "thread_name": "kvtier-l1-evict", "thread_alive": true,
                        "rounds_total": 5, "round_errors_total": 1, "last_error": null},
            "l2": {"adapters": [{"is_healthy": false, "probe_task_alive": false, "probe_rounds": 3}]},
        });
        let mut out = Vec::new();
        collect(&tree, "", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "kvtier-l1-evict");
        assert_eq!(out[0].level(), "critical");
        assert_eq!(out[1].name, "l2.adapters[0].probe");
        assert!(!out[1].alive);
        assert_eq!(out[1].runs, 3);
        assert_eq!(out[1].level(), "high");
    }

    #[test]
    fn python_levels_map_to_tracing() {
        assert_eq!(tracing_level("warning"), Some("warn"));
        assert_eq!(tracing_level("DEBUG"), Some("debug"));
        assert_eq!(tracing_level("loud"), None);
    }
}
