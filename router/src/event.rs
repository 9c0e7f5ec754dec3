//! Encoders of the events of PROTOCOL.md section 6. Each event is encoded once and its
//! bytes shared by every session that receives it.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::record::{MemberChange, StoredMessage};

#[derive(Serialize)]
struct MsgEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    seq: u64,
    mid: String,
    from: &'a str,
    ts: u64,
    kind: &'static str,
    body: &'a str,
    cmid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    media: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<u64>,
}

fn encode<T: Serialize>(event: &T) -> Arc<str> {
    Arc::from(serde_json::to_string(event).expect("events serialize"))
}

/// `{"ev":"msg", ...}`. History pages carry the same objects.
pub fn msg(message: &StoredMessage) -> Arc<str> {
    // Media was checked to be a JSON object when it was sent.
    let media = message
        .media
        .as_deref()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
    encode(&MsgEvent {
        ev: "msg",
        conv: &message.conv,
        seq: message.seq,
        mid: message.mid(),
        from: &message.from,
        ts: message.ts,
        kind: message.kind.as_str(),
        body: &message.body,
        cmid: &message.cmid,
        media,
        reply_to: message.reply_to,
    })
}

#[derive(Clone, Copy)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

#[derive(Serialize)]
struct ReceiptEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    user: &'a str,
    kind: &'static str,
    seq: u64,
}

pub fn receipt(conv: &str, user: &str, kind: ReceiptKind, seq: u64) -> Arc<str> {
    encode(&ReceiptEvent {
        ev: "receipt",
        conv,
        user,
        kind: match kind {
            ReceiptKind::Delivered => "delivered",
            ReceiptKind::Read => "read",
        },
        seq,
    })
}

#[derive(Serialize)]
struct TypingEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    user: &'a str,
    on: bool,
}

pub fn typing(conv: &str, user: &str, on: bool) -> Arc<str> {
    encode(&TypingEvent {
        ev: "typing",
        conv,
        user,
        on,
    })
}

#[derive(Serialize)]
struct PresenceEvent<'a> {
    ev: &'static str,
    user: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<u64>,
}

pub fn presence(user: &str, online: bool, last_seen: Option<u64>) -> Arc<str> {
    encode(&PresenceEvent {
        ev: "presence",
        user,
        status: if online { "online" } else { "offline" },
        last_seen,
    })
}

#[derive(Serialize)]
struct MemberEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    user: &'a str,
    change: &'static str,
    by: &'a str,
}

pub fn member(conv: &str, user: &str, change: MemberChange, by: &str) -> Arc<str> {
    encode(&MemberEvent {
        ev: "member",
        conv,
        user,
        change: change.as_str(),
        by,
    })
}

#[derive(Serialize)]
struct ConvEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    members: Vec<&'a str>,
}

pub fn conv(conv: &str, kind: &'static str, title: Option<&str>, members: Vec<&str>) -> Arc<str> {
    encode(&ConvEvent {
        ev: "conv",
        conv,
        kind,
        title,
        members,
    })
}

#[derive(Serialize)]
struct ReactionEvent<'a> {
    ev: &'static str,
    conv: &'a str,
    seq: u64,
    user: &'a str,
    emoji: &'a str,
    on: bool,
}

pub fn reaction(conv: &str, seq: u64, user: &str, emoji: &str, on: bool) -> Arc<str> {
    encode(&ReactionEvent {
        ev: "reaction",
        conv,
        seq,
        user,
        emoji,
        on,
    })
}

#[derive(Serialize)]
struct SyncedEvent<'a> {
    ev: &'static str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    more: &'a [MoreAfter],
}

/// Where a truncated replay continues: fetch `conv` again after `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoreAfter {
    pub conv: String,
    pub after: u64,
}

pub fn synced(more: &[MoreAfter]) -> String {
    serde_json::to_string(&SyncedEvent { ev: "synced", more }).expect("events serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::MessageKind;
    use serde_json::{json, Value};

    #[test]
    fn msg_event_shape() {
        let message = StoredMessage {
            conv: "d-1".into(),
            seq: 2,
            from: "alice".into(),
            cmid: "c".into(),
            ts: 5,
            kind: MessageKind::File,
            body: "b".into(),
            media: Some(r#"{"url":"u"}"#.into()),
            reply_to: None,
        };
        let event: Value = serde_json::from_str(&msg(&message)).unwrap();
        assert_eq!(
            event,
            json!({"ev":"msg","conv":"d-1","seq":2,"mid":"d-1#2","from":"alice","ts":5,
                   "kind":"file","body":"b","cmid":"c","media":{"url":"u"}})
        );
        assert_eq!(synced(&[]), r#"{"ev":"synced"}"#);
    }
}
