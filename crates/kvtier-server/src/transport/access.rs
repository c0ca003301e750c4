//! Who may talk to the ZeroMQ RPC port: the exposure rule and the `--rpc-allow` peer filter.
//!
//! The RPC protocol has no authentication (LMCache clients send none), and any peer that reaches
//! the port can clear L1, fill it with reservations, or have the server map `/dev/shm` segments
//! (lmcache_driven registration). So:
//! - **Exposure**: a `--host` that is not a loopback address (`0.0.0.0`, `*`, an interface, a
//!   routable address) still starts, as `lmcache server` does, but without `--rpc-allow` the
//!   server logs a WARN at start and the status tree's `transport.access` node says
//!   `open_to_any_peer: true`. Health and readiness do not change: it is a warning, not a fault.
//! - **Peer filter** (`--rpc-allow CIDR[,CIDR...]`): enforced by a ZAP handler (ZeroMQ's
//!   authentication protocol, RFC 27) on the front end's own context. The ROUTER gets a ZAP
//!   domain, so libzmq asks the handler about every new connection during the NULL-mechanism
//!   handshake, *before* any message of that peer is delivered. The handler answers `200` when
//!   the peer's IP address is inside one of the networks and `400` otherwise; a refused peer's
//!   messages are never read, so it sees no reply at all (its libzmq retries the connection,
//!   and each retry is refused and counted again). Unmodified LMCache clients (NULL mechanism,
//!   no credentials) connect as before when their address is allowed.
//!
//! Invariants:
//! - The ZAP socket is bound before the ROUTER binds and is closed after the ROUTER is closed,
//!   so no connection is ever accepted without a verdict. It stays bound even if the handler
//!   thread dies (a panic), so libzmq's requests then wait unanswered: the filter fails closed.
//! - The handler thread (`kvtier-zap`, a [`PeriodicThread`]) answers each request with O(number of
//!   networks) work, holds no lock but its own socket's, and is stopped by the front end's
//!   shutdown after the poll thread (which owns the ROUTER) has exited.
//! - Refusals and admissions are counted in [`AccessStats`] (always exported, 0 without a
//!   filter); the last refused address is kept for the status tree.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kvtier_core::metrics::status_fields;
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;

/// libzmq's well-known ZAP endpoint (per context).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The ZAP domain kvtier sets on its ROUTER when a peer filter is configured.
pub const ZAP_DOMAIN: &str = "kvtier";

/// A network in CIDR notation (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`); host bits are
/// ignored (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a `--rpc-allow` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("{input:?} is not a network in CIDR notation (ADDRESS[/PREFIX], e.g. 10.0.0.0/8)")]
    Address {
        /// The entry as given.
        input: String,
    },
    /// The prefix length is not a number within the address family's width.
    #[error("{input:?}: prefix length must be 0..={max}")]
    Prefix {
        /// The entry as given.
        input: String,
        /// 32 or 128.
        max: u8,
    },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let (addr, prefix) = match input.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (input, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address {
            input: input.to_owned(),
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>()
                    .ok()
                    .filter(|&p| p <= max)
                    .ok_or_else(|| CidrError::Prefix {
                        input: input.to_owned(),
                        max,
                    })?
            }
        };
        Ok(Self {
            network: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4
/// peer) as the IPv4 address it carries; other addresses unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

/// Parses a comma-separated `--rpc-allow` value.
///
/// # Errors
/// [`CidrError`] naming the first entry that is not a network.
pub fn parse_allow_list(s: &str) -> Result<Vec<Cidr>, CidrError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// Whether the RPC `--host` only accepts connections from this machine: `localhost` or a
/// loopback address. Anything else (`0.0.0.0`, `*`, an interface or host name, a routable
/// address) counts as exposed.
pub fn host_is_loopback(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<IpAddr>()
            .is_ok_and(|ip| canonical(ip).is_loopback())
}

kvtier_core::metric_set! {
    /// RPC peer-filter counters (status `transport.access`, Prometheus `kvtier_rpc_access_*`).
    pub struct AccessStats {
        /// Connections the --rpc-allow filter let in.
        allowed: Counter as "peers_allowed_total" => "kvtier_rpc_access_peers_allowed",
        /// Connection attempts the --rpc-allow filter refused (a client retrying counts again).
        refused: Counter as "peers_refused_total" => "kvtier_rpc_access_peers_refused",
        /// ZAP requests that were not well-formed (answered with a refusal).
        malformed: Counter as "zap_malformed_total" => "kvtier_rpc_access_zap_malformed",
    }
}

/// The peer-access state the front end reports: the exposure rule and, with `--rpc-allow`, the
/// ZAP handler.
#[derive(Debug)]
pub struct Access {
    host: String,
    allow: Vec<Cidr>,
    stats: Arc<AccessStats>,
    last_refused: Arc<Mutex<Option<String>>>,
    zap: Option<ZapHandler>,
}

/// The running ZAP handler: its thread and its socket (kept open until [`Access::stop`]).
struct ZapHandler {
    thread: PeriodicThread,
    /// Shared with the thread; `None` once closed by [`Access::stop`].
    socket: Arc<Mutex<Option<zmq::Socket>>>,
}

impl fmt::Debug for ZapHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZapHandler")
            .field("thread", &self.thread)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// Sets up the access rule for a ROUTER on `host`: with a non-empty `allow`, binds the ZAP
    /// handler in `ctx` and starts its thread (call before the ROUTER binds, then
    /// [`configure`](Self::configure) the ROUTER). Logs the exposure warning.
    ///
    /// # Errors
    /// The ZeroMQ or thread-spawn failure.
    pub fn start(ctx: &zmq::Context, host: &str, allow: Vec<Cidr>) -> Result<Self, AccessError> {
        let stats = Arc::new(AccessStats::default());
        let last_refused = Arc::new(Mutex::new(None));
        let zap = if allow.is_empty() {
            None
        } else {
            let socket = ctx.socket(zmq::REP).map_err(AccessError::Zmq)?;
            socket.set_linger(0).map_err(AccessError::Zmq)?;
            socket.bind(ZAP_ENDPOINT).map_err(AccessError::Zmq)?;
            let socket = Arc::new(Mutex::new(Some(socket)));
            let verdicts = Verdicts {
                allow: allow.clone(),
                stats: Arc::clone(&stats),
                last_refused: Arc::clone(&last_refused),
            };
            let sock = Arc::clone(&socket);
            let thread = PeriodicThread::builder("kvtier-zap")
                .interval(Duration::from_millis(1))
                .description("ZAP handler (--rpc-allow)")
                .spawn(move || match sock.lock().as_ref() {
                    Some(socket) => serve_zap(socket, &verdicts),
                    None => Ok(()),
                })
                .map_err(AccessError::Spawn)?;
            Some(ZapHandler { thread, socket })
        };
        let access = Self {
            host: host.to_owned(),
            allow,
            stats,
            last_refused,
            zap,
        };
        if access.open_to_any_peer() {
            tracing::warn!(
                host,
                "THE ZEROMQ RPC PORT IS OPEN TO ANY PEER THAT CAN REACH IT: --host is not a \
                 loopback address and no --rpc-allow is given. Any such peer can clear the \
                 cache, fill it with reservations and make this server map /dev/shm segments. \
                 Bind to 127.0.0.1 (engines on the same host or pod) or restrict peers with \
                 --rpc-allow CIDR[,CIDR...]"
            );
        } else if !access.allow.is_empty() {
            let allow: Vec<String> = access.allow.iter().map(Cidr::to_string).collect();
            tracing::info!(host, allow = ?allow, "RPC peers restricted by --rpc-allow");
        }
        Ok(access)
    }

    /// Sets the ROUTER's ZAP domain when a filter is configured (before it binds).
    ///
    /// # Errors
    /// libzmq's error.
    pub fn configure(&self, router: &zmq::Socket) -> Result<(), zmq::Error> {
        if self.zap.is_some() {
            router.set_zap_domain(ZAP_DOMAIN)?;
        }
        Ok(())
    }

    /// Whether any peer that can reach the port may use it (a non-loopback host, no filter).
    pub fn open_to_any_peer(&self) -> bool {
        self.allow.is_empty() && !host_is_loopback(&self.host)
    }

    /// The counters.
    pub fn stats(&self) -> &AccessStats {
        &self.stats
    }

    /// The ZAP thread, when a filter is configured.
    pub fn thread(&self) -> Option<&PeriodicThread> {
        self.zap.as_ref().map(|z| &z.thread)
    }

    /// Stops the ZAP thread and closes its socket. Call after the ROUTER is closed.
    /// Idempotent.
    pub fn stop(&self) {
        if let Some(z) = &self.zap {
            z.thread.stop();
            // Closed here, not by the thread: a crashed thread leaves it bound (fail closed).
            drop(z.socket.lock().take());
        }
    }

    /// The `transport.access` status node.
    pub fn status_node(&self) -> StatusNode {
        let allow: Vec<String> = self.allow.iter().map(Cidr::to_string).collect();
        let mut node = StatusNode::healthy()
            .field("host", self.host.as_str())
            .field("open_to_any_peer", self.open_to_any_peer())
            .field("rpc_allow", allow)
            .field("last_refused_peer", self.last_refused.lock().clone())
            .fields(status_fields(self.stats.as_ref()));
        if self.open_to_any_peer() {
            node = node.field(
                "warning",
                "the RPC port is open to any peer that can reach it (non-loopback --host \
                 without --rpc-allow)",
            );
        }
        if let Some(z) = &self.zap {
            node = node.child("zap_handler", z.thread.status_node());
        }
        node
    }
}

/// Start-up failures of the peer filter.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// libzmq refused to create or bind the ZAP socket.
    #[error("zap handler socket: {0}")]
    Zmq(zmq::Error),
    /// The handler thread could not start.
    #[error("spawning kvtier-zap: {0}")]
    Spawn(std::io::Error),
}

/// What the ZAP thread decides with.
struct Verdicts {
    allow: Vec<Cidr>,
    stats: Arc<AccessStats>,
    last_refused: Arc<Mutex<Option<String>>>,
}

impl Verdicts {
    /// The reply to one ZAP request (RFC 27): `[version, request_id, status_code, status_text,
    /// user_id, metadata]`.
    fn answer(&self, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let request_id = frames.get(1).cloned().unwrap_or_default();
        let reply = |code: &str, text: &str| {
            vec![
                b"1.0".to_vec(),
                request_id.clone(),
                code.as_bytes().to_vec(),
                text.as_bytes().to_vec(),
                Vec::new(),
                Vec::new(),
            ]
        };
        // [version, request_id, domain, address, identity, mechanism, credentials...]
        let (Some(version), Some(address)) = (frames.first(), frames.get(3)) else {
            self.stats.malformed.inc();
            return reply("400", "malformed ZAP request");
        };
        if version.as_slice() != b"1.0" {
            self.stats.malformed.inc();
            return reply("400", "unsupported ZAP version");
        }
        let address = String::from_utf8_lossy(address);
        // A link-local IPv6 peer may carry a scope (`fe80::1%eth0`).
        let ip = address
            .split('%')
            .next()
            .and_then(|a| a.parse::<IpAddr>().ok());
        match ip {
            Some(ip) if self.allow.iter().any(|c| c.contains(ip)) => {
                self.stats.allowed.inc();
                reply("200", "OK")
            }
            _ => {
                self.stats.refused.inc();
                let first = self.stats.refused.get() == 1;
                *self.last_refused.lock() = Some(address.to_string());
                if first {
                    tracing::warn!(peer = %address, "RPC peer refused by --rpc-allow (further refusals are counted, not logged)");
                } else {
                    tracing::debug!(peer = %address, "RPC peer refused by --rpc-allow");
                }
                reply("400", "address not allowed by --rpc-allow")
            }
        }
    }
}

/// One round of the ZAP thread: waits up to 100 ms for requests and answers every one queued.
fn serve_zap(socket: &zmq::Socket, verdicts: &Verdicts) -> Result<(), String> {
    match socket.poll(zmq::POLLIN, 100) {
        Ok(0) => return Ok(()),
        Ok(_) => {}
        Err(zmq::Error::EINTR) => return Ok(()),
        Err(e) => return Err(format!("zap poll: {e}")),
    }
    loop {
        let frames = match socket.recv_multipart(zmq::DONTWAIT) {
            Ok(f) => f,
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => return Ok(()),
            Err(e) => return Err(format!("zap receive: {e}")),
        };
        let reply = verdicts.answer(&frames);
        socket
            .send_multipart(reply, 0)
            .map_err(|e| format!("zap reply: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs_parse_mask_and_match() {
        let net: Cidr = "10.1.2.3/8".parse().expect("cidr");
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains(ip("10.200.0.1")));
        assert!(net.contains(ip("::ffff:10.0.0.9")), "IPv4-mapped");
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        let one: Cidr = "127.0.0.1".parse().expect("host");
        assert_eq!(one.to_string(), "127.0.0.1/32");
        let all: Cidr = "0.0.0.0/0".parse().expect("any v4");
        assert!(all.contains(ip("203.0.113.5")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert_eq!(
            parse_allow_list("127.0.0.0/8, 10.0.0.0/8").map(|v| v.len()),
            Ok(2)
        );
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "example.com/8",
            "10.0.0/8",
            "10.0.0.0/x",
        ] {
            let e = parse_allow_list(bad).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
            "127.1.2.3",
        ] {
            assert!(host_is_loopback(h), "{h}");
        }
        for h in ["0.0.0.0", "*", "::", "10.0.0.1", "eth0", "kvtier.example"] {
            assert!(!host_is_loopback(h), "{h}");
        }
    }

    #[test]
    fn zap_verdicts() {
        let v = Verdicts {
            allow: parse_allow_list("10.0.0.0/8").expect("list"),
            stats: Arc::new(AccessStats::default()),
            last_refused: Arc::new(Mutex::new(None)),
        };
        let req = |addr: &str| -> Vec<Vec<u8>> {
            ["1.0", "7", ZAP_DOMAIN, addr, "", "NULL"]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect()
        };
        let ok = v.answer(&req("10.9.8.7"));
        assert_eq!(ok[1], b"7");
        assert_eq!(ok[2], b"200");
        assert_eq!(ok.len(), 6);
        assert_eq!(v.answer(&req("127.0.0.1"))[2], b"400");
        assert_eq!(v.answer(&req("not an address"))[2], b"400");
        assert_eq!(v.answer(&[b"2.0".to_vec()])[2], b"400");
        assert_eq!(v.stats.allowed.get(), 1);
        assert_eq!(v.stats.refused.get(), 2);
        assert_eq!(v.stats.malformed.get(), 1);
        assert_eq!(v.last_refused.lock().as_deref(), Some("not an address"));
    }
}
