//! What every transport (the two WebSocket engines and QUIC) does with a session the
//! same way: admit its socket, hand what it accepted to the core, end it once, and the
//! mailbox the core's documents for it arrive in.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Waker;

use parley_router::clock::Now;
use parley_router::protocol::Doc;
use parley_router::session::ChatRequest;

use super::Shard;
use crate::metrics::{dec, inc};
use crate::ws::WsConnection;

/// Documents from the core for one session, and the waker of its task.
#[derive(Default)]
pub(super) struct Mailbox {
    pub(super) documents: RefCell<VecDeque<(Doc, bool)>>,
    pub(super) waker: RefCell<Option<Waker>>,
    /// A mailbox of a session served by a shard-wide task (QUIC, the io_uring socket
    /// engine): that task is told which of its sessions have mail.
    pub(super) notice: Option<(u64, Rc<MailNotice>)>,
}

/// Which sessions of a shard-wide task have mail from the core, and that task's waker.
#[derive(Default)]
pub(super) struct MailNotice {
    pub(super) pending: RefCell<Vec<u64>>,
    pub(super) waker: RefCell<Option<Waker>>,
}

impl MailNotice {
    pub(super) fn post(&self, id: u64) {
        self.pending.borrow_mut().push(id);
        self.wake();
    }

    pub(super) fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

impl Mailbox {
    pub(super) fn wake(&self) {
        if let Some((id, notice)) = &self.notice {
            notice.post(*id);
            return;
        }
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// What becomes of an accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// A session, with its connection id.
    Session(u64),
    /// Refused (the shard is full, or drains): answered 503 and closed like a session;
    /// [`Shard::refusal_closed`] when its socket is closed.
    Answer,
    /// Refused while `max_refusing_connections_per_shard` are being answered: close it
    /// at once, without a word.
    Close,
}

impl Shard {
    /// A socket was accepted: count it and give it a connection id, or refuse it when
    /// the shard holds `max_connections_per_shard` or drains.
    pub(super) fn admit(&self, draining: bool) -> Admission {
        if self.open_sockets.get() >= self.max_connections || draining {
            inc(&self.metrics.connections_refused);
            if self.refusing.get() >= self.max_refusing {
                inc(&self.metrics.connections_refused_unanswered);
                return Admission::Close;
            }
            self.refusing.set(self.refusing.get() + 1);
            inc(&self.metrics.connections_refusing);
            return Admission::Answer;
        }
        inc(&self.metrics.connections_accepted);
        inc(&self.metrics.connections_open);
        self.open_sockets.set(self.open_sockets.get() + 1);
        let id = self.next_connection.get();
        self.next_connection.set(id + 1);
        debug_assert!(self.open_sockets.get() <= self.max_connections);
        Admission::Session(id)
    }

    /// An admitted socket is closed (after its session ended and it lingered).
    pub(super) fn socket_closed(&self) {
        let open = self.open_sockets.get();
        assert!(open > 0, "shard {}: a socket closed twice", self.index);
        self.open_sockets.set(open - 1);
        dec(&self.metrics.connections_open);
    }

    /// A socket refused with an answer is closed.
    pub(super) fn refusal_closed(&self) {
        let refusing = self.refusing.get();
        assert!(refusing > 0, "shard {}: a refusal closed twice", self.index);
        self.refusing.set(refusing - 1);
        dec(&self.metrics.connections_refusing);
    }

    /// A session's new mailbox, by which the core task finds it.
    pub(super) fn new_mailbox(
        &self,
        id: u64,
        notice: Option<(u64, Rc<MailNotice>)>,
    ) -> Rc<Mailbox> {
        let mailbox = Rc::new(Mailbox {
            notice,
            ..Mailbox::default()
        });
        let replaced = self.connections.borrow_mut().insert(id, mailbox.clone());
        assert!(
            replaced.is_none(),
            "shard {}: session {id} opened twice",
            self.index
        );
        mailbox
    }

    /// Hand a session's requests to the core; `opening` joins the session to the core
    /// first (live delivery, presence).
    pub(super) fn to_core(
        &self,
        id: u64,
        opening: bool,
        (user, device): (&str, &str),
        requests: Vec<ChatRequest>,
        now: Now,
    ) {
        let mut core = self.core.borrow_mut();
        if opening {
            core.session_opened(id, user, now);
        }
        for request in requests {
            core.on_request(id, request.re, user, device, request.command, now);
        }
        drop(core);
        self.kick();
    }

    /// The session is over (its close frame is flushed, or the peer is gone): forget its
    /// mailbox and tell the core, once (`ended` is the transport's note of that). A drain
    /// need not wait for the socket's lingering.
    pub(super) fn end_session(&self, id: u64, ended: &mut bool, opened: bool, now: Now) {
        if std::mem::replace(ended, true) {
            return;
        }
        self.connections.borrow_mut().remove(&id);
        if opened {
            self.core.borrow_mut().session_closed(id, now);
            self.kick();
        }
        if self.draining.get() && self.connections.borrow().is_empty() {
            if let Some(waker) = self.idle_waker.take() {
                waker.wake();
            }
        }
    }
}

/// Hand what a WebSocket session accepted to the core: the session itself, then its
/// commands.
///
/// A session joins the core (live delivery, presence) with its first `hello` or chat
/// command, not at authentication: a `hello` with `resume` then starts live delivery
/// and its replay together, so no live message can overtake the replay.
pub(super) fn forward_ws_requests(
    shard: &Shard,
    conn: &mut WsConnection,
    id: u64,
    opened: &mut bool,
    now: Now,
) {
    let requests = conn.take_requests();
    if !*opened && requests.is_empty() && !conn.said_hello() {
        return;
    }
    let Some(identity) = conn.identity() else {
        return;
    };
    let opening = !std::mem::replace(opened, true);
    shard.to_core(id, opening, identity, requests, now);
}
