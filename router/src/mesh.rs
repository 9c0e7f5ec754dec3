//! The shard mesh: a bounded single-producer single-consumer ring (rtrb) from every shard
//! to every other, and one doorbell per shard.
//!
//! A consumer whose inboxes are empty parks: it registers its waker, marks itself parked,
//! and checks the rings once more. A producer that has pushed a batch checks the
//! destination's parked mark and wakes it only then. So an idle shard uses no CPU, and a
//! busy one is never woken needlessly (one fenced load per batch). Both sides put a
//! SeqCst fence between their ring access and the parked mark (the eventcount pattern):
//! without it, a consumer could see an empty ring and park just as a producer, having
//! seen it not parked, pushes — and the entry would wait forever.
//!
//! A full ring is backpressure: `send` hands the entry back, `send_batch` takes only what
//! fits, and the caller stops reading from its socket. Nothing is dropped here.
//!
//! Wakers are plain `std::task::Waker`s, so this module names no runtime type.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use rtrb::{Consumer, Producer, RingBuffer};

/// One shard's wake-up: its waker and whether it is parked.
#[derive(Debug, Default)]
pub struct Doorbell {
    parked: AtomicBool,
    waker: AtomicWaker,
}

impl Doorbell {
    /// Wake the owner if it is parked. Call after publishing entries.
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

struct Outbox<T> {
    producer: Producer<T>,
    /// The destination's doorbell.
    doorbell: Arc<Doorbell>,
}

/// One shard's ends of the mesh: an outbox to every other shard, an inbox from every
/// other shard, and its own doorbell.
pub struct MeshEnds<T> {
    shard: usize,
    outboxes: Vec<Option<Outbox<T>>>,
    inboxes: Vec<Option<Consumer<T>>>,
    doorbell: Arc<Doorbell>,
    /// Where the next `receive` starts, so no inbox starves the others.
    next_inbox: usize,
}

/// Build a full mesh of `shards` shards with rings of `ring_capacity` entries; element
/// `k` goes to shard `k`.
pub fn mesh<T>(shards: usize, ring_capacity: usize) -> Vec<MeshEnds<T>> {
    assert!(ring_capacity > 0, "a ring holds at least one entry");
    let doorbells: Vec<Arc<Doorbell>> = (0..shards).map(|_| Arc::default()).collect();
    let mut ends: Vec<MeshEnds<T>> = (0..shards)
        .map(|shard| MeshEnds {
            shard,
            outboxes: (0..shards).map(|_| None).collect(),
            inboxes: (0..shards).map(|_| None).collect(),
            doorbell: doorbells[shard].clone(),
            next_inbox: 0,
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from == to {
                continue;
            }
            let (producer, consumer) = RingBuffer::new(ring_capacity);
            ends[from].outboxes[to] = Some(Outbox {
                producer,
                doorbell: doorbells[to].clone(),
            });
            ends[to].inboxes[from] = Some(consumer);
        }
    }
    ends
}

impl<T> MeshEnds<T> {
    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn shards(&self) -> usize {
        self.outboxes.len()
    }

    fn outbox(&mut self, to: usize) -> &mut Outbox<T> {
        assert!(
            to != self.shard,
            "shard {to} sends to itself through the mesh"
        );
        self.outboxes[to]
            .as_mut()
            .expect("every other shard has an outbox")
    }

    /// Free slots in the ring to `to`: check before taking more work from a socket.
    pub fn room(&self, to: usize) -> usize {
        self.outboxes[to].as_ref().map_or(0, |o| o.producer.slots())
    }

    /// Send one entry; a full ring hands it back.
    pub fn send(&mut self, to: usize, entry: T) -> Result<(), T> {
        let outbox = self.outbox(to);
        outbox
            .producer
            .push(entry)
            .map_err(|rtrb::PushError::Full(entry)| entry)?;
        outbox.doorbell.ring();
        Ok(())
    }

    /// Send as many entries from the front of `entries` as the ring to `to` has room for,
    /// as one batch (one index update, at most one wake-up). Returns how many were sent;
    /// the rest stay in `entries`.
    pub fn send_batch(&mut self, to: usize, entries: &mut VecDeque<T>) -> usize {
        let outbox = self.outbox(to);
        let n = entries.len().min(outbox.producer.slots());
        if n == 0 {
            return 0;
        }
        let chunk = outbox
            .producer
            .write_chunk_uninit(n)
            .expect("n is at most the free slots");
        let sent = chunk.fill_from_iter(entries.drain(..n));
        debug_assert_eq!(sent, n);
        outbox.doorbell.ring();
        sent
    }

    /// Take up to `max` entries from the inboxes, round-robin, handing each to `deliver`
    /// with the shard it came from. Returns how many were taken.
    pub fn receive(&mut self, max: usize, mut deliver: impl FnMut(usize, T)) -> usize {
        let shards = self.inboxes.len();
        let mut taken = 0;
        for step in 0..shards {
            let from = (self.next_inbox + step) % shards;
            let Some(inbox) = self.inboxes[from].as_mut() else {
                continue;
            };
            let n = inbox.slots().min(max - taken);
            if n == 0 {
                continue;
            }
            let chunk = inbox.read_chunk(n).expect("n is at most the filled slots");
            for entry in chunk {
                deliver(from, entry);
            }
            taken += n;
            if taken == max {
                self.next_inbox = (from + 1) % shards;
                break;
            }
        }
        taken
    }

    fn has_entries(&self) -> bool {
        self.inboxes.iter().flatten().any(|inbox| !inbox.is_empty())
    }

    /// Ready once any inbox holds an entry; until then the shard is parked.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_entries() {
            return Poll::Ready(());
        }
        self.doorbell.waker.register(cx.waker());
        self.doorbell.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_entries() {
            self.doorbell.parked.store(false, Ordering::Relaxed);
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A future for [`poll_ready`](Self::poll_ready).
    pub fn ready(&self) -> Ready<'_, T> {
        Ready { ends: self }
    }
}

/// Resolves once a shard's inbox holds an entry.
pub struct Ready<'a, T> {
    ends: &'a MeshEnds<T>,
}

impl<T> Future for Ready<'_, T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.ends.poll_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_arrive_in_order_and_a_full_ring_pushes_back() {
        let mut ends = mesh::<u32>(3, 4);
        let (mut a, mut rest) = (ends.remove(0), ends);
        for i in 0..4 {
            assert_eq!(a.send(1, i), Ok(()));
        }
        assert_eq!(a.room(1), 0);
        assert_eq!(a.send(1, 99), Err(99), "a full ring hands the entry back");
        let mut batch: VecDeque<u32> = (10..20).collect();
        assert_eq!(a.send_batch(2, &mut batch), 4);
        assert_eq!(batch.len(), 6, "what did not fit stays with the sender");
        let mut got = Vec::new();
        assert_eq!(rest[0].receive(10, |from, e| got.push((from, e))), 4);
        assert_eq!(got, vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(a.room(1), 4);
        let mut got = Vec::new();
        rest[1].receive(2, |_, e| got.push(e));
        rest[1].receive(10, |_, e| got.push(e));
        assert_eq!(got, vec![10, 11, 12, 13]);
    }

    #[test]
    fn receive_is_fair_across_inboxes() {
        let mut ends = mesh::<u32>(3, 16);
        for _ in 0..8 {
            ends[1].send(0, 1).unwrap();
            ends[2].send(0, 2).unwrap();
        }
        let mut got = Vec::new();
        ends[0].receive(8, |from, _| got.push(from));
        ends[0].receive(4, |from, _| got.push(from));
        // The second receive starts after the inbox the first one stopped at.
        assert!(got.contains(&2), "{got:?}");
    }
}
