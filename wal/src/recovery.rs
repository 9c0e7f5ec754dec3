//! Reading a log directory on open: every segment scanned and checked, then a verdict.
//! `analyze` only reads (the `parley-wal verify` tool uses it); `repair` applies its
//! verdict by cutting a torn tail.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::WalError;
use crate::format::{Lsn, SEGMENT_HEADER};
use crate::scan::{has_any_record, scan_segment, SegmentEnd, SegmentScan};

pub const SEGMENT_SUFFIX: &str = ".seg";

/// A segment's file name: its first LSN, zero-padded so names sort in LSN order.
pub fn segment_name(first_lsn: Lsn) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// Segment files of `dir`, in LSN order.
pub fn list_segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, WalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| WalError::io("read directory", dir, e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("read directory", dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        if let Ok(first_lsn) = stem.parse::<Lsn>() {
            segments.push((first_lsn, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Scan progress, reported once per segment.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub segment: usize,
    pub segments: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A segment that stays, as recovery found it.
#[derive(Debug, Clone)]
pub struct GoodSegment {
    pub first_lsn: Lsn,
    pub path: PathBuf,
    /// The size its header records (see [`SegmentScan::segment_size`]).
    pub segment_size: u64,
    /// LSN after its last record.
    pub next_lsn: Lsn,
    /// Byte offset after its last record.
    pub end: u64,
    pub index: Vec<(Lsn, u64)>,
}

/// A tail to cut from `offset` of `path`: where the log ends after recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    /// Bytes of data cut: records of an incomplete batch and the non-zero bytes of the
    /// damaged tail (padding that was zero already is not counted).
    pub bytes: u64,
    /// Recovery zeroes `offset..zero_to`.
    pub zero_to: u64,
}

/// What a directory holds.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub segments: Vec<GoodSegment>,
    pub next_lsn: Lsn,
    pub max_epoch: u32,
    pub torn_tail: Option<TornTail>,
    /// Segments after the torn tail that hold no record (created just before a crash).
    pub removable: Vec<PathBuf>,
    pub bytes_total: u64,
}

/// Scan every segment of `dir` without changing anything.
pub fn analyze(dir: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Analysis, WalError> {
    let files = list_segments(dir)?;
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, path)| std::fs::metadata(path).map_or(0, |m| m.len()))
        .collect();
    let bytes_total = sizes.iter().sum();
    let mut analysis = Analysis {
        segments: Vec::new(),
        next_lsn: 1,
        max_epoch: 0,
        torn_tail: None,
        removable: Vec::new(),
        bytes_total,
    };
    let mut bytes_done = 0;
    for (i, (first_lsn, path)) in files.iter().enumerate() {
        let data = std::fs::read(path).map_err(|e| WalError::io("read", path, e))?;
        bytes_done += sizes[i];
        progress(Progress {
            segment: i + 1,
            segments: files.len(),
            bytes_done,
            bytes_total,
        });
        let later = &files[i + 1..];
        let log_ends_at = match analyze_segment(&mut analysis, path, *first_lsn, &data, later)? {
            SegmentVerdict::Good => continue,
            SegmentVerdict::Headerless => &files[i..],
            SegmentVerdict::TornTail => later,
        };
        let removable = log_ends_at.iter().map(|(_, p)| p.clone());
        analysis.removable.extend(removable);
        break;
    }
    Ok(analysis)
}

/// What one segment means for the log.
enum SegmentVerdict {
    /// Its records are kept whole; the log may go on in the next segment.
    Good,
    /// It has no valid header and nothing after it holds records: created just before a
    /// crash. It and every later segment go.
    Headerless,
    /// Its kept records end at a torn tail; every later segment goes.
    TornTail,
}

/// Add the segment at `path` (whose bytes are `data`) to `analysis`; `later` are the
/// segment files after it.
fn analyze_segment(
    analysis: &mut Analysis,
    path: &Path,
    first_lsn: Lsn,
    data: &[u8],
    later: &[(Lsn, PathBuf)],
) -> Result<SegmentVerdict, WalError> {
    let scan = match scan_segment(data, first_lsn) {
        Ok(scan) => scan,
        // A segment created just before a crash may lack its header; only at the end.
        Err(_) if !has_any_record(data) && !any_holds_records(later)? => {
            return Ok(SegmentVerdict::Headerless)
        }
        Err(error) => return Err(corruption(path, 0, format!("bad segment: {error:?}"))),
    };
    if !analysis.segments.is_empty() && scan.first_lsn != analysis.next_lsn {
        let detail = format!(
            "segment starts at LSN {}, but the previous one ends before LSN {}",
            scan.first_lsn, analysis.next_lsn
        );
        return Err(corruption(path, 0, detail));
    }
    let tail = damaged_tail(&scan).map_err(|offset| {
        let detail = "damaged record before a later flush";
        corruption(path, offset as u64, detail.to_string())
    })?;
    analysis.max_epoch = analysis.max_epoch.max(scan.last_epoch.unwrap_or(0));
    analysis.next_lsn = scan.next_lsn;
    analysis.segments.push(GoodSegment {
        first_lsn: scan.first_lsn,
        path: path.to_path_buf(),
        segment_size: scan.segment_size,
        next_lsn: scan.next_lsn,
        end: scan.committed_end as u64,
        index: scan.index.iter().map(|&(l, o)| (l, o as u64)).collect(),
    });
    let Some((stop, damaged_bytes)) = tail else {
        return Ok(SegmentVerdict::Good);
    };
    if any_holds_records(later)? {
        let detail = "damaged record followed by later segments";
        return Err(corruption(path, stop as u64, detail.to_string()));
    }
    analysis.torn_tail = Some(TornTail {
        path: path.to_path_buf(),
        offset: scan.committed_end as u64,
        bytes: (scan.incomplete_batch_bytes + damaged_bytes) as u64,
        zero_to: (stop + damaged_bytes) as u64,
    });
    Ok(SegmentVerdict::TornTail)
}

/// Where a scanned segment's tail must be cut: `Some((stop, damaged nonzero bytes))` for
/// damage or an incomplete batch at its end, `None` for a clean end, `Err(offset)` for
/// damage before a later flush (corruption).
fn damaged_tail(scan: &SegmentScan) -> Result<Option<(usize, usize)>, usize> {
    match scan.end {
        SegmentEnd::Corrupt { offset } => Err(offset),
        SegmentEnd::Stopped {
            offset,
            nonzero_bytes,
        } => Ok(Some((offset, nonzero_bytes))),
        SegmentEnd::Clean if scan.incomplete_batch_bytes > 0 => {
            Ok(Some((scan.committed_end + scan.incomplete_batch_bytes, 0)))
        }
        SegmentEnd::Clean => Ok(None),
    }
}

/// Whether any of these segment files holds a valid record.
fn any_holds_records(files: &[(Lsn, PathBuf)]) -> Result<bool, WalError> {
    for (_, path) in files {
        let data = std::fs::read(path).map_err(|e| WalError::io("read", path, e))?;
        if has_any_record(&data) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn corruption(path: &Path, offset: u64, detail: String) -> WalError {
    WalError::Corruption {
        path: path.to_path_buf(),
        offset,
        detail,
    }
}

/// Cut the torn tail (zero it, so the next flush cannot be mistaken for a later flush
/// after damage) and remove the empty segments after it.
pub fn repair(dir: &Path, analysis: &Analysis) -> Result<(), WalError> {
    if let Some(torn) = &analysis.torn_tail {
        let file = OpenOptions::new()
            .write(true)
            .open(&torn.path)
            .map_err(|e| WalError::io("open", &torn.path, e))?;
        let zeros = vec![0u8; (torn.zero_to - torn.offset) as usize];
        file.write_all_at(&zeros, torn.offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| WalError::io("cut torn tail of", &torn.path, e))?;
    }
    for path in &analysis.removable {
        std::fs::remove_file(path).map_err(|e| WalError::io("remove", path, e))?;
    }
    if analysis.torn_tail.is_some() || !analysis.removable.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io("fsync directory", dir, e))
}

/// Smallest offset records may start at in a segment.
pub const FIRST_RECORD_OFFSET: u64 = SEGMENT_HEADER as u64;
