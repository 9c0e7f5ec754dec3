//! What the chat core's home-shard state machines produce, for the shard core to route:
//! documents for one session, deliveries to every live session of some users, and parts
//! of answers gathered from several shards.

use std::sync::Arc;

use serde::Serialize;

use crate::event::MoreAfter;
use crate::protocol::{encode_err, encode_ok, Doc, ErrorCode};

/// A session: the shard that holds it and its connection id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub shard: usize,
    pub conn: u64,
}

/// A session's command on its way: where the reply goes, and whose identity it carries.
#[derive(Debug, Clone)]
pub struct Caller {
    pub origin: Origin,
    /// The command's id, which the reply answers.
    pub re: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
}

impl Caller {
    /// The command's one `ok` reply.
    pub fn ok<T: Serialize>(&self, out: &mut Vec<Output>, body: &T) {
        out.push(Output::ToSession {
            to: self.origin,
            doc: Doc::Owned(encode_ok(self.re, body)),
        });
    }

    /// The command's one `err` reply.
    pub fn err(&self, out: &mut Vec<Output>, code: ErrorCode, msg: &str) {
        out.push(Output::ToSession {
            to: self.origin,
            doc: Doc::Owned(encode_err(Some(self.re), code, msg)),
        });
    }
}

/// One event for every live session of `users` (except those of `except`). Shared by
/// every destination shard: the bytes are encoded once.
#[derive(Debug)]
pub struct Delivery {
    pub users: Arc<[Arc<str>]>,
    pub except: Option<Arc<str>>,
    pub doc: Arc<str>,
    /// Typing and presence: shed first under load, and never held back for durability.
    pub ephemeral: bool,
}

#[derive(Debug)]
pub enum Output {
    ToSession {
        to: Origin,
        doc: Doc,
    },
    Deliver(Arc<Delivery>),
    Part {
        shard: usize,
        gather: u64,
        part: Part,
    },
}

/// A shard's share of a gathered answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Convs(Vec<ConvSummary>),
    /// A sync or resume replay is done on this shard (its `msg` events went first).
    Synced {
        convs: Vec<ConvSummary>,
        more: Vec<MoreAfter>,
    },
    Presence(Vec<PresenceInfo>),
}

/// One entry of `conv.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConvSummary {
    pub conv: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub last_seq: u64,
    pub read_seq: u64,
    pub delivered_seq: u64,
    pub unread: u64,
    /// Time of the newest message (or of creation): the list is ordered by it, newest first.
    pub last_ts: u64,
}

/// One entry of `presence.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceInfo {
    pub user: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}
