//! What presence needs of the sequencer: last-seen times of the users homed here, and
//! who shares a conversation with whom.

use std::sync::Arc;

use super::turn::Handled;
use super::Sequencer;
use crate::chat_log::{ChatLog, LogError};
use crate::record::ChatRecord;
use crate::seeded_map::FastSet;

impl Sequencer {
    pub fn last_seen(&self, user: &str) -> Option<u64> {
        self.last_seen.get(user).copied()
    }

    /// Remember when a user homed here was last seen (their last session ended).
    pub fn record_last_seen(
        &mut self,
        user: &str,
        ts: u64,
        log: &mut dyn ChatLog,
    ) -> Result<(), LogError> {
        let record = ChatRecord::LastSeen {
            user: user.to_string(),
            ts,
        };
        match self.commit(log, ts, &record) {
            Ok(_) => Ok(()),
            // Last seen is best-effort: keep it in memory when the log does not take it
            // now (a last-seen record always fits the state, so it is never refused).
            Err(
                Handled::Log(LogError::Full | LogError::NoSpace(_) | LogError::TooLarge { .. })
                | Handled::Refused(_),
            ) => {
                self.last_seen.insert(Arc::from(user), ts);
                Ok(())
            }
            Err(Handled::Log(error)) => Err(error),
        }
    }

    /// Everyone who shares a conversation homed here with `user`.
    pub fn co_members(&self, user: &str) -> FastSet<Arc<str>> {
        let mut users = FastSet::default();
        for conv in self.convs_of_user.get(user).into_iter().flatten() {
            if let Some(conversation) = self.convs.get(conv) {
                users.extend(conversation.members.keys().cloned());
            }
        }
        users.remove(user);
        users
    }
}
