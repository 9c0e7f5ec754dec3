//! Signals: the first SIGTERM or SIGINT drains (no new connections, sessions closed with
//! 1001); a second, or a drain that outlives `drain_timeout` and a grace period, exits
//! the process with status 1.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{stderr_line, StartupError};
use crate::runtime::ShardControl;

/// Extra time past drain_timeout before the process gives up on a stuck drain.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

pub(super) fn spawn_signal_thread(
    mut signals: signal_hook::iterator::Signals,
    controls: Vec<Arc<ShardControl>>,
    draining: Arc<AtomicBool>,
    drain_timeout: Duration,
) -> Result<(), StartupError> {
    let spawn_error = |source| StartupError::Spawn {
        what: "the signal thread".into(),
        source,
    };
    std::thread::Builder::new()
        .name("parley-signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(signal) = signals.next() {
                tracing::info!(
                    signal,
                    "draining: no new connections, sessions closed with 1001"
                );
                let _no_systemd_is_fine =
                    sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                draining.store(true, Ordering::Release);
                for control in &controls {
                    control.request_drain();
                }
                let started = Instant::now();
                std::thread::spawn(move || {
                    std::thread::sleep(drain_timeout + DRAIN_GRACE);
                    stderr_line(format_args!(
                        "parleyd: error: drain did not finish in {:?}; exiting",
                        started.elapsed()
                    ));
                    std::process::exit(1);
                });
            }
            if signals.next().is_some() {
                stderr_line(format_args!(
                    "parleyd: second signal during drain; exiting now"
                ));
                std::process::exit(1);
            }
        })
        .map_err(spawn_error)?;
    Ok(())
}
