//! `kvtier`: command-line entry point. Wiring only; the server lives in `kvtier-server`.

mod bench;
mod explain;
mod serve;
mod simulate;
mod size;
mod status;

/// mimalloc instead of glibc's malloc: the KV-event log and the session table free many
/// kilobyte-sized buffers in FIFO order, which costs glibc about twice the CPU in heap
/// consolidation and page clearing (`cargo bench -p kvtier-server --bench kv_events`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kvtier: an LMCache-compatible KV-cache server for LLM inference engines.
#[derive(Debug, Parser)]
#[command(name = "kvtier", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache server (ZeroMQ RPC compatible with LMCache 0.5.6 clients, plus an HTTP
    /// admin API).
    Serve(Box<serve::ServeArgs>),
    /// Fetch a server's status tree over HTTP and print it (kvtier, or LMCache 0.5.6 with
    /// --url http://HOST:8080/status). Exit code 0 healthy, 2 unhealthy, 1 unreachable, refused
    /// (401) or a bad answer.
    Status(status::StatusArgs),

    /// Measure a running server (kvtier or `lmcache server`) through the engine-driven
    /// shared-memory path: noop round trips, lookup latency, store and retrieve throughput
    /// against memcpy, many clients, status latency, server memory and start-up time.
    Bench(Box<bench::BenchArgs>),

    /// Replay a lookup log (`kvtier serve --lookup-log-dir`) against kvtier's L1 with each
    /// eviction policy at each size, and print the hit rate of each: what a bigger or smaller
    /// cache, or another policy, would have done on the recorded traffic.
    Simulate(simulate::SimulateArgs),

    /// Explain a request's lookups: chunks found per tier and why the prefix ended where it
    /// did (never stored, evicted and why, another model or cache_salt, discarded write, L2
    /// unavailable, ...), from a running kvtier's /api/lookups. Exit code 0 when the request
    /// has records, 1 otherwise.
    Explain(explain::ExplainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Status(args) => return status::run(args),
        Command::Explain(args) => return explain::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::Simulate(args) => simulate::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvtier: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
