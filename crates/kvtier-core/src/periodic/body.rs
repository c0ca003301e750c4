//! What a spawned background thread runs: the round loop (wait on the condition variable until
//! the interval passes, a wake or a stop, then run one round), the single task of
//! `spawn_once`, and one round's guard: an `Err` is logged and recorded and the thread goes
//! on; a panic is caught, recorded, and ends the thread (marked crashed, so liveness reports
//! it), as does an injected crash; an injected stall delays the round. The rules are in the
//! `periodic` module docs.

use super::*;

pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs one round (or the one-shot task) under `catch_unwind`, timing it and recording its
/// outcome. Returns `false` when it panicked (the thread must end).
pub(super) fn run_round(shared: &Shared, round: impl FnOnce() -> RoundResult) -> bool {
    let t = Instant::now();
    let started = u64::try_from(t.saturating_duration_since(shared.epoch).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    shared.round_started.store(started, Relaxed);
    let stall = shared.inject_stall_ms.swap(0, Relaxed);
    if stall > 0 {
        tracing::warn!(thread = %shared.name, stall_ms = stall, "stalling on injected fault");
        let until = t + Duration::from_millis(stall);
        while Instant::now() < until && !shared.stop_requested.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let out = catch_unwind(AssertUnwindSafe(round));
    shared.round_started.store(0, Relaxed);
    let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    shared.last_round_nanos.store(nanos, Relaxed);
    shared.rounds.fetch_add(1, Relaxed);
    match out {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(thread = %shared.name, error = %e, "background round failed");
            shared.record_error(e);
            true
        }
        Err(payload) => {
            let msg = format!("panicked: {}", panic_message(payload.as_ref()));
            tracing::error!(thread = %shared.name, error = %msg, "background thread died");
            shared.crashed.store(true, Relaxed);
            shared.record_error(msg);
            false
        }
    }
}

/// Returns `true` when the thread must end because of an injected fault.
pub(super) fn take_injected_crash(shared: &Shared) -> bool {
    if !shared.inject_crash.load(Relaxed) {
        return false;
    }
    tracing::error!(thread = %shared.name, "background thread stopping on injected fault");
    shared.crashed.store(true, Relaxed);
    shared.record_error("injected fault".to_owned());
    true
}

pub(super) fn run_periodic(
    shared: Arc<Shared>,
    interval: Duration,
    mut round: impl FnMut() -> RoundResult,
) {
    let _guard = AliveGuard(Arc::clone(&shared));
    let mut next_at = Instant::now() + interval;
    loop {
        {
            let mut sig = shared.signal.lock();
            loop {
                if sig.stop {
                    return;
                }
                if sig.woken {
                    sig.woken = false;
                    break;
                }
                let now = Instant::now();
                if now >= next_at {
                    next_at += interval;
                    if next_at <= now {
                        next_at = now + interval;
                    }
                    break;
                }
                shared.cv.wait_for(&mut sig, next_at - now);
            }
        }
        if take_injected_crash(&shared) || !run_round(&shared, &mut round) {
            return;
        }
    }
}

pub(super) fn run_once(shared: Arc<Shared>, task: impl FnOnce(&StopToken) -> RoundResult) {
    let _guard = AliveGuard(Arc::clone(&shared));
    if take_injected_crash(&shared) {
        return;
    }
    let token = StopToken(Arc::clone(&shared));
    if run_round(&shared, || task(&token)) {
        shared.finished.store(true, Relaxed);
    }
}
