//! `--rpc-cpu`: the request path's two threads on one CPU.
//!
//! A request crosses two server threads: libzmq's I/O thread reads it from the TCP socket and
//! signals the `kvtier-zmq` poll thread, which handles it and hands the reply back the same way.
//! On a virtual machine each hand-off to a thread on another, idle vCPU is an inter-processor
//! interrupt into a halted vCPU, one of the costliest things a round trip does there
//! (docs/performance.md: pinning the two together took the noop round trip from 78-93 to 59-65
//! µs). Pinning both to one CPU makes the hand-off a same-CPU wake-up.
//!
//! libzmq starts its I/O (and reaper) threads when the context's first socket is created, and a
//! new thread inherits its creator's CPU mask, so [`InheritedCpu`] pins the creating thread
//! while the front end creates its first socket and restores its mask afterwards; the poll
//! thread pins itself with [`pin_current_thread`]. Off by default: a fixed CPU is an operator's
//! decision (it may be one an engine's threads need).

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

use super::TransportError;

/// Pins the calling thread to `cpu`.
///
/// # Errors
/// [`TransportError::CpuNotAllowed`] when the process may not run on `cpu`; the OS error when
/// the call fails.
pub(super) fn pin_current_thread(cpu: usize) -> Result<(), TransportError> {
    let allowed = sched_getaffinity(None).map_err(|e| io("sched_getaffinity", e))?;
    if cpu >= CpuSet::MAX_CPU || !allowed.is_set(cpu) {
        return Err(TransportError::CpuNotAllowed {
            cpu,
            allowed: describe(&allowed),
        });
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).map_err(|e| io("sched_setaffinity", e))
}

/// The calling thread pinned to one CPU until dropped, when its previous mask comes back (so
/// threads it starts meanwhile inherit the pin, and it keeps none).
pub(super) struct InheritedCpu {
    saved: CpuSet,
}

impl InheritedCpu {
    /// Pins the calling thread to `cpu` (see [`pin_current_thread`]).
    ///
    /// # Errors
    /// As [`pin_current_thread`].
    pub(super) fn pin(cpu: usize) -> Result<Self, TransportError> {
        let saved = sched_getaffinity(None).map_err(|e| io("sched_getaffinity", e))?;
        pin_current_thread(cpu)?;
        Ok(Self { saved })
    }
}

impl Drop for InheritedCpu {
    fn drop(&mut self) {
        if let Err(e) = sched_setaffinity(None, &self.saved) {
            tracing::warn!(error = %e, "could not restore the thread's CPU mask after --rpc-cpu");
        }
    }
}

fn io(op: &'static str, e: rustix::io::Errno) -> TransportError {
    TransportError::Io {
        op,
        source: e.into(),
    }
}

/// `0-3,6` style list of the CPUs in `set`.
fn describe(set: &CpuSet) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cpu = 0;
    while cpu < CpuSet::MAX_CPU {
        if set.is_set(cpu) {
            let start = cpu;
            while cpu + 1 < CpuSet::MAX_CPU && set.is_set(cpu + 1) {
                cpu += 1;
            }
            out.push(if start == cpu {
                start.to_string()
            } else {
                format!("{start}-{cpu}")
            });
        }
        cpu += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_like_the_kernels() {
        let mut set = CpuSet::new();
        for cpu in [0, 1, 2, 3, 6, 9, 10] {
            set.set(cpu);
        }
        assert_eq!(describe(&set), "0-3,6,9-10");
        assert_eq!(describe(&CpuSet::new()), "");
    }

    #[test]
    fn a_cpu_outside_the_mask_is_refused_by_name() {
        let e = pin_current_thread(CpuSet::MAX_CPU + 1).expect_err("no such CPU");
        assert!(e.to_string().contains("--rpc-cpu"), "{e}");
    }

    #[test]
    fn the_creating_thread_gets_its_mask_back() {
        std::thread::spawn(|| {
            let before = sched_getaffinity(None).expect("mask");
            let cpu = (0..CpuSet::MAX_CPU)
                .find(|&c| before.is_set(c))
                .expect("a CPU");
            {
                let _pinned = InheritedCpu::pin(cpu).expect("pin");
                let child = std::thread::spawn(|| sched_getaffinity(None).expect("mask").count())
                    .join()
                    .expect("child");
                assert_eq!(child, 1, "a thread started meanwhile inherits the pin");
            }
            assert_eq!(sched_getaffinity(None).expect("mask"), before);
        })
        .join()
        .expect("test thread");
    }
}
