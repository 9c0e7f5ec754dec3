//! A hashed timer wheel for per-connection deadlines (auth, heartbeat, idle, linger).
//!
//! Arming and expiring cost O(1) per timer, and a tick costs nothing per idle connection:
//! only the slots whose time has come are looked at. Deadlines are rounded up to the
//! tick, so a timer never fires early. Timers are not removed when a deadline moves:
//! the owner re-checks its real deadline when an entry fires and ignores stale ones,
//! which keeps each connection's footprint to one entry in the common case (deadlines
//! mostly move later).

use std::time::{Duration, Instant};

/// One armed timer: the tick it is due at and whose it is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    due_tick: u64,
    token: u64,
}

#[derive(Debug)]
pub struct TimerWheel {
    origin: Instant,
    tick: Duration,
    slots: Box<[Vec<Entry>]>,
    /// Every tick before this one has been expired.
    cursor: u64,
    armed: usize,
}

impl TimerWheel {
    /// `slots` times `tick` is the span one rotation covers; later deadlines wait in
    /// their slot for extra rotations.
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> Self {
        assert!(
            !tick.is_zero() && slots > 0,
            "a wheel needs a tick and slots"
        );
        Self {
            origin,
            tick,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            cursor: 0,
            armed: 0,
        }
    }

    /// Timers armed and not yet expired (stale ones included).
    pub fn len(&self) -> usize {
        self.armed
    }

    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Ticks from the origin to `at`: rounded up for deadlines (never early), down for
    /// the present (a tick is due once its start has passed).
    fn ticks_to(&self, at: Instant, round_up: bool) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let tick = self.tick.as_nanos();
        let ticks = if round_up {
            since.div_ceil(tick)
        } else {
            since / tick
        };
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u64::try_from(self.tick.as_nanos()).unwrap_or(u64::MAX);
        self.origin + Duration::from_nanos(tick.saturating_mul(nanos))
    }

    /// Fire `token` at `at` or at most one tick later.
    pub fn insert(&mut self, at: Instant, token: u64) {
        // A deadline already past fires at the next tick.
        let due_tick = self.ticks_to(at, true).max(self.cursor);
        let slot = (due_tick % self.slots.len() as u64) as usize;
        self.slots[slot].push(Entry { due_tick, token });
        self.armed += 1;
    }

    /// Move the tokens of every timer due at or before `now` into `fired`.
    pub fn expire(&mut self, now: Instant, fired: &mut Vec<u64>) {
        let now_tick = self.ticks_to(now, false);
        if now_tick < self.cursor {
            return;
        }
        let span = self.slots.len() as u64;
        // After a long stall, one pass over every slot covers everything due.
        let last = now_tick.min(self.cursor + span - 1);
        for tick in self.cursor..=last {
            let slot = &mut self.slots[(tick % span) as usize];
            let before = slot.len();
            slot.retain(|entry| {
                if entry.due_tick <= now_tick {
                    fired.push(entry.token);
                    false
                } else {
                    true
                }
            });
            self.armed -= before - slot.len();
            if slot.is_empty() && slot.capacity() > 64 {
                // A burst's capacity is not kept by an idle slot.
                slot.shrink_to(8);
            }
        }
        self.cursor = now_tick + 1;
    }

    /// When the next expiry could have something to fire: the start of the next
    /// non-empty slot's tick within one rotation, or `None` with nothing armed.
    pub fn next_expiry(&self) -> Option<Instant> {
        if self.armed == 0 {
            return None;
        }
        let span = self.slots.len() as u64;
        let next = (self.cursor..self.cursor + span)
            .find(|tick| !self.slots[(tick % span) as usize].is_empty())
            .unwrap_or(self.cursor);
        Some(self.instant_of(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn wheel() -> (TimerWheel, Instant) {
        let origin = Instant::now();
        (TimerWheel::new(origin, 10 * MS, 8), origin)
    }

    fn expire(wheel: &mut TimerWheel, at: Instant) -> Vec<u64> {
        let mut fired = Vec::new();
        wheel.expire(at, &mut fired);
        fired.sort_unstable();
        fired
    }

    #[test]
    fn fires_never_early_and_at_most_one_tick_late() {
        let (mut wheel, t0) = wheel();
        wheel.insert(t0 + 25 * MS, 1);
        assert!(expire(&mut wheel, t0 + 24 * MS).is_empty());
        assert!(expire(&mut wheel, t0 + 29 * MS).is_empty());
        assert_eq!(expire(&mut wheel, t0 + 30 * MS), vec![1]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_a_rotation_wait_their_turn() {
        let (mut wheel, t0) = wheel();
        // The span is 80 ms: 85 ms shares a slot with 5 ms.
        wheel.insert(t0 + 5 * MS, 1);
        wheel.insert(t0 + 85 * MS, 2);
        assert_eq!(expire(&mut wheel, t0 + 10 * MS), vec![1]);
        assert!(expire(&mut wheel, t0 + 80 * MS).is_empty());
        assert_eq!(expire(&mut wheel, t0 + 90 * MS), vec![2]);
    }

    #[test]
    fn a_long_stall_fires_everything_due_once() {
        let (mut wheel, t0) = wheel();
        for token in 0..20 {
            wheel.insert(t0 + token * 7 * MS, token as u64);
        }
        wheel.insert(t0 + 10_000 * MS, 99);
        let fired = expire(&mut wheel, t0 + 1000 * MS);
        assert_eq!(fired, (0..20).collect::<Vec<_>>());
        assert_eq!(wheel.len(), 1);
        assert!(expire(&mut wheel, t0 + 9_990 * MS).is_empty());
        assert_eq!(expire(&mut wheel, t0 + 10_000 * MS), vec![99]);
    }

    #[test]
    fn past_deadlines_fire_at_the_next_tick() {
        let (mut wheel, t0) = wheel();
        assert!(expire(&mut wheel, t0 + 50 * MS).is_empty());
        wheel.insert(t0 + MS, 7);
        assert!(expire(&mut wheel, t0 + 59 * MS).is_empty());
        assert_eq!(expire(&mut wheel, t0 + 60 * MS), vec![7]);
    }

    #[test]
    fn next_expiry_points_at_the_first_armed_slot() {
        let (mut wheel, t0) = wheel();
        assert_eq!(wheel.next_expiry(), None);
        wheel.insert(t0 + 35 * MS, 1);
        assert_eq!(wheel.next_expiry(), Some(t0 + 40 * MS));
    }
}
