//! One command served: sent to its handler, and a failure answered. Every command gets
//! exactly one reply (`typing` none); only a failed log is an error for the shard.

use super::turn::{Handled, Refused, Request, Turn};
use super::{HomeCommand, Sequencer};
use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::command::ChatCommand;
use crate::conversation::Conversation;
use crate::output::{Origin, Output};
use crate::protocol::ErrorCode;
use crate::record::{ConvKind, MemberChange};

impl Sequencer {
    /// Serve one command. Only a failed log is an error; everything else is answered.
    pub fn handle(
        &mut self,
        command: HomeCommand,
        now: Now,
        log: &mut dyn ChatLog,
        out: &mut Vec<Output>,
    ) -> Result<(), LogError> {
        let HomeCommand {
            caller,
            conv,
            command,
        } = command;
        let request = Request { caller, conv };
        let silent = matches!(command, ChatCommand::Typing { .. });
        let outputs_before = out.len();
        let mut turn = Turn { now, log, out };
        let result = match self.dispatch(&request, command, &mut turn) {
            Ok(()) => Ok(()),
            Err(handled) => answer_failure(&request, handled, turn.out),
        };
        let replies = replies(&turn.out[outputs_before..], request.caller.origin);
        debug_assert!(
            replies == 1 || (silent && replies == 0),
            "a command gets one reply (typing none, unless refused), not {replies}"
        );
        result
    }

    fn dispatch(
        &mut self,
        request: &Request,
        command: ChatCommand,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        match command {
            ChatCommand::ConvCreate {
                kind,
                members,
                title,
            } => self.conv_create(request, kind, members, title, turn),
            ChatCommand::ConvGet { .. } => self.conv_get(request, turn.out),
            ChatCommand::MemberAdd { users, .. } => self.member_add(request, users, turn),
            ChatCommand::MemberRemove { users, .. } => {
                self.member_remove(request, users, MemberChange::Removed, turn)
            }
            ChatCommand::ConvLeave { .. } => {
                let leaving = vec![request.caller.user.to_string()];
                self.member_remove(request, leaving, MemberChange::Left, turn)
            }
            ChatCommand::Send(args) => self.send(request, *args, turn),
            ChatCommand::Ack { seq, .. } => self.cursor(request, seq, false, turn),
            ChatCommand::Read { seq, .. } => self.cursor(request, seq, true, turn),
            ChatCommand::Typing { on, .. } => self.typing(request, on, turn),
            ChatCommand::History { page, limit, .. } => self.history(request, page, limit, turn),
            ChatCommand::React { seq, emoji, on, .. } => self.react(request, seq, emoji, on, turn),
            ChatCommand::ConvList
            | ChatCommand::Sync { .. }
            | ChatCommand::Resume { .. }
            | ChatCommand::PresenceGet { .. }
            | ChatCommand::Search(_) => Err(Handled::Refused((
                ErrorCode::Internal,
                "command routed to a conversation's home by mistake".into(),
            ))),
        }
    }

    /// `conv` exists here and `user` is one of its members.
    pub(super) fn member_of(&self, conv: &str, user: &str) -> Result<&Conversation, Refused> {
        let conversation = self
            .convs
            .get(conv)
            .ok_or_else(|| (ErrorCode::NotFound, format!("no conversation {conv}")))?;
        if !conversation.is_member(user) {
            return Err((ErrorCode::Forbidden, format!("not a member of {conv}")));
        }
        Ok(conversation)
    }

    /// `conv` is a group and `user` one of its admins.
    pub(super) fn admin_of_group(&self, conv: &str, user: &str) -> Result<&Conversation, Refused> {
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
}

/// Documents for `origin` among `outputs`: a home command's replies (its events are
/// deliveries).
fn replies(outputs: &[Output], origin: Origin) -> usize {
    outputs
        .iter()
        .filter(|output| matches!(output, Output::ToSession { to, .. } if *to == origin))
        .count()
}

/// The reply to a command that did not succeed; a failed log also stops the shard.
fn answer_failure(
    request: &Request,
    handled: Handled,
    out: &mut Vec<Output>,
) -> Result<(), LogError> {
    match handled {
        Handled::Refused((code, msg)) => {
            request.caller.err(out, code, &msg);
            Ok(())
        }
        Handled::Log(LogError::Full) => {
            request.caller.err(
                out,
                ErrorCode::Unavailable,
                "the log is busy; retry the same command",
            );
            Ok(())
        }
        Handled::Log(LogError::NoSpace(_)) => {
            request.caller.err(
                out,
                ErrorCode::Unavailable,
                "the disk is full; retry the same command later",
            );
            Ok(())
        }
        Handled::Log(LogError::TooLarge { size, max }) => {
            let msg = format!("the change takes {size} bytes; the log takes {max} at most");
            request.caller.err(out, ErrorCode::TooLarge, &msg);
            Ok(())
        }
        Handled::Log(LogError::Missing(lsn)) => {
            request.caller.err(
                out,
                ErrorCode::Internal,
                &format!("log record {lsn} is missing"),
            );
            Ok(())
        }
        Handled::Log(error) => {
            request.caller.err(
                out,
                ErrorCode::Unavailable,
                "the log failed; retry elsewhere",
            );
            Err(error)
        }
    }
}
