//! The caller's clock. The state machines never read time themselves: every input that
//! depends on time carries a [`Now`], so tests and the simulator choose it.

use std::time::Instant;

/// The caller's clock: monotonic time for timers, wall time for tokens and `server_ts`.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl Now {
    pub fn system() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            instant: Instant::now(),
            unix_ms,
        }
    }
}
