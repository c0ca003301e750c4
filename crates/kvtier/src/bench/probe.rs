//! Looking at the server from outside: spawning it and timing its first answer, its memory
//! from `/proc`, and its HTTP status endpoint.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvtier_client::Client;

use super::BenchArgs;

/// A server started by the bench; stopped (SIGTERM, then SIGKILL) on [`Spawned::stop`] or drop.
#[derive(Debug)]
pub struct Spawned {
    child: Option<Child>,
    pid: u32,
    /// From `spawn()` to the first answered `noop`.
    pub startup: Duration,
}

fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("no port in {url:?}"))?;
    let port = port
        .split('/')
        .next()
        .unwrap_or(port)
        .parse()
        .with_context(|| format!("bad port in {url:?}"))?;
    Ok((host.to_owned(), port))
}

/// Starts the server and polls `noop` until it answers.
pub fn spawn_server(args: &BenchArgs, timeout: Duration) -> anyhow::Result<Spawned> {
    let mut cmd = if let Some((prog, rest)) = args.server_cmd.split_first() {
        let mut c = Command::new(prog);
        c.args(rest);
        c
    } else {
        let (host, port) = host_port(&args.url)?;
        let mut c = Command::new(std::env::current_exe().context("locating this binary")?);
        c.args(["serve", "--host", &host, "--port", &port.to_string()]);
        c.args(["--l1-size-gb", "2", "--shm-name"]);
        c.arg(format!("kvtier_bench_{}", std::process::id()));
        match &args.http_url {
            Some(h) => {
                let (hh, hp) = host_port(h)?;
                c.args(["--http-host", &hh, "--http-port", &hp.to_string()]);
            }
            None => {
                c.arg("--no-http");
            }
        }
        c
    };
    match &args.server_log {
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    cmd.stdin(Stdio::null());
    let t0 = Instant::now();
    let child = cmd.spawn().context("spawning the server")?;
    let pid = child.id();
    let mut spawned = Spawned {
        child: Some(child),
        pid,
        startup: Duration::ZERO,
    };
    let mut client = Client::connect(&args.url, Duration::from_millis(50))?;
    let deadline = t0 + timeout.max(Duration::from_secs(120));
    loop {
        if let Some(c) = spawned.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("the server exited during start-up: {status}");
        }
        match client.noop() {
            Ok(_) => {
                spawned.startup = t0.elapsed();
                return Ok(spawned);
            }
            Err(e) if e.is_timeout() && Instant::now() < deadline => {}
            Err(e) => return Err(e).context("waiting for the spawned server's first answer"),
        }
    }
}

impl Spawned {
    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM, wait up to 20 s, then SIGKILL.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _sent = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _killed = child.kill();
        let _reaped = child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub struct ServerMemory {
    pub rss_kib: u64,
    pub shmem_kib: u64,
}

/// Reads `VmRSS` and `RssShmem` of `pid`.
pub fn server_memory(pid: u32) -> anyhow::Result<ServerMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let v = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("malformed {line:?}"))?;
        Ok(v.parse()?)
    };
    Ok(ServerMemory {
        rss_kib: field("VmRSS:")?,
        shmem_kib: field("RssShmem:")?,
    })
}

/// `GET <path>` on an HTTP/1.1 server, one connection per request.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    addr: std::net::SocketAddr,
    host: String,
    path: String,
}

impl HttpTarget {
    /// From `http://HOST:PORT` and a path.
    pub fn parse(url: &str, path: &str) -> anyhow::Result<Self> {
        let (host, port) = host_port(url)?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{host} does not resolve"))?;
        Ok(Self {
            addr,
            host: format!("{host}:{port}"),
            path: path.to_owned(),
        })
    }

    /// Time to fetch the whole response; an error unless the status is 200.
    pub fn get(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: */*\r\n\r\n",
            self.path, self.host
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let elapsed = t.elapsed();
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        if line.split_whitespace().nth(1) != Some("200") {
            bail!("GET {} answered {:?}", self.path, line.trim());
        }
        Ok(elapsed)
    }
}

/// Round trips of a bare ZeroMQ DEALER to a ROUTER that echoes inline on its own thread, over
/// loopback TCP, with noop-sized frames: p50 and p99 in microseconds. Each side has its own
/// context (so its own I/O thread), as two processes would. This is the floor under any
/// ZeroMQ server's `noop` on this machine.
pub fn zmq_echo_rtt(n: usize) -> anyhow::Result<(f64, f64)> {
    let server_ctx = zmq::Context::new();
    let router = server_ctx.socket(zmq::ROUTER)?;
    router.set_linger(0)?;
    router.bind("tcp://127.0.0.1:*")?;
    let endpoint = router
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;
    let echo = std::thread::Builder::new()
        .name("bench-zmq-echo".into())
        .spawn(move || -> anyhow::Result<()> {
            router.set_rcvtimeo(10_000)?;
            loop {
                let frames = router.recv_multipart(0)?;
                if frames.len() == 2 {
                    return Ok(()); // [identity, stop]
                }
                router.send_multipart(frames, 0)?;
            }
        })?;
    let client_ctx = zmq::Context::new();
    let dealer = client_ctx.socket(zmq::DEALER)?;
    dealer.set_linger(0)?;
    dealer.set_rcvtimeo(10_000)?;
    dealer.connect(&endpoint)?;
    let mut samples = Vec::with_capacity(n);
    // A few unrecorded round trips establish the connection.
    for i in 0..n + 20 {
        let uid = [0xcdu8, (i >> 8) as u8, i as u8];
        let t = Instant::now();
        dealer.send_multipart([&uid[..], &[24u8][..]], 0)?;
        let reply = dealer.recv_multipart(0)?;
        let d = t.elapsed();
        if reply.first().map(Vec::as_slice) != Some(&uid[..]) {
            bail!("echo returned another message");
        }
        if i >= 20 {
            samples.push(d);
        }
    }
    dealer.send(&b"stop"[..], 0)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    let p50 = super::report::quantile_us(&mut samples, 0.5).unwrap_or(0.0);
    let p99 = super::report::quantile_us(&mut samples, 0.99).unwrap_or(0.0);
    Ok((p50, p99))
}
