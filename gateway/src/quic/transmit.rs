//! Datagrams waiting to leave a shard's QUIC socket: due now, or paced for later
//! (quiche's `send_info.at`). Runs of equal-size packets to one peer are joined into one
//! buffer the kernel splits (GSO, `UDP_SEGMENT`), when the socket supports it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// Most segments the kernel accepts in one GSO send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (a UDP datagram's payload limit).
const GSO_MAX_BYTES: usize = 65_000;

/// One datagram (or, with GSO, a run of equal-size datagrams) to send.
#[derive(Debug)]
pub struct Transmit {
    pub to: SocketAddr,
    /// When to send it (pacing).
    pub at: Instant,
    /// Size of each datagram in `data` but the last, for GSO; `data.len()` for one.
    pub segment: usize,
    pub data: Vec<u8>,
}

/// Paced datagrams, earliest first.
struct Paced(Instant, u64, Transmit);

impl PartialEq for Paced {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Paced {}
impl PartialOrd for Paced {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Paced {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

/// The datagrams of one endpoint not yet handed to the socket.
#[derive(Default)]
pub(super) struct Outbox {
    ready: VecDeque<Transmit>,
    paced: BinaryHeap<Reverse<Paced>>,
    /// Orders paced datagrams due at the same instant by when they were queued.
    paced_seq: u64,
}

impl Outbox {
    /// Queue a datagram: at once if due by `now`, else paced.
    pub(super) fn push(&mut self, transmit: Transmit, now: Instant) {
        if transmit.at > now {
            self.paced_seq += 1;
            self.paced
                .push(Reverse(Paced(transmit.at, self.paced_seq, transmit)));
        } else {
            self.ready.push_back(transmit);
        }
    }

    /// Everything quiche has to send for one connection, as transmits: equal-size packets to
    /// one peer are joined for GSO; a packet due later (pacing) waits in `paced`.
    pub(super) fn produce(
        &mut self,
        conn: &mut quiche::Connection,
        out: &mut [u8],
        gso: Option<usize>,
        now: Instant,
    ) {
        let mut batch: Option<Transmit> = None;
        loop {
            let (len, info) = match conn.send(out) {
                Ok(sent) => sent,
                Err(quiche::Error::Done) => break,
                Err(_) => {
                    let _closing = conn.close(false, 0x1, b"internal error");
                    break;
                }
            };
            let packet = &out[..len];
            if let Some(current) = batch.as_mut() {
                let joins = gso == Some(current.segment)
                    && current.to == info.to
                    && current.data.len() % current.segment == 0
                    && len <= current.segment
                    && current.data.len() / current.segment < GSO_MAX_SEGMENTS
                    && current.data.len() + len <= GSO_MAX_BYTES
                    && info.at <= current.at;
                if joins {
                    current.data.extend_from_slice(packet);
                    continue;
                }
            }
            if let Some(done) = batch.take() {
                self.push(done, now);
            }
            batch = Some(Transmit {
                to: info.to,
                at: info.at,
                segment: len,
                data: packet.to_vec(),
            });
        }
        if let Some(done) = batch {
            self.push(done, now);
        }
    }

    /// Datagrams due by `now`, in order.
    pub(super) fn take_due(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(Reverse(Paced(at, _, _))) = self.paced.peek() {
            if *at <= now {
                return self
                    .paced
                    .pop()
                    .map(|Reverse(Paced(_, _, transmit))| transmit);
            }
        }
        self.ready.pop_front()
    }

    /// Datagrams wait to be sent (now or paced).
    pub(super) fn has_output(&self) -> bool {
        !self.ready.is_empty() || !self.paced.is_empty()
    }

    /// A datagram is due by `now`.
    pub(super) fn has_due(&self, now: Instant) -> bool {
        !self.ready.is_empty() || self.next_paced().is_some_and(|at| at <= now)
    }

    /// When the next paced datagram is due, if any waits.
    pub(super) fn next_paced(&self) -> Option<Instant> {
        self.paced.peek().map(|Reverse(Paced(at, _, _))| *at)
    }
}
