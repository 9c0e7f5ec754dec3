//! Warnings that may come in floods (a full descriptor table, ICMP errors on a UDP
//! socket), logged at most once a second.

use std::time::{Duration, Instant};

/// When a flooding warning was last logged.
#[derive(Default)]
pub(super) struct Throttled {
    last: Option<Instant>,
}

impl Throttled {
    /// True if the warning may be logged now.
    pub(super) fn may_log(&mut self) -> bool {
        if self
            .last
            .is_none_or(|at| at.elapsed() > Duration::from_secs(1))
        {
            self.last = Some(Instant::now());
            return true;
        }
        false
    }
}
