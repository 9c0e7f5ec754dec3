//! One io_uring instance of the engine: its sparse fixed-file table (the sessions' direct
//! descriptors), its provided-buffer ring for multishot receives, and a backlog for
//! submissions that did not fit the submission queue. Also the probe that decides whether
//! the engine can run here at all.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

/// Submission queue entries per ring; more in one loop turn wait in the ring's backlog.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries per ring (the kernel keeps overflow beyond this, unlost).
const CQ_ENTRIES: u32 = 16384;
/// Provided receive buffers per ring, and their size. An idle session receives a few
/// dozen bytes at a time, and buffers go back to the ring as soon as their completion is
/// handled, so a small pool serves 20,000 sessions; running out only ends a multishot
/// receive (ENOBUFS), which is re-armed once buffers are back.
pub const BUFFERS: u16 = 256;
pub const BUFFER_BYTES: u32 = 2048;
/// The buffer group id of each ring's provided buffers (one group per ring).
pub const BUFFER_GROUP: u16 = 0;

/// The fixed-file table size of each ring: min(20,000, RLIMIT_NOFILE's soft limit), the
/// most the kernel lets one table hold here.
pub fn table_size() -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    soft.clamp(16, 20_000) as u32
}

/// Anonymous, page-aligned memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping; no file, no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// A provided-buffer ring: `BUFFERS` entries in page-aligned memory the kernel reads,
/// pointing into `BUFFERS` buffers of `BUFFER_BYTES`.
struct Buffers {
    entries: Mapping,
    data: Mapping,
    /// Our copy of the tail, published to the kernel by `publish`.
    tail: u16,
}

impl Buffers {
    fn new() -> io::Result<Buffers> {
        let entries = Mapping::new(usize::from(BUFFERS) * std::mem::size_of::<BufRingEntry>())?;
        let data = Mapping::new(usize::from(BUFFERS) * BUFFER_BYTES as usize)?;
        let mut buffers = Buffers {
            entries,
            data,
            tail: 0,
        };
        for bid in 0..BUFFERS {
            buffers.recycle(bid);
        }
        buffers.publish();
        Ok(buffers)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.entries.ptr.cast()
    }

    /// Give buffer `bid` back to the kernel (visible after `publish`).
    fn recycle(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: index < BUFFERS, inside the entries mapping; the kernel reads entries
        // only below the published tail, and this one is at or above it. The setters
        // leave the `resv` field (entry 0's is the tail) alone.
        unsafe {
            let entry = &mut *self.base().add(index);
            entry.set_addr(self.data.ptr as u64 + u64::from(bid) * u64::from(BUFFER_BYTES));
            entry.set_len(BUFFER_BYTES);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Let the kernel see every buffer recycled so far.
    fn publish(&self) {
        // SAFETY: the tail is the `resv` field of entry 0, a naturally aligned u16 in the
        // mapping, shared with the kernel: an atomic store with release ordering is the
        // documented way to update it.
        unsafe {
            let tail = BufRingEntry::tail(self.base()) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let bid = bid.min(BUFFERS - 1);
        let len = len.min(BUFFER_BYTES as usize);
        // SAFETY: inside the data mapping; the kernel wrote these bytes before posting the
        // completion that names `bid`, and it does not touch the buffer again until it is
        // recycled.
        unsafe {
            std::slice::from_raw_parts(
                self.data.ptr.add(usize::from(bid) * BUFFER_BYTES as usize),
                len,
            )
        }
    }
}

/// One ring with its fixed-file table and provided buffers.
pub struct Ring {
    // Dropped first: the kernel lets go of the buffers before they are unmapped.
    uring: IoUring,
    buffers: Option<Buffers>,
    /// Entries that did not fit the submission queue, submitted first next time.
    /// Submissions that did not fit, each a chain (one entry, or linked ones) that enters
    /// the submission queue whole: a chain split across two submits is two chains, and
    /// its second half runs unlinked (a connect before its bind).
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// Fixed-file slots holding a socket.
    pub slots: u32,
}

impl Ring {
    pub fn new(table: u32) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_submit_all()
            .build(SQ_ENTRIES)?;
        uring.submitter().register_files_sparse(table)?;
        let buffers = Buffers::new()?;
        // SAFETY: the entries mapping is page aligned and stays mapped until after the
        // ring is gone (field order, and `leak_buffers` when the kernel may still use it).
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                buffers.entries.ptr as u64,
                BUFFERS,
                BUFFER_GROUP,
                0,
            )?;
        }
        Ok(Ring {
            uring,
            buffers: Some(buffers),
            backlog: VecDeque::new(),
            slots: 0,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.uring.as_raw_fd()
    }

    /// Queue one submission; it reaches the kernel with the next `submit`.
    pub fn push(&mut self, entry: squeue::Entry) {
        self.push_chain(&[entry]);
    }

    /// Queue linked submissions (each but the last carries IO_LINK or IO_HARDLINK): all
    /// of them reach the kernel in the same submit.
    pub fn push_chain(&mut self, chain: &[squeue::Entry]) {
        // SAFETY: every entry this engine builds points only at memory that outlives
        // the operation (the engine's address table, a session's boxed send buffer kept
        // until its completion, a static option value) or at nothing. push_multiple
        // queues all of them or none.
        if self.backlog.is_empty()
            && unsafe { self.uring.submission().push_multiple(chain) }.is_ok()
        {
            return;
        }
        self.backlog.push_back(chain.to_vec());
    }

    /// Submit what is queued (one system call when it all fits). Errors that only mean
    /// "not now" leave the rest for the next turn.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            {
                let mut sq = self.uring.submission();
                while let Some(chain) = self.backlog.front() {
                    // SAFETY: as in `push_chain`.
                    if unsafe { sq.push_multiple(chain) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            let queued = self.uring.submission().len();
            let overflow = self.uring.submission().cq_overflow();
            if queued == 0 && !overflow {
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    return Ok(())
                }
                Err(error) => return Err(error),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
        }
    }

    /// Move every completion waiting in the queue to `into`.
    pub fn reap(&mut self, into: &mut Vec<cqueue::Entry>) {
        into.extend(self.uring.completion());
    }

    /// Chains of submissions still waiting in the backlog.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// The bytes a receive completion delivered in buffer `bid`.
    pub fn received(&self, bid: u16, len: usize) -> &[u8] {
        match &self.buffers {
            Some(buffers) => buffers.bytes(bid, len),
            None => &[],
        }
    }

    /// Hand buffer `bid` back (visible to the kernel after `publish_buffers`).
    pub fn recycle(&mut self, bid: u16) {
        if let Some(buffers) = &mut self.buffers {
            buffers.recycle(bid);
        }
    }

    pub fn publish_buffers(&self) {
        if let Some(buffers) = &self.buffers {
            buffers.publish();
        }
    }

    /// The ring is torn down with receives possibly still armed: keep the buffer memory
    /// mapped (the process is about to end) rather than let a late receive write into
    /// memory that may have been reused.
    pub fn leak_buffers(&mut self) {
        if let Some(buffers) = self.buffers.take() {
            std::mem::forget(buffers);
        }
    }

    /// Unregister the buffer ring (every receive has ended).
    pub fn release_buffers(&mut self) {
        let _ = self.uring.submitter().unregister_buf_ring(BUFFER_GROUP);
    }
}

/// Can this process run the engine: a ring, a sparse fixed-file table of `table_size()`,
/// a provided-buffer ring, and the socket, bind, connect, multishot receive, send, cancel
/// and close operations?
pub fn probe() -> Result<(), String> {
    let ring = Ring::new(table_size()).map_err(|error| format!("io_uring setup: {error}"))?;
    let mut probe = Probe::new();
    ring.uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("io_uring probe: {error}"))?;
    let needed = [
        ("socket", opcode::Socket::CODE),
        ("bind", opcode::Bind::CODE),
        ("connect", opcode::Connect::CODE),
        ("recv (multishot)", opcode::RecvMulti::CODE),
        ("send", opcode::Send::CODE),
        ("async cancel", opcode::AsyncCancel::CODE),
        ("close", opcode::Close::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, code)| !probe.is_supported(*code))
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("the kernel lacks io_uring {}", missing.join(", ")));
    }
    let mut ring = ring;
    ring.release_buffers();
    Ok(())
}
