//! Periodic snapshots of the chat state (every `snapshot_every_records` records), so a
//! restart replays only the log's tail: encoded on the shard at a turn's end, saved by a
//! thread of their own once the log is durable up to the LSN they reflect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parley_router::shard::ShardCore;
use parley_wal::Wal;

pub(super) struct Snapshots {
    every: u64,
    /// LSN of the last snapshot taken (saved or being saved).
    last: u64,
    /// Taken, waiting for the log to be durable up to its LSN.
    pending: Option<(u64, Vec<u8>)>,
    /// A save thread is running.
    saving: Arc<AtomicBool>,
}

impl Snapshots {
    /// `every` records between snapshots (0: never); `last` is the LSN of the snapshot
    /// the log holds, if any.
    pub(super) fn new(every: u64, last: u64) -> Self {
        Self {
            every,
            last,
            pending: None,
            saving: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Take a snapshot when one is due, and hand it to a saving thread once the log is
    /// durable up to its LSN.
    pub(super) fn step(&mut self, shard: usize, core: &ShardCore, wal: &Arc<Wal>) {
        if self.every == 0 || self.saving.load(Ordering::Acquire) {
            return;
        }
        if self.pending.is_none() && core.last_appended() >= self.last + self.every {
            self.pending = core.snapshot();
        }
        let Some((lsn, _)) = &self.pending else {
            return;
        };
        if *lsn > core.durable_lsn() {
            return;
        }
        let Some((lsn, bytes)) = self.pending.take() else {
            return;
        };
        self.last = lsn;
        self.saving.store(true, Ordering::Release);
        let (saving, wal) = (self.saving.clone(), wal.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("parley-snap-{shard}"))
            .spawn(move || {
                let started = Instant::now();
                match wal.save_state(lsn, &bytes) {
                    Ok(()) => tracing::info!(
                        shard,
                        lsn,
                        bytes = bytes.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "saved a state snapshot"
                    ),
                    // Not fatal: the log still holds everything; recovery replays more.
                    Err(error) => tracing::warn!(shard, lsn, %error, "state snapshot failed"),
                }
                saving.store(false, Ordering::Release);
            });
        if let Err(error) = spawned {
            tracing::warn!(shard, %error, "cannot start the snapshot thread");
            self.saving.store(false, Ordering::Release);
        }
    }
}
