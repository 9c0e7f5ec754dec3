//! The sequencer: the single writer of the conversations homed on one shard.
//!
//! A command is checked (membership, roles, limits), turned into a record, appended to
//! the log, and only then applied to the state, by the same `apply` that replays the log
//! at recovery. So the state is always what the log says. Replies and events come out
//! as [`Output`]s; the shard core holds them back until the log is durable up to the
//! records they depend on (PROTOCOL.md 7.1).

use crate::seeded_map::{FastMap, FastSet};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::command::{too_large_group, ChatCommand, Cursor, Page, Refusal, SendArgs};
use crate::conversation::{Conversation, MessageKeep, Role, Window};
use crate::event::{self, MoreAfter, ReceiptKind};
use crate::limits::{ChatLimits, TYPING_TTL};
use crate::output::{ConvSummary, Delivery, Origin, Output, Part};
use crate::protocol::{encode_err, encode_ok, Doc, ErrorCode};
use crate::record::ConvKind;
use crate::record::{ChatRecord, CursorAdvance, DecodeError, MemberChange, StoredMessage};

/// A command for a conversation homed here.
#[derive(Debug)]
pub struct HomeCommand {
    pub origin: Origin,
    pub re: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
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

type Refused = (ErrorCode, String);

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

    pub fn last_seen(&self, user: &str) -> Option<u64> {
        self.last_seen.get(user).copied()
    }

    pub fn set_durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn);
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
        let record =
            ChatRecord::decode(payload).map_err(|source| ApplyError::Decode { lsn, source })?;
        self.durable_lsn = lsn;
        self.apply(lsn, &record)
    }

    /// Append a record and apply it. Log trouble comes back for the caller to answer.
    fn commit(
        &mut self,
        log: &mut dyn ChatLog,
        ts: u64,
        record: &ChatRecord,
    ) -> Result<u64, LogError> {
        let lsn = log.append(ts, &record.encode())?;
        if let Err(error) = self.apply(lsn, record) {
            // The command was checked against this same state, so this is a bug here.
            panic!("a record the sequencer just checked does not apply: {error}");
        }
        Ok(lsn)
    }

    fn apply(&mut self, lsn: u64, record: &ChatRecord) -> Result<(), ApplyError> {
        let inconsistent = |what: String| ApplyError::Inconsistent { lsn, what };
        match record {
            ChatRecord::ConvCreated {
                conv,
                kind,
                title,
                creator,
                members,
                ts,
            } => {
                if self.convs.contains_key(conv.as_str()) {
                    return Err(inconsistent(format!("conversation {conv} created twice")));
                }
                let id: Arc<str> = Arc::from(conv.as_str());
                let mut conversation = Conversation::new(id.clone(), *kind, title.clone());
                conversation.last_ts = *ts;
                for user in members {
                    let role = if user == creator && *kind == ConvKind::Group {
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
            }
            ChatRecord::Members {
                conv,
                change,
                users,
                ..
            } => {
                let conversation = self
                    .convs
                    .get_mut(conv.as_str())
                    .ok_or_else(|| inconsistent(format!("members of unknown {conv}")))?;
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
                                convs.remove(conv.as_str());
                                if convs.is_empty() {
                                    self.convs_of_user.remove(&user);
                                }
                            }
                        }
                    }
                }
            }
            ChatRecord::Message(message) => {
                let conversation = self
                    .convs
                    .get_mut(message.conv.as_str())
                    .ok_or_else(|| inconsistent(format!("message in unknown {}", message.conv)))?;
                if message.seq != conversation.last_seq + 1 {
                    return Err(inconsistent(format!(
                        "{} seq {} follows {}",
                        message.conv, message.seq, conversation.last_seq
                    )));
                }
                let keep = MessageKeep {
                    dedupe: self.window,
                    cache: self.limits.message_cache_per_conv,
                    durable_lsn: self.durable_lsn,
                };
                conversation.push_message(message, lsn, event::msg(message), keep);
            }
            ChatRecord::Cursors(advances) => {
                for advance in advances {
                    let Some(conversation) = self.convs.get_mut(advance.conv.as_str()) else {
                        return Err(inconsistent(format!("cursor of unknown {}", advance.conv)));
                    };
                    let user: Arc<str> = Arc::from(advance.user.as_str());
                    match &advance.device {
                        Some(device) => {
                            conversation.advance_delivered(
                                &user,
                                &Arc::from(device.as_str()),
                                advance.seq,
                            );
                        }
                        None => {
                            conversation.advance_read(&user, advance.seq);
                        }
                    }
                }
            }
            ChatRecord::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            } => {
                let conversation = self
                    .convs
                    .get_mut(conv.as_str())
                    .ok_or_else(|| inconsistent(format!("reaction in unknown {conv}")))?;
                conversation.set_reaction(*seq, Arc::from(user.as_str()), emoji, *on);
            }
            ChatRecord::LastSeen { user, ts } => {
                self.last_seen.insert(Arc::from(user.as_str()), *ts);
            }
        }
        Ok(())
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
            // Last seen is best-effort: keep it in memory when the log is busy.
            Err(LogError::Full) => {
                self.last_seen.insert(Arc::from(user), ts);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Serve one command. Only a failed log is an error; everything else is answered.
    pub fn handle(
        &mut self,
        command: HomeCommand,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), LogError> {
        let HomeCommand {
            origin,
            re,
            user,
            device,
            conv,
            command,
        } = command;
        let reply = Replier { origin, re };
        let result = match command {
            ChatCommand::ConvCreate {
                kind,
                members,
                title,
            } => self.conv_create(&reply, &user, conv, kind, members, title, now, log, out),
            ChatCommand::ConvGet { .. } => self.conv_get(&reply, &user, &conv, out),
            ChatCommand::MemberAdd { users, .. } => {
                self.member_add(&reply, &user, &conv, users, now, log, out)
            }
            ChatCommand::MemberRemove { users, .. } => self.member_remove(
                &reply,
                &user,
                &conv,
                users,
                MemberChange::Removed,
                now,
                log,
                out,
            ),
            ChatCommand::ConvLeave { .. } => self.member_remove(
                &reply,
                &user,
                &conv,
                vec![user.to_string()],
                MemberChange::Left,
                now,
                log,
                out,
            ),
            ChatCommand::Send(args) => self.send(&reply, &user, *args, now, log, out),
            ChatCommand::Ack { seq, .. } => {
                self.cursor(&reply, &user, &device, &conv, seq, false, out)
            }
            ChatCommand::Read { seq, .. } => {
                self.cursor(&reply, &user, &device, &conv, seq, true, out)
            }
            ChatCommand::Typing { on, .. } => self.typing(&reply, &user, &conv, on, now, out),
            ChatCommand::History { page, limit, .. } => {
                self.history(&reply, &user, &conv, page, limit, log, out)
            }
            ChatCommand::React { seq, emoji, on, .. } => {
                self.react(&reply, &user, &conv, seq, emoji, on, now, log, out)
            }
            ChatCommand::ConvList
            | ChatCommand::Sync { .. }
            | ChatCommand::Resume { .. }
            | ChatCommand::PresenceGet { .. } => Err(Handled::Refused((
                ErrorCode::Internal,
                "command routed to a conversation's home by mistake".into(),
            ))),
        };
        match result {
            Ok(()) => Ok(()),
            Err(Handled::Refused((code, msg))) => {
                reply.err(out, code, &msg);
                Ok(())
            }
            Err(Handled::Log(LogError::Full)) => {
                reply.err(
                    out,
                    ErrorCode::Unavailable,
                    "the log is busy; retry the same command",
                );
                Ok(())
            }
            Err(Handled::Log(LogError::Missing(lsn))) => {
                reply.err(
                    out,
                    ErrorCode::Internal,
                    &format!("log record {lsn} is missing"),
                );
                Ok(())
            }
            Err(Handled::Log(error)) => {
                reply.err(
                    out,
                    ErrorCode::Unavailable,
                    "the log failed; retry elsewhere",
                );
                Err(error)
            }
        }
    }

    fn member_of(&self, conv: &str, user: &str) -> Result<&Conversation, Refused> {
        let conversation = self
            .convs
            .get(conv)
            .ok_or_else(|| (ErrorCode::NotFound, format!("no conversation {conv}")))?;
        if !conversation.is_member(user) {
            return Err((ErrorCode::Forbidden, format!("not a member of {conv}")));
        }
        Ok(conversation)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_create(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        conv: Arc<str>,
        kind: ConvKind,
        members: Vec<String>,
        title: Option<String>,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        #[derive(Serialize)]
        struct Created<'a> {
            conv: &'a str,
            kind: &'static str,
            members: Vec<&'a str>,
            created: bool,
        }
        if let Some(existing) = self.convs.get(&conv) {
            if kind == ConvKind::Direct && existing.is_member(user) {
                reply.ok(
                    out,
                    &Created {
                        conv: &conv,
                        kind: kind.as_str(),
                        members: existing.member_ids(),
                        created: false,
                    },
                );
                return Ok(());
            }
            return Err(Handled::Refused((
                ErrorCode::Conflict,
                format!("conversation id {conv} is taken; retry"),
            )));
        }
        let mut all: BTreeSet<String> = members.into_iter().collect();
        all.insert(user.to_string());
        if all.len() > self.limits.max_group_members {
            return Err(too_large_group(&self.limits).into());
        }
        if kind == ConvKind::Direct && all.len() != 2 {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                "a direct conversation is between two different users".into(),
            )));
        }
        let record = ChatRecord::ConvCreated {
            conv: conv.to_string(),
            kind,
            title: if kind == ConvKind::Group { title } else { None },
            creator: user.to_string(),
            members: all.into_iter().collect(),
            ts: now.unix_ms,
        };
        self.commit(log, now.unix_ms, &record)?;
        let conversation = &self.convs[&conv];
        reply.ok(
            out,
            &Created {
                conv: &conv,
                kind: kind.as_str(),
                members: conversation.member_ids(),
                created: true,
            },
        );
        let others: Arc<[Arc<str>]> = conversation
            .members
            .keys()
            .filter(|member| *member != user)
            .cloned()
            .collect();
        let doc = event::conv(
            &conv,
            kind.as_str(),
            conversation.title.as_deref(),
            conversation.member_ids(),
        );
        deliver(out, others, None, doc, false);
        Ok(())
    }

    fn conv_get(
        &mut self,
        reply: &Replier,
        user: &str,
        conv: &str,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        #[derive(Serialize)]
        struct MemberView<'a> {
            user: &'a str,
            role: Role,
        }
        #[derive(Serialize)]
        struct ConvView<'a> {
            conv: &'a str,
            kind: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            title: Option<&'a str>,
            members: Vec<MemberView<'a>>,
            last_seq: u64,
        }
        let conversation = self.member_of(conv, user)?;
        let members = conversation
            .members
            .iter()
            .map(|(user, member)| MemberView {
                user,
                role: member.role,
            })
            .collect();
        reply.ok(
            out,
            &ConvView {
                conv,
                kind: conversation.kind.as_str(),
                title: conversation.title.as_deref(),
                members,
                last_seq: conversation.last_seq,
            },
        );
        Ok(())
    }

    fn admin_of_group(&self, conv: &str, user: &str) -> Result<&Conversation, Refused> {
        let conversation = self.member_of(conv, user)?;
        if conversation.kind == ConvKind::Direct {
            return Err((
                ErrorCode::Forbidden,
                "a direct conversation's members are fixed".into(),
            ));
        }
        if !conversation.is_admin(user) {
            return Err((
                ErrorCode::Forbidden,
                format!("only admins of {conv} change its members"),
            ));
        }
        Ok(conversation)
    }

    #[allow(clippy::too_many_arguments)]
    fn member_add(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        conv: &Arc<str>,
        users: Vec<String>,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let conversation = self.admin_of_group(conv, user)?;
        let added: Vec<String> = users
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|candidate| !conversation.is_member(candidate))
            .collect();
        if conversation.members.len() + added.len() > self.limits.max_group_members {
            return Err(too_large_group(&self.limits).into());
        }
        if !added.is_empty() {
            let record = ChatRecord::Members {
                conv: conv.to_string(),
                by: user.to_string(),
                change: MemberChange::Added,
                users: added.clone(),
                ts: now.unix_ms,
            };
            self.commit(log, now.unix_ms, &record)?;
        }
        let conversation = &self.convs[conv];
        reply.ok(out, &MembersReply::of(conversation));
        let everyone = conversation.members_shared();
        for added_user in &added {
            let doc = event::member(conv, added_user, MemberChange::Added, user);
            deliver(out, everyone.clone(), None, doc, false);
        }
        if !added.is_empty() {
            let newcomers: Arc<[Arc<str>]> = added.iter().map(|u| Arc::from(u.as_str())).collect();
            let doc = event::conv(
                conv,
                conversation.kind.as_str(),
                conversation.title.as_deref(),
                conversation.member_ids(),
            );
            deliver(out, newcomers, None, doc, false);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn member_remove(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        conv: &Arc<str>,
        users: Vec<String>,
        change: MemberChange,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let conversation = if change == MemberChange::Left {
            let conversation = self.member_of(conv, user)?;
            if conversation.kind == ConvKind::Direct {
                return Err(Handled::Refused((
                    ErrorCode::Forbidden,
                    "a direct conversation cannot be left".into(),
                )));
            }
            conversation
        } else {
            self.admin_of_group(conv, user)?
        };
        let removed: Vec<String> = users
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|candidate| conversation.is_member(candidate))
            .collect();
        // Tell the members as they were, the removed included.
        let before = conversation.members_shared();
        if !removed.is_empty() {
            let record = ChatRecord::Members {
                conv: conv.to_string(),
                by: user.to_string(),
                change,
                users: removed.clone(),
                ts: now.unix_ms,
            };
            self.commit(log, now.unix_ms, &record)?;
        }
        let conversation = &self.convs[conv];
        if change == MemberChange::Left {
            reply.ok(out, &Empty {});
        } else {
            reply.ok(out, &MembersReply::of(conversation));
        }
        for removed_user in &removed {
            let doc = event::member(conv, removed_user, change, user);
            deliver(out, before.clone(), None, doc, false);
            // Whoever leaves while typing stops typing, for those who remain.
            let key = (conv.clone(), Arc::from(removed_user.as_str()));
            if self
                .typing
                .remove(&key)
                .is_some_and(|expires| expires > now.instant)
            {
                let remaining = self.convs[conv].members_shared();
                let doc = event::typing(conv, removed_user, false);
                deliver(out, remaining, None, doc, true);
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        args: SendArgs,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        #[derive(Serialize)]
        struct Sent<'a> {
            conv: &'a str,
            seq: u64,
            mid: String,
            ts: u64,
            dup: bool,
        }
        let conversation = self.member_of(&args.conv, user)?;
        if let Some((seq, ts)) = conversation.dedupe.get(user, &args.cmid) {
            self.stats.duplicates += 1;
            reply.ok(
                out,
                &Sent {
                    conv: &args.conv,
                    seq,
                    mid: format!("{}#{seq}", args.conv),
                    ts,
                    dup: true,
                },
            );
            return Ok(());
        }
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
        // ts never goes back within a conversation, even if the wall clock does.
        let ts = now.unix_ms.max(conversation.last_ts);
        let message = StoredMessage {
            seq: conversation.last_seq + 1,
            conv: args.conv,
            from: user.to_string(),
            cmid: args.cmid,
            ts,
            kind: args.kind,
            body: args.body,
            media: args.media,
            reply_to: args.reply_to,
        };
        let record = ChatRecord::Message(message);
        self.commit(log, ts, &record)?;
        self.stats.sequenced += 1;
        let ChatRecord::Message(message) = &record else {
            unreachable!("built above as a message");
        };
        let conversation = &self.convs[message.conv.as_str()];
        reply.ok(
            out,
            &Sent {
                conv: &message.conv,
                seq: message.seq,
                mid: message.mid(),
                ts,
                dup: false,
            },
        );
        let doc = conversation
            .cached(message.seq)
            .cloned()
            .unwrap_or_else(|| event::msg(message));
        deliver(out, conversation.members_shared(), None, doc, false);
        Ok(())
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
    fn message_doc(
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

    #[allow(clippy::too_many_arguments)]
    fn cursor(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        device: &Arc<str>,
        conv: &Arc<str>,
        seq: u64,
        read: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let conversation = self.member_of(conv, user)?;
        if seq > conversation.last_seq {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                format!("seq {seq} is beyond the last seq {}", conversation.last_seq),
            )));
        }
        let members = conversation.members_shared();
        let conversation = self.convs.get_mut(conv).expect("checked above");
        // Reading implies receiving: a read also moves this device's delivered cursor,
        // so a read receipt never runs ahead of the delivered one.
        let before = conversation.delivered_seq(user, device);
        if let Some(delivered) = conversation.advance_delivered(user, device, seq) {
            let doc = event::receipt(conv, user, ReceiptKind::Delivered, delivered);
            deliver(out, members.clone(), None, doc, false);
        }
        if seq > before {
            self.dirty_cursors
                .insert((conv.clone(), user.clone(), Some(device.clone())), seq);
        }
        if read && conversation.advance_read(user, seq) {
            let doc = event::receipt(conv, user, ReceiptKind::Read, seq);
            deliver(out, members, None, doc, false);
            self.dirty_cursors
                .insert((conv.clone(), user.clone(), None), seq);
        }
        reply.ok(out, &Empty {});
        Ok(())
    }

    fn typing(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        conv: &Arc<str>,
        on: bool,
        now: Now,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let conversation = self.member_of(conv, user)?;
        let members = conversation.members_shared();
        let _ = reply;
        let key = (conv.clone(), user.clone());
        let was_on = self
            .typing
            .get(&key)
            .is_some_and(|expires| *expires > now.instant);
        if on {
            let expires = now.instant + TYPING_TTL;
            self.typing.insert(key, expires);
            self.typing_expiry
                .push_back((expires, conv.clone(), user.clone()));
        } else {
            self.typing.remove(&key);
        }
        if on != was_on {
            let doc = event::typing(conv, user, on);
            deliver(out, members, Some(user.clone()), doc, true);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn history(
        &mut self,
        reply: &Replier,
        user: &str,
        conv: &str,
        page: Page,
        limit: usize,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        #[derive(Serialize)]
        struct HistoryPage<'a> {
            msgs: Vec<&'a RawValue>,
            more: bool,
        }
        let conversation = self.member_of(conv, user)?;
        let last = conversation.last_seq;
        let limit = limit as u64;
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
        let mut docs = Vec::new();
        if end >= first {
            for seq in first..=end {
                let doc = self.message_doc(conv, seq, log)?;
                docs.push(with_reactions(&doc, &self.convs[conv], seq));
            }
        }
        let msgs = docs
            .iter()
            .filter_map(|doc| serde_json::from_str::<&RawValue>(doc).ok())
            .collect();
        reply.ok(out, &HistoryPage { msgs, more });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn react(
        &mut self,
        reply: &Replier,
        user: &Arc<str>,
        conv: &Arc<str>,
        seq: u64,
        emoji: String,
        on: bool,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), Handled> {
        let conversation = self.member_of(conv, user)?;
        if seq == 0 || seq > conversation.last_seq {
            return Err(Handled::Refused((
                ErrorCode::NotFound,
                format!("no message {seq} in {conv}"),
            )));
        }
        let by_emoji = conversation.reactions.get(&seq);
        let distinct = by_emoji.map_or(0, |by_emoji| by_emoji.len());
        let new_emoji = by_emoji.is_none_or(|by_emoji| !by_emoji.contains_key(&emoji));
        if on && new_emoji && distinct >= MAX_EMOJI_PER_MESSAGE {
            return Err(Handled::Refused((
                ErrorCode::TooLarge,
                format!("a message carries at most {MAX_EMOJI_PER_MESSAGE} different reactions"),
            )));
        }
        if conversation.has_reaction(seq, user, &emoji) != on {
            let record = ChatRecord::Reaction {
                conv: conv.to_string(),
                seq,
                user: user.to_string(),
                emoji: emoji.clone(),
                on,
            };
            self.commit(log, now.unix_ms, &record)?;
            let members = self.convs[conv].members_shared();
            let doc = event::reaction(conv, seq, user, &emoji, on);
            deliver(out, members, None, doc, false);
        }
        reply.ok(out, &Empty {});
        Ok(())
    }

    /// Write the turn's cursor advances as one record. Returns its LSN, if one was written.
    pub fn flush_cursors(
        &mut self,
        now: Now,
        log: &mut dyn ChatLog,
    ) -> Result<Option<u64>, LogError> {
        if self.dirty_cursors.is_empty() {
            return Ok(None);
        }
        let advances: Vec<CursorAdvance> = self
            .dirty_cursors
            .iter()
            .map(|((conv, user, device), seq)| CursorAdvance {
                conv: conv.to_string(),
                user: user.to_string(),
                device: device.as_ref().map(|d| d.to_string()),
                seq: *seq,
            })
            .collect();
        let lsn = log.append(now.unix_ms, &ChatRecord::Cursors(advances).encode())?;
        self.dirty_cursors.clear();
        Ok(Some(lsn))
    }

    pub fn has_dirty_cursors(&self) -> bool {
        !self.dirty_cursors.is_empty()
    }

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

    /// Replay what `user` missed in the named conversations homed here, as `msg` events
    /// to the session, then answer with this shard's part.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        to: Origin,
        gather: u64,
        user: &str,
        device: &str,
        cursors: &[Cursor],
        list_unnamed: bool,
        per_conv: usize,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), LogError> {
        let mut more = Vec::new();
        for cursor in cursors {
            let Ok(conversation) = self.member_of(&cursor.conv, user) else {
                continue;
            };
            let last = conversation.last_seq;
            let mut end = last.min(cursor.after.saturating_add(per_conv as u64));
            for seq in cursor.after.saturating_add(1)..=end {
                match self.message_doc(&cursor.conv, seq, log) {
                    Ok(doc) => out.push(Output::ToSession {
                        to,
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
            if end < last {
                more.push(MoreAfter {
                    conv: cursor.conv.clone(),
                    after: end,
                });
            }
        }
        let convs = if list_unnamed {
            let named: FastSet<&str> = cursors.iter().map(|c| c.conv.as_str()).collect();
            self.summaries(user, device, &named)
        } else {
            Vec::new()
        };
        out.push(Output::Part {
            shard: to.shard,
            gather,
            part: Part::Synced { convs, more },
        });
        Ok(())
    }

    /// Typing that expired without a fresh `on`: tell the members it stopped.
    pub fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        while let Some((expires, _, _)) = self.typing_expiry.front() {
            if *expires > now.instant {
                break;
            }
            let Some((expires, conv, user)) = self.typing_expiry.pop_front() else {
                break;
            };
            let key = (conv, user);
            if self.typing.get(&key) != Some(&expires) {
                continue; // refreshed or stopped since
            }
            self.typing.remove(&key);
            let (conv, user) = key;
            if let Some(conversation) = self.convs.get(&conv) {
                let doc = event::typing(&conv, &user, false);
                deliver(out, conversation.members_shared(), Some(user), doc, true);
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.typing_expiry.front().map(|(at, _, _)| *at)
    }
}

/// How a command ended when it did not simply succeed.
enum Handled {
    Refused(Refused),
    Log(LogError),
}

impl From<Refused> for Handled {
    fn from(refused: Refused) -> Self {
        Handled::Refused(refused)
    }
}

impl From<Refusal> for Handled {
    fn from(refusal: Refusal) -> Self {
        Handled::Refused((refusal.code, refusal.msg))
    }
}

impl From<LogError> for Handled {
    fn from(error: LogError) -> Self {
        Handled::Log(error)
    }
}

struct Replier {
    origin: Origin,
    re: u64,
}

impl Replier {
    fn ok<T: Serialize>(&self, out: &mut Vec<Output>, body: &T) {
        out.push(Output::ToSession {
            to: self.origin,
            doc: Doc::Owned(encode_ok(self.re, body)),
        });
    }

    fn err(&self, out: &mut Vec<Output>, code: ErrorCode, msg: &str) {
        out.push(Output::ToSession {
            to: self.origin,
            doc: Doc::Owned(encode_err(Some(self.re), code, msg)),
        });
    }
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct MembersReply<'a> {
    conv: &'a str,
    members: Vec<&'a str>,
}

impl<'a> MembersReply<'a> {
    fn of(conversation: &'a Conversation) -> Self {
        Self {
            conv: &conversation.id,
            members: conversation.member_ids(),
        }
    }
}

fn deliver(
    out: &mut Vec<Output>,
    users: Arc<[Arc<str>]>,
    except: Option<Arc<str>>,
    doc: Arc<str>,
    ephemeral: bool,
) {
    if users.is_empty() {
        return;
    }
    out.push(Output::Deliver(Arc::new(Delivery {
        users,
        except,
        doc,
        ephemeral,
    })));
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
