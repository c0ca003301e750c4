//! `kvtier status`: fetch a status tree over HTTP and print it, for kvtier and for LMCache 0.5.6
//! servers alike (`--url http://HOST:8080/status`).
//!
//! Rendering is the pure function [`render`] (tree in, text out), so golden tests compare exact
//! text. Rules:
//! - a banner, then the root as section `engine`; every JSON object is a section titled
//!   `<key>  [HEALTHY]` or `<key>  [UNHEALTHY]` (an object without `is_healthy` is healthy), its
//!   fields indented two more spaces; an unhealthy node's `unhealthy_reason` is its first line;
//! - scalars print as `key: value`; a number under a key containing `bytes` (or inside an object
//!   whose key does) is humanised in base 1024 with two decimals (`B`, `KB`, `MB`, `GB`, `TB`);
//!   a number under a key containing `latency` and ending in `_seconds` is shown as a duration
//!   (`ns`, `µs`, `ms`, `s`, two decimals) since four decimals of a second would hide it; other
//!   floats get four decimals; strings print bare;
//! - a non-empty list of objects prints as sections `key[i]`; other lists and empty objects print
//!   inline as JSON-like values;
//! - colour (green/red tags, red reasons) only when asked, which `run` does only on a terminal
//!   and never with `NO_COLOR` set.
//!
//! Exit codes: 0 healthy, 2 unhealthy (the root's `is_healthy` is false), 1 when the server cannot
//! be reached, refuses the token (401) or answers something that is not a JSON object; each
//! with one line on stderr. `--watch N` redraws every N seconds until interrupted and keeps going
//! through errors. The client is blocking (`ureq`, no TLS, proxy variables ignored).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{Map, Value};

/// Flags of `kvtier status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Status URL. kvtier serves /api/status (and /status); an LMCache 0.5.6 server serves
    /// /status on its --http-port (8080 by default). A URL without a path gets /api/status.
    #[arg(
        long,
        env = "KVTIER_STATUS_URL",
        default_value = "http://localhost:8080/api/status"
    )]
    url: String,

    /// Print the raw JSON tree (indented) instead of the formatted view.
    #[arg(long)]
    json: bool,

    /// Redraw every SECONDS seconds (clearing the screen on a terminal) until Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<f64>,

    /// Bearer token for a server started with --http-auth-token.
    #[arg(long, env = "KVTIER_HTTP_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Seconds to wait for the server's answer.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    timeout_seconds: f64,
}

/// How [`render`] decorates its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours for the health tags and reasons.
    pub color: bool,
}

const BANNER: &str = "============================================================";
const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// Renders a status tree as the pretty text view (see the module docs). Every line ends with
/// `\n`.
pub fn render(tree: &Value, style: Style) -> String {
    let mut out = String::with_capacity(4096);
    let engine_type = tree
        .get("engine_type")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    out.push_str(BANNER);
    out.push('\n');
    out.push_str("  Cache Server Status (engine_type: ");
    out.push_str(engine_type);
    out.push_str(")\n");
    out.push_str(BANNER);
    out.push('\n');
    match tree {
        Value::Object(map) => section(&mut out, "engine", map, 0, false, style),
        other => {
            out.push_str("engine: ");
            out.push_str(&scalar(other, Kind::Plain));
            out.push('\n');
        }
    }
    out.push_str(BANNER);
    out.push('\n');
    out
}

fn is_healthy(map: &Map<String, Value>) -> bool {
    map.get("is_healthy")
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn section(
    out: &mut String,
    title: &str,
    map: &Map<String, Value>,
    depth: usize,
    bytes: bool,
    style: Style,
) {
    let healthy = is_healthy(map);
    indent(out, depth);
    out.push_str(title);
    out.push_str("  ");
    let (tag, colour) = if healthy {
        ("[HEALTHY]", GREEN)
    } else {
        ("[UNHEALTHY]", RED)
    };
    if style.color {
        out.push_str(colour);
        out.push_str(tag);
        out.push_str(RESET);
    } else {
        out.push_str(tag);
    }
    out.push('\n');
    if let Some(reason) = map.get("unhealthy_reason") {
        indent(out, depth + 1);
        out.push_str("unhealthy_reason: ");
        let text = scalar(reason, Kind::Plain);
        if style.color {
            out.push_str(RED);
            out.push_str(&text);
            out.push_str(RESET);
        } else {
            out.push_str(&text);
        }
        out.push('\n');
    }
    for (key, value) in map {
        if key == "is_healthy" || key == "unhealthy_reason" {
            continue;
        }
        let kind = if bytes || key.contains("bytes") {
            Kind::Bytes
        } else if key.contains("latency") && key.ends_with("_seconds") {
            Kind::Latency
        } else {
            Kind::Plain
        };
        let bytes = kind == Kind::Bytes;
        match value {
            Value::Object(child) if !child.is_empty() => {
                section(out, key, child, depth + 1, bytes, style);
            }
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Object(child) = item {
                        section(out, &format!("{key}[{i}]"), child, depth + 1, bytes, style);
                    }
                }
            }
            other => {
                indent(out, depth + 1);
                out.push_str(key);
                out.push_str(": ");
                out.push_str(&scalar(other, kind));
                out.push('\n');
            }
        }
    }
}

/// How a number is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Bytes,
    Latency,
}

/// A duration in seconds with a unit that keeps it readable.
pub fn human_seconds(s: f64) -> String {
    let a = s.abs();
    if a == 0.0 {
        "0.00 s".into()
    } else if a < 1e-6 {
        format!("{:.2} ns", s * 1e9)
    } else if a < 1e-3 {
        format!("{:.2} µs", s * 1e6)
    } else if a < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `n` bytes in base 1024 with two decimals.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = UNITS[0];
    for (i, u) in UNITS.iter().enumerate() {
        unit = u;
        if v.abs() < 1024.0 || i == UNITS.len() - 1 {
            break;
        }
        v /= 1024.0;
    }
    format!("{v:.2} {unit}")
}

fn scalar(v: &Value, kind: Kind) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            match kind {
                Kind::Bytes => human_bytes(f),
                Kind::Latency => human_seconds(f),
                Kind::Plain if n.is_f64() => format!("{f:.4}"),
                Kind::Plain => n.to_string(),
            }
        }
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(_) => inline(v),
    }
}

/// A value inside an inline list or object: strings quoted, everything else as JSON.
fn inline(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), inline(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// The nodes that are unhealthy themselves (not only through a child), as
/// `path: reason`, depth first.
pub fn unhealthy_causes(tree: &Value) -> Vec<String> {
    fn walk(path: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                let mut child_unhealthy = false;
                for (k, c) in map {
                    let before = out.len();
                    match c {
                        Value::Object(_) => walk(&format!("{path}.{k}"), c, out),
                        Value::Array(items) => {
                            for (i, item) in items.iter().enumerate() {
                                walk(&format!("{path}.{k}[{i}]"), item, out);
                            }
                        }
                        _ => {}
                    }
                    child_unhealthy |= out.len() > before;
                }
                if !is_healthy(map) && !child_unhealthy {
                    let reason = map.get("unhealthy_reason").map_or_else(
                        || "is_healthy is false".to_owned(),
                        |r| scalar(r, Kind::Plain),
                    );
                    out.push(format!("{path}: {reason}"));
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), item, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("engine", tree, &mut out);
    out
}

/// Why a fetch failed; each is one line.
#[derive(Debug)]
enum FetchError {
    Connect(String),
    Unauthorized { sent_token: bool },
    Status(u16, String),
    BadAnswer(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect: {e}"),
            Self::Unauthorized { sent_token: false } => f.write_str(
                "401 Unauthorized: the server requires a token (pass --token or set KVTIER_HTTP_TOKEN)",
            ),
            Self::Unauthorized { sent_token: true } => {
                f.write_str("401 Unauthorized: the server rejected the token")
            }
            Self::Status(code, body) => write!(f, "HTTP {code}: {body}"),
            Self::BadAnswer(e) => write!(f, "bad answer: {e}"),
        }
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    match flat.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat.to_owned(),
    }
}

struct Client {
    agent: ureq::Agent,
    url: String,
    token: Option<String>,
}

impl Client {
    fn fetch(&self) -> Result<Value, FetchError> {
        let mut req = self.agent.get(&self.url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req
            .call()
            .map_err(|e| FetchError::Connect(one_line(&e.to_string(), 200)))?;
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| FetchError::BadAnswer(one_line(&e.to_string(), 200)))?;
        if code == 401 {
            return Err(FetchError::Unauthorized {
                sent_token: self.token.is_some(),
            });
        }
        if !(200..300).contains(&code) {
            return Err(FetchError::Status(code, one_line(&body, 200)));
        }
        match serde_json::from_str::<Value>(&body) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(FetchError::BadAnswer(
                "the body is JSON but not an object".into(),
            )),
            Err(e) => Err(FetchError::BadAnswer(format!("not JSON ({e})"))),
        }
    }
}

/// Appends `/api/status` to a URL whose path is empty or `/`.
fn normalise_url(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    if path.is_empty() || path == "/" {
        format!("{}/api/status", url.trim_end_matches('/'))
    } else {
        url.to_owned()
    }
}

/// A positive, finite number of seconds given to `--flag`.
pub(crate) fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    if !(v.is_finite() && v > 0.0) {
        return Err(format!(
            "--{flag} must be a positive number of seconds, got {v}"
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|e| format!("--{flag}: {e}"))
}

/// The blocking HTTP client of the admin commands: HTTP error codes are answers (the caller
/// reads them), proxy variables are ignored (the admin API is reached directly), and the whole
/// exchange is bounded by `timeout`.
pub(crate) fn http_agent(user_agent: &str, timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(timeout))
        .user_agent(user_agent)
        .build()
        .into()
}

/// UTC wall-clock time as `HH:MM:SS` (for the watch header).
fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02} UTC",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn output(tree: &Value, json: bool, style: Style) -> String {
    if json {
        let mut s = serde_json::to_string_pretty(tree).unwrap_or_else(|_| tree.to_string());
        s.push('\n');
        s
    } else {
        render(tree, style)
    }
}

fn health_exit(tree: &Value) -> (ExitCode, Option<String>) {
    let healthy = tree
        .get("is_healthy")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if healthy {
        (ExitCode::SUCCESS, None)
    } else {
        let causes = unhealthy_causes(tree);
        let line = if causes.is_empty() {
            "UNHEALTHY".to_owned()
        } else {
            format!("UNHEALTHY: {}", causes.join("; "))
        };
        (ExitCode::from(2), Some(line))
    }
}

/// Runs `kvtier status`. Never returns an error: every failure is a one-line message and an exit
/// code.
pub fn run(args: StatusArgs) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("kvtier status: {msg}");
        ExitCode::FAILURE
    };
    let timeout = match seconds("timeout-seconds", args.timeout_seconds) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let watch = match args.watch.map(|w| seconds("watch", w)).transpose() {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    let url = normalise_url(&args.url);
    let agent = http_agent(
        concat!("kvtier-status/", env!("CARGO_PKG_VERSION")),
        timeout,
    );
    let client = Client {
        agent,
        url: url.clone(),
        token: args.token,
    };
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let style = Style {
        color: terminal && std::env::var_os("NO_COLOR").is_none(),
    };
    let Some(every) = watch else {
        return match client.fetch() {
            Ok(tree) => {
                let mut lock = stdout.lock();
                let written = lock
                    .write_all(output(&tree, args.json, style).as_bytes())
                    .and_then(|()| lock.flush());
                if let Err(e) = written {
                    return fail(&format!("writing the output: {e}"));
                }
                let (code, line) = health_exit(&tree);
                if let Some(line) = line {
                    eprintln!("kvtier status: {url}: {line}");
                }
                code
            }
            Err(e) => fail(&format!("{url}: {e}")),
        };
    };
    loop {
        let body = match client.fetch() {
            Ok(tree) => {
                let mut s = output(&tree, args.json, style);
                if let (_, Some(line)) = health_exit(&tree) {
                    s.push_str(&line);
                    s.push('\n');
                }
                s
            }
            Err(e) => format!("kvtier status: {url}: {e}\n"),
        };
        let mut frame = String::new();
        if terminal {
            // Home the cursor and clear the screen, then draw the whole frame at once.
            frame.push_str("\x1b[H\x1b[2J");
        }
        frame.push_str(&format!(
            "Every {:.1}s: {url}    {}\n\n",
            every.as_secs_f64(),
            clock()
        ));
        frame.push_str(&body);
        if !terminal {
            frame.push('\n');
        }
        let mut lock = stdout.lock();
        if lock
            .write_all(frame.as_bytes())
            .and_then(|()| lock.flush())
            .is_err()
        {
            // The reader went away (e.g. a closed pipe): stop quietly.
            return ExitCode::SUCCESS;
        }
        drop(lock);
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// Compares `actual` with the committed golden file byte for byte. `UPDATE_GOLDEN=1`
    /// rewrites the file instead (review the diff before committing).
    fn golden(actual: &str, name: &str) {
        let path = fixture(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).expect("write golden");
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert!(
            expected == actual,
            "{name} differs from the golden file.\n--- expected\n{expected}\n--- actual\n{actual}"
        );
    }

    fn load(name: &str) -> Value {
        let text = std::fs::read_to_string(fixture(name)).expect("fixture");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    #[test]
    fn golden_kvtier_tree() {
        let tree = load("kvtier-status.json");
        golden(&render(&tree, Style { color: false }), "kvtier-status.txt");
        assert_eq!(health_exit(&tree).0, ExitCode::SUCCESS);
    }

    #[test]
    fn golden_kvtier_unhealthy_tree() {
        let tree = load("kvtier-status-unhealthy.json");
        golden(
            &render(&tree, Style { color: false }),
            "kvtier-status-unhealthy.txt",
        );
        golden(
            &render(&tree, Style { color: true }),
            "kvtier-status-unhealthy.color.txt",
        );
        let (code, line) = health_exit(&tree);
        assert_eq!(code, ExitCode::from(2));
        assert_eq!(
            line.as_deref(),
            Some(
                "UNHEALTHY: engine.storage_manager.l1_eviction_controller: eviction thread is \
                 not running"
            )
        );
    }

    #[test]
    fn golden_lmcache_sample() {
        let tree = load("lmcache-status-sample.json");
        golden(&render(&tree, Style { color: false }), "lmcache-status.txt");
        assert_eq!(health_exit(&tree).0, ExitCode::SUCCESS);
    }

    #[test]
    fn json_output_is_the_tree_indented() {
        let tree = load("lmcache-status-sample.json");
        let text = output(&tree, true, Style { color: true });
        assert!(!text.contains('\x1b'));
        let back: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(back, tree);
        assert!(text.starts_with("{\n  \"is_healthy\": true,\n  \"engine_type\""));
    }

    #[test]
    fn formatting_rules() {
        assert_eq!(human_bytes(0.0), "0.00 B");
        assert_eq!(human_bytes(1023.0), "1023.00 B");
        assert_eq!(human_bytes(786_432.0), "768.00 KB");
        assert_eq!(human_bytes(2_147_483_648.0), "2.00 GB");
        assert_eq!(human_bytes(3.0 * 1024f64.powi(4)), "3.00 TB");
        assert_eq!(human_bytes(5.0 * 1024f64.powi(5)), "5120.00 TB");
        assert_eq!(human_seconds(0.0), "0.00 s");
        assert_eq!(human_seconds(5e-7), "500.00 ns");
        assert_eq!(human_seconds(4.5e-6), "4.50 µs");
        assert_eq!(human_seconds(0.0125), "12.50 ms");
        assert_eq!(human_seconds(2.5), "2.50 s");
        let tree = serde_json::json!({
            "is_healthy": false,
            "unhealthy_reason": "unhealthy: child",
            "ratio": 0.5,
            "whole_float": 120.0,
            "count": 3,
            "name": "x",
            "nothing": null,
            "flag": true,
            "empty_map": {},
            "empty_list": [],
            "ints": [1, 2],
            "strs": ["a", "b"],
            "mixed": [{"a": 1}, 2],
            "capacity_bytes_by_backend": {"dram": 1024},
            "used_bytes": 1536,
            "latency_p99_seconds": 0.000016383,
            "interval_seconds": 0.1,
            "items": [{"k": 1}, {"is_healthy": false, "unhealthy_reason": "broken"}],
            "child": {"is_healthy": false, "unhealthy_reason": "own"},
            "plain": {"x": 1},
        });
        let text = render(&tree, Style { color: false });
        let expected = "\
============================================================
  Cache Server Status (engine_type: unknown)
============================================================
engine  [UNHEALTHY]
  unhealthy_reason: unhealthy: child
  ratio: 0.5000
  whole_float: 120.0000
  count: 3
  name: x
  nothing: null
  flag: true
  empty_map: {}
  empty_list: []
  ints: [1, 2]
  strs: [\"a\", \"b\"]
  mixed: [{\"a\": 1}, 2]
  capacity_bytes_by_backend  [HEALTHY]
    dram: 1.00 KB
  used_bytes: 1.50 KB
  latency_p99_seconds: 16.38 µs
  interval_seconds: 0.1000
  items[0]  [HEALTHY]
    k: 1
  items[1]  [UNHEALTHY]
    unhealthy_reason: broken
  child  [UNHEALTHY]
    unhealthy_reason: own
  plain  [HEALTHY]
    x: 1
============================================================
";
        assert_eq!(text, expected);
        assert_eq!(
            unhealthy_causes(&tree),
            vec!["engine.items[1]: broken", "engine.child: own"]
        );
    }

    #[test]
    fn urls_without_a_path_get_the_status_path() {
        assert_eq!(normalise_url("http://h:8000"), "http://h:8000/api/status");
        assert_eq!(normalise_url("http://h:8000/"), "http://h:8000/api/status");
        assert_eq!(normalise_url("h:8000"), "h:8000/api/status");
        assert_eq!(
            normalise_url("http://h:8080/status"),
            "http://h:8080/status"
        );
    }
}
