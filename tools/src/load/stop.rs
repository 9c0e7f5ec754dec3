//! Why a run ends before its plan is done: SIGINT or SIGTERM. The handler only records
//! the signal; the main thread sees it between its waits, stops the workers and still
//! writes the report, saying it was stopped. The handler is reset as it runs
//! (SA_RESETHAND), so a second signal kills a run whose orderly stop hangs.

use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    RECEIVED.store(signal, Ordering::Relaxed);
}

/// Catch SIGINT and SIGTERM from now on (once each).
pub fn install() -> Result<(), String> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores an atomic; the
        // mask is emptied before use.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(format!(
                "sigaction({signal}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::Relaxed) {
        0 => None,
        signal => Some(signal),
    }
}

/// `SIGTERM`, `SIGINT`, or the number.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}
