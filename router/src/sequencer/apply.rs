//! Records applied to the state, one function per kind. The same code runs for a record
//! just appended and for one read back at recovery, so the state is what the log says.

use std::sync::Arc;

use super::{ApplyError, Sequencer};
use crate::conversation::{Conversation, MessageKeep, Role};
use crate::event;
use crate::record::{ChatRecord, ConvKind, CursorAdvance, MemberChange, StoredMessage};

impl Sequencer {
    pub(super) fn apply(&mut self, lsn: u64, record: &ChatRecord) -> Result<(), ApplyError> {
        let inconsistent = |what: String| ApplyError::Inconsistent { lsn, what };
        match record {
            ChatRecord::ConvCreated {
                conv,
                kind,
                title,
                creator,
                members,
                ts,
            } => self
                .apply_conv_created(conv, *kind, title, creator, members, *ts)
                .map_err(inconsistent),
            ChatRecord::Members {
                conv,
                change,
                users,
                ..
            } => self
                .apply_members(conv, *change, users)
                .map_err(inconsistent),
            ChatRecord::Message(message) => self.apply_message(lsn, message).map_err(inconsistent),
            ChatRecord::Cursors(advances) => self.apply_cursors(advances).map_err(inconsistent),
            ChatRecord::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            } => self
                .apply_reaction(conv, *seq, user, emoji, *on)
                .map_err(inconsistent),
            ChatRecord::LastSeen { user, ts } => {
                self.last_seen.insert(Arc::from(user.as_str()), *ts);
                Ok(())
            }
        }
    }

    fn apply_conv_created(
        &mut self,
        conv: &str,
        kind: ConvKind,
        title: &Option<String>,
        creator: &str,
        members: &[String],
        ts: u64,
    ) -> Result<(), String> {
        if self.convs.contains_key(conv) {
            return Err(format!("conversation {conv} created twice"));
        }
        let id: Arc<str> = Arc::from(conv);
        let mut conversation = Conversation::new(id.clone(), kind, title.clone());
        conversation.last_ts = ts;
        for user in members {
            let role = if user == creator && kind == ConvKind::Group {
                Role::Admin
            } else {
                Role::Member
            };
            let user: Arc<str> = Arc::from(user.as_str());
            conversation.add_member(user.clone(), role);
            self.convs_of_user
                .entry(user)
                .or_default()
                .insert(id.clone());
        }
        self.convs.insert(id, conversation);
        Ok(())
    }

    fn apply_members(
        &mut self,
        conv: &str,
        change: MemberChange,
        users: &[String],
    ) -> Result<(), String> {
        let conversation = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| format!("members of unknown {conv}"))?;
        for user in users {
            let user: Arc<str> = Arc::from(user.as_str());
            match change {
                MemberChange::Added => {
                    conversation.add_member(user.clone(), Role::Member);
                    self.convs_of_user
                        .entry(user)
                        .or_default()
                        .insert(conversation.id.clone());
                }
                MemberChange::Removed | MemberChange::Left => {
                    conversation.remove_member(&user);
                    if let Some(convs) = self.convs_of_user.get_mut(&user) {
                        convs.remove(conv);
                        if convs.is_empty() {
                            self.convs_of_user.remove(&user);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_message(&mut self, lsn: u64, message: &StoredMessage) -> Result<(), String> {
        let conversation = self
            .convs
            .get_mut(message.conv.as_str())
            .ok_or_else(|| format!("message in unknown {}", message.conv))?;
        if message.seq != conversation.last_seq + 1 {
            return Err(format!(
                "{} seq {} follows {}",
                message.conv, message.seq, conversation.last_seq
            ));
        }
        let keep = MessageKeep {
            dedupe: self.window,
            cache: self.limits.message_cache_per_conv,
            durable_lsn: self.durable_lsn,
        };
        conversation.push_message(message, lsn, event::msg(message), keep);
        Ok(())
    }

    fn apply_cursors(&mut self, advances: &[CursorAdvance]) -> Result<(), String> {
        for advance in advances {
            let Some(conversation) = self.convs.get_mut(advance.conv.as_str()) else {
                return Err(format!("cursor of unknown {}", advance.conv));
            };
            let user: Arc<str> = Arc::from(advance.user.as_str());
            match &advance.device {
                Some(device) => {
                    conversation.advance_delivered(&user, &Arc::from(device.as_str()), advance.seq);
                }
                None => {
                    conversation.advance_read(&user, advance.seq);
                }
            }
        }
        Ok(())
    }

    fn apply_reaction(
        &mut self,
        conv: &str,
        seq: u64,
        user: &str,
        emoji: &str,
        on: bool,
    ) -> Result<(), String> {
        let conversation = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| format!("reaction in unknown {conv}"))?;
        conversation.set_reaction(seq, Arc::from(user), emoji, on);
        Ok(())
    }
}
