//! What the chat core writes to its shard's WAL: every change of durable state is one
//! record, and replaying the records in order rebuilds the state (the sequencer applies
//! a record the same way whether it just wrote it or reads it back at recovery).
//!
//! Records are postcard-encoded. New variants go at the end of the enum, so older logs
//! stay readable.

use serde::{Deserialize, Serialize};

use crate::command::{ConvKind, MessageKind};

/// The WAL record type of every chat record (the `type` byte of the WAL's header).
pub const CHAT_RECORD_TYPE: u8 = 1;

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
    /// Cursor advances, coalesced: one record per loop turn carries the latest of each.
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
}
