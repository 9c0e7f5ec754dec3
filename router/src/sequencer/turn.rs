//! What a command works with, and what it ends as.
//!
//! Every command handler used to take the clock, the log and the output sink one by one,
//! next to who asked and where the reply goes. Those are two values: a [`Turn`] (the
//! shard's loop turn this command is served in) and a [`Request`] (everything of a
//! [`HomeCommand`](super::HomeCommand) but the command itself).

use std::sync::Arc;

use serde::Serialize;

use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::command::Refusal;
use crate::output::{Delivery, Origin, Output};
use crate::protocol::{encode_err, encode_ok, Doc, ErrorCode};

/// The shard's turn a command is served in: the caller's clock, the log records are
/// appended to, and where replies and events go (the shard core routes them).
pub struct Turn<'a> {
    pub now: Now,
    pub log: &'a mut dyn ChatLog,
    pub out: &'a mut Vec<Output>,
}

/// Who asks, and about which conversation.
pub struct Request {
    /// The session the reply goes to.
    pub origin: Origin,
    /// The command's id, which the reply answers.
    pub re: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub conv: Arc<str>,
}

impl Request {
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

/// A command refused with this code and message; nothing changed.
pub type Refused = (ErrorCode, String);

/// How a command ended when it did not simply succeed.
#[derive(Debug)]
pub enum Handled {
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

/// The body of an `ok` that says nothing more.
#[derive(Serialize)]
pub struct Empty {}

/// One event for every live session of `users` (but `except`), unless there is no one.
pub fn deliver(
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
