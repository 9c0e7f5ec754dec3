//! The sequencer: the single writer of the conversations homed on one shard.
//!
//! A command is checked (membership, roles, limits) and turned into a record; the record
//! is checked against the state, appended to the log, and only then applied to the
//! state, by the same `check` and `apply` that replay the log at recovery. So the state
//! is always what the log says, and the log holds only records that apply. Replies and events come out
//! as `Output`s; the shard core holds them back until the log is durable up to the
//! records they depend on (PROTOCOL.md 7.1).
//!
//! - `turn`: what a command works with (the clock, the log, the outputs) and who asks.
//! - `apply`: records checked against the state and applied to it, one kind at a time.
//! - `state`: the state as a snapshot, restored from one, and replayed from the log.
//! - `handle`: a command served, and how a failure is answered.
//! - `membership`, `messages`, `cursors`, `typing`, `presence`: the commands
//!   and upkeep of each concern.
//! - `gather`: this shard's parts of `conv.list`, `sync` and `resume`.

mod apply;
mod cursors;
mod gather;
mod handle;
mod membership;
mod messages;
mod presence;
mod state;
mod turn;
mod typing;

use crate::seeded_map::FastMap;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::chat_log::ChatLog;
use crate::command::ChatCommand;
use crate::conversation::{Conversation, Window};
use crate::limits::ChatLimits;
use crate::output::Caller;
use crate::protocol::ErrorCode;
use crate::record::{ChatRecord, DecodeError};

pub use gather::SyncShare;
use turn::Handled;

/// A command for a conversation homed here.
#[derive(Debug)]
pub struct HomeCommand {
    pub caller: Caller,
    /// The conversation (for `conv.create`, the id the origin chose or derived).
    pub conv: Arc<str>,
    pub command: ChatCommand,
}

/// A record the log holds that does not fit the state: the log is not one this build wrote.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("LSN {lsn}: {source}")]
    Decode { lsn: u64, source: DecodeError },
    #[error("LSN {lsn}: {what}")]
    Inconsistent { lsn: u64, what: String },
}

/// Different reactions one message may carry (each is in every history page covering it).
pub const MAX_EMOJI_PER_MESSAGE: usize = 64;

/// (conv, user, device): a device's delivered cursor, or with no device the user's read cursor.
type CursorKey = (Arc<str>, Arc<str>, Option<Arc<str>>);

/// Counters for metrics and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SequencerStats {
    pub sequenced: u64,
    pub duplicates: u64,
}

pub struct Sequencer {
    limits: Arc<ChatLimits>,
    window: Window,
    convs: FastMap<Arc<str>, Conversation>,
    /// user -> the conversations homed here that they belong to.
    convs_of_user: FastMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// user -> when their last session ended (for users homed here).
    last_seen: FastMap<Arc<str>, u64>,
    /// (conv, user) -> when their typing expires.
    typing: FastMap<(Arc<str>, Arc<str>), Instant>,
    /// Expiries in the order they were set (the TTL is fixed, so this is time order).
    typing_expiry: VecDeque<(Instant, Arc<str>, Arc<str>)>,
    /// Cursor advances not yet in the log: (conv, user, device or None for read) -> seq.
    dirty_cursors: FastMap<CursorKey, u64>,
    /// Everything up to here is durable; the message cache keeps what is not.
    durable_lsn: u64,
    pub stats: SequencerStats,
}

impl Sequencer {
    pub fn new(limits: Arc<ChatLimits>) -> Self {
        let window = Window::new(limits.dedupe_window, limits.dedupe_window_sends);
        Self {
            limits,
            window,
            convs: FastMap::default(),
            convs_of_user: FastMap::default(),
            last_seen: FastMap::default(),
            typing: FastMap::default(),
            typing_expiry: VecDeque::new(),
            dirty_cursors: FastMap::default(),
            durable_lsn: 0,
            stats: SequencerStats::default(),
        }
    }

    pub fn conversations(&self) -> usize {
        self.convs.len()
    }

    pub fn set_durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn);
    }

    /// Check a record against the state, append it, and apply it. A record that does not
    /// fit is refused before the log holds it (a bug here, answered `internal`); log
    /// trouble comes back for the caller to answer.
    fn commit(
        &mut self,
        log: &mut dyn ChatLog,
        ts: u64,
        record: &ChatRecord,
    ) -> Result<u64, Handled> {
        if let Err(what) = self.check(record) {
            let msg = format!("the sequencer made a record that does not fit its state: {what}");
            return Err(Handled::Refused((ErrorCode::Internal, msg)));
        }
        let lsn = log.append(ts, &record.encode())?;
        // A record just appended is beyond everything durable.
        assert!(
            lsn > self.durable_lsn,
            "LSN {lsn} appended, {} durable",
            self.durable_lsn
        );
        self.apply(lsn, record);
        Ok(lsn)
    }
}

#[cfg(test)]
mod tests;
