//! Durable waits: who waits for which LSN, and how the writer thread wakes exactly the
//! waiters a flush covers (a blocked thread, or a future's waker).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::error::WalError;
use crate::format::Lsn;
use crate::shared::Shared;

/// How to wake one waiter.
pub(crate) enum Wake {
    Thread(std::thread::Thread),
    Task(Waker),
}

/// Waiters ordered by the LSN they wait for, so a flush wakes exactly the ones it covers
/// (waking every waiter on every flush costs a context switch per waiter per flush).
#[derive(Default)]
pub(crate) struct Waiters {
    by_lsn: BTreeMap<(Lsn, u64), Wake>,
    next_id: u64,
}

impl Waiters {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish that every LSN up to `lsn` is durable, and wake the waiters that covers;
    /// after a poison, wake everyone (to see it). Called by the writer thread only.
    pub(crate) fn publish_durable(&self, lsn: Lsn) {
        let state = self.lock();
        let previous = self.durable_lsn.load(Ordering::Acquire);
        assert!(lsn >= previous, "durable LSN back from {previous} to {lsn}");
        assert!(lsn < state.next_lsn, "durable LSN {lsn} not given out yet");
        self.durable_lsn.store(lsn, Ordering::Release);
        self.durable_changed.notify_all();
        drop(state);
        let woken = {
            let mut waiters = self.waiters();
            if self.poison.get().is_some() {
                std::mem::take(&mut waiters.by_lsn)
            } else {
                let later = waiters.by_lsn.split_off(&(lsn + 1, 0));
                std::mem::replace(&mut waiters.by_lsn, later)
            }
        };
        for wake in woken.into_values() {
            match wake {
                Wake::Thread(thread) => thread.unpark(),
                Wake::Task(waker) => waker.wake(),
            }
        }
    }

    /// Done waiting for `lsn`: durable, or never will be.
    pub(crate) fn wait_outcome(&self, lsn: Lsn) -> Option<Result<(), WalError>> {
        if self.durable_lsn.load(Ordering::Acquire) >= lsn {
            Some(Ok(()))
        } else {
            self.poisoned().map(Err)
        }
    }

    /// Park this thread until `lsn` is durable or the log is poisoned. The caller has
    /// checked that `lsn` was given out.
    pub(crate) fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let id = self.waiters().id();
        loop {
            self.waiters()
                .by_lsn
                .insert((lsn, id), Wake::Thread(std::thread::current()));
            // Re-check after registering: the writer may have published in between.
            if let Some(outcome) = self.wait_outcome(lsn) {
                self.waiters().by_lsn.remove(&(lsn, id));
                return outcome;
            }
            std::thread::park();
        }
    }
}

/// Resolves once its LSN is durable (see [`Wal::durable`](crate::Wal::durable)).
pub struct Durable {
    shared: Arc<Shared>,
    lsn: Lsn,
    /// Its key among the waiters, once registered.
    id: Option<u64>,
}

impl Durable {
    pub(crate) fn new(shared: Arc<Shared>, lsn: Lsn) -> Self {
        Self {
            shared,
            lsn,
            id: None,
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.waiters().by_lsn.remove(&(self.lsn, id));
        }
    }
}

impl std::future::Future for Durable {
    type Output = Result<(), WalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lsn = self.lsn;
        if let Some(outcome) = self.shared.wait_outcome(lsn) {
            return Poll::Ready(outcome);
        }
        let shared = self.shared.clone();
        let mut waiters = shared.waiters();
        let id = *self.id.get_or_insert_with(|| waiters.id());
        waiters
            .by_lsn
            .insert((lsn, id), Wake::Task(cx.waker().clone()));
        drop(waiters);
        // Re-check: the writer may have published between the check and the registration.
        match shared.wait_outcome(lsn) {
            Some(outcome) => Poll::Ready(outcome),
            None => Poll::Pending,
        }
    }
}
