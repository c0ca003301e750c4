//! `kvtier explain REQUEST_ID`: why a request's lookup found the prefix it found.
//!
//! Fetches `GET /api/lookups?request_id=ID` from a running kvtier and prints each recorded
//! lookup of the request: chunks asked and found per tier, the first missing chunk and its
//! reason (`never_stored`, `evicted`, `other_model_or_salt`, `discarded`, `l2_unavailable`,
//! ...; see `kvtier_server::engine::explain`), timings and retrieves. `--json` prints the
//! server's answer as it is. Rendering is the pure function [`render`] (records in, text out).
//!
//! Exit codes: 0 when the request has records; 1 when it has none, the server cannot be reached,
//! refuses the token, or answers something else (one line on stderr). The client is blocking
//! (`ureq`, no TLS, proxy variables ignored).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::Value;

/// Flags of `kvtier explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The request id the engine used in its lookup (vLLM's request id).
    request_id: String,

    /// Base URL of the server's HTTP API (its --http-port).
    #[arg(long, env = "KVTIER_URL", default_value = "http://localhost:8080")]
    url: String,

    /// Print the server's JSON answer instead of the text view.
    #[arg(long)]
    json: bool,

    /// Bearer token for a server started with --http-auth-token.
    #[arg(long, env = "KVTIER_HTTP_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Seconds to wait for the server's answer.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    timeout_seconds: f64,
}

/// Runs `kvtier explain`.
pub fn run(args: ExplainArgs) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("kvtier explain: {msg}");
        ExitCode::FAILURE
    };
    let timeout = match crate::status::seconds("timeout-seconds", args.timeout_seconds) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let base = args.url.trim_end_matches('/');
    let url = format!("{base}/api/lookups");
    let agent = crate::status::http_agent(
        concat!("kvtier-explain/", env!("CARGO_PKG_VERSION")),
        timeout,
    );
    let mut req = agent.get(&url).query("request_id", &args.request_id);
    if let Some(t) = &args.token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = match req.call() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot reach {url}: {e}")),
    };
    let code = resp.status().as_u16();
    let body = match resp.body_mut().read_to_string() {
        Ok(b) => b,
        Err(e) => return fail(&format!("reading the answer of {url}: {e}")),
    };
    let answer: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(_) => {
            return fail(&format!(
                "{url} answered {code} with something that is not JSON (is this a kvtier server?)"
            ));
        }
    };
    if code == 401 {
        return fail("the server requires a bearer token (--token or KVTIER_HTTP_TOKEN)");
    }
    if code != 200 {
        let reason = answer
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return fail(&format!("{reason} (HTTP {code})"));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_else(|_| answer.to_string())
        );
        return ExitCode::SUCCESS;
    }
    let records = answer
        .get("records")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    print!("{}", render(&args.request_id, &records, now_ms()));
    ExitCode::SUCCESS
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `HH:MM:SS.mmm UTC` of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

/// The text view of a request's lookup records (oldest first); `now_ms` dates them.
pub fn render(request_id: &str, records: &[Value], now_ms: u64) -> String {
    let mut out = String::new();
    let n = records.len();
    let _ = writeln!(
        out,
        "request {request_id:?}: {n} lookup{} recorded{}",
        if n == 1 { "" } else { "s" },
        if n > 1 { " (oldest first)" } else { "" }
    );
    for r in records {
        let at = u(r, "unix_ms");
        let ago = now_ms.saturating_sub(at) as f64 / 1000.0;
        let salt = s(r, "cache_salt");
        let _ = writeln!(
            out,
            "\nlookup #{} at {} ({ago:.1} s ago)  model {}  cache_salt {}",
            u(r, "seq"),
            clock(at),
            s(r, "model"),
            if salt.is_empty() { "(none)" } else { salt }
        );
        let asked = u(r, "chunks_requested");
        let l1 = u(r, "hit_chunks_l1");
        let l2 = r.get("hit_chunks_l2").and_then(Value::as_u64);
        let hit = l1 + l2.unwrap_or(0);
        let pct = if asked == 0 {
            100.0
        } else {
            hit as f64 * 100.0 / asked as f64
        };
        let l2_text = match (l2, s(r, "state")) {
            (Some(n), _) => format!(", {n} from L2"),
            (None, "l2_pending") => ", L2 prefetch not collected yet".to_owned(),
            (None, "abandoned") => ", L2 prefetch abandoned".to_owned(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  asked {asked} chunk{}: {l1} from L1{l2_text}; prefix {hit} ({pct:.1} %)",
            if asked == 1 { "" } else { "s" },
        );
        match r.get("miss").filter(|m| !m.is_null()) {
            Some(m) => {
                let hash = s(m, "chunk_hash");
                let short = hash.get(..16).unwrap_or(hash);
                let _ = writeln!(
                    out,
                    "  first miss: chunk {} ({short}…): {}",
                    u(m, "chunk_index"),
                    s(m, "reason")
                );
                let _ = writeln!(out, "    {}", s(m, "detail"));
            }
            None if s(r, "state") == "l2_pending" => {
                let _ = writeln!(
                    out,
                    "  first miss: unknown until the engine collects the L2 prefetch result"
                );
            }
            None => {
                let _ = writeln!(out, "  no miss: every chunk asked was found");
            }
        }
        let mut timing = format!("  lookup took {} µs", u(r, "lookup_us"));
        if let Some(ms) = r.get("l2_prefetch_ms").and_then(Value::as_f64) {
            let _ = write!(timing, "; L2 prefetch ran {ms:.1} ms");
        }
        let waits = u(r, "wait_timeouts");
        if waits > 0 {
            let _ = write!(
                timing,
                "; {waits} wait{} timed out",
                if waits == 1 { "" } else { "s" }
            );
        }
        let _ = writeln!(out, "{timing}");
        let _ = writeln!(
            out,
            "  retrieves: {} objects handed to the engine, {} failed",
            u(r, "retrieved_objects"),
            u(r, "failed_retrieves")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_a_miss_and_a_hit() {
        let records = vec![
            json!({"seq": 7, "request_id": "r", "model": "m", "cache_salt": "", "unix_ms": 3_600_000,
                   "chunks_requested": 4, "hit_chunks_l1": 1, "hit_chunks_l2": null, "state": "done",
                   "lookup_us": 12, "l2_prefetch_ms": null, "wait_timeouts": 0,
                   "miss": {"chunk_index": 1, "chunk_hash": "00112233445566778899", "reason": "evicted",
                            "detail": "evicted from L1 3 s ago to make room for a store (policy LRU)",
                            "age_seconds": 3},
                   "retrieved_objects": 1, "failed_retrieves": 0}),
            json!({"seq": 8, "request_id": "r", "model": "m", "cache_salt": "t", "unix_ms": 3_601_000,
                   "chunks_requested": 2, "hit_chunks_l1": 1, "hit_chunks_l2": 1, "state": "done",
                   "lookup_us": 9, "l2_prefetch_ms": 2.5, "wait_timeouts": 1, "miss": null,
                   "retrieved_objects": 2, "failed_retrieves": 0}),
        ];
        let text = render("r", &records, 3_602_000);
        assert_eq!(
            text,
            "request \"r\": 2 lookups recorded (oldest first)\n\
             \n\
             lookup #7 at 01:00:00.000 UTC (2.0 s ago)  model m  cache_salt (none)\n\
             \x20 asked 4 chunks: 1 from L1; prefix 1 (25.0 %)\n\
             \x20 first miss: chunk 1 (0011223344556677…): evicted\n\
             \x20   evicted from L1 3 s ago to make room for a store (policy LRU)\n\
             \x20 lookup took 12 µs\n\
             \x20 retrieves: 1 objects handed to the engine, 0 failed\n\
             \n\
             lookup #8 at 01:00:01.000 UTC (1.0 s ago)  model m  cache_salt t\n\
             \x20 asked 2 chunks: 1 from L1, 1 from L2; prefix 2 (100.0 %)\n\
             \x20 no miss: every chunk asked was found\n\
             \x20 lookup took 9 µs; L2 prefetch ran 2.5 ms; 1 wait timed out\n\
             \x20 retrieves: 2 objects handed to the engine, 0 failed\n"
        );
    }
}
