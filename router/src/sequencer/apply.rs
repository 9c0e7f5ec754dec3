//! Records checked against the state, and applied to it, one function per kind. The
//! same code runs for a record about to be appended and for one read back at recovery,
//! so the state is what the log says.
//!
//! A record is checked before it is appended: one that does not fit the state never
//! reaches the log, where every restart would refuse it again. Once checked, applying
//! it cannot fail.

use std::sync::Arc;

use super::Sequencer;
use crate::conversation::{Conversation, MessageKeep, Role};
use crate::event;
use crate::record::{ChatRecord, ConvKind, CursorAdvance, MemberChange, StoredMessage};

impl Sequencer {
    /// Why `record` does not fit the state, if it does not. Changes nothing.
    pub(super) fn check(&self, record: &ChatRecord) -> Result<(), String> {
        match record {
            ChatRecord::ConvCreated { conv, .. } => {
                if self.convs.contains_key(conv.as_str()) {
                    return Err(format!("conversation {conv} created twice"));
                }
                Ok(())
            }
            ChatRecord::Members { conv, .. } => self.known(conv, "members of"),
            ChatRecord::Message(message) => self.check_message(message),
            ChatRecord::Cursors(advances) => advances
                .iter()
                .try_for_each(|advance| self.known(&advance.conv, "cursor of")),
            ChatRecord::Reaction { conv, .. } => self.known(conv, "reaction in"),
            ChatRecord::LastSeen { .. } => Ok(()),
        }
    }

    fn known(&self, conv: &str, what: &str) -> Result<(), String> {
        if !self.convs.contains_key(conv) {
            return Err(format!("{what} unknown {conv}"));
        }
        Ok(())
    }

    fn check_message(&self, message: &StoredMessage) -> Result<(), String> {
        let Some(conversation) = self.convs.get(message.conv.as_str()) else {
            return Err(format!("message in unknown {}", message.conv));
        };
        if message.seq != conversation.last_seq + 1 {
            return Err(format!(
                "{} seq {} follows {}",
                message.conv, message.seq, conversation.last_seq
            ));
        }
        Ok(())
    }

    /// Apply a record [`check`](Self::check) accepted against this same state.
    pub(super) fn apply(&mut self, lsn: u64, record: &ChatRecord) {
        debug_assert_eq!(self.check(record), Ok(()), "only checked records apply");
        match record {
            ChatRecord::ConvCreated {
                conv,
                kind,
                title,
                creator,
                members,
                ts,
            } => {
                let mut conversation =
                    Conversation::new(Arc::from(conv.as_str()), *kind, title.clone());
                conversation.last_ts = *ts;
                self.add_creation_members(&mut conversation, creator, members);
                self.convs.insert(conversation.id.clone(), conversation);
            }
            ChatRecord::Members {
                conv,
                change,
                users,
                ..
            } => self.apply_members(conv, *change, users),
            ChatRecord::Message(message) => self.apply_message(lsn, message),
            ChatRecord::Cursors(advances) => self.apply_cursors(advances),
            ChatRecord::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            } => {
                let conversation = self.checked_mut(conv);
                conversation.set_reaction(*seq, Arc::from(user.as_str()), emoji, *on);
            }
            ChatRecord::LastSeen { user, ts } => {
                self.last_seen.insert(Arc::from(user.as_str()), *ts);
            }
        }
    }

    /// A conversation `check` found.
    fn checked_mut(&mut self, conv: &str) -> &mut Conversation {
        self.convs
            .get_mut(conv)
            .expect("check found the conversation")
    }

    fn add_creation_members(
        &mut self,
        conversation: &mut Conversation,
        creator: &str,
        members: &[String],
    ) {
        for user in members {
            let role = if user == creator && conversation.kind == ConvKind::Group {
                Role::Admin
            } else {
                Role::Member
            };
            let user: Arc<str> = Arc::from(user.as_str());
            conversation.add_member(user.clone(), role);
            self.convs_of_user
                .entry(user)
                .or_default()
                .insert(conversation.id.clone());
        }
    }

    fn apply_members(&mut self, conv: &str, change: MemberChange, users: &[String]) {
        let conversation = self
            .convs
            .get_mut(conv)
            .expect("check found the conversation");
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
    }

    fn apply_message(&mut self, lsn: u64, message: &StoredMessage) {
        let keep = MessageKeep {
            dedupe: self.window,
            cache: self.limits.message_cache_per_conv,
            durable_lsn: self.durable_lsn,
        };
        let conversation = self.checked_mut(&message.conv);
        let before = conversation.last_seq;
        conversation.push_message(message, lsn, event::msg(message), keep);
        // A conversation's seq grows by exactly one per message, and its messages'
        // log positions grow with it.
        assert_eq!(conversation.last_seq, before + 1, "seq is gapless");
        debug_assert!(
            before == 0 || conversation.lsn_of(before).is_some_and(|prev| prev < lsn),
            "a conversation's messages are in log order"
        );
    }

    fn apply_cursors(&mut self, advances: &[CursorAdvance]) {
        for advance in advances {
            let conversation = self.checked_mut(&advance.conv);
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
    }
}
