//! The shard's QUIC I/O: one SO_REUSEPORT UDP socket per shard, driving the sans-IO
//! [`QuicEndpoint`] with three tasks:
//!
//! - **receive**: reads datagrams; a packet whose connection id names another shard goes
//!   to that shard over the forwarding ring, the rest to the endpoint;
//! - **drive**: forwarded packets, the core's documents for QUIC sessions, timers, the
//!   drain and backpressure's end;
//! - **send**: writes the endpoint's datagrams, each no earlier than quiche's pacing time.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::Future;
use glommio::net::UdpSocket;
use glommio::timer::Timer;
use parley_router::clock::Now;
use parley_router::mesh::MeshEnds;

use super::deadline::DeadlineTimer;
use super::sessions::MailNotice;
use super::throttled::Throttled;
use super::Shard;
use crate::metrics::inc;
use crate::quic::cert::TlsFiles;
use crate::quic::{QuicEndpoint, QuicKeys, QuicSettings, Route, SessionUpdate};

/// Largest datagram read (a GSO-less peer never sends more than its path MTU).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Forwarded datagrams taken per turn, so one busy peer shard cannot starve the others.
const FORWARDED_PER_TURN: usize = 1024;
/// Pause after a receive error, so a persistent one is not a busy loop.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(1);

/// A datagram another shard received for a connection this shard owns.
#[derive(Debug)]
pub struct ForwardedDatagram {
    pub from: SocketAddr,
    pub packet: Box<[u8]>,
}

/// What a shard needs to serve QUIC.
pub struct QuicPlan {
    pub socket: OwnedFd,
    pub local: SocketAddr,
    pub settings: QuicSettings,
    pub tls: TlsFiles,
    pub keys: QuicKeys,
    /// The socket takes UDP_SEGMENT sends of `settings.max_udp_payload_bytes` segments.
    pub gso: bool,
    pub mesh: MeshEnds<ForwardedDatagram>,
}

pub(super) struct QuicShard {
    endpoint: RefCell<QuicEndpoint>,
    socket: UdpSocket,
    mesh: RefCell<MeshEnds<ForwardedDatagram>>,
    notice: Rc<MailNotice>,
    sender_waker: RefCell<Option<Waker>>,
    /// Woken when the sender runs out of datagrams (the drain waits for that).
    sent_waker: RefCell<Option<Waker>>,
    /// The instant the driver's timer is armed for: a turn of another task that makes an
    /// earlier timer due wakes the driver to re-arm.
    timer_armed: Cell<Option<Instant>>,
}

impl QuicShard {
    /// The shard drains: the driver closes every QUIC session.
    pub(super) fn wake_for_drain(&self) {
        self.notice.wake();
    }

    /// Resolves once no datagram waits to be sent.
    pub(super) async fn output_sent(&self) {
        futures::future::poll_fn(|cx| {
            if self.endpoint.borrow().has_output() {
                *self.sent_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// Build the endpoint and start the shard's QUIC tasks.
pub(super) fn spawn(shard: &Rc<Shard>, plan: QuicPlan) -> Result<(), String> {
    let config = crate::quic::server_config(&plan.settings, &plan.tls, &plan.keys)
        .map_err(|error| format!("QUIC TLS configuration: {error}"))?;
    let endpoint = QuicEndpoint::new(
        shard.index,
        plan.mesh.shards(),
        plan.local,
        config,
        plan.settings,
        shard.session_config.clone(),
        shard.metrics.clone(),
        &plan.keys,
        plan.gso,
    );
    // SAFETY: main created this UDP socket for this shard alone and gave up its fd.
    let socket = unsafe { UdpSocket::from_raw_fd(plan.socket.into_raw_fd()) };
    let quic = Rc::new(QuicShard {
        endpoint: RefCell::new(endpoint),
        socket,
        mesh: RefCell::new(plan.mesh),
        notice: Rc::new(MailNotice::default()),
        sender_waker: RefCell::new(None),
        sent_waker: RefCell::new(None),
        timer_armed: Cell::new(None),
    });
    *shard.quic.borrow_mut() = Some(quic.clone());
    glommio::spawn_local(receive(shard.clone(), quic.clone())).detach();
    glommio::spawn_local(drive(shard.clone(), quic.clone())).detach();
    glommio::spawn_local(send(shard.clone(), quic)).detach();
    Ok(())
}

async fn receive(shard: Rc<Shard>, quic: Rc<QuicShard>) {
    let mut buffer = vec![0u8; RECV_BUFFER_BYTES];
    let mut errors = Throttled::default();
    loop {
        let received = quic.socket.recv_from(&mut buffer).await;
        let (len, from) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors surface on UDP reads; none ends the listener.
                if errors.may_log() {
                    tracing::warn!(shard = shard.index, %error, "QUIC receive failed");
                }
                Timer::new(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let packet = &mut buffer[..len];
        let now = Now::system();
        let route = quic.endpoint.borrow().route(packet);
        match route {
            Route::Local => {
                let may_read = !shard.backpressure.get();
                quic.endpoint
                    .borrow_mut()
                    .on_datagram(now, packet, from, may_read);
            }
            Route::Forward(owner) => {
                let forwarded = ForwardedDatagram {
                    from,
                    packet: packet.to_vec().into_boxed_slice(),
                };
                // A full ring drops the datagram; QUIC's loss recovery resends it.
                match quic.mesh.borrow_mut().send(owner, forwarded) {
                    Ok(()) => inc(&shard.metrics.quic_forwarded),
                    Err(_) => inc(&shard.metrics.quic_dropped),
                }
            }
            Route::Drop => inc(&shard.metrics.quic_dropped),
        }
        finish_turn(&shard, &quic, now);
        glommio::yield_if_needed().await;
    }
}

/// The driver's bookkeeping between wake-ups.
struct Driver {
    timer: DeadlineTimer,
    drained: bool,
    /// The backpressure episode whose end this task waits for.
    parked_in: Option<u64>,
}

async fn drive(shard: Rc<Shard>, quic: Rc<QuicShard>) {
    let mut driver = Driver {
        timer: DeadlineTimer::default(),
        drained: false,
        parked_in: None,
    };
    futures::future::poll_fn(|cx| {
        let registered = quic
            .notice
            .waker
            .borrow()
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !registered {
            *quic.notice.waker.borrow_mut() = Some(cx.waker().clone());
        }
        poll_drive(cx, &shard, &quic, &mut driver)
    })
    .await
}

fn poll_drive(
    cx: &mut Context<'_>,
    shard: &Shard,
    quic: &QuicShard,
    driver: &mut Driver,
) -> Poll<()> {
    let now = Now::system();
    let may_read = !shard.backpressure.get();
    let mut progress = false;
    {
        let mut endpoint = quic.endpoint.borrow_mut();
        let taken = quic
            .mesh
            .borrow_mut()
            .receive(FORWARDED_PER_TURN, |_, mut forwarded| {
                endpoint.on_datagram(now, &mut forwarded.packet, forwarded.from, may_read)
            });
        progress |= taken > 0;
        let mail = std::mem::take(&mut *quic.notice.pending.borrow_mut());
        let connections = shard.connections.borrow();
        for id in mail {
            if let Some(mailbox) = connections.get(&id) {
                let documents = std::mem::take(&mut *mailbox.documents.borrow_mut());
                endpoint.push_documents(now, id, documents.into_iter());
            }
        }
        drop(connections);
        if shard.draining.get() && !driver.drained {
            driver.drained = true;
            endpoint.drain(now);
        }
        // Backpressure: wait for its end, then read what was left unread.
        if !shard.held_back(cx, &mut driver.parked_in) && driver.parked_in.take().is_some() {
            endpoint.resume_reading(now);
        }
        endpoint.on_timers(now);
    }
    finish_turn(shard, quic, now);

    let next = quic.endpoint.borrow().next_timer();
    quic.timer_armed.set(next);
    match next {
        Some(deadline) => progress |= driver.timer.poll_fired(cx, deadline, now.instant),
        None => driver.timer.disarm(),
    }
    if progress || quic.mesh.borrow().poll_ready(cx).is_ready() {
        cx.waker().wake_by_ref();
    }
    Poll::Pending
}

/// Produce the endpoint's datagrams, tell the core what the sessions did, wake the sender.
fn finish_turn(shard: &Shard, quic: &QuicShard, now: Now) {
    let mut endpoint = quic.endpoint.borrow_mut();
    endpoint.flush(now);
    let mut kicked = false;
    for update in endpoint.take_updates() {
        kicked = true;
        match update {
            SessionUpdate::Chat {
                id,
                first,
                user,
                device,
                requests,
            } => {
                if first {
                    shard.new_mailbox(id, Some((id, quic.notice.clone())));
                }
                shard.to_core(id, first, (&user, &device), requests, now);
            }
            SessionUpdate::Closed { id, opened } => {
                // The endpoint reports each session's end once.
                shard.end_session(id, &mut false, opened, now);
            }
        }
    }
    let has_output = endpoint.has_output();
    let next_timer = endpoint.next_timer();
    drop(endpoint);
    if next_timer.is_some_and(|at| quic.timer_armed.get().is_none_or(|armed| at < armed)) {
        quic.notice.wake();
    }
    if kicked {
        shard.kick();
    }
    if has_output {
        if let Some(waker) = quic.sender_waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

async fn send(shard: Rc<Shard>, quic: Rc<QuicShard>) {
    let mut errors = Throttled::default();
    let mut pacing: Option<(Instant, Timer)> = None;
    loop {
        let due = quic.endpoint.borrow_mut().take_due(Instant::now());
        if let Some(transmit) = due {
            if let Err(error) = quic.socket.send_to(&transmit.data, transmit.to).await {
                // A full socket buffer or an unreachable peer: the datagram is lost, and
                // QUIC's loss recovery resends what mattered.
                inc(&shard.metrics.quic_dropped);
                if errors.may_log() {
                    tracing::debug!(shard = shard.index, %error, to = %transmit.to, "QUIC send failed");
                }
            }
            glommio::yield_if_needed().await;
            continue;
        }
        if let Some(waker) = quic.sent_waker.borrow_mut().take() {
            if !quic.endpoint.borrow().has_output() {
                waker.wake();
            }
        }
        futures::future::poll_fn(|cx| {
            *quic.sender_waker.borrow_mut() = Some(cx.waker().clone());
            let endpoint = quic.endpoint.borrow();
            if endpoint.has_due(Instant::now()) {
                return Poll::Ready(());
            }
            let Some(at) = endpoint.next_paced() else {
                pacing = None;
                return Poll::Pending;
            };
            if pacing.as_ref().is_none_or(|(armed, _)| *armed != at) {
                pacing = Some((at, Timer::new(at.saturating_duration_since(Instant::now()))));
            }
            let fired = pacing
                .as_mut()
                .is_some_and(|(_, timer)| Pin::new(timer).poll(cx).is_ready());
            if fired {
                pacing = None;
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}
