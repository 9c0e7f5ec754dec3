//! The log's I/O: block-aligned buffers, and the one operation the writer needs, "write
//! these blocks and make them durable", behind a trait so tests can inject faults.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::format::BLOCK;

/// A zero-initialised, block-aligned byte buffer of fixed capacity, for direct I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `capacity` is rounded up to whole blocks.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(BLOCK).div_ceil(BLOCK) * BLOCK;
        let layout = Layout::from_size_align(capacity, BLOCK).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// The used bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.full()[..self.len]
    }

    /// The whole capacity (bytes past `len` are zero unless written through `spare_mut`).
    fn full(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity initialised bytes (alloc_zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity) }
    }

    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `full`, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// Grow `len` by `n` bytes that the caller wrote past it.
    pub fn commit(&mut self, n: usize) {
        assert!(self.len + n <= self.capacity, "AlignedBuf overflow");
        self.len += n;
    }

    /// The used bytes padded with zeros to a whole number of blocks, for a direct write.
    /// Bytes between `len` and the block end are zeroed first: a reused buffer holds stale data.
    pub fn padded_blocks(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK) * BLOCK;
        let len = self.len;
        self.full_mut()[len..padded].fill(0);
        &self.full()[..padded]
    }

    /// Forget the contents (the bytes stay until overwritten; `padded_blocks` zeroes them).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BLOCK).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// The writer's I/O: make `buf` durable at `offset` of `file`.
pub trait LogIo: Send + 'static {
    /// Write all of `buf` at `offset`, then fdatasync. Ok only when both completed.
    fn write_durable(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// fdatasync alone (new segment headers, directory entries).
    fn sync(&mut self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    /// Allocate the first `size` bytes of a new segment file (where a full disk shows:
    /// ENOSPC or EDQUOT here is a refusal, not a failure; see `space`).
    fn allocate(&mut self, file: &File, size: u64) -> io::Result<()> {
        preallocate(file, size)
    }

    /// Which path this is, for the log line.
    fn name(&self) -> &'static str;
}

/// io_uring: the write and the fdatasync go in one submission, linked so the fsync runs
/// only after the write completed.
pub struct UringIo {
    ring: io_uring::IoUring,
}

impl UringIo {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ring: io_uring::IoUring::new(8)?,
        })
    }
}

impl UringIo {
    /// Submit a write of `rest` at `offset` linked to an fdatasync, and collect both
    /// completions: (the write's result, the fdatasync's result), raw as the kernel gave
    /// them. Returns only once neither operation is in flight, so `rest` may be reused.
    fn write_then_sync(
        &mut self,
        fd: io_uring::types::Fd,
        rest: &[u8],
        offset: u64,
    ) -> io::Result<(i32, i32)> {
        use io_uring::{opcode, squeue, types};
        let write = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
            .offset(offset)
            .build()
            .user_data(WRITE)
            .flags(squeue::Flags::IO_LINK);
        let fsync = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(FSYNC);
        // SAFETY: `rest` outlives the submission: both completions are collected below
        // before this function returns.
        unsafe {
            let mut queue = self.ring.submission();
            queue
                .push(&write)
                .map_err(|_| io::Error::other("submission queue full"))?;
            queue
                .push(&fsync)
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        self.collect_write_and_sync()
    }

    /// Wait for the completions of the linked write and fdatasync. A signal can end a wait
    /// early (EINTR, or a return with only the write's completion), so wait again for
    /// what is missing.
    fn collect_write_and_sync(&mut self) -> io::Result<(i32, i32)> {
        let mut write_result = None;
        let mut fsync_result = None;
        while write_result.is_none() || fsync_result.is_none() {
            let missing = usize::from(write_result.is_none()) + usize::from(fsync_result.is_none());
            match self.ring.submit_and_wait(missing) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    WRITE => write_result = Some(cqe.result()),
                    _ => fsync_result = Some(cqe.result()),
                }
            }
        }
        match (write_result, fsync_result) {
            (Some(write), Some(fsync)) => Ok((write, fsync)),
            _ => Err(io::Error::other("io_uring lost a completion")),
        }
    }
}

/// `user_data` of the write and of the fdatasync linked behind it.
const WRITE: u64 = 1;
const FSYNC: u64 = 2;

impl LogIo for UringIo {
    fn write_durable(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        let fd = io_uring::types::Fd(file.as_raw_fd());
        let mut written = 0usize;
        let mut transient_retries = 0u32;
        // A short write is legal; finish it before the fsync is linked behind it.
        while written < buf.len() {
            let (write_result, fsync_result) =
                self.write_then_sync(fd, &buf[written..], offset + written as u64)?;
            let retry = is_transient(write_result) || write_result == -libc::ECANCELED;
            if retry && transient_retries < MAX_TRANSIENT_RETRIES {
                // Nothing was written and the linked fsync was cancelled: submit again.
                // ECANCELED too: this ring never cancels a write, so the kernel gave it up
                // unstarted (io-wq could not start a worker while a signal was pending).
                // Writing the same bytes at the same offset again is harmless.
                transient_retries += 1;
                continue;
            }
            written += bytes_written(write_result)?;
            // A short write cancels the linked fsync (-ECANCELED); loop to finish and sync.
            if written == buf.len() && fsync_result < 0 {
                // After a whole write, ECANCELED is the kernel's too (see above).
                if is_transient(fsync_result) || fsync_result == -libc::ECANCELED {
                    // The data is written; only the flush was interrupted. Flush again.
                    return sync_retrying(file);
                }
                return Err(io::Error::from_raw_os_error(-fsync_result));
            }
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

/// The bytes a write's completion reports, or its error (a write of nothing is one).
fn bytes_written(completion: i32) -> io::Result<usize> {
    match completion {
        error if error < 0 => Err(io::Error::from_raw_os_error(-error)),
        0 => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "write wrote nothing",
        )),
        written => Ok(written as usize),
    }
}

/// How many times one durable write resubmits after an interrupted (EINTR), would-block
/// (EAGAIN) or kernel-cancelled (ECANCELED) completion before it reports the error: a signal storm must not fail the log,
/// but a device that only ever answers EAGAIN must not spin it forever either.
const MAX_TRANSIENT_RETRIES: u32 = 64;

fn is_transient(completion: i32) -> bool {
    completion == -libc::EINTR || completion == -libc::EAGAIN
}

/// fdatasync, repeated while a signal interrupts it (bounded like the ring's retries).
fn sync_retrying(file: &File) -> io::Result<()> {
    let mut attempts = 0;
    loop {
        match file.sync_data() {
            Err(error)
                if error.kind() == io::ErrorKind::Interrupted
                    && attempts < MAX_TRANSIENT_RETRIES =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

/// Reserve `size` bytes of blocks for `file` (fallocate), so that writes into them need
/// no allocation; a filesystem without fallocate gets a sparse file of that size.
pub fn preallocate(file: &File, size: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor we own.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(size);
    }
    Err(error)
}

/// pwrite + fdatasync: the fallback where io_uring is unavailable.
pub struct SyncIo;

impl LogIo for SyncIo {
    fn write_durable(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        file.write_all_at(buf, offset)?;
        sync_retrying(file)
    }

    fn name(&self) -> &'static str {
        "pwrite+fdatasync"
    }
}

/// Which operation a [`FaultyIo`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write itself fails (ENOSPC, as a write into allocated space could in theory:
    /// unlike a failed allocation, that poisons the log).
    Write,
    /// The write succeeds and the fdatasync fails (EIO).
    Sync,
}

/// Fault injection: the `fail_at`-th durable write (counting from 1) and every one after
/// it fail, the way a full or failing disk does.
pub struct FaultyIo<I> {
    inner: I,
    fail_at: u64,
    fault: Fault,
    calls: u64,
}

impl<I: LogIo> FaultyIo<I> {
    pub fn new(inner: I, fail_at: u64, fault: Fault) -> Self {
        Self {
            inner,
            fail_at,
            fault,
            calls: 0,
        }
    }
}

impl<I: LogIo> LogIo for FaultyIo<I> {
    fn write_durable(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.calls += 1;
        if self.calls < self.fail_at {
            return self.inner.write_durable(file, offset, buf);
        }
        match self.fault {
            Fault::Write => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Fault::Sync => {
                // The bytes may reach the disk; only the durability promise fails.
                file.write_all_at(buf, offset)?;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }

    fn sync(&mut self, file: &File) -> io::Result<()> {
        self.inner.sync(file)
    }

    fn allocate(&mut self, file: &File, size: u64) -> io::Result<()> {
        self.inner.allocate(file, size)
    }

    fn name(&self) -> &'static str {
        "fault-injecting"
    }
}

/// Fault injection of a full disk: while its switch is on, allocating a segment fails
/// with ENOSPC; writes into space already allocated succeed, as they do on a real disk.
pub struct FullDiskIo<I> {
    inner: I,
    full: Arc<AtomicBool>,
}

impl<I: LogIo> FullDiskIo<I> {
    /// The I/O layer and its switch (true: the disk is full).
    pub fn new(inner: I) -> (Self, Arc<AtomicBool>) {
        let full = Arc::new(AtomicBool::new(false));
        let io = Self {
            inner,
            full: full.clone(),
        };
        (io, full)
    }
}

impl<I: LogIo> LogIo for FullDiskIo<I> {
    fn write_durable(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_durable(file, offset, buf)
    }

    fn sync(&mut self, file: &File) -> io::Result<()> {
        self.inner.sync(file)
    }

    fn allocate(&mut self, file: &File, size: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.allocate(file, size)
    }

    fn name(&self) -> &'static str {
        "full-disk-injecting"
    }
}
