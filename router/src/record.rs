//! What the chat core writes to its shard's WAL: every change of durable state is one
//! record, and replaying the records in order rebuilds the state (the sequencer applies
//! a record the same way whether it just wrote it or reads it back at recovery).
//!
//! Records are postcard-encoded, which writes an enum's variant as its index: the order
//! of the variants of every enum here is an on-disk format. New variants go at the end,
//! none is ever removed or moved, so older logs stay readable (`variant_indices_are_the_log_format`
//! pins them).

use serde::{Deserialize, Serialize};

/// The WAL record type of every chat record (the `type` byte of the WAL's header).
pub const CHAT_RECORD_TYPE: u8 = 1;

/// A chat record is at most the frame that caused it plus this many bytes: what the
/// sequencer adds (the sender's id, seq, timestamps, the conversation id it minted) and
/// postcard's length prefixes. Cursor records, which no single frame causes, are split
/// by the log's batch limit instead. Settings check the largest frame against it.
pub const MAX_RECORD_OVERHEAD_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatRecord {
    ConvCreated {
        conv: String,
        kind: ConvKind,
        title: Option<String>,
        creator: String,
        /// Everyone, the creator included.
        members: Vec<String>,
        ts: u64,
    },
    Members {
        conv: String,
        by: String,
        change: MemberChange,
        users: Vec<String>,
        ts: u64,
    },
    Message(StoredMessage),
    /// Cursor advances, coalesced: a loop turn's records carry the latest of each (one
    /// record, or as many as the log's record limit needs).
    Cursors(Vec<CursorAdvance>),
    Reaction {
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        on: bool,
    },
    /// A user's last session ended (kept by the user's home shard).
    LastSeen {
        user: String,
        ts: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
/// Parsed from the wire by its lowercase name; stored in [`ChatRecord::ConvCreated`] by
/// its index.
#[serde(rename_all = "lowercase")]
pub enum ConvKind {
    Direct,
    Group,
}

impl ConvKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvKind::Direct => "direct",
            ConvKind::Group => "group",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
/// Parsed from the wire by its lowercase name; stored in [`StoredMessage`] by its index.
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Text,
    Image,
    Video,
    File,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Image => "image",
            MessageKind::Video => "video",
            MessageKind::File => "file",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    Added,
    Removed,
    Left,
}

impl MemberChange {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberChange::Added => "added",
            MemberChange::Removed => "removed",
            MemberChange::Left => "left",
        }
    }
}

/// A sequenced message, as stored and as replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub conv: String,
    pub seq: u64,
    pub from: String,
    pub cmid: String,
    pub ts: u64,
    pub kind: MessageKind,
    pub body: String,
    pub media: Option<String>,
    pub reply_to: Option<u64>,
}

impl StoredMessage {
    /// The globally unique message id: conversation ids are unique, and so is `seq` in one.
    pub fn mid(&self) -> String {
        format!("{}#{}", self.conv, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorAdvance {
    pub conv: String,
    pub user: String,
    /// `Some(device)`: that device's delivered cursor (`ack`); `None`: the user's read cursor.
    pub device: Option<String>,
    pub seq: u64,
}

/// A record that could not be decoded: the log holds something this build did not write.
#[derive(Debug, thiserror::Error)]
#[error("undecodable chat record: {0}")]
pub struct DecodeError(String);

/// The bytes of a [`ChatRecord::Cursors`] beyond its advances' own, at most: the
/// variant, and the count (a varint of up to 10 bytes).
pub const CURSORS_RECORD_OVERHEAD: usize = 1 + 10;

/// The length of `value` encoded as records are (postcard), without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .expect("chat records always encode")
}

impl ChatRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("chat records always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records = [
            ChatRecord::Message(StoredMessage {
                conv: "g-1".into(),
                seq: 7,
                from: "alice".into(),
                cmid: "c1".into(),
                ts: 1,
                kind: MessageKind::Image,
                body: "hi ☃".into(),
                media: Some(r#"{"url":"x"}"#.into()),
                reply_to: Some(3),
            }),
            ChatRecord::Cursors(vec![CursorAdvance {
                conv: "g-1".into(),
                user: "bob".into(),
                device: None,
                seq: 4,
            }]),
            ChatRecord::LastSeen {
                user: "bob".into(),
                ts: 9,
            },
        ];
        for record in records {
            assert_eq!(ChatRecord::decode(&record.encode()).unwrap(), record);
        }
        assert!(ChatRecord::decode(&[0xff, 0xff]).is_err());
    }

    /// The bytes of one record of each variant, written out by hand from postcard's rules
    /// (a variant is its index, a string its length then its bytes, an integer a varint,
    /// `None` is 0): reordering a variant of any enum here would make old logs decode
    /// into the wrong thing, and fails this test.
    #[test]
    fn variant_indices_are_the_log_format() {
        let b = |s: &str| s.as_bytes()[0];
        let cases: Vec<(ChatRecord, Vec<u8>)> = vec![
            (
                ChatRecord::ConvCreated {
                    conv: "g".into(),
                    kind: ConvKind::Group,
                    title: None,
                    creator: "a".into(),
                    members: vec!["a".into()],
                    ts: 5,
                },
                vec![0, 1, b("g"), 1, 0, 1, b("a"), 1, 1, b("a"), 5],
            ),
            (
                ChatRecord::Members {
                    conv: "g".into(),
                    by: "a".into(),
                    change: MemberChange::Left,
                    users: vec!["b".into()],
                    ts: 5,
                },
                vec![1, 1, b("g"), 1, b("a"), 2, 1, 1, b("b"), 5],
            ),
            (
                ChatRecord::Message(StoredMessage {
                    conv: "g".into(),
                    seq: 1,
                    from: "a".into(),
                    cmid: "c".into(),
                    ts: 5,
                    kind: MessageKind::File,
                    body: String::new(),
                    media: None,
                    reply_to: None,
                }),
                vec![2, 1, b("g"), 1, 1, b("a"), 1, b("c"), 5, 3, 0, 0, 0],
            ),
            (
                ChatRecord::Cursors(vec![CursorAdvance {
                    conv: "g".into(),
                    user: "a".into(),
                    device: None,
                    seq: 2,
                }]),
                vec![3, 1, 1, b("g"), 1, b("a"), 0, 2],
            ),
            (
                ChatRecord::Reaction {
                    conv: "g".into(),
                    seq: 1,
                    user: "a".into(),
                    emoji: "x".into(),
                    on: true,
                },
                vec![4, 1, b("g"), 1, 1, b("a"), 1, b("x"), 1],
            ),
            (
                ChatRecord::LastSeen {
                    user: "a".into(),
                    ts: 5,
                },
                vec![5, 1, b("a"), 5],
            ),
        ];
        for (record, bytes) in cases {
            assert_eq!(record.encode(), bytes, "{record:?}");
        }
        for (kind, at) in [(ConvKind::Direct, 0), (ConvKind::Group, 1)] {
            assert_eq!(encoded(&kind), [at], "{kind:?}");
        }
        for (kind, at) in [
            (MessageKind::Text, 0),
            (MessageKind::Image, 1),
            (MessageKind::Video, 2),
            (MessageKind::File, 3),
        ] {
            assert_eq!(encoded(&kind), [at], "{kind:?}");
        }
        for (change, at) in [
            (MemberChange::Added, 0),
            (MemberChange::Removed, 1),
            (MemberChange::Left, 2),
        ] {
            assert_eq!(encoded(&change), [at], "{change:?}");
        }
    }

    /// A `Cursors` record is its advances and at most the overhead: the sequencer splits
    /// advances into records by this sum.
    #[test]
    fn a_cursors_record_is_its_advances_and_the_overhead() {
        for n in [0usize, 1, 127, 128, 20_000] {
            let advances: Vec<CursorAdvance> = (0..n)
                .map(|i| CursorAdvance {
                    conv: format!("g-{i}"),
                    user: "u".repeat(i % 64 + 1),
                    device: (i % 2 == 0).then(|| "d".into()),
                    seq: i as u64 * 1_000_003,
                })
                .collect();
            let parts: usize = advances.iter().map(encoded_len).sum();
            let record = ChatRecord::Cursors(advances);
            assert_eq!(encoded_len(&record), record.encode().len());
            assert!(
                record.encode().len() <= parts + CURSORS_RECORD_OVERHEAD,
                "{n}"
            );
        }
    }

    /// The record of a send is no larger than the frame that carried it plus the
    /// overhead the settings reckon with, however long its ids and body.
    #[test]
    fn a_message_record_is_its_frame_and_at_most_the_overhead() {
        for body_len in [0usize, 1, 300, 70_000] {
            let id = "i".repeat(64);
            let body = "b".repeat(body_len);
            let frame = serde_json::json!({
                "op": "send", "id": 1, "conv": id, "cmid": id, "body": body,
            })
            .to_string();
            let record = ChatRecord::Message(StoredMessage {
                conv: id.clone(),
                seq: u64::MAX,
                from: id.clone(),
                cmid: id.clone(),
                ts: u64::MAX,
                kind: MessageKind::Text,
                body,
                media: None,
                reply_to: Some(u64::MAX),
            });
            let len = record.encode().len();
            assert!(
                len <= frame.len() + MAX_RECORD_OVERHEAD_BYTES,
                "body {body_len}: record {len}, frame {}",
                frame.len()
            );
        }
    }

    fn encoded<T: Serialize>(value: &T) -> Vec<u8> {
        postcard::to_stdvec(value).expect("encodes")
    }
}
