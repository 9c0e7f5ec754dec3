//! A task's timer for a deadline that moves. Deadlines mostly move later (each inbound
//! frame pushes a heartbeat out), so an armed timer is kept when a later deadline comes,
//! and re-armed only for an earlier one. When it fires early the caller simply looks at
//! its deadlines again.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Instant;

use glommio::timer::Timer;

#[derive(Default)]
pub(super) struct DeadlineTimer {
    armed: Option<(Instant, Timer)>,
}

impl DeadlineTimer {
    /// True when `deadline` is due by `now`, or when the timer armed for an earlier
    /// deadline fired: either way the caller handles what is due. Otherwise the task is
    /// woken when the timer fires.
    pub(super) fn poll_fired(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Instant,
        now: Instant,
    ) -> bool {
        if deadline <= now {
            self.armed = None;
            return true;
        }
        if self.armed.as_ref().is_none_or(|(at, _)| *at > deadline) {
            self.armed = Some((deadline, Timer::new(deadline - now)));
        }
        let fired = self
            .armed
            .as_mut()
            .is_some_and(|(_, timer)| Pin::new(timer).poll(cx).is_ready());
        if fired {
            self.armed = None;
        }
        fired
    }

    /// Nothing is due any more: drop the timer.
    pub(super) fn disarm(&mut self) {
        self.armed = None;
    }
}
