//! Containment of `SIGBUS` in engine mappings: a client that truncates its own KV segment
//! under the server fails its own requests instead of killing the server.
//!
//! # The problem
//! An engine segment is a file in `/dev/shm` that the *client* owns. If the client shrinks it
//! (`ftruncate`) after registering, the server's pages past the new end of file are gone, and
//! the next copy that touches one gets `SIGBUS`; the default action ends the process, with
//! every other client's work and the L1 segment left behind in `/dev/shm`.
//!
//! # The mechanism (why this one)
//! A process-wide `SIGBUS` handler, installed once when the first engine segment is mapped,
//! and a registry of the guarded address ranges (one per engine mapping). When a fault
//! (`si_code == BUS_ADRERR`) lies inside a registered range, the handler maps anonymous zero
//! pages over the *whole* range with `mmap(MAP_FIXED)`, sets the range's `faulted` flag and
//! returns: the faulting instruction runs again against the zero pages, and the copy finishes
//! harmlessly (reading zeros, or writing into private pages nobody sees). Callers check the flag
//! after each copy ([`Guard::faulted`]) and fail the request; the flag is sticky, because the
//! range is no longer shared with the engine: the registration stays failed until the engine
//! registers again (which maps the segment afresh) or is unregistered or reaped. This is the
//! technique of Wayland's `wl_shm` (`wl_shm_buffer_begin_access`), which has the same problem
//! with client-owned buffers.
//!
//! Rejected alternatives:
//! - *`fstat` before each copy*: racy (the client can truncate between the check and the
//!   copy, or during it), and one syscall per segment per transfer (32+ per store).
//! - *`pread`/`pwrite` through a kept fd*: no `SIGBUS` (a short read instead), but one syscall
//!   per contiguous run: a whole block for NHD layouts, but one per 256-byte head vector for
//!   HND (hundreds of thousands per store), and a copy through the kernel instead of `memcpy`.
//! - *Sealing the file* (`F_SEAL_SHRINK`): only `memfd`s created with `MFD_ALLOW_SEALING`
//!   can be sealed; `shm_open` files cannot.
//! - *`sigsetjmp`/`siglongjmp` out of the copy*: unwinding Rust frames by `longjmp` is
//!   undefined behaviour, and the scoped copy threads would be left mid-flight.
//!
//! The cost on the copy path is one relaxed atomic load per segment before and after a
//! transfer; nothing runs unless a fault happens.
//!
//! # Invariants
//! - The handler is async-signal-safe: it reads a fixed array of atomics (no allocation, no
//!   lock), calls `mmap`/`sigaction`/`raise` (raw system calls), and saves and restores
//!   `errno`.
//! - Slot writers (registration and release, never on the copy path) serialise on a mutex the
//!   handler never takes, and publish `start`/`end` under a per-slot sequence number (odd while
//!   written), so the handler never acts on a half-written range.
//! - A range is released from the registry *before* it is unmapped (see
//!   [`super::mapping::EngineSegment`]'s `Drop`), so the handler never remaps memory that no
//!   longer belongs to an engine mapping. No copy runs while a mapping is dropped (copies hold
//!   the registration's `Arc`).
//! - A fault outside every registered range, of another kind (`BUS_ADRERR` only is handled), or
//!   one the remap cannot cure, goes to the handler that was installed before (Rust's stack
//!   overflow handler, usually); if that was the default action, the default action is
//!   restored and the fault repeats, so the process dies exactly as it would have.
//! - The registry holds [`MAX_GUARDED`] ranges; registering more fails (the registration is
//!   refused with that reason), it never maps unguarded.
//!
//! Segments *unlinked* or *replaced* (unlinked and created again under the same name) need no
//! handling: the mapping keeps the old inode alive, so copies keep working on the memory the
//! engine registered. A new inode is picked up when the engine registers again, which maps
//! by name.

use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use rustix::mm::{MapFlags, ProtFlags};

/// Most engine mappings guarded at once (one per distinct segment of every registration).
pub const MAX_GUARDED: usize = 8192;

/// Why a range cannot be guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The `SIGBUS` handler could not be installed.
    #[error("installing the SIGBUS handler failed (errno {0})")]
    Install(i32),
    /// Every slot of the registry is in use.
    #[error("more than {MAX_GUARDED} engine segments are mapped")]
    Full,
}

struct Slot {
    /// Sequence number: odd while `start`/`end` are being written.
    seq: AtomicUsize,
    /// First byte of the range (0: free slot).
    start: AtomicUsize,
    /// One past the last byte.
    end: AtomicUsize,
    /// Set by the handler; sticky until the slot is released.
    faulted: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self {
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }
}

static SLOTS: [Slot; MAX_GUARDED] = [const { Slot::new() }; MAX_GUARDED];
/// Slots `[0, HIGH)` may be in use (the handler scans no further).
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Serialises slot writers; which slots are taken.
static WRITERS: Mutex<Vec<bool>> = Mutex::new(Vec::new());
/// Faults the handler cured, process-wide.
static CURED: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The handler that was installed before ours (set once, before ours is installed).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), GuardError>> = OnceLock::new();

/// Faults cured since start (every process, every mapping).
pub fn cured_faults() -> u64 {
    CURED.load(Ordering::Relaxed)
}

/// Installs the handler (once per process).
fn install() -> Result<(), GuardError> {
    *INSTALLED.get_or_init(|| {
        PAGE.store(rustix::param::page_size(), Ordering::Relaxed);
        // SAFETY: plain libc calls on zero-initialised `sigaction` structs; the handler has the
        // `SA_SIGINFO` signature.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return Err(GuardError::Install(errno()));
            }
            // Only ever set here, before our handler can run.
            let _set = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) = on_sigbus;
            new.sa_sigaction = handler as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) != 0 {
                return Err(GuardError::Install(errno()));
            }
        }
        Ok(())
    })
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One guarded range; released (unregistered) on drop or by [`Guard::release`].
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Registers `[start, start + len)` (an engine mapping) with the `SIGBUS` handler,
    /// installing it first if needed.
    ///
    /// # Errors
    /// [`GuardError`] when the handler cannot be installed or the registry is full.
    pub fn new(start: *mut u8, len: usize) -> Result<Self, GuardError> {
        install()?;
        let start = start as usize;
        let mut taken = WRITERS.lock();
        let i = match taken.iter().position(|&t| !t) {
            Some(i) => i,
            None if taken.len() < MAX_GUARDED => {
                taken.push(false);
                taken.len() - 1
            }
            None => return Err(GuardError::Full),
        };
        let slot = &SLOTS[i];
        slot.seq.fetch_add(1, Ordering::AcqRel);
        slot.faulted.store(false, Ordering::Relaxed);
        slot.start.store(start, Ordering::Relaxed);
        slot.end.store(start.saturating_add(len), Ordering::Relaxed);
        slot.seq.fetch_add(1, Ordering::Release);
        taken[i] = true;
        HIGH.fetch_max(i + 1, Ordering::Release);
        Ok(Self { slot: Some(i) })
    }

    /// Whether a fault in the range was cured (its contents are now zero pages, no longer the
    /// engine's). Sticky.
    pub fn faulted(&self) -> bool {
        self.slot
            .and_then(|i| SLOTS.get(i))
            .is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }

    /// Unregisters the range (idempotent). Call before unmapping it.
    pub fn release(&mut self) {
        let Some(i) = self.slot.take() else { return };
        let mut taken = WRITERS.lock();
        let slot = &SLOTS[i];
        slot.seq.fetch_add(1, Ordering::AcqRel);
        slot.start.store(0, Ordering::Relaxed);
        slot.end.store(0, Ordering::Relaxed);
        slot.seq.fetch_add(1, Ordering::Release);
        if let Some(t) = taken.get_mut(i) {
            *t = false;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release();
    }
}

/// The registered range containing `addr`, as `(slot, start, end)`.
fn find(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    let high = HIGH.load(Ordering::Acquire).min(MAX_GUARDED);
    for slot in &SLOTS[..high] {
        let s1 = slot.seq.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            continue; // being written: a mapping appears or goes, no copy uses it
        }
        let start = slot.start.load(Ordering::Relaxed);
        let end = slot.end.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) != s1 {
            continue;
        }
        if start != 0 && start <= addr && addr < end {
            return Some((slot, start, end));
        }
    }
    None
}

/// Maps zero pages over `[start, end)`. Async-signal-safe (one system call).
fn zero_fill(start: usize, end: usize) -> bool {
    // SAFETY: `[start, end)` is a registered engine mapping (or a page of one), owned by this
    // process and not unmapped while registered; replacing its pages cannot invalidate any
    // Rust reference because none is ever formed over engine memory.
    unsafe {
        rustix::mm::mmap_anonymous(
            start as *mut c_void,
            end - start,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
        )
    }
    .is_ok()
}

/// Tries to cure a fault at `addr`; true when the faulting access can be retried.
fn cure(addr: usize) -> bool {
    let Some((slot, start, end)) = find(addr) else {
        return false;
    };
    // First fault: zero the whole range (later accesses to lost pages then cost nothing).
    // Otherwise, or if that fails, just the faulting page.
    let whole = !slot.faulted.swap(true, Ordering::AcqRel) && zero_fill(start, end);
    let ok = whole || {
        let page = PAGE.load(Ordering::Relaxed).max(1);
        let p = addr - addr % page;
        zero_fill(p.max(start), (p + page).min(end).max(p + 1))
    };
    if ok {
        CURED.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: `errno` is thread-local; saving and restoring it keeps the interrupted code's.
    let errno_slot = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno_slot };
    // SAFETY: the kernel passes a valid `siginfo_t` to an `SA_SIGINFO` handler.
    let fault = (!info.is_null())
        .then(|| unsafe { ((*info).si_code, (*info).si_addr() as usize) })
        .filter(|&(code, _)| code == libc::BUS_ADRERR);
    let cured = fault.is_some_and(|(_, addr)| cure(addr));
    if !cured {
        // SAFETY: forwarding the signal's own arguments.
        unsafe { chain(sig, info, ctx) };
    }
    // SAFETY: see above.
    unsafe { *errno_slot = saved };
}

/// Hands a fault we do not own to the previous handler, or to the default action.
///
/// # Safety
/// Call from the signal handler only, with its arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let prev = PREVIOUS.get();
    let action = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if action != libc::SIG_DFL && action != libc::SIG_IGN {
        let siginfo = prev.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
        // SAFETY: the previous handler was installed with this signature (its flags say which).
        unsafe {
            if siginfo {
                let f = std::mem::transmute::<
                    libc::sighandler_t,
                    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void),
                >(action);
                f(sig, info, ctx);
            } else {
                let f =
                    std::mem::transmute::<libc::sighandler_t, extern "C" fn(libc::c_int)>(action);
                f(sig);
            }
        }
        return;
    }
    // Default action: restore it. A fault repeats when we return and kills the process as it
    // would have without us; a signal sent by `kill` is raised again (it stays blocked until
    // the handler returns).
    // SAFETY: `sigaction` and `raise` are async-signal-safe.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        if info.is_null() || (*info).si_code <= 0 {
            libc::raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// A file in /dev/shm mapped shared, like an engine segment.
    struct Mapped {
        path: String,
        ptr: *mut u8,
        len: usize,
    }

    impl Mapped {
        fn new(len: usize) -> Self {
            let path = format!(
                "/dev/shm/kvtier_ut_fault_{}_{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            std::fs::write(&path, vec![7u8; len]).expect("write segment");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            // SAFETY: a fresh shared mapping of a file of `len` bytes.
            let ptr = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    &file,
                    0,
                )
            }
            .expect("mmap");
            Self {
                path,
                ptr: ptr.cast(),
                len,
            }
        }

        fn truncate(&self, len: u64) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .expect("open");
            file.set_len(len).expect("truncate");
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            // SAFETY: our own mapping.
            let _unmapped = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
            let _gone = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn a_truncated_guarded_mapping_reads_zeros_and_reports_the_fault() {
        let len = 64 << 10;
        let m = Mapped::new(len);
        let mut guard = Guard::new(m.ptr, len).expect("guard");
        // SAFETY: inside our mapping.
        assert_eq!(unsafe { m.ptr.add(100).read_volatile() }, 7);
        assert!(!guard.faulted());
        m.truncate(4096);
        let before = cured_faults();
        // SAFETY: inside our mapping; the page past EOF faults and is cured.
        unsafe {
            assert_eq!(m.ptr.add(100).read_volatile(), 7, "the page before EOF");
            assert_eq!(m.ptr.add(20_000).read_volatile(), 0);
            m.ptr.add(40_000).write_volatile(9);
            assert_eq!(m.ptr.add(40_000).read_volatile(), 9);
            // Every byte is now a private zero page (the whole range was replaced).
            assert_eq!(m.ptr.add(100).read_volatile(), 0);
        }
        assert!(guard.faulted());
        assert!(cured_faults() > before);
        guard.release();
        assert!(!guard.faulted());
        guard.release();
    }

    #[test]
    fn a_new_guard_of_a_remapped_range_starts_clean() {
        let m = Mapped::new(8192);
        let a = Guard::new(m.ptr, m.len).expect("guard");
        m.truncate(0);
        // SAFETY: inside the guarded mapping: cured.
        unsafe { m.ptr.read_volatile() };
        assert!(a.faulted());
        drop(a);
        m.truncate(8192);
        let b = Guard::new(m.ptr, m.len).expect("guard again");
        assert!(!b.faulted());
    }

    /// A fault outside every guarded range still kills the process with SIGBUS (checked in a
    /// child process: this test binary run again for the test below).
    #[test]
    fn faults_outside_guarded_ranges_still_kill_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let exe = std::env::current_exe().expect("test binary");
        let child = std::process::Command::new(exe)
            .args([
                "--exact",
                "engine::lmcache_driven::fault::tests::child_touches_an_unguarded_truncated_mapping",
                "--ignored",
                "--nocapture",
            ])
            .env("KVTIER_FAULT_CHILD", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn child");
        let pid = child.id();
        let out = child.wait_with_output().expect("child output");
        // The child dies by SIGBUS before its `Mapped` values drop: remove its files here.
        let prefix = format!("kvtier_ut_fault_{pid}_");
        for entry in std::fs::read_dir("/dev/shm").expect("/dev/shm").flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _gone = std::fs::remove_file(entry.path());
            }
        }
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("guarded fault cured"));
    }

    #[test]
    #[ignore = "run by faults_outside_guarded_ranges_still_kill_the_process"]
    fn child_touches_an_unguarded_truncated_mapping() {
        if std::env::var_os("KVTIER_FAULT_CHILD").is_none() {
            return;
        }
        let guarded = Mapped::new(8192);
        let g = Guard::new(guarded.ptr, guarded.len).expect("guard");
        guarded.truncate(0);
        // SAFETY: inside the guarded mapping: cured.
        unsafe { guarded.ptr.read_volatile() };
        assert!(g.faulted());
        println!("guarded fault cured");
        let unguarded = Mapped::new(8192);
        unguarded.truncate(0);
        // SAFETY: deliberately touches a lost page outside every guarded range: SIGBUS.
        unsafe { unguarded.ptr.read_volatile() };
        unreachable!("SIGBUS expected");
    }
}
