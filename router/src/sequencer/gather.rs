//! The sequencer's parts of answers gathered from every shard: its conversations for
//! `conv.list`, and its share of a `sync` or `resume` replay.

use super::turn::Handled;
use super::Sequencer;
use crate::chat_log::{ChatLog, LogError};
use crate::command::Cursor;
use crate::event::MoreAfter;
use crate::output::{ConvSummary, Origin, Output, Part};
use crate::protocol::Doc;
use crate::seeded_map::FastSet;

/// This shard's share of one `sync` or `resume`.
#[derive(Debug, Clone, Copy)]
pub struct SyncShare<'a> {
    /// The session replayed to; its shard gathers the parts.
    pub to: Origin,
    pub gather: u64,
    pub user: &'a str,
    pub device: &'a str,
    /// The cursors of conversations homed here.
    pub cursors: &'a [Cursor],
    /// List the user's conversations here that `cursors` does not name (a `sync`).
    pub list_unnamed: bool,
    /// Messages to replay per named conversation at most.
    pub per_conv: usize,
}

impl Sequencer {
    /// Summaries of the conversations homed here that `user` belongs to.
    pub fn summaries(&self, user: &str, device: &str, skip: &FastSet<&str>) -> Vec<ConvSummary> {
        self.convs_of_user
            .get(user)
            .into_iter()
            .flatten()
            .filter(|conv| !skip.contains(&***conv))
            .filter_map(|conv| self.convs.get(conv))
            .map(|conversation| {
                let read_seq = conversation.read_seq(user);
                ConvSummary {
                    conv: conversation.id.to_string(),
                    kind: conversation.kind.as_str(),
                    title: conversation.title.clone(),
                    last_seq: conversation.last_seq,
                    read_seq,
                    delivered_seq: conversation.delivered_seq(user, device),
                    unread: conversation.last_seq.saturating_sub(read_seq),
                    last_ts: conversation.last_ts,
                }
            })
            .collect()
    }

    /// Replay what the user missed in the named conversations homed here, as `msg`
    /// events to the session, then answer with this shard's part.
    pub fn sync(
        &mut self,
        share: &SyncShare<'_>,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), LogError> {
        let outputs_before = out.len();
        let mut more = Vec::new();
        for cursor in share.cursors {
            if let Some(stopped) = self.replay_after(share, cursor, log, out)? {
                more.push(stopped);
            }
        }
        let convs = if share.list_unnamed {
            let named: FastSet<&str> = share.cursors.iter().map(|c| c.conv.as_str()).collect();
            self.summaries(share.user, share.device, &named)
        } else {
            Vec::new()
        };
        // A replay stays within its share: per_conv messages per named conversation.
        debug_assert!(
            out.len() - outputs_before <= share.cursors.len() * share.per_conv,
            "a sync replays {} messages at most",
            share.cursors.len() * share.per_conv
        );
        out.push(Output::Part {
            shard: share.to.shard,
            gather: share.gather,
            part: Part::Synced { convs, more },
        });
        Ok(())
    }

    /// Replay one conversation after `cursor`; where it stopped short of the last seq,
    /// if it did. A conversation the user is not in is skipped.
    fn replay_after(
        &mut self,
        share: &SyncShare<'_>,
        cursor: &Cursor,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<Option<MoreAfter>, LogError> {
        let Ok(conversation) = self.member_of(&cursor.conv, share.user) else {
            return Ok(None);
        };
        let last = conversation.last_seq;
        let mut end = last.min(cursor.after.saturating_add(share.per_conv as u64));
        for seq in cursor.after.saturating_add(1)..=end {
            match self.message_doc(&cursor.conv, seq, log) {
                Ok(doc) => out.push(Output::ToSession {
                    to: share.to,
                    doc: Doc::Shared(doc),
                }),
                Err(Handled::Log(error @ LogError::Failed(_))) => return Err(error),
                Err(_) => {
                    // Say where the replay stopped rather than claim it complete.
                    end = seq - 1;
                    break;
                }
            }
        }
        Ok((end < last).then(|| MoreAfter {
            conv: cursor.conv.clone(),
            after: end,
        }))
    }
}
