//! Messages: sequenced, read back (from the cache or the log), paged and reacted to.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::turn::{deliver, Empty, Handled, Request, Turn};
use super::{Sequencer, MAX_EMOJI_PER_MESSAGE};
use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::command::{Page, SendArgs};
use crate::conversation::Conversation;
use crate::event;
use crate::output::Output;
use crate::protocol::ErrorCode;
use crate::record::{ChatRecord, StoredMessage};

/// The `ok` of `send`.
#[derive(Serialize)]
struct Sent<'a> {
    conv: &'a str,
    seq: u64,
    mid: String,
    ts: u64,
    dup: bool,
}

impl Sequencer {
    pub(super) fn send(
        &mut self,
        request: &Request,
        args: SendArgs,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let conversation = self.member_of(&args.conv, &request.caller.user)?;
        if let Some((seq, ts)) = conversation.dedupe.get(&request.caller.user, &args.cmid) {
            self.stats.duplicates += 1;
            let mid = format!("{}#{seq}", args.conv);
            let conv = &args.conv;
            let dup = true;
            request.caller.ok(
                turn.out,
                &Sent {
                    conv,
                    seq,
                    mid,
                    ts,
                    dup,
                },
            );
            return Ok(());
        }
        let message = next_message(conversation, &request.caller.user, args, turn.now)?;
        let record = ChatRecord::Message(message);
        let ChatRecord::Message(message) = &record else {
            unreachable!("built above as a message");
        };
        self.commit(turn.log, message.ts, &record)?;
        self.stats.sequenced += 1;
        self.announce_sent(request, message, turn.out);
        Ok(())
    }

    /// The sender's `ok`, and the `msg` event for every member.
    fn announce_sent(&self, request: &Request, message: &StoredMessage, out: &mut Vec<Output>) {
        let conversation = &self.convs[message.conv.as_str()];
        let sent = Sent {
            conv: &message.conv,
            seq: message.seq,
            mid: message.mid(),
            ts: message.ts,
            dup: false,
        };
        request.caller.ok(out, &sent);
        let doc = conversation
            .cached(message.seq)
            .cloned()
            .unwrap_or_else(|| event::msg(message));
        deliver(out, conversation.members_shared(), None, doc, false);
    }

    /// A message read back from the log.
    fn logged_message(
        &self,
        conv: &str,
        seq: u64,
        log: &mut dyn ChatLog,
    ) -> Result<StoredMessage, Handled> {
        let lsn = self.convs[conv]
            .lsn_of(seq)
            .ok_or(Handled::Log(LogError::Missing(0)))?;
        let payload = log.read(lsn)?;
        match ChatRecord::decode(&payload) {
            Ok(ChatRecord::Message(message)) if message.seq == seq => Ok(message),
            _ => Err(Handled::Log(LogError::Missing(lsn))),
        }
    }

    /// The encoded `msg` event of a message, from the cache or the log.
    pub(super) fn message_doc(
        &mut self,
        conv: &str,
        seq: u64,
        log: &mut dyn ChatLog,
    ) -> Result<Arc<str>, Handled> {
        if let Some(doc) = self.convs[conv].cached(seq) {
            return Ok(doc.clone());
        }
        let message = self.logged_message(conv, seq, log)?;
        Ok(event::msg(&message))
    }

    pub(super) fn history(
        &mut self,
        request: &Request,
        page: Page,
        limit: usize,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        #[derive(Serialize)]
        struct HistoryPage<'a> {
            msgs: Vec<&'a RawValue>,
            more: bool,
        }
        let conv: &str = &request.conv;
        let conversation = self.member_of(conv, &request.caller.user)?;
        let (first, end, more) = page_bounds(page, limit as u64, conversation.last_seq);
        let mut docs = Vec::new();
        if end >= first {
            for seq in first..=end {
                let doc = self.message_doc(conv, seq, turn.log)?;
                docs.push(with_reactions(&doc, &self.convs[conv], seq));
            }
        }
        let msgs = docs
            .iter()
            .filter_map(|doc| serde_json::from_str::<&RawValue>(doc).ok())
            .collect();
        request.caller.ok(turn.out, &HistoryPage { msgs, more });
        Ok(())
    }

    pub(super) fn react(
        &mut self,
        request: &Request,
        seq: u64,
        emoji: String,
        on: bool,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let (conv, user) = (&request.conv, &request.caller.user);
        let conversation = self.member_of(conv, user)?;
        check_reaction(conversation, seq, &emoji, on)?;
        if conversation.has_reaction(seq, user, &emoji) != on {
            let record = ChatRecord::Reaction {
                conv: conv.to_string(),
                seq,
                user: user.to_string(),
                emoji: emoji.clone(),
                on,
            };
            self.commit(turn.log, turn.now.unix_ms, &record)?;
            let members = self.convs[conv].members_shared();
            let doc = event::reaction(conv, seq, user, &emoji, on);
            deliver(turn.out, members, None, doc, false);
        }
        request.caller.ok(turn.out, &Empty {});
        Ok(())
    }
}

/// The next message of `conversation` from `sender`, once its `reply_to` is checked.
fn next_message(
    conversation: &Conversation,
    sender: &str,
    args: SendArgs,
    now: Now,
) -> Result<StoredMessage, Handled> {
    if let Some(reply_to) = args.reply_to {
        if reply_to > conversation.last_seq {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                format!(
                    "reply_to {reply_to} is beyond the last seq {}",
                    conversation.last_seq
                ),
            )));
        }
    }
    Ok(StoredMessage {
        seq: conversation.last_seq + 1,
        conv: args.conv,
        from: sender.to_string(),
        cmid: args.cmid,
        // ts never goes back within a conversation, even if the wall clock does.
        ts: now.unix_ms.max(conversation.last_ts),
        kind: args.kind,
        body: args.body,
        media: args.media,
        reply_to: args.reply_to,
    })
}

/// A `history` page's seqs, `first..=end` (empty when `end < first`), and whether more
/// lie beyond it in the direction of paging.
fn page_bounds(page: Page, limit: u64, last: u64) -> (u64, u64, bool) {
    let (first, end) = match page {
        Page::Latest => (last.saturating_sub(limit - 1).max(1), last),
        Page::Before(before) => {
            let end = before.saturating_sub(1).min(last);
            (end.saturating_sub(limit - 1).max(1), end)
        }
        Page::After(after) => (
            after.saturating_add(1),
            last.min(after.saturating_add(limit)),
        ),
    };
    let more = match page {
        Page::Latest | Page::Before(_) => first > 1 && end >= first,
        Page::After(_) => end < last,
    };
    (first, end, more)
}

/// A reaction to `seq` may be set: the message exists, and a new emoji stays within
/// the message's bound.
fn check_reaction(
    conversation: &Conversation,
    seq: u64,
    emoji: &str,
    on: bool,
) -> Result<(), Handled> {
    if seq == 0 || seq > conversation.last_seq {
        return Err(Handled::Refused((
            ErrorCode::NotFound,
            format!("no message {seq} in {}", conversation.id),
        )));
    }
    let by_emoji = conversation.reactions.get(&seq);
    let distinct = by_emoji.map_or(0, |by_emoji| by_emoji.len());
    let new_emoji = by_emoji.is_none_or(|by_emoji| !by_emoji.contains_key(emoji));
    if on && new_emoji && distinct >= MAX_EMOJI_PER_MESSAGE {
        return Err(Handled::Refused((
            ErrorCode::TooLarge,
            format!("a message carries at most {MAX_EMOJI_PER_MESSAGE} different reactions"),
        )));
    }
    Ok(())
}

/// A history entry: the `msg` event, with `reactions` added when the message has any.
fn with_reactions(doc: &Arc<str>, conversation: &Conversation, seq: u64) -> String {
    let Some(by_emoji) = conversation.reactions.get(&seq) else {
        return doc.to_string();
    };
    let reactions = serde_json::to_string(by_emoji).expect("reactions serialize");
    // The event is a JSON object: splice the field in before its closing brace.
    let body = doc.strip_suffix('}').unwrap_or(doc);
    format!("{body},\"reactions\":{reactions}}}")
}
