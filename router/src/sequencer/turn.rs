//! What a command works with, and what it ends as.
//!
//! Every command handler used to take the clock, the log and the output sink one by one,
//! next to who asked and where the reply goes. Those are two values: a [`Turn`] (the
//! shard's loop turn this command is served in) and a [`Request`] (the caller, and the
//! conversation asked about).

use std::sync::Arc;

use serde::Serialize;

use crate::chat_log::{ChatLog, LogError};
use crate::clock::Now;
use crate::command::Refusal;
use crate::output::{Caller, Delivery, Output};
use crate::protocol::ErrorCode;

/// The shard's turn a command is served in: the caller's clock, the log records are
/// appended to, and where replies and events go (the shard core routes them).
pub struct Turn<'a> {
    pub now: Now,
    pub log: &'a mut dyn ChatLog,
    pub out: &'a mut Vec<Output>,
}

/// Who asks, and about which conversation: a [`HomeCommand`](super::HomeCommand) but
/// the command itself.
pub struct Request {
    pub caller: Caller,
    pub conv: Arc<str>,
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
