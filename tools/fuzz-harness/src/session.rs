//! Target `session`: frames from a client into one [`Session`] (router/src/session.rs),
//! whose documents are parsed and checked by router/src/command.rs.
//!
//! Input: one option byte (bit 0: the upgrade carried a valid token; bit 1: drain the
//! outbound queue only when a chunk asks), then chunks. Chunk kinds: 0-3 a text frame
//! (split at `\n` like WebSocket's), 4 a QUIC document frame (not split), 5 a binary
//! frame, 6 a frame the transport discarded as oversized, 7 the clock moves on, 8 the
//! socket takes the queued documents; larger kinds wrap around.
//!
//! Invariants:
//! - every document read while the session is open gets one reply or one accepted
//!   command (two for `hello` with `resume`: its `ok` and the resume), unless the reply
//!   overflowed the queue, which closes the session;
//! - every queued document is a reply `{"re", "ok"|"err"}`, its `re` null or the id of
//!   the document it answers, its error code one of PROTOCOL.md's;
//! - a command reaches the shard only from a session that authenticated (the same frame
//!   may then close it), and only within every limit (checked again here, independently of command.rs);
//! - `command::parse` of each document under every op is a command within the limits or
//!   a refusal coded `bad_request` or `too_large`;
//! - the queue stays within its bound; after the close action nothing more is queued.

use std::collections::HashSet;

use parley_router::auth::is_valid_id;
use parley_router::command::{self, ChatCommand, CHAT_OPS};
use parley_router::limits::ChatLimits;
use parley_router::protocol::ErrorCode;
use parley_router::session::{Action, Note, Session};
use serde::Deserialize;

use crate::fixture::{self, later};
use crate::input::Input;

pub fn session(data: &[u8]) {
    let mut input = Input::new(data);
    let options = input.byte();
    let config = fixture::session_config();
    let limits = config.limits.clone();
    let chat = config.chat.clone();
    let mut now = fixture::start();
    let token = (options & 1 != 0).then(fixture::token);
    let mut session = Session::new(config, "fuzz.1".into(), token.as_deref(), now);
    let drain_on_request = options & 2 != 0;
    let mut closed = false;
    // Whether the session ever authenticated: a frame may authenticate it (hello), send
    // commands, and close it (the abuse policy) in one go.
    let mut authenticated = session.is_authenticated();
    // Ids of the documents whose replies may still be queued.
    let mut ids: HashSet<u64> = HashSet::new();
    while let Some((kind, bytes)) = input.chunk() {
        let text = String::from_utf8_lossy(bytes);
        let was_open = !session.is_closing();
        let queued_before = session.outbound_len();
        // Which documents this frame holds, as the session will read them.
        let documents: Vec<&str> = match kind % 9 {
            0..=3 if text.len() <= limits.max_frame_bytes => {
                text.split('\n').filter(|d| !d.trim().is_empty()).collect()
            }
            4 if text.len() <= limits.max_frame_bytes && !text.trim().is_empty() => vec![&text],
            _ => Vec::new(),
        };
        match kind % 9 {
            0..=3 => session.on_text(now, &text),
            4 => session.on_document_frame(now, &text),
            5 => session.on_binary(now),
            6 => {
                let len =
                    limits.max_frame_bytes + 1 + usize::from(bytes.first().copied().unwrap_or(0));
                session.on_oversized_frame(now, len);
            }
            7 => {
                let step = bytes
                    .iter()
                    .take(4)
                    .fold(0u64, |n, &b| n << 8 | u64::from(b));
                now = later(now, step % 200_000);
                session.on_tick(now);
            }
            _ => {}
        }
        let requests: Vec<_> = session.take_requests().collect();
        authenticated |= session.take_notes().any(|note| note == Note::Authenticated);
        if !authenticated {
            assert!(
                requests.is_empty(),
                "a command from a session that never authenticated"
            );
        }
        for request in &requests {
            check_command(&request.command, &chat);
        }
        let replies = session.outbound_len() - queued_before;
        if was_open && documents.len() == 1 {
            let answers = replies + requests.len();
            assert!(
                (1..=2).contains(&answers) || session.is_closing(),
                "{answers} answers to one document: {:?}",
                documents[0]
            );
        }
        if was_open && documents.is_empty() && matches!(kind % 9, 5 | 6) {
            assert!(
                replies <= 1,
                "{replies} replies to one frame that held no document"
            );
        }
        assert!(session.outbound_len() <= limits.outbound_queue_len);
        for document in &documents {
            check_parse(document, &chat);
        }
        ids.extend(documents.iter().filter_map(|d| document_id(d)));
        if !drain_on_request || kind % 9 == 8 {
            while let Some(doc) = session.pop_outbound() {
                check_reply(doc.as_str(), &ids, closed);
            }
            ids.clear();
        }
        while let Some(action) = session.poll_action() {
            if let Action::Close { .. } = action {
                assert!(!closed, "closed twice");
                assert_eq!(
                    session.outbound_len(),
                    0,
                    "closed before the queue was sent"
                );
                closed = true;
            }
        }
    }
    while let Some(doc) = session.pop_outbound() {
        check_reply(doc.as_str(), &ids, closed);
    }
}

#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<u64>,
}

fn document_id(document: &str) -> Option<u64> {
    serde_json::from_str::<IdOnly>(document).ok()?.id
}

/// One queued document: a reply as PROTOCOL.md section 3 writes it.
fn check_reply(document: &str, ids: &HashSet<u64>, closed: bool) {
    assert!(!closed, "a document queued after the close: {document}");
    let value: serde_json::Value =
        serde_json::from_str(document).unwrap_or_else(|e| panic!("not JSON ({e}): {document}"));
    let object = value.as_object().expect("a reply is an object");
    match object.get("re") {
        Some(serde_json::Value::Null) => {}
        Some(re) => {
            let re = re.as_u64().expect("re is an id");
            assert!(
                ids.contains(&re),
                "re {re} answers no document read: {document}"
            );
        }
        None => panic!("a reply without re: {document}"),
    }
    match (object.get("ok"), object.get("err")) {
        (Some(_), None) => {}
        (None, Some(err)) => {
            let code = err["code"].as_str().expect("an error has a code");
            assert!(
                ErrorCode::ALL.iter().any(|c| c.as_str() == code),
                "unknown error code {code}"
            );
            assert!(
                err["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "{document}"
            );
        }
        _ => panic!("a reply is ok or err: {document}"),
    }
}

/// `command::parse` of the document under every op: within the limits, or refused with
/// a code the protocol gives refusals.
fn check_parse(document: &str, chat: &ChatLimits) {
    for op in CHAT_OPS {
        match command::parse(op, document, chat) {
            Ok(command) => check_command(&command, chat),
            Err(refusal) => {
                assert!(
                    matches!(refusal.code, ErrorCode::BadRequest | ErrorCode::TooLarge),
                    "{op}: {refusal:?}"
                );
                assert!(!refusal.msg.is_empty());
            }
        }
    }
}

/// A command the shard may receive: every limit of PROTOCOL.md section 5 holds. Written
/// from the protocol, not from command.rs, so that a check lost there fails here.
pub fn check_command(command: &ChatCommand, chat: &ChatLimits) {
    let conv_ok = |conv: &str| (1..=64).contains(&conv.len());
    let users_ok = |users: &[String]| users.iter().all(|u| is_valid_id(u));
    if let Some(conv) = command.conv() {
        assert!(conv_ok(conv), "conv {conv:?}");
    }
    match command {
        ChatCommand::ConvCreate {
            kind,
            members,
            title,
        } => {
            assert!(users_ok(members), "{members:?}");
            assert!(members.len() <= chat.max_group_members);
            if *kind == parley_router::record::ConvKind::Direct {
                assert_eq!(members.len(), 1);
            }
            assert!(title.as_ref().is_none_or(|t| t.len() <= 256));
        }
        ChatCommand::MemberAdd { users, .. } | ChatCommand::MemberRemove { users, .. } => {
            assert!(users_ok(users) && !users.is_empty() && users.len() <= chat.max_group_members);
        }
        ChatCommand::PresenceGet { users } => {
            assert!(users_ok(users) && users.len() <= chat.presence_get_max_users);
        }
        ChatCommand::Send(args) => {
            assert!((1..=64).contains(&args.cmid.len()));
            assert!(args.body.len() <= chat.max_body_bytes);
            if let Some(media) = &args.media {
                assert!(media.len() <= chat.max_media_bytes);
                let value: serde_json::Value = serde_json::from_str(media).expect("media is JSON");
                assert!(value.is_object(), "media {media}");
            }
            assert_ne!(args.reply_to, Some(0));
        }
        ChatCommand::History { limit, .. } => {
            assert!((1..=chat.history_page_max).contains(limit));
        }
        ChatCommand::Sync { cursors } | ChatCommand::Resume { cursors } => {
            assert!(cursors.len() <= chat.sync_max_convs);
            assert!(cursors.iter().all(|c| conv_ok(&c.conv)));
        }
        ChatCommand::React { emoji, .. } => assert!((1..=32).contains(&emoji.len())),
        _ => {}
    }
}
