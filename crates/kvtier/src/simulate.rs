//! `kvtier simulate LOG --sizes 1GB,2GB --policy LRU,ARC [--json]`: replays a lookup log
//! (`kvtier serve --lookup-log-dir`) against kvtier's real L1 manager with each eviction policy
//! at each size, in one pass over the log (every (size, policy) cache is fed each lookup in
//! turn), through `kvtier_core::analysis::replay` — the code the policy benchmark uses.
//!
//! Each lookup is replayed as an engine would drive it: the prefix found counts as hits, the
//! chunks that missed are stored. Records written before the server knew its chunk size
//! (`chunk_bytes` 0) are held until the first record that has one (or use `--chunk-bytes`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use kvtier_core::analysis::lookup_log::{LogReader, LookupRecord, log_files};
use kvtier_core::analysis::replay::Replay;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::EvictionPolicyKind;

use crate::size::{format_size, parse_size, parse_size_list};

/// Flags of `kvtier simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A lookup log file (`*.kvtlog`) or a directory of them, as written by `kvtier serve
    /// --lookup-log-dir DIR`; a directory's files are replayed in name order (= time order).
    #[arg(value_name = "LOG_DIR_OR_FILE")]
    log: PathBuf,

    /// Cache sizes to simulate, comma-separated, e.g. `--sizes 512MiB,1GB,2GB,4GB`. Units are
    /// binary (1GB = 1GiB = 2^30 bytes, like --l1-size-gb); a bare number is bytes.
    #[arg(long, value_name = "SIZE[,SIZE...]", required = true, value_parser = parse_size_list)]
    sizes: Vec<Vec<u64>>,

    /// Eviction policies to compare, comma-separated: LRU, ARC, S3FIFO, IsolatedLRU
    /// (case-insensitive; the names of `kvtier serve --eviction-policy`).
    #[arg(long, value_name = "POLICY[,POLICY...]", default_value = "LRU")]
    policy: String,

    /// Print one JSON object (sizes, policies, hit rates, lookups and chunks replayed, files,
    /// truncated file tails) instead of a table.
    #[arg(long)]
    json: bool,

    /// Bytes of one chunk for records that carry none (the server writes 0 until L1 holds an
    /// object) or for all records when given with --force-chunk-bytes [default: each record's
    /// own size; records without one take the first size found in the log].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    chunk_bytes: Option<u64>,

    /// Use --chunk-bytes for every record, ignoring the sizes in the log.
    #[arg(long, requires = "chunk_bytes")]
    force_chunk_bytes: bool,
}

/// One simulated cache and its tally.
struct Sim {
    size: u64,
    policy: EvictionPolicyKind,
    replay: Replay,
    hits: u64,
}

/// Strings shared by every key that uses them.
#[derive(Default)]
struct Interner(HashMap<Arc<str>, Arc<str>>);

impl Interner {
    fn get(&mut self, s: &Arc<str>) -> Arc<str> {
        Arc::clone(self.0.entry(Arc::clone(s)).or_insert_with(|| Arc::clone(s)))
    }
}

struct Run {
    sims: Vec<Sim>,
    strings: Interner,
    seen: HashSet<(u64, Arc<str>, Arc<str>, u32)>,
    lookups: u64,
    chunks: u64,
    unbounded_hits: u64,
    held: Vec<LookupRecord>,
    default_bytes: Option<u64>,
    forced_bytes: Option<u64>,
}

impl Run {
    fn feed(&mut self, rec: LookupRecord) {
        let bytes = match self.forced_bytes {
            Some(b) => b,
            None if rec.chunk_bytes > 0 => {
                if self.default_bytes.is_none() {
                    self.default_bytes = Some(rec.chunk_bytes);
                    let held = std::mem::take(&mut self.held);
                    for h in held {
                        self.replay(h, rec.chunk_bytes);
                    }
                }
                rec.chunk_bytes
            }
            None => match self.default_bytes {
                Some(b) => b,
                None => {
                    self.held.push(rec);
                    return;
                }
            },
        };
        self.replay(rec, bytes);
    }

    fn replay(&mut self, rec: LookupRecord, bytes: u64) {
        let model = self.strings.get(&rec.model);
        let salt = self.strings.get(&rec.cache_salt);
        let keys: Vec<ObjectKey> = rec
            .chunks
            .iter()
            .map(|&c| Replay::key(c, &model, rec.kv_rank, &salt))
            .collect();
        self.lookups += 1;
        self.chunks += keys.len() as u64;
        let mut prefix = true;
        for &c in &rec.chunks {
            let new = self
                .seen
                .insert((c, Arc::clone(&model), Arc::clone(&salt), rec.kv_rank));
            prefix &= !new;
            if prefix {
                self.unbounded_hits += 1;
            }
        }
        for s in &mut self.sims {
            s.hits += s.replay.request(&keys, bytes) as u64;
        }
    }
}

fn parse_policies(s: &str) -> anyhow::Result<Vec<EvictionPolicyKind>> {
    let mut out = Vec::new();
    for p in s.split(',') {
        let kind = p
            .trim()
            .parse::<EvictionPolicyKind>()
            .map_err(|e| anyhow::anyhow!("--policy {p:?}: {e}"))?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}

/// Runs `kvtier simulate`.
///
/// # Errors
/// Bad flags, unreadable or corrupt logs (naming the file and offset), a log without any
/// chunk size and no `--chunk-bytes`.
pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let sizes: Vec<u64> = args.sizes.into_iter().flatten().collect();
    let policies = parse_policies(&args.policy)?;
    let files = log_files(&args.log)?;
    let mut run = Run {
        sims: sizes
            .iter()
            .flat_map(|&size| {
                policies.iter().map(move |&policy| Sim {
                    size,
                    policy,
                    replay: Replay::new(size, policy),
                    hits: 0,
                })
            })
            .collect(),
        strings: Interner::default(),
        seen: HashSet::new(),
        lookups: 0,
        chunks: 0,
        unbounded_hits: 0,
        held: Vec::new(),
        default_bytes: None,
        forced_bytes: args.force_chunk_bytes.then_some(args.chunk_bytes).flatten(),
    };
    let mut truncated = Vec::new();
    for f in &files {
        let mut reader = LogReader::open(f)?;
        while let Some(rec) = reader.next_record()? {
            run.feed(rec);
        }
        if let Some(at) = reader.truncated_at() {
            eprintln!(
                "kvtier simulate: warning: {} ends inside a record at offset {at} (a writer stopped mid-record); the rest of that file is skipped",
                f.display()
            );
            truncated.push(serde_json::json!({"file": f.display().to_string(), "offset": at}));
        }
    }
    if !run.held.is_empty() {
        let Some(bytes) = args.chunk_bytes else {
            bail!(
                "{} lookups carry no chunk size (the server had no object in L1 yet) and none in the log does: pass --chunk-bytes",
                run.held.len()
            );
        };
        for h in std::mem::take(&mut run.held) {
            run.replay(h, bytes);
        }
    }
    if run.lookups == 0 {
        bail!("{}: the log holds no lookup to replay", args.log.display());
    }
    let rate = |hits: u64| hits as f64 / run.chunks.max(1) as f64;
    if args.json {
        let results: Vec<_> = run
            .sims
            .iter()
            .map(|s| {
                serde_json::json!({
                    "size_bytes": s.size,
                    "policy": s.policy.name(),
                    "hit_rate": rate(s.hits),
                    "hits": s.hits,
                })
            })
            .collect();
        let out = serde_json::json!({
            "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "truncated": truncated,
            "lookups": run.lookups,
            "chunks": run.chunks,
            "chunk_bytes": run.forced_bytes.or(run.default_bytes).or(args.chunk_bytes),
            "unbounded_hit_rate": rate(run.unbounded_hits),
            "results": results,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("encoding the result")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} lookups, {} chunks from {} file(s); chunk size {}; unbounded cache: {:.1} % hits",
        run.lookups,
        run.chunks,
        files.len(),
        run.forced_bytes
            .or(run.default_bytes)
            .or(args.chunk_bytes)
            .map_or_else(|| "unknown".into(), format_size),
        100.0 * rate(run.unbounded_hits)
    );
    let mut header = String::from("| size |");
    let mut rule = String::from("|---:|");
    for p in &policies {
        header.push_str(&format!(" {} |", p.name()));
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    for &size in &sizes {
        let mut row = format!("| {} |", format_size(size));
        for p in &policies {
            if let Some(s) = run.sims.iter().find(|s| s.size == size && s.policy == *p) {
                row.push_str(&format!(" {:.1} % |", 100.0 * rate(s.hits)));
            }
        }
        println!("{row}");
    }
    Ok(ExitCode::SUCCESS)
}
