//! Conversations created, looked at, and their members changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use super::turn::{deliver, Empty, Handled, Request, Turn};
use super::Sequencer;
use crate::command::too_large_group;
use crate::conversation::{Conversation, Role};
use crate::event;
use crate::output::Output;
use crate::protocol::ErrorCode;
use crate::record::{ChatRecord, ConvKind, MemberChange};

/// The `ok` of `conv.create`.
#[derive(Serialize)]
struct Created<'a> {
    conv: &'a str,
    kind: &'static str,
    members: Vec<&'a str>,
    created: bool,
}

/// The `ok` of `member.add` and `member.remove`.
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

impl Sequencer {
    pub(super) fn conv_create(
        &mut self,
        request: &Request,
        kind: ConvKind,
        members: Vec<String>,
        title: Option<String>,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        if let Some(existing) = self.convs.get(&request.conv) {
            return created_before(request, kind, existing, turn.out);
        }
        let members = self.creation_members(request, kind, members)?;
        let record = ChatRecord::ConvCreated {
            conv: request.conv.to_string(),
            kind,
            title: if kind == ConvKind::Group { title } else { None },
            creator: request.caller.user.to_string(),
            members,
            ts: turn.now.unix_ms,
        };
        self.commit(turn.log, turn.now.unix_ms, &record)?;
        self.announce_created(request, turn.out);
        Ok(())
    }

    /// Everyone of a new conversation, the creator included, within the limits.
    fn creation_members(
        &self,
        request: &Request,
        kind: ConvKind,
        members: Vec<String>,
    ) -> Result<Vec<String>, Handled> {
        let mut all: BTreeSet<String> = members.into_iter().collect();
        all.insert(request.caller.user.to_string());
        if all.len() > self.limits.max_group_members {
            return Err(too_large_group(&self.limits).into());
        }
        if kind == ConvKind::Direct && all.len() != 2 {
            return Err(Handled::Refused((
                ErrorCode::BadRequest,
                "a direct conversation is between two different users".into(),
            )));
        }
        Ok(all.into_iter().collect())
    }

    /// The creator's `ok`, and a `conv` event for everyone else.
    fn announce_created(&self, request: &Request, out: &mut Vec<Output>) {
        let conv = &request.conv;
        let conversation = &self.convs[conv];
        let kind = conversation.kind.as_str();
        request.caller.ok(
            out,
            &Created {
                conv,
                kind,
                members: conversation.member_ids(),
                created: true,
            },
        );
        let others: Arc<[Arc<str>]> = conversation
            .members
            .keys()
            .filter(|member| **member != request.caller.user)
            .cloned()
            .collect();
        let title = conversation.title.as_deref();
        let doc = event::conv(conv, kind, title, conversation.member_ids());
        deliver(out, others, None, doc, false);
    }

    pub(super) fn conv_get(&self, request: &Request, out: &mut Vec<Output>) -> Result<(), Handled> {
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
        let conv = &request.conv;
        let conversation = self.member_of(conv, &request.caller.user)?;
        let members = conversation
            .members
            .iter()
            .map(|(user, member)| MemberView {
                user,
                role: member.role,
            })
            .collect();
        request.caller.ok(
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

    pub(super) fn member_add(
        &mut self,
        request: &Request,
        users: Vec<String>,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let (conv, user) = (&request.conv, &request.caller.user);
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
                ts: turn.now.unix_ms,
            };
            self.commit(turn.log, turn.now.unix_ms, &record)?;
        }
        let conversation = &self.convs[conv];
        request.caller.ok(turn.out, &MembersReply::of(conversation));
        let everyone = conversation.members_shared();
        for added_user in &added {
            let doc = event::member(conv, added_user, MemberChange::Added, user);
            deliver(turn.out, everyone.clone(), None, doc, false);
        }
        if !added.is_empty() {
            let newcomers: Arc<[Arc<str>]> = added.iter().map(|u| Arc::from(u.as_str())).collect();
            let doc = event::conv(
                conv,
                conversation.kind.as_str(),
                conversation.title.as_deref(),
                conversation.member_ids(),
            );
            deliver(turn.out, newcomers, None, doc, false);
        }
        Ok(())
    }

    /// `member.remove` (by an admin) or `conv.leave` (`users` is the leaver).
    pub(super) fn member_remove(
        &mut self,
        request: &Request,
        users: Vec<String>,
        change: MemberChange,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let (conv, user) = (&request.conv, &request.caller.user);
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
                ts: turn.now.unix_ms,
            };
            self.commit(turn.log, turn.now.unix_ms, &record)?;
        }
        let conversation = &self.convs[conv];
        if change == MemberChange::Left {
            request.caller.ok(turn.out, &Empty {});
        } else {
            request.caller.ok(turn.out, &MembersReply::of(conversation));
        }
        for removed_user in &removed {
            let doc = event::member(conv, removed_user, change, user);
            deliver(turn.out, before.clone(), None, doc, false);
            self.stop_typing_of_leaver(conv, removed_user, turn);
        }
        Ok(())
    }
}

/// `conv.create` of an id already taken: the same direct conversation again is answered
/// with it; anything else is a clash of ids.
fn created_before(
    request: &Request,
    kind: ConvKind,
    existing: &Conversation,
    out: &mut Vec<Output>,
) -> Result<(), Handled> {
    if kind == ConvKind::Direct && existing.is_member(&request.caller.user) {
        request.caller.ok(
            out,
            &Created {
                conv: &request.conv,
                kind: kind.as_str(),
                members: existing.member_ids(),
                created: false,
            },
        );
        return Ok(());
    }
    Err(Handled::Refused((
        ErrorCode::Conflict,
        format!("conversation id {} is taken; retry", request.conv),
    )))
}
