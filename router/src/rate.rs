//! A token bucket, driven by the caller's clock.

use std::time::{Duration, Instant};

/// Allows `per_sec` events per second on average with bursts up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: u32,
    burst: u32,
    /// Tokens scaled by 1000 so refills of less than one token are not lost.
    milli_tokens: u64,
    last_refill: Instant,
}

impl TokenBucket {
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        Self {
            per_sec,
            burst,
            milli_tokens: u64::from(burst) * 1000,
            last_refill: now,
        }
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let gained = elapsed.as_micros() as u64 * u64::from(self.per_sec) / 1000;
        if gained > 0 {
            let cap = u64::from(self.burst) * 1000;
            self.milli_tokens = (self.milli_tokens + gained).min(cap);
            // Advance only by the time that produced whole milli-tokens.
            let used_us = gained * 1000 / u64::from(self.per_sec.max(1));
            self.last_refill += Duration::from_micros(used_us);
            if self.milli_tokens == cap {
                self.last_refill = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, t0);
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        // 10/s: one token every 100 ms.
        assert!(!bucket.try_take(t0 + Duration::from_millis(99)));
        assert!(bucket.try_take(t0 + Duration::from_millis(100)));
        assert!(!bucket.try_take(t0 + Duration::from_millis(150)));
        assert!(bucket.try_take(t0 + Duration::from_millis(200)));
    }

    #[test]
    fn refill_caps_at_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, 2, t0);
        let later = t0 + Duration::from_secs(60);
        assert!(bucket.try_take(later));
        assert!(bucket.try_take(later));
        assert!(!bucket.try_take(later));
    }

    #[test]
    fn zero_rate_never_refills() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0, 1, t0);
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 + Duration::from_secs(3600)));
    }
}
