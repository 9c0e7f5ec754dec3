//! The sequencer's durable state as a whole: a snapshot of it, a snapshot loaded, and
//! the log replayed over it at recovery.

use std::sync::Arc;

use serde::Serialize;

use super::{ApplyError, Sequencer};
use crate::conversation::Conversation;
use crate::record::ChatRecord;
use crate::seeded_map::FastMap;

impl Sequencer {
    /// The durable state as bytes, for a snapshot: conversations (with members, cursors,
    /// reactions, the dedupe window and the seq -> LSN index) and last-seen times.
    /// `None` while cursor advances wait for the log (the state would be ahead of it).
    pub fn snapshot(&self) -> Option<Vec<u8>> {
        #[derive(Serialize)]
        struct State<'a> {
            convs: Vec<&'a Conversation>,
            last_seen: &'a FastMap<Arc<str>, u64>,
        }
        if self.has_dirty_cursors() {
            return None;
        }
        let state = State {
            convs: self.convs.values().collect(),
            last_seen: &self.last_seen,
        };
        Some(postcard::to_stdvec(&state).expect("state serializes"))
    }

    /// Load a snapshot taken at `lsn` into an empty sequencer.
    pub fn restore(&mut self, lsn: u64, bytes: &[u8]) -> Result<(), ApplyError> {
        #[derive(serde::Deserialize)]
        struct State {
            convs: Vec<Conversation>,
            last_seen: FastMap<Arc<str>, u64>,
        }
        let state: State = postcard::from_bytes(bytes).map_err(|e| ApplyError::Inconsistent {
            lsn,
            what: format!("undecodable state snapshot: {e}"),
        })?;
        // Checked whole before any of it is taken, so a refused snapshot changes nothing.
        for conversation in &state.convs {
            conversation
                .check_log_positions(lsn)
                .map_err(|what| ApplyError::Inconsistent { lsn, what })?;
        }
        for mut conversation in state.convs {
            conversation.restored();
            for user in conversation.members.keys() {
                self.convs_of_user
                    .entry(user.clone())
                    .or_default()
                    .insert(conversation.id.clone());
            }
            self.convs.insert(conversation.id.clone(), conversation);
        }
        self.last_seen = state.last_seen;
        self.durable_lsn = lsn;
        Ok(())
    }

    /// Apply a record read back from the log at recovery.
    pub fn replay(&mut self, lsn: u64, payload: &[u8]) -> Result<(), ApplyError> {
        if lsn <= self.durable_lsn {
            let what = format!("replayed after LSN {}", self.durable_lsn);
            return Err(ApplyError::Inconsistent { lsn, what });
        }
        let record =
            ChatRecord::decode(payload).map_err(|source| ApplyError::Decode { lsn, source })?;
        self.check(&record)
            .map_err(|what| ApplyError::Inconsistent { lsn, what })?;
        self.durable_lsn = lsn;
        self.apply(lsn, &record);
        Ok(())
    }
}
