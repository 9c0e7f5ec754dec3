//! One io_uring for client sockets: accepted sockets go straight into the ring's fixed
//! file table (direct descriptors, so they count against no process descriptor limit),
//! and multishot receives fill buffers from a ring of provided buffers, so a connection
//! that is not receiving right now pins no read buffer.
//!
//! A process may hold only as many descriptors as `RLIMIT_NOFILE`, and one ring's table
//! is capped by the same number: the socket engine uses as many rings as it needs.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

/// The buffer group every ring's provided buffers are registered as.
pub const BUFFER_GROUP: u16 = 0;

/// Sizes of one ring's resources (named settings, see docs/configuration.md).
#[derive(Debug, Clone, Copy)]
pub struct RingSizes {
    /// Submission queue entries; the completion queue is four times larger.
    pub entries: u32,
    /// Fixed-file slots, at most `RLIMIT_NOFILE`.
    pub files: u32,
    /// Provided receive buffers (a power of two, at most 32,768).
    pub recv_buffers: u16,
    pub recv_buffer_bytes: u32,
}

/// A completion, copied out of the ring so the caller may submit while handling it.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// The operation goes on (multishot) and will complete again.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// Why the kernel cannot run the socket engine.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|error| format!("io_uring_setup: {error}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("io_uring probe: {error}"))?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Close::CODE, "close"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::AsyncCancel::CODE, "async cancel"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} operation"));
        }
    }
    Ok(())
}

pub struct SocketRing {
    ring: IoUring,
    buffers: BufRing,
    files: u32,
    /// Fixed-file slots no accept targets and no socket holds, the lowest on top. An
    /// accept names the slot it fills, so a table never overflows (a connection accepted
    /// into a full table would be closed by the kernel), and a slot is free again only
    /// once the kernel confirmed its close.
    free_slots: Vec<u32>,
    /// Entries pushed since the last submit.
    queued: u32,
}

impl SocketRing {
    /// A ring whose completions also signal `eventfd`, so a runtime can sleep on it.
    pub fn new(sizes: RingSizes, eventfd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(sizes.entries.saturating_mul(4))
            .build(sizes.entries)?;
        ring.submitter().register_files_sparse(sizes.files)?;
        ring.submitter().register_eventfd(eventfd)?;
        let buffers = BufRing::new(&ring, sizes.recv_buffers, sizes.recv_buffer_bytes)?;
        Ok(Self {
            ring,
            buffers,
            files: sizes.files,
            free_slots: (0..sizes.files).rev().collect(),
            queued: 0,
        })
    }

    pub fn files(&self) -> u32 {
        self.files
    }

    /// A free slot for an accept to fill, now reserved.
    pub fn take_slot(&mut self) -> Option<u32> {
        self.free_slots.pop()
    }

    /// `slot` is empty again: its accept failed, or the kernel closed its socket.
    pub fn release_slot(&mut self, slot: u32) {
        debug_assert!(slot < self.files);
        self.free_slots.push(slot);
    }

    /// Slots reserved by an accept or holding a socket.
    pub fn slots_taken(&self) -> u32 {
        self.files - self.free_slots.len() as u32
    }

    /// Queue one entry; submits first when the submission queue is full.
    pub fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry the engine builds points at memory it keeps alive until
            // the entry's final completion (send buffers, the provided-buffer ring).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hand everything queued to the kernel in one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.queued == 0 && !self.ring.submission().cq_overflow() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // The completion queue is full: the caller reaps, then submits again.
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        self.queued = self.ring.submission().len() as u32;
        Ok(())
    }

    /// Move up to `limit` completions into `out`.
    pub fn reap(&mut self, limit: usize, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.extend(self.ring.completion().take(limit).map(|cqe| Completion {
            user_data: cqe.user_data(),
            result: cqe.result(),
            flags: cqe.flags(),
        }));
        out.len() - before
    }

    /// The bytes a receive put in provided buffer `id`, which is ours until
    /// [`recycle`](Self::recycle)d.
    pub fn received(&mut self, id: u16, len: usize) -> &[u8] {
        self.buffers.held += 1;
        self.buffers.get(id, len)
    }

    /// Give buffer `id` back to the kernel.
    pub fn recycle(&mut self, id: u16) {
        self.buffers.recycle(id);
    }

    /// Provided buffers the kernel has filled and the engine has not given back yet.
    pub fn buffers_held(&self) -> u32 {
        self.buffers.held
    }
}

/// A ring of provided buffers (IORING_REGISTER_PBUF_RING), in memory of our own.
struct BufRing {
    /// `count` entries, page-aligned as the kernel requires.
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    memory: Box<[u8]>,
    count: u16,
    buffer_bytes: u32,
    /// Our copy of the tail the kernel reads.
    tail: u16,
    held: u32,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, buffer_bytes: u32) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 1 << 15 || buffer_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{count} receive buffers of {buffer_bytes} bytes: the count must be a \
                     power of two up to 32768"
                ),
            ));
        }
        let entries_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (count >= 1).
        let entries = NonNull::new(unsafe { alloc_zeroed(entries_layout) }.cast())
            .ok_or_else(|| io::Error::other("cannot allocate the provided-buffer ring"))?;
        let memory = vec![0u8; usize::from(count) * buffer_bytes as usize].into_boxed_slice();
        let mut buffers = Self {
            entries,
            entries_layout,
            memory,
            count,
            buffer_bytes,
            tail: 0,
            held: u32::from(count),
        };
        for id in 0..count {
            buffers.recycle(id);
        }
        // SAFETY: the entries live as long as this BufRing, which the SocketRing drops
        // after the io_uring (field order), so the kernel never sees freed memory.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                count,
                BUFFER_GROUP,
                0,
            )?;
        }
        Ok(buffers)
    }

    fn get(&self, id: u16, len: usize) -> &[u8] {
        let start = usize::from(id) * self.buffer_bytes as usize;
        let len = len.min(self.buffer_bytes as usize);
        self.memory.get(start..start + len).unwrap_or(&[])
    }

    fn recycle(&mut self, id: u16) {
        if id >= self.count {
            return;
        }
        let index = usize::from(self.tail & (self.count - 1));
        let address = self.memory.as_ptr() as u64 + u64::from(id) * u64::from(self.buffer_bytes);
        // SAFETY: index < count, inside the allocation; the kernel reads only entries
        // before the tail, and this one is past it until the store below.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(index);
            entry.set_addr(address);
            entry.set_len(self.buffer_bytes);
            entry.set_bid(id);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays entry 0's reserved word, inside the allocation;
        // the kernel reads it with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.held = self.held.saturating_sub(1);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.entries.as_ptr().cast(), self.entries_layout) };
    }
}
