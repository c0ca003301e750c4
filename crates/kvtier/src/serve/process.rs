//! Process-wide set-up for `kvtier serve`: the logger with its run-time filter (behind
//! `GET/POST /loglevel`; `RUST_LOG` overrides `--log`) and the hook that gives freed heap
//! memory back to the OS after large releases.

use anyhow::Context;
use kvtier_server::http::admin::LogControl;

/// Gives freed heap memory back to the OS: the calling thread's empty mimalloc pages and every
/// arena's purgeable pages (`mi_collect(true)`; mimalloc is this binary's global allocator), and
/// the free pages of glibc's arenas, where libzmq allocates message buffers (`malloc_trim(0)`).
/// Run by the server after large releases (see `kvtier_server::engine::MemoryRelease`).
pub(super) fn release_memory() {
    // SAFETY: neither function has preconditions: each walks its allocator's own free lists
    // under the allocator's locks and may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libc::malloc_trim(0);
    }
}

pub(super) type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The run-time log filter behind `GET/POST /loglevel`.
#[derive(Debug)]
pub(super) struct ReloadableFilter {
    handle: FilterHandle,
    current: parking_lot::Mutex<String>,
}

impl LogControl for ReloadableFilter {
    fn current(&self) -> String {
        self.current.lock().clone()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = tracing_subscriber::EnvFilter::try_new(filter)
            .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        *self.current.lock() = filter.to_owned();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

pub(super) fn init_logging(filter: &str) -> anyhow::Result<std::sync::Arc<ReloadableFilter>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => v,
        _ => filter.to_owned(),
    };
    let parsed = tracing_subscriber::EnvFilter::try_new(&filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let (layer, handle) = tracing_subscriber::reload::Layer::new(parsed);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        );
    tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init()
        .context("installing the logger")?;
    Ok(std::sync::Arc::new(ReloadableFilter {
        handle,
        current: parking_lot::Mutex::new(filter),
    }))
}
