//! The `kvtier` binary end to end: `kvtier status` output and exit codes against a tiny local
//! HTTP server serving fixtures and against a real in-process kvtier server, and `kvtier serve`
//! refusing an unauthenticated non-loopback bind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvtier_server::http::{AuthToken, HttpConfig};
use kvtier_server::{Server, ServerConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).expect("fixture")
}

/// `kvtier` with a clean environment for the variables it reads.
fn kvtier() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvtier"));
    for v in [
        "KVTIER_HTTP_TOKEN",
        "KVTIER_STATUS_URL",
        "KVTIER_HTTP_HOST",
        "KVTIER_HTTP_INSECURE",
        "NO_COLOR",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("runs");
    (
        status.code().expect("exited normally"),
        String::from_utf8(stdout).expect("utf-8"),
        String::from_utf8(stderr).expect("utf-8"),
    )
}

/// A one-route HTTP/1.1 server that answers every request with `code` and `body`, and records
/// the request heads it saw.
struct Canned {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Canned {
    fn start(code: u16, body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&head).into_owned());
                let reason = match code {
                    200 => "OK",
                    401 => "Unauthorized",
                    _ => "Other",
                };
                let reply = format!(
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ignored = s.write_all(reply.as_bytes());
            }
        });
        Self { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/api/status", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

#[test]
fn status_renders_the_kvtier_fixture_and_exits_0() {
    let srv = Canned::start(200, read_fixture("kvtier-status.json"));
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, read_fixture("kvtier-status.txt"));
    assert!(
        !out.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
    assert_eq!(err, "");
    let reqs = srv.requests();
    assert!(
        reqs[0].starts_with("GET /api/status HTTP/1.1\r\n"),
        "{reqs:?}"
    );
    assert!(!reqs[0].to_ascii_lowercase().contains("authorization"));
}

/// Runs `cmd` with stdout on a pseudo-terminal; returns what it printed.
fn run_on_a_terminal(cmd: &mut Command) -> String {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().expect("utf-8 path"))
        .expect("open the terminal");
    let mut child = cmd
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // The command still holds our copy of the terminal; drop it so the master sees EIO once the
    // child exits.
    cmd.stdout(Stdio::null());
    // Drain while it runs (a terminal buffers little), until the last writer closes (EIO).
    let reader = std::thread::spawn(move || {
        let mut master = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    child.wait().expect("exits");
    String::from_utf8(reader.join().expect("reader")).expect("utf-8")
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let srv = Canned::start(200, read_fixture("kvtier-status-unhealthy.json"));
    let tty = run_on_a_terminal(kvtier().args(["status", "--url", &srv.url()]));
    assert!(
        tty.contains("engine  \x1b[31m[UNHEALTHY]\x1b[0m"),
        "{tty:?}"
    );
    assert!(tty.contains("l1_manager  \x1b[32m[HEALTHY]\x1b[0m"));
    let no_color = run_on_a_terminal(
        kvtier()
            .args(["status", "--url", &srv.url()])
            .env("NO_COLOR", "1"),
    );
    assert!(no_color.contains("engine  [UNHEALTHY]"), "{no_color:?}");
    assert!(!no_color.contains('\x1b'));
}

#[test]
fn status_renders_the_lmcache_sample() {
    let srv = Canned::start(200, read_fixture("lmcache-status-sample.json"));
    let url = format!("http://{}/status", srv.addr);
    let (code, out, err) = run(kvtier().args(["status", "--url", &url]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, read_fixture("lmcache-status.txt"));
    assert!(srv.requests()[0].starts_with("GET /status HTTP/1.1\r\n"));
}

#[test]
fn status_exits_2_on_an_unhealthy_tree_and_says_why() {
    let srv = Canned::start(200, read_fixture("kvtier-status-unhealthy.json"));
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_eq!(code, 2);
    assert_eq!(out, read_fixture("kvtier-status-unhealthy.txt"));
    assert_eq!(
        err,
        format!(
            "kvtier status: {}: UNHEALTHY: engine.storage_manager.l1_eviction_controller: \
             eviction thread is not running\n",
            srv.url()
        )
    );
    // --json prints the tree as is, with the same exit code.
    let (code, out, _) = run(kvtier().args(["status", "--json", "--url", &srv.url()]));
    assert_eq!(code, 2);
    let printed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let expected: serde_json::Value =
        serde_json::from_str(&read_fixture("kvtier-status-unhealthy.json")).expect("JSON");
    assert_eq!(printed, expected);
}

fn assert_one_line_failure(code: i32, out: &str, err: &str, needle: &str) {
    assert_eq!(code, 1, "stderr: {err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("kvtier status: "), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn status_exits_1_on_401_bad_answers_and_no_server() {
    let srv = Canned::start(
        401,
        r#"{"status":"error","reason":"missing or invalid bearer token"}"#.into(),
    );
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_one_line_failure(code, &out, &err, "401 Unauthorized");
    assert!(err.contains("--token"));
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url(), "--token", "nope"]));
    assert_one_line_failure(code, &out, &err, "rejected the token");

    let srv = Canned::start(200, "<html>not json</html>".into());
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_one_line_failure(code, &out, &err, "bad answer");

    let srv = Canned::start(200, "[1, 2]".into());
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_one_line_failure(code, &out, &err, "not an object");

    let srv = Canned::start(503, r#"{"error":"engine not initialized"}"#.into());
    let (code, out, err) = run(kvtier().args(["status", "--url", &srv.url()]));
    assert_one_line_failure(code, &out, &err, "HTTP 503");

    // A port nobody listens on (picked below the ephemeral range, never handed out twice).
    let closed = kvtier_storage::testsuite::free_port();
    let url = format!("http://127.0.0.1:{closed}/api/status");
    let (code, out, err) = run(kvtier().args(["status", "--url", &url]));
    assert_one_line_failure(code, &out, &err, "cannot connect");

    let (code, _, err) = run(kvtier().args(["status", "--watch", "0", "--url", &url]));
    assert_eq!(code, 1);
    assert!(err.contains("--watch"), "{err}");
}

#[test]
fn status_sends_the_token_from_the_flag_or_the_environment() {
    let srv = Canned::start(200, read_fixture("kvtier-status.json"));
    let (code, _, _) = run(kvtier().args(["status", "--url", &srv.url(), "--token", "flag-tok"]));
    assert_eq!(code, 0);
    let (code, _, _) = run(kvtier()
        .args(["status", "--url", &srv.url()])
        .env("KVTIER_HTTP_TOKEN", "env-tok"));
    assert_eq!(code, 0);
    let reqs = srv.requests();
    assert!(
        reqs[0].contains("authorization: Bearer flag-tok\r\n"),
        "{reqs:?}"
    );
    assert!(
        reqs[1].contains("authorization: Bearer env-tok\r\n"),
        "{reqs:?}"
    );
}

#[test]
fn status_watch_redraws_until_interrupted() {
    let srv = Canned::start(200, read_fixture("lmcache-status-sample.json"));
    let mut cmd = kvtier();
    // An operator's Ctrl-C reaches a foreground process with SIGINT's default action; a test
    // harness started in the background by a non-interactive shell has SIGINT ignored, and an
    // ignored signal stays ignored across exec. Restore the default in the child.
    // SAFETY: between fork and exec only the async-signal-safe `signal(2)` runs.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = cmd
        .args(["status", "--watch", "0.05", "--url", &srv.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait (bounded) for a fourth poll, then stop it the way an operator would. The loop writes
    // and flushes a frame before it sleeps and polls again, so a fourth request proves three
    // whole frames are in the pipe; a third request alone does not (SIGINT can land between
    // the third answer and its frame, which is how CI once saw two frames).
    let deadline = Instant::now() + Duration::from_secs(20);
    while srv.requests().len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let out = child.wait_with_output().expect("exits");
    assert!(srv.requests().len() >= 4);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    // Three frames are whole; a later one may have been cut short by the signal.
    let frames: Vec<&str> = stdout.split("Every 0.1s: ").skip(1).collect();
    assert!(frames.len() >= 3, "{} frames:\n{stdout}", frames.len());
    for (i, frame) in frames.iter().take(3).enumerate() {
        assert!(
            frame.contains("engine  [HEALTHY]"),
            "frame {i} lacks the tree:\n{frame}"
        );
    }
    assert!(!stdout.contains('\x1b'), "no screen clearing into a pipe");
}

// ---- against a real kvtier server ----

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn server_config(token: Option<&str>) -> ServerConfig {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut c = ServerConfig::ephemeral(format!("kvtier_cli_test_{}_{n}", std::process::id()));
    c.l1.size_bytes = 8 << 20;
    c.http = Some(HttpConfig {
        auth_token: token.map(|t| AuthToken::new(t).expect("valid")),
        ..HttpConfig::local(0)
    });
    c
}

#[test]
fn status_against_a_live_server_with_a_token() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = Server::start(server_config(Some("live-token")), rt.handle()).expect("starts");
    let addr = server.http_addr().expect("http");
    let url = format!("http://{addr}/api/status");

    let (code, out, err) = run(kvtier().args(["status", "--url", &url]));
    assert_one_line_failure(code, &out, &err, "401 Unauthorized");

    let (code, out, err) = run(kvtier().args(["status", "--url", &url, "--token", "live-token"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("engine  [HEALTHY]\n  engine_type: kvtier\n"),
        "{out}"
    );
    assert!(out.contains("    l1_manager  [HEALTHY]\n"));
    assert!(out.contains("      memory_total_bytes: 8.00 MB\n"));

    // A URL without a path goes to /api/status; the /status alias works too.
    let (code, _, err) = run(kvtier()
        .args(["status", "--url", &format!("http://{addr}")])
        .env("KVTIER_HTTP_TOKEN", "live-token"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(kvtier()
        .args(["status", "--url", &format!("http://{addr}/status")])
        .env("KVTIER_HTTP_TOKEN", "live-token"));
    assert_eq!(code, 0, "{err}");

    server.engine().evictor().inject_crash();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, out, err) = loop {
        let r = run(kvtier().args(["status", "--url", &url, "--token", "live-token"]));
        if r.0 != 0 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 2, "{err}");
    assert!(out.contains("engine  [UNHEALTHY]\n  unhealthy_reason: unhealthy: storage_manager\n"));
    assert!(
        err.contains(
            "engine.storage_manager.l1_eviction_controller: eviction thread is not running"
        )
    );
    server.shutdown();
}

#[test]
fn serve_refuses_a_public_bind_without_a_token() {
    let shm = format!("kvtier_cli_refuse_{}", std::process::id());
    let (code, out, err) = run(kvtier().args([
        "serve",
        "--http-host",
        "0.0.0.0",
        "--http-port",
        "0",
        "--port",
        "0",
        "--shm-name",
        &shm,
    ]));
    assert_ne!(code, 0);
    assert_eq!(out, "");
    assert!(err.contains("--http-auth-token"), "{err}");
    assert!(err.contains("--http-insecure"), "{err}");
    assert!(!std::path::Path::new("/dev/shm").join(&shm).exists());

    // An empty or unsendable token is refused too, naming the flag.
    let (code, _, err) = run(kvtier().args(["serve", "--http-auth-token", "two words"]));
    assert_ne!(code, 0);
    assert!(err.contains("--http-auth-token"), "{err}");
}
