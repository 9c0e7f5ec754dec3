//! WebSocket over glommio's readiness-based streams on regular descriptors: a task per
//! connection owns its socket and its [`WsConnection`], moves bytes between the two and
//! takes documents for its session from a mailbox. Reads go through one scratch buffer
//! per shard: a pending read pins no buffer, so an idle connection holds no read memory
//! of ours. The fallback engine (`socket_engine = "streams"`); io_uring's is
//! `uring_engine`.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use parley_router::clock::Now;

use super::deadline::DeadlineTimer;
use super::sessions::{forward_ws_requests, Admission, Mailbox};
use super::throttled::Throttled;
use super::Shard;
use crate::ws::WsConnection;

/// Bytes read from a socket in one go; one buffer per shard, shared by its connections.
pub(super) const SCRATCH_BYTES: usize = 64 * 1024;
/// Pause after an accept error such as EMFILE, so a full descriptor table is not a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Reads discarded per wake while lingering on close.
const LINGER_READS_PER_WAKE: usize = 16;

/// Accept until the shard drains (the caller drops this future then).
pub(super) async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener) {
    let mut accept_errors = Throttled::default();
    loop {
        match listener.accept().await {
            Ok(stream) => match shard.admit(false) {
                Admission::Session(id) => {
                    glommio::spawn_local(serve_connection(shard.clone(), stream, id)).detach();
                }
                Admission::Answer => {
                    glommio::spawn_local(refuse_connection(shard.clone(), stream)).detach();
                }
                // Dropped: closed at once.
                Admission::Close => drop(stream),
            },
            Err(error) => {
                if accept_errors.may_log() {
                    tracing::warn!(shard = shard.index, %error, "accept failed; backing off");
                }
                Timer::new(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Answer 503 and close like a session (the write bounded by the linger time too).
async fn refuse_connection(shard: Rc<Shard>, mut stream: TcpStream) {
    use futures::AsyncWriteExt;
    let answer = crate::ws::refusal(false);
    let write = Box::pin(stream.write_all(&answer));
    let deadline = Box::pin(Timer::new(shard.ws_limits.close_linger));
    let written = matches!(
        futures::future::select(write, deadline).await,
        futures::future::Either::Left((Ok(()), _))
    );
    if written {
        linger_close(&shard, &mut stream).await;
    }
    drop(stream);
    shard.refusal_closed();
}

/// What one wake-up of a connection task found.
enum Step {
    Progress,
    Done,
}

async fn serve_connection(shard: Rc<Shard>, mut stream: TcpStream, id: u64) {
    let _nodelay_is_an_optimisation = stream.set_nodelay(true);
    let session_id = format!("{}.{id}", shard.index);
    let mut conn = WsConnection::new(
        shard.ws_limits.clone(),
        shard.session_config.clone(),
        shard.metrics.clone(),
        session_id,
        Now::system(),
    );
    let mailbox = shard.new_mailbox(id, None);
    let mut task = ConnectionTask {
        id,
        timer: DeadlineTimer::default(),
        drained: false,
        opened: false,
        parked_in: None,
    };
    loop {
        let step = futures::future::poll_fn(|cx| {
            if mailbox.waker.borrow().is_none() {
                *mailbox.waker.borrow_mut() = Some(cx.waker().clone());
            }
            poll_connection(cx, &shard, &mut stream, &mut conn, &mailbox, &mut task)
        })
        .await;
        if let Step::Done = step {
            break;
        }
        glommio::yield_if_needed().await;
    }
    // The executor drops tasks still lingering when the shard stops.
    shard.end_session(id, &mut false, task.opened, Now::system());
    linger_close(&shard, &mut stream).await;
    drop(stream);
    shard.socket_closed();
}

/// A connection task's own bookkeeping.
struct ConnectionTask {
    id: u64,
    timer: DeadlineTimer,
    drained: bool,
    /// The core knows this session (it said hello or sent a chat command).
    opened: bool,
    /// The backpressure episode (`blocked_epoch`) this task's waker is parked in.
    parked_in: Option<u64>,
}

/// Close gracefully: send FIN, then read and discard until the peer's EOF or the linger
/// deadline. Closing a socket with unread input makes Linux send RST, which can destroy
/// the replies and close frame the peer has not read yet.
async fn linger_close(shard: &Shard, stream: &mut TcpStream) {
    if stream.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let mut deadline = Timer::new(shard.ws_limits.close_linger);
    futures::future::poll_fn(|cx| {
        if Pin::new(&mut deadline).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut scratch = shard.scratch.borrow_mut();
        // A bounded number of reads per wake, so a flooding peer cannot hog the shard.
        for _ in 0..LINGER_READS_PER_WAKE {
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

fn poll_connection(
    cx: &mut Context<'_>,
    shard: &Shard,
    stream: &mut TcpStream,
    conn: &mut WsConnection,
    mailbox: &Mailbox,
    task: &mut ConnectionTask,
) -> Poll<Step> {
    let now = Now::system();
    let mut progress = false;
    if shard.draining.get() && !task.drained {
        task.drained = true;
        conn.drain(now);
        progress = true;
    }
    if !mailbox.documents.borrow().is_empty() {
        let documents = std::mem::take(&mut *mailbox.documents.borrow_mut());
        conn.push_documents(now, documents.into_iter());
        progress = true;
    }
    while !conn.output().is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, conn.output()) {
            Poll::Ready(Ok(n)) if n > 0 => {
                conn.consume_output(n, now);
                progress = true;
            }
            Poll::Ready(_) => {
                conn.on_peer_gone();
                return Poll::Ready(Step::Done);
            }
            Poll::Pending => break,
        }
    }
    if conn.is_finished() && conn.output().is_empty() {
        return Poll::Ready(Step::Done);
    }
    // While the rings to other shards are full, this socket's data stays in the kernel.
    if conn.wants_input() && !shard.held_back(cx, &mut task.parked_in) {
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) if n > 0 => {
                conn.on_bytes(now, &scratch[..n]);
                drop(scratch);
                forward_ws_requests(shard, conn, task.id, &mut task.opened, now);
                return Poll::Ready(Step::Progress);
            }
            Poll::Ready(_) => {
                conn.on_peer_gone();
                return Poll::Ready(Step::Done);
            }
            Poll::Pending => {}
        }
    }
    if let Some(deadline) = conn.next_deadline() {
        if task.timer.poll_fired(cx, deadline, now.instant) {
            conn.on_tick(now);
            return Poll::Ready(Step::Progress);
        }
    }
    if progress {
        Poll::Ready(Step::Progress)
    } else {
        Poll::Pending
    }
}
