//! New segments. A segment is first a spare: the file `next-segment.spare`, its blocks
//! allocated (fallocate), which the writer makes ahead of need. When the log rolls onto
//! it, it gets its header (the first LSN is known only then) and its name. Allocation is
//! where a full disk shows, so it is told apart from other failures here.
//!
//! The spare's name is not a segment's, so recovery passes over a spare a crash left;
//! the next allocation removes it and starts over.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::WalError;
use crate::format::{encode_segment_header, Lsn, SegmentHeader, SEGMENT_HEADER};
use crate::io::{AlignedBuf, LogIo};
use crate::read::SegmentIndex;
use crate::recovery::{segment_name, sync_dir};
use crate::space::{free_bytes, is_no_space};
use crate::writer::{open_write, ActiveSegment};

const SPARE_FILE: &str = "next-segment.spare";

/// Where a new segment goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewSegment {
    /// After the last one.
    Beside,
    /// In place of the last one, which holds no records (and so begins at the same LSN)
    /// but is too small for the next batch: it was made at an older, smaller size.
    Replacing,
}

/// Why a new segment could not be had.
#[derive(Debug)]
pub(crate) enum SegmentError {
    /// The disk or the quota has no room ([`WalError::NoSpace`]): nothing was
    /// acknowledged from the segment, so the attempt is made again later.
    NoSpace(WalError),
    /// Anything else: the log cannot go on.
    Failed(WalError),
}

impl From<SegmentError> for WalError {
    fn from(error: SegmentError) -> Self {
        match error {
            SegmentError::NoSpace(error) | SegmentError::Failed(error) => error,
        }
    }
}

/// `op` on `path` failed: no space, or a failure.
fn classify(dir: &Path, op: &'static str, path: &Path, error: std::io::Error) -> SegmentError {
    if is_no_space(&error) {
        SegmentError::NoSpace(WalError::NoSpace {
            op,
            path: path.to_path_buf(),
            source: std::sync::Arc::new(error),
            free_bytes: free_bytes(dir),
        })
    } else {
        SegmentError::Failed(WalError::io(op, path, error))
    }
}

/// A segment file allocated ahead of need, without a header yet.
pub(crate) struct Spare {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
}

/// Remove a spare an earlier run left (it holds no records: a segment is written only
/// once named).
pub(crate) fn discard_spare(dir: &Path) -> Result<(), WalError> {
    let path = dir.join(SPARE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(WalError::io("remove", path, error)),
    }
}

impl Spare {
    /// Create the spare in `dir` and allocate `size` bytes for it. On failure nothing is
    /// left behind: a partly allocated file would hold space the disk has too little of.
    pub(crate) fn allocate(
        dir: &Path,
        size: u64,
        direct: bool,
        io: &mut dyn LogIo,
    ) -> Result<Spare, SegmentError> {
        discard_spare(dir).map_err(SegmentError::Failed)?;
        let path = dir.join(SPARE_FILE);
        let made = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| ("create", error))
            .and_then(|_| open_write(&path, direct).map_err(|error| ("open", error)))
            .and_then(|(file, direct)| match io.allocate(&file, size) {
                Ok(()) => Ok((file, direct)),
                Err(error) => Err(("preallocate", error)),
            });
        match made {
            Ok((file, direct)) => Ok(Spare {
                file,
                path,
                size,
                direct,
            }),
            Err((op, error)) => {
                let _ = std::fs::remove_file(&path);
                Err(classify(dir, op, &path, error))
            }
        }
    }

    /// Make the spare the segment of `dir` that begins at `first_lsn`: its header written
    /// and durable, then its name (a new one `Beside` the last, or over the last when
    /// `Replacing`), then the directory synced. Returns it as the active segment, its
    /// index entry, and whether it is open for direct I/O.
    pub(crate) fn adopt(
        self,
        dir: &Path,
        first_lsn: Lsn,
        new: NewSegment,
        io: &mut dyn LogIo,
    ) -> Result<(ActiveSegment, SegmentIndex, bool), SegmentError> {
        let path = dir.join(segment_name(first_lsn));
        let header = SegmentHeader {
            first_lsn,
            segment_size: self.size,
        };
        let named = write_header(&self.file, &header, io)
            .map_err(|error| ("write header of", error))
            .and_then(|()| match new {
                // A link, not a rename: it never replaces a file of that name.
                NewSegment::Beside => std::fs::hard_link(&self.path, &path)
                    .map(|()| {
                        // The segment is named; a spare name left over goes at the next
                        // allocation.
                        let _ = std::fs::remove_file(&self.path);
                    })
                    .map_err(|error| ("link", error)),
                NewSegment::Replacing => {
                    std::fs::rename(&self.path, &path).map_err(|error| ("rename", error))
                }
            });
        if let Err((op, error)) = named {
            let _ = std::fs::remove_file(&self.path);
            return Err(classify(dir, op, &self.path, error));
        }
        // Once named, the segment is the log's: a failure to make the name durable is no
        // refusal to try again later.
        sync_dir(dir).map_err(SegmentError::Failed)?;
        let index =
            SegmentIndex::empty(first_lsn, &path, self.size).map_err(SegmentError::Failed)?;
        let active = ActiveSegment::new_empty(self.file, path, self.size);
        Ok((active, index, self.direct))
    }
}

/// Write `header` in the first block of `file` and make it durable.
fn write_header(file: &File, header: &SegmentHeader, io: &mut dyn LogIo) -> std::io::Result<()> {
    let mut block = AlignedBuf::new(SEGMENT_HEADER);
    let bytes = encode_segment_header(header);
    block.full_mut()[..bytes.len()].copy_from_slice(&bytes);
    block.commit(bytes.len());
    io.write_durable(file, 0, block.padded_blocks())
}

/// A new segment at once: allocated and adopted (the first of a new log, or a roll with no
/// spare ready).
pub(crate) fn create_segment(
    dir: &Path,
    first_lsn: Lsn,
    segment_size: u64,
    direct: bool,
    io: &mut dyn LogIo,
    new: NewSegment,
) -> Result<(ActiveSegment, SegmentIndex, bool), SegmentError> {
    Spare::allocate(dir, segment_size, direct, io)?.adopt(dir, first_lsn, new, io)
}
