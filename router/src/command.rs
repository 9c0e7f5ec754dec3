//! The chat commands of PROTOCOL.md section 5, parsed and checked against the limits on
//! the shard that received them, before anything crosses a ring.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::is_valid_id;
use crate::limits::ChatLimits;
use crate::protocol::ErrorCode;
use crate::record::{ConvKind, MessageKind};
use crate::search::{self, SearchQuery};

/// A conversation id: 1-64 bytes (PROTOCOL.md section 4).
pub const MAX_CONV_ID_BYTES: usize = 64;
/// A client message id: 1-64 bytes.
pub const MAX_CMID_BYTES: usize = 64;
/// A group title.
pub const MAX_TITLE_BYTES: usize = 256;
/// A reaction emoji (one emoji may be several code points).
pub const MAX_EMOJI_BYTES: usize = 32;

/// `{conv, after}`: a client's position in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Cursor {
    pub conv: String,
    pub after: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SendArgs {
    pub conv: String,
    pub cmid: String,
    pub body: String,
    pub kind: MessageKind,
    /// Media metadata as the client's JSON object text, stored and echoed verbatim.
    pub media: Option<String>,
    pub reply_to: Option<u64>,
}

/// Which end of a conversation a `history` page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The newest messages.
    Latest,
    Before(u64),
    After(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatCommand {
    ConvCreate {
        kind: ConvKind,
        members: Vec<String>,
        title: Option<String>,
    },
    ConvList,
    ConvGet {
        conv: String,
    },
    MemberAdd {
        conv: String,
        users: Vec<String>,
    },
    MemberRemove {
        conv: String,
        users: Vec<String>,
    },
    ConvLeave {
        conv: String,
    },
    Send(Box<SendArgs>),
    Ack {
        conv: String,
        seq: u64,
    },
    Read {
        conv: String,
        seq: u64,
    },
    Typing {
        conv: String,
        on: bool,
    },
    History {
        conv: String,
        page: Page,
        limit: usize,
    },
    Sync {
        cursors: Vec<Cursor>,
    },
    /// `hello`'s `resume`: as `sync`, without the reply.
    Resume {
        cursors: Vec<Cursor>,
    },
    PresenceGet {
        users: Vec<String>,
    },
    React {
        conv: String,
        seq: u64,
        emoji: String,
        on: bool,
    },
    /// `search` (PROTOCOL.md 10): asked of every shard's conversations of the user.
    Search(Box<SearchQuery>),
}

impl ChatCommand {
    /// The conversation whose home shard serves this command, if it is one conversation's.
    pub fn conv(&self) -> Option<&str> {
        match self {
            ChatCommand::ConvGet { conv }
            | ChatCommand::MemberAdd { conv, .. }
            | ChatCommand::MemberRemove { conv, .. }
            | ChatCommand::ConvLeave { conv }
            | ChatCommand::Ack { conv, .. }
            | ChatCommand::Read { conv, .. }
            | ChatCommand::Typing { conv, .. }
            | ChatCommand::History { conv, .. }
            | ChatCommand::React { conv, .. } => Some(conv),
            ChatCommand::Send(args) => Some(&args.conv),
            _ => None,
        }
    }
}

/// Why a command was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub msg: String,
}

impl Refusal {
    pub(crate) fn bad(msg: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            msg: msg.into(),
        }
    }
}

/// The ops this module parses (PROTOCOL.md section 5, less `hello` and `ping`).
pub const CHAT_OPS: &[&str] = &[
    "conv.create",
    "conv.list",
    "conv.get",
    "member.add",
    "member.remove",
    "conv.leave",
    "send",
    "ack",
    "read",
    "typing",
    "history",
    "sync",
    "presence.get",
    "react",
    "search",
];

#[derive(Deserialize)]
struct ConvCreateArgs {
    kind: ConvKind,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize)]
struct ConvArgs {
    conv: String,
}

#[derive(Deserialize)]
struct UsersArgs {
    conv: String,
    users: Vec<String>,
}

#[derive(Deserialize)]
struct RawSendArgs<'a> {
    conv: String,
    cmid: String,
    body: String,
    #[serde(default)]
    kind: Option<MessageKind>,
    #[serde(default, borrow)]
    media: Option<&'a RawValue>,
    #[serde(default)]
    reply_to: Option<u64>,
}

#[derive(Deserialize)]
struct SeqArgs {
    conv: String,
    seq: u64,
}

#[derive(Deserialize)]
struct TypingArgs {
    conv: String,
    on: bool,
}

#[derive(Deserialize)]
struct HistoryArgs {
    conv: String,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct SyncArgs {
    #[serde(default)]
    cursors: Vec<Cursor>,
}

#[derive(Deserialize)]
struct PresenceArgs {
    users: Vec<String>,
}

#[derive(Deserialize)]
struct ReactArgs {
    conv: String,
    seq: u64,
    emoji: String,
    on: bool,
}

impl From<ConvCreateArgs> for ChatCommand {
    fn from(a: ConvCreateArgs) -> Self {
        ChatCommand::ConvCreate {
            kind: a.kind,
            members: a.members,
            title: a.title,
        }
    }
}

impl UsersArgs {
    fn into_add(self) -> ChatCommand {
        ChatCommand::MemberAdd {
            conv: self.conv,
            users: self.users,
        }
    }

    fn into_remove(self) -> ChatCommand {
        ChatCommand::MemberRemove {
            conv: self.conv,
            users: self.users,
        }
    }
}

impl From<RawSendArgs<'_>> for ChatCommand {
    fn from(a: RawSendArgs<'_>) -> Self {
        ChatCommand::Send(Box::new(SendArgs {
            conv: a.conv,
            cmid: a.cmid,
            body: a.body,
            kind: a.kind.unwrap_or(MessageKind::Text),
            media: a.media.map(|raw| raw.get().to_string()),
            reply_to: a.reply_to,
        }))
    }
}

impl SeqArgs {
    fn into_ack(self) -> ChatCommand {
        ChatCommand::Ack {
            conv: self.conv,
            seq: self.seq,
        }
    }

    fn into_read(self) -> ChatCommand {
        ChatCommand::Read {
            conv: self.conv,
            seq: self.seq,
        }
    }
}

impl From<TypingArgs> for ChatCommand {
    fn from(a: TypingArgs) -> Self {
        ChatCommand::Typing {
            conv: a.conv,
            on: a.on,
        }
    }
}

impl HistoryArgs {
    /// The page asked for, with the page size the client named or the default.
    fn into_command(self, limits: &ChatLimits) -> Result<ChatCommand, Refusal> {
        let page = match (self.before, self.after) {
            (Some(_), Some(_)) => {
                return Err(Refusal::bad("history takes before or after, not both"))
            }
            (Some(before), None) => Page::Before(before),
            (None, Some(after)) => Page::After(after),
            (None, None) => Page::Latest,
        };
        let limit = self.limit.unwrap_or(limits.history_page_default);
        if limit == 0 || limit > limits.history_page_max {
            return Err(Refusal::bad(format!(
                "history limit must be 1-{} (history_page_max)",
                limits.history_page_max
            )));
        }
        Ok(ChatCommand::History {
            conv: self.conv,
            page,
            limit,
        })
    }
}

impl From<ReactArgs> for ChatCommand {
    fn from(a: ReactArgs) -> Self {
        ChatCommand::React {
            conv: a.conv,
            seq: a.seq,
            emoji: a.emoji,
            on: a.on,
        }
    }
}

/// Parse the fields of a chat command (`op` is one of [`CHAT_OPS`]) and check its limits.
pub fn parse(op: &str, document: &str, limits: &ChatLimits) -> Result<ChatCommand, Refusal> {
    let command = parse_fields(op, document, limits)?;
    check(&command, limits)?;
    Ok(command)
}

/// Each op's fields, as its command: a table of which argument shape each op has.
fn parse_fields(op: &str, document: &str, limits: &ChatLimits) -> Result<ChatCommand, Refusal> {
    fn args<'a, T: Deserialize<'a>>(op: &str, document: &'a str) -> Result<T, Refusal> {
        serde_json::from_str(document).map_err(|e| Refusal::bad(format!("malformed {op}: {e}")))
    }
    let conv = |document| args::<ConvArgs>(op, document).map(|a| a.conv);
    Ok(match op {
        "conv.create" => args::<ConvCreateArgs>(op, document)?.into(),
        "conv.list" => ChatCommand::ConvList,
        "conv.get" => ChatCommand::ConvGet {
            conv: conv(document)?,
        },
        "member.add" => args::<UsersArgs>(op, document)?.into_add(),
        "member.remove" => args::<UsersArgs>(op, document)?.into_remove(),
        "conv.leave" => ChatCommand::ConvLeave {
            conv: conv(document)?,
        },
        "send" => args::<RawSendArgs>(op, document)?.into(),
        "ack" => args::<SeqArgs>(op, document)?.into_ack(),
        "read" => args::<SeqArgs>(op, document)?.into_read(),
        "typing" => args::<TypingArgs>(op, document)?.into(),
        "history" => args::<HistoryArgs>(op, document)?.into_command(limits)?,
        "sync" => ChatCommand::Sync {
            cursors: args::<SyncArgs>(op, document)?.cursors,
        },
        "presence.get" => ChatCommand::PresenceGet {
            users: args::<PresenceArgs>(op, document)?.users,
        },
        "react" => args::<ReactArgs>(op, document)?.into(),
        "search" => ChatCommand::Search(Box::new(search::parse(document, limits)?)),
        other => return Err(Refusal::bad(format!("unknown op '{other}'"))),
    })
}

/// Parse `hello`'s `resume` list into a command, when one was given.
pub fn resume(cursors: Vec<Cursor>, limits: &ChatLimits) -> Result<ChatCommand, Refusal> {
    let command = ChatCommand::Resume { cursors };
    check(&command, limits)?;
    Ok(command)
}

/// A command within the limits (what [`parse`] and [`resume`] let through).
pub(crate) fn check(command: &ChatCommand, limits: &ChatLimits) -> Result<(), Refusal> {
    if let Some(conv) = command.conv() {
        check_conv(conv)?;
    }
    match command {
        ChatCommand::ConvCreate {
            kind,
            members,
            title,
        } => check_conv_create(*kind, members, title.as_deref(), limits),
        ChatCommand::MemberAdd { users, .. } | ChatCommand::MemberRemove { users, .. } => {
            check_member_change(users, limits)
        }
        ChatCommand::PresenceGet { users } => check_presence_get(users, limits),
        ChatCommand::Send(args) => check_send(args, limits),
        ChatCommand::React { emoji, .. } => check_emoji(emoji),
        ChatCommand::Sync { cursors } | ChatCommand::Resume { cursors } => {
            check_cursors(cursors, limits)
        }
        _ => Ok(()),
    }
}

fn check_conv_create(
    kind: ConvKind,
    members: &[String],
    title: Option<&str>,
    limits: &ChatLimits,
) -> Result<(), Refusal> {
    check_users(members, "members")?;
    if kind == ConvKind::Direct && members.len() != 1 {
        return Err(Refusal::bad(
            "a direct conversation names exactly one other member",
        ));
    }
    // The creator may or may not be listed; the home counts exactly.
    if members.len() > limits.max_group_members {
        return Err(too_large_group(limits));
    }
    if title.is_some_and(|t| t.len() > MAX_TITLE_BYTES) {
        return Err(Refusal::bad(format!(
            "title exceeds {MAX_TITLE_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_member_change(users: &[String], limits: &ChatLimits) -> Result<(), Refusal> {
    check_users(users, "users")?;
    if users.is_empty() {
        return Err(Refusal::bad("users is empty"));
    }
    if users.len() > limits.max_group_members {
        return Err(too_large_group(limits));
    }
    Ok(())
}

fn check_presence_get(users: &[String], limits: &ChatLimits) -> Result<(), Refusal> {
    check_users(users, "users")?;
    if users.len() > limits.presence_get_max_users {
        return Err(Refusal::bad(format!(
            "presence.get takes at most {} users (presence_get_max_users)",
            limits.presence_get_max_users
        )));
    }
    Ok(())
}

fn check_send(args: &SendArgs, limits: &ChatLimits) -> Result<(), Refusal> {
    if args.cmid.is_empty() || args.cmid.len() > MAX_CMID_BYTES {
        return Err(Refusal::bad(format!(
            "cmid must be 1-{MAX_CMID_BYTES} bytes"
        )));
    }
    if args.body.len() > limits.max_body_bytes {
        return Err(Refusal {
            code: ErrorCode::TooLarge,
            msg: format!(
                "body of {} bytes exceeds max_body_bytes ({})",
                args.body.len(),
                limits.max_body_bytes
            ),
        });
    }
    if let Some(media) = &args.media {
        if media.len() > limits.max_media_bytes {
            return Err(Refusal {
                code: ErrorCode::TooLarge,
                msg: format!("media exceeds max_media_bytes ({})", limits.max_media_bytes),
            });
        }
        if !media.trim_start().starts_with('{') {
            return Err(Refusal::bad("media must be a JSON object"));
        }
    }
    if args.reply_to == Some(0) {
        return Err(Refusal::bad("reply_to is a seq, and seqs start at 1"));
    }
    Ok(())
}

fn check_emoji(emoji: &str) -> Result<(), Refusal> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        return Err(Refusal::bad(format!(
            "emoji must be 1-{MAX_EMOJI_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_cursors(cursors: &[Cursor], limits: &ChatLimits) -> Result<(), Refusal> {
    if cursors.len() > limits.sync_max_convs {
        return Err(Refusal::bad(format!(
            "at most {} cursors per sync (sync_max_convs)",
            limits.sync_max_convs
        )));
    }
    for cursor in cursors {
        check_conv(&cursor.conv)?;
    }
    Ok(())
}

fn check_conv(conv: &str) -> Result<(), Refusal> {
    if conv.is_empty() || conv.len() > MAX_CONV_ID_BYTES {
        return Err(Refusal::bad(format!(
            "conv must be 1-{MAX_CONV_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_users(users: &[String], field: &str) -> Result<(), Refusal> {
    match users.iter().find(|user| !is_valid_id(user)) {
        Some(bad) => Err(Refusal::bad(format!(
            "{field}: {bad:?} is not a user id (1-64 bytes of [A-Za-z0-9._@-])"
        ))),
        None => Ok(()),
    }
}

/// A group over `max_group_members`.
pub fn too_large_group(limits: &ChatLimits) -> Refusal {
    Refusal {
        code: ErrorCode::TooLarge,
        msg: format!(
            "a group has at most {} members (max_group_members)",
            limits.max_group_members
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(op: &str, doc: &str) -> ChatCommand {
        parse(op, doc, &ChatLimits::default()).expect("parses")
    }

    fn refusal(op: &str, doc: &str) -> Refusal {
        parse(op, doc, &ChatLimits::default()).expect_err("refused")
    }

    #[test]
    fn send_defaults_and_media_verbatim() {
        let cmd = parse_ok(
            "send",
            r#"{"id":1,"op":"send","conv":"c","cmid":"x","body":"hi","media":{"url":"u","w":3}}"#,
        );
        let ChatCommand::Send(args) = cmd else {
            panic!("not a send")
        };
        assert_eq!(args.kind, MessageKind::Text);
        assert_eq!(args.media.as_deref(), Some(r#"{"url":"u","w":3}"#));
    }

    #[test]
    fn limits_are_enforced() {
        let body = "x".repeat(16 * 1024 + 1);
        let doc = format!(r#"{{"conv":"c","cmid":"x","body":"{body}"}}"#);
        assert_eq!(refusal("send", &doc).code, ErrorCode::TooLarge);
        let cmid = "x".repeat(65);
        let doc = format!(r#"{{"conv":"c","cmid":"{cmid}","body":"b"}}"#);
        assert_eq!(refusal("send", &doc).code, ErrorCode::BadRequest);
        assert_eq!(
            refusal("history", r#"{"conv":"c","limit":201}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            refusal("history", r#"{"conv":"c","before":3,"after":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            refusal("conv.create", r#"{"kind":"direct","members":["a","b"]}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            refusal("conv.create", r#"{"kind":"group","members":["bad user"]}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            refusal("send", r#"{"conv":"","cmid":"x","body":"b"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            refusal("send", r#"{"conv":"c","cmid":"x","body":"b","kind":"gif"}"#).code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn group_size_limit() {
        let limits = ChatLimits {
            max_group_members: 3,
            ..ChatLimits::default()
        };
        let doc = r#"{"kind":"group","members":["a","b","c","d"]}"#;
        let refused = parse("conv.create", doc, &limits).expect_err("over the limit");
        assert_eq!(refused.code, ErrorCode::TooLarge);
        let doc = r#"{"kind":"group","members":["a","b","c"]}"#;
        assert!(
            parse("conv.create", doc, &limits).is_ok(),
            "the creator may be listed"
        );
    }

    #[test]
    fn history_pages() {
        assert_eq!(
            parse_ok("history", r#"{"conv":"c"}"#),
            ChatCommand::History {
                conv: "c".into(),
                page: Page::Latest,
                limit: 50
            }
        );
        assert_eq!(
            parse_ok("history", r#"{"conv":"c","before":9,"limit":2}"#),
            ChatCommand::History {
                conv: "c".into(),
                page: Page::Before(9),
                limit: 2
            }
        );
    }
}
