//! Connections: the standalone or cluster target built from the configuration (addresses, TLS
//! with rustls, ACL user), the multiplexed connection either way behind one [`ConnectionLike`]
//! type, the standalone pool's reconnect (one reconnect at a time), the deployment check
//! (standalone vs cluster as configured) and which errors count as the connection failing.

use super::*;

/// A standalone or cluster connection (both multiplexed; clones share the socket(s)).
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How to connect.
pub(super) enum Target {
    Single(Client),
    Cluster(redis::cluster::ClusterClient),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Target::Single",
            Self::Cluster(_) => "Target::Cluster",
        })
    }
}

pub(super) fn read_pem(what: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::Open {
        kind: "valkey",
        reason: format!("cannot read {what} {path:?}: {e}"),
    })
}

pub(super) fn open_err(e: impl fmt::Display) -> ConfigError {
    ConfigError::Open {
        kind: "valkey",
        reason: e.to_string(),
    }
}

impl ValkeyBackend {
    pub(super) fn target(
        cfg: &ValkeyConfig,
        seeds: &[(String, u16)],
    ) -> Result<Target, ConfigError> {
        // rustls needs a process-wide crypto provider; ours is ring (an error only means one is
        // installed already).
        let _already = rustls::crypto::ring::default_provider().install_default();
        let certs = if cfg.tls_enable
            && (cfg.tls_ca_file.is_some() || cfg.tls_client_cert_file.is_some())
        {
            let root_cert = match &cfg.tls_ca_file {
                Some(p) => Some(read_pem("tls_ca_file", p)?),
                None => None,
            };
            let client_tls = match (&cfg.tls_client_cert_file, &cfg.tls_client_key_file) {
                (Some(c), Some(k)) => Some(ClientTlsConfig {
                    client_cert: read_pem("tls_client_cert_file", c)?,
                    client_key: read_pem("tls_client_key_file", k)?,
                }),
                _ => None,
            };
            Some(TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        let addr = |host: &str, port: u16| {
            if cfg.tls_enable {
                ConnectionAddr::TcpTls {
                    host: host.to_owned(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.to_owned(), port)
            }
        };
        let mut settings = redis::RedisConnectionInfo::default();
        if !cfg.username.is_empty() {
            settings = settings.set_username(&cfg.username);
        }
        if !cfg.password.is_empty() {
            settings = settings.set_password(&cfg.password);
        }
        if cfg.cluster_mode {
            let infos = seeds
                .iter()
                .map(|(h, p)| {
                    addr(h, *p)
                        .into_connection_info()
                        .map(|i| i.set_redis_settings(settings.clone()))
                })
                .collect::<RedisResult<Vec<_>>>()
                .map_err(open_err)?;
            let mut b = ClusterClientBuilder::new(infos)
                .connection_timeout(Duration::from_secs_f64(cfg.connection_timeout))
                .response_timeout(Duration::from_secs_f64(cfg.request_timeout))
                .retries(3)
                .min_retry_wait(20)
                .max_retry_wait(500);
            if !cfg.username.is_empty() {
                b = b.username(&cfg.username);
            }
            if !cfg.password.is_empty() {
                b = b.password(&cfg.password);
            }
            if cfg.tls_enable {
                b = b.tls(redis::TlsMode::Secure);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Ok(Target::Cluster(b.build().map_err(open_err)?))
        } else {
            let (h, p) = &seeds[0];
            if let Some(db) = cfg.database_id {
                settings = settings.set_db(db);
            }
            let info = addr(h, *p)
                .into_connection_info()
                .map(|i| i.set_redis_settings(settings))
                .map_err(open_err)?;
            let client = match certs {
                Some(c) => Client::build_with_tls(info, c),
                None => Client::open(info),
            }
            .map_err(open_err)?;
            Ok(Target::Single(client))
        }
    }

    pub(super) fn standalone_addr(&self) -> String {
        self.seeds
            .first()
            .map(|(h, p)| format!("{h}:{p}"))
            .unwrap_or_default()
    }

    /// Opens fresh connections, checks them, reads the topology, and installs them.
    pub(super) async fn reconnect(&self) -> Result<(), String> {
        let _one = self.reconnecting.lock().await;
        let timeout = Duration::from_secs_f64(self.cfg.connection_timeout);
        let fresh = match &self.target {
            Target::Single(client) => {
                let acfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(Duration::from_secs_f64(self.cfg.request_timeout)));
                let mut fresh = Vec::with_capacity(self.cfg.num_workers);
                for _ in 0..self.cfg.num_workers {
                    let mut c = client
                        .get_multiplexed_async_connection_with_config(&acfg)
                        .await
                        .map_err(|e| {
                            format!(
                                "cannot connect to valkey at {}: {e}",
                                self.standalone_addr()
                            )
                        })?;
                    redis::cmd("PING")
                        .query_async::<()>(&mut c)
                        .await
                        .map_err(|e| {
                            format!(
                                "valkey at {} does not answer PING: {e}",
                                self.standalone_addr()
                            )
                        })?;
                    fresh.push(Conn::Single(c));
                }
                fresh
            }
            Target::Cluster(client) => {
                let c = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        format!(
                            "cannot connect to the valkey cluster at {} within {timeout:?}",
                            self.cfg.startup_nodes
                        )
                    })?
                    .map_err(|e| {
                        format!(
                            "cannot connect to the valkey cluster at {}: {e}",
                            self.cfg.startup_nodes
                        )
                    })?;
                vec![Conn::Cluster(c)]
            }
        };
        *self.conns.lock() = fresh;
        if let Err(e) = self.check_deployment().await {
            self.conns.lock().clear();
            return Err(e);
        }
        Ok(())
    }

    /// Standalone: `PING`. Cluster: reads the topology and `PING`s every master; `Err` only when
    /// no node answers.
    pub(super) async fn check_deployment(&self) -> Result<(), String> {
        let conn = self.conns.lock().first().cloned();
        match conn {
            None => Err("not connected".to_owned()),
            Some(Conn::Single(mut c)) => {
                let addr = self.standalone_addr();
                let t = Instant::now();
                let r = redis::cmd("PING").query_async::<()>(&mut c).await;
                self.account(&addr, t, r.is_ok());
                r.map_err(|e| format!("valkey at {addr} does not answer PING: {e}"))
            }
            Some(Conn::Cluster(mut c)) => self.refresh_topology(&mut c).await,
        }
    }

    /// A connection (round-robin), or `Unavailable` at once while down.
    pub(super) fn conn(&self) -> Result<Conn, L2Error> {
        self.health.gate()?;
        let conns = self.conns.lock();
        if conns.is_empty() {
            return Err(L2Error::Unavailable(format!(
                "not connected to valkey at {}",
                self.cfg.startup_nodes
            )));
        }
        let i = self.rr.fetch_add(1, Relaxed) % conns.len();
        conns
            .get(i)
            .cloned()
            .ok_or_else(|| L2Error::Unavailable("no connection".to_owned()))
    }
}
