//! Real Redis servers for tests: [`RedisServer`] (standalone, restartable on its port),
//! [`RedisCluster`] (masters with one replica each), [`TestCerts`] and [`TlsRedisServer`], and the
//! loopback ports they listen on ([`free_port`]: below the kernel's ephemeral range, never handed
//! out twice in one process). A missing `redis-server` or `redis-cli` is a panic with
//! instructions, never a skip.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A real `redis-server` on a free loopback port, without persistence, in a temp directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`; 32768 if unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A free loopback port in `lo..hi` for a test server, never handed out twice in this process.
/// Candidates walk the range from a per-process start in steps of a prime, so parallel test
/// processes start apart.
/// `offset` is `0` for a plain port; a Redis Cluster node passes `10_000` so that its bus port
/// `p + 10000` is checked free and reserved together with `p`.
fn free_port_in(lo: u16, hi: u16, offset: u16) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static STEP: AtomicU64 = AtomicU64::new(0);
    let span = u64::from(hi.saturating_sub(lo).max(1));
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..span {
        let n = STEP.fetch_add(1, Relaxed);
        let candidate = u64::from(std::process::id()).wrapping_mul(7_919) + n * 104_729;
        let Ok(p) = u16::try_from(u64::from(lo) + candidate % span) else {
            continue;
        };
        let Some(q) = p.checked_add(offset) else {
            continue;
        };
        let pair = if q == p { vec![p] } else { vec![p, q] };
        if pair.iter().all(|x| !given.contains(x) && free(*x)) {
            given.extend(pair);
            return p;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

/// A free loopback port for a test server. It comes from below the kernel's ephemeral range:
/// a port from `bind(0)` is ephemeral, and a client connecting somewhere (a retrying Redis
/// client, a ZeroMQ socket) can take it as its source port between the pick and the server's
/// bind. Never handed out twice in this process.
pub fn free_port() -> u16 {
    free_port_in(10_000, ephemeral_low().max(12_000), 0)
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _t = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts a server. Panics (never skips) if `redis-server` is not installed.
    pub fn start() -> Self {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) => panic!(
                "redis-server is not available ({e}). The resp L2 tests need a real Redis server \
                 and never skip: install it (e.g. `apt-get install -y redis-server`; \
                 scripts/test does this) and rerun."
            ),
        }
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut me = Self {
            child: None,
            port: 0,
            dir,
        };
        for _ in 0..5 {
            me.port = free_port();
            if me.spawn() {
                return me;
            }
        }
        panic!("could not start redis-server on a free port after 5 attempts");
    }

    fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_ping(self.port) {
                return true;
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _killed = c.kill();
            let _waited = c.wait();
        }
    }

    /// Starts it again on the same port (its data is gone: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn require_tool(tool: &str, package: &str) {
    if let Err(e) = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        panic!(
            "{tool} is not available ({e}). The valkey L2 tests need it and never skip: install \
             it (e.g. `apt-get install -y {package}`; scripts/test does this) and rerun."
        );
    }
}

/// A free loopback port `p` whose cluster bus port `p + 10000` is free and reserved too (both
/// below the ephemeral range, see [`free_port`]).
fn free_cluster_port() -> u16 {
    free_port_in(
        10_000,
        ephemeral_low().saturating_sub(10_000).max(12_000),
        10_000,
    )
}

/// Runs `redis-cli` with `args` against `port`, returning stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real Redis Cluster on loopback: `masters` masters with one replica each, no persistence,
/// `cluster-node-timeout` 1 s, and `cluster-require-full-coverage no` (a shard outage leaves the
/// other shards serving). Panics (never skips) without `redis-server`/`redis-cli`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts `2 * masters` nodes and creates the cluster; waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Self {
        require_tool("redis-server", "redis-server");
        require_tool("redis-cli", "redis-tools");
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut me = Self {
            nodes: Vec::new(),
            dir,
        };
        let mut ports = Vec::new();
        for _ in 0..masters * 2 {
            let p = free_cluster_port();
            ports.push(p);
        }
        for &p in &ports {
            let child = me.spawn(p);
            me.nodes.push((p, Some(child)));
        }
        for &p in &ports {
            wait_for(Duration::from_secs(10), &format!("redis node {p}"), || {
                redis_ping(p)
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        me.wait_ok(Duration::from_secs(20));
        me
    }

    fn spawn(&self, port: u16) -> Child {
        let nd = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&nd).expect("node dir");
        Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "1000"])
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&nd)
            .arg("--logfile")
            .arg(nd.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server")
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on full coverage.
    pub fn wait_ok(&self, timeout: Duration) {
        wait_for(timeout, "cluster_state:ok on every live node", || {
            self.live_ports().iter().all(|&p| {
                let info = redis_cli(p, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            })
        });
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// `startup_nodes` for the adapter (every node).
    pub fn startup_nodes(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the current masters that serve hash slots (as a live node sees them). A node
    /// that has not yet taken its replica role after `CLUSTER REPLICATE` is still listed as a
    /// master for a moment, without slots; it is not counted (`CLUSTER NODES` lists a master's
    /// slot ranges from its ninth field on).
    pub fn masters(&self) -> Vec<u16> {
        let Some(&probe) = self.live_ports().first() else {
            return Vec::new();
        };
        redis_cli(probe, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter(|l| l.split_whitespace().nth(8).is_some())
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|a| a.split('@').next()?.rsplit_once(':')?.1.parse().ok())
            .collect()
    }

    /// Keys stored on the node at `port`.
    pub fn dbsize(&self, port: u16) -> u64 {
        redis_cli(port, &["dbsize"]).trim().parse().unwrap_or(0)
    }

    /// Kills the node at `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        for (p, c) in &mut self.nodes {
            if *p == port
                && let Some(mut child) = c.take()
            {
                let _killed = child.kill();
                let _waited = child.wait();
            }
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for p in self.live_ports() {
            self.kill(p);
        }
    }

    /// Restarts every stopped node with its cluster configuration (it rejoins).
    pub fn restart_stopped(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].1.is_some() {
                continue;
            }
            let p = self.nodes[i].0;
            self.nodes[i].1 = Some(self.spawn(p));
            wait_for(Duration::from_secs(10), &format!("redis node {p}"), || {
                redis_ping(p)
            });
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Certificates for TLS tests, made with the `openssl` CLI in a temporary directory: a CA, a
/// server certificate for `127.0.0.1` signed by it, and an unrelated second CA.
#[derive(Debug)]
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates the certificates. Panics (never skips) without `openssl`.
    pub fn generate() -> Self {
        require_tool("openssl", "openssl");
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("running openssl");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=kvtier test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("writing san.ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    /// Path of a generated file (`ca.pem`, `other-ca.pem`, `server.pem`, `server.key`).
    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }
}

/// A `redis-server` that only speaks TLS (certificates from `certs`), on a free loopback port.
#[derive(Debug)]
pub struct TlsRedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedisServer {
    /// Starts it; panics if it does not accept TLS connections within 10 s.
    pub fn start(certs: &TestCerts) -> Self {
        require_tool("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &certs.path("server.pem")])
            .args(["--tls-key-file", &certs.path("server.key")])
            .args(["--tls-ca-cert-file", &certs.path("ca.pem")])
            .args(["--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server with TLS");
        wait_for(Duration::from_secs(10), "redis-server's TLS port", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        let _killed = self.child.kill();
        let _waited = self.child.wait();
    }
}
