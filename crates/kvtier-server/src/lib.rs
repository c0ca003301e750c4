//! kvtier server: everything between the wire and the cache.
//!
//! - [`transport`]: the ZeroMQ ROUTER front end (poll thread + worker pools).
//! - [`engine`]: LMCache 0.5.6 MP-server semantics (sessions, lookups, engine-driven transfers).
//! - [`http`]: the admin API (status tree, health, Prometheus metrics, configuration, cache
//!   clearing) with optional bearer-token access control.
//! - [`dashboard`]: the web dashboard served by the admin API, and its time-series endpoint.
//! - [`telemetry`]: the background sampler that keeps recent history of the counters.
//! - [`analysis`]: the live hit-rate curve and the lookup log (what-if analysis of the cache size).
//! - [`service`]: the wire edge: decode, call the engine, encode, classify the outcome.
//! - [`stats`]: lock-free per-operation counters and latency histograms.
//! - [`config`]: the server's settings and their defaults.
//! - [`status`]: the root of the status tree and the list of metric sets.
//! - [`prefault`]: the background prefault of the L1 segment.
//! - [`server`]: start-up and ordered shutdown of all of the above (wiring only).

pub mod analysis;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod http;
pub mod prefault;
pub mod server;
pub mod service;
pub mod stats;
pub mod status;
pub mod telemetry;
pub mod transport;

pub use server::{Server, ServerConfig, ServerError};
