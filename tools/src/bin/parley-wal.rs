//! `parley-wal`: inspect a write-ahead log directory, and benchmark the log.
//!
//! `dump`, `verify` and `stat` only read: they use recovery's analysis (the verdict
//! `Wal::open` would reach) and read segment files directly, so they never cut a torn tail
//! or remove a file. On a log a live process is writing they may see its in-flight flush
//! as a torn tail. `bench` writes a fresh log of its own.
//!
//! Exit codes (every subcommand):
//! - 0: ok;
//! - 1: torn tail: the end of the log holds bytes from an unacknowledged flush (or empty
//!   segments created just before a crash) that opening the log would cut;
//! - 2: corruption: damage before later durable records; the log would refuse to open;
//! - 3: usage or I/O error (a missing directory, an unreadable file, a bad flag).

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use parley_wal::format::SEGMENT_HEADER;
use parley_wal::recovery::{analyze, list_segments, Analysis, Progress};
use parley_wal::scan::{records_from, scan_segment, SegmentEnd};
use parley_wal::{Lsn, Wal, WalError, WalOptions};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_OK: u8 = 0;
const EXIT_TORN: u8 = 1;
const EXIT_CORRUPT: u8 = 2;
const EXIT_ERROR: u8 = 3;

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 torn tail (opening the log would cut it), \
2 corruption (the log would refuse to open), 3 usage or I/O error.";

#[derive(Parser)]
#[command(
    name = "parley-wal",
    version,
    about = "Inspect (read-only) and benchmark Parley's write-ahead log",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the records recovery would keep (up to a torn tail or corruption), one a line.
    ///
    /// Human-readable: lsn, epoch, type, timestamp, payload length and an escaped preview
    /// of the payload. With --json, one JSON object a line:
    /// {"lsn","epoch","type","timestamp","len","payload"}, the payload in standard base64
    /// (RFC 4648, padded). A verdict other than ok goes to stderr, and sets the exit code
    /// as `verify` would.
    #[command(after_help = EXIT_CODES)]
    Dump {
        /// The log directory (a shard's WAL directory).
        dir: PathBuf,
        /// First LSN to print.
        #[arg(long)]
        from: Option<Lsn>,
        /// Last LSN to print (inclusive).
        #[arg(long)]
        to: Option<Lsn>,
        /// JSON lines, payload in base64.
        #[arg(long)]
        json: bool,
    },
    /// Check every record's checksum and print a one-line verdict: ok, torn tail, or
    /// corruption (file, offset, detail).
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The log directory.
        dir: PathBuf,
    },
    /// Segments (name, first and last LSN, bytes), the LSN range, total bytes and epoch.
    #[command(after_help = EXIT_CODES)]
    Stat {
        /// The log directory.
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Append to a fresh log and report throughput and durable-acknowledgement latency.
    #[command(after_help = EXIT_CODES)]
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Directory to run in: the log goes to a new subdirectory, removed afterwards.
    #[arg(long)]
    dir: PathBuf,
    /// Payload bytes per record (suffixes K, M: binary).
    #[arg(long, default_value = "100", value_parser = parse_size)]
    record_size: u64,
    /// Concurrent appender threads.
    #[arg(long, default_value_t = 1)]
    appenders: usize,
    /// Threads carrying the appenders (default: one per appender). Fewer threads than
    /// appenders multiplex them, as a shard's event loop would: each thread keeps one
    /// record in flight per appender it carries. Not with --pipelined.
    #[arg(long)]
    threads: Option<usize>,
    /// How long to append (90s, 500ms, 2m). Default 5s, unless --records is given.
    #[arg(long, value_parser = parse_bench_duration)]
    duration: Option<Duration>,
    /// Stop after this many records in all (split over the appenders).
    #[arg(long)]
    records: Option<u64>,
    /// Largest flush (WalOptions::max_batch_bytes; suffixes K, M, G).
    #[arg(long, value_parser = parse_size)]
    max_batch_bytes: Option<u64>,
    /// Segment file size (WalOptions::segment_size; suffixes K, M, G).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Append without waiting per record (wait for the last one only): peak throughput.
    /// Latency is then sampled (every 16th record) and observed when the appender next
    /// looks, so it is an upper bound.
    #[arg(long)]
    pipelined: bool,
    /// Buffered I/O instead of O_DIRECT (still one fdatasync per flush).
    #[arg(long)]
    buffered: bool,
    /// Keep the log directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_ERROR),
            };
        }
    };
    let result = match cli.command {
        Command::Dump {
            dir,
            from,
            to,
            json,
        } => dump(&dir, from, to, json),
        Command::Verify { dir } => verify(&dir),
        Command::Stat { dir, json } => stat(&dir, json),
        Command::Bench(args) => bench(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("parley-wal: error: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// What recovery would conclude about a directory.
enum Verdict {
    Ok(Analysis),
    /// `Wal::open` would cut a torn tail and/or remove empty trailing segments.
    Torn(Analysis),
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
}

impl Verdict {
    fn exit_code(&self) -> u8 {
        match self {
            Verdict::Ok(_) => EXIT_OK,
            Verdict::Torn(_) => EXIT_TORN,
            Verdict::Corrupt { .. } => EXIT_CORRUPT,
        }
    }

    fn analysis(&self) -> Option<&Analysis> {
        match self {
            Verdict::Ok(a) | Verdict::Torn(a) => Some(a),
            Verdict::Corrupt { .. } => None,
        }
    }

    /// The one-line verdict.
    fn line(&self) -> String {
        match self {
            Verdict::Ok(a) => format!(
                "ok: {} segment{}, {}, {} bytes",
                a.segments.len(),
                plural(a.segments.len()),
                lsn_range(a),
                a.bytes_total
            ),
            Verdict::Torn(a) => {
                let mut line = String::from("torn tail: ");
                if let Some(torn) = &a.torn_tail {
                    line += &format!(
                        "{} at offset {}, {} bytes to cut (recovery zeroes offsets {}..{})",
                        torn.path.display(),
                        torn.offset,
                        torn.bytes,
                        torn.offset,
                        torn.zero_to
                    );
                }
                if !a.removable.is_empty() {
                    if a.torn_tail.is_some() {
                        line += "; ";
                    }
                    let names: Vec<String> = a
                        .removable
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    line += &format!("empty segments to remove: {}", names.join(", "));
                }
                line + &format!("; the log keeps {}", lsn_range(a))
            }
            Verdict::Corrupt {
                path,
                offset,
                detail,
            } => format!(
                "corruption: {} at offset {offset}: {detail}",
                path.display()
            ),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Verdict::Ok(_) => json!({ "verdict": "ok" }),
            Verdict::Torn(a) => json!({
                "verdict": "torn_tail",
                "torn_tail": a.torn_tail.as_ref().map(|t| json!({
                    "path": t.path.display().to_string(),
                    "offset": t.offset,
                    "bytes": t.bytes,
                    "zero_to": t.zero_to,
                })),
                "removable": a.removable.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            }),
            Verdict::Corrupt {
                path,
                offset,
                detail,
            } => json!({
                "verdict": "corruption",
                "path": path.display().to_string(),
                "offset": offset,
                "detail": detail,
            }),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn first_lsn(a: &Analysis) -> Option<Lsn> {
    a.segments
        .iter()
        .find(|s| s.next_lsn > s.first_lsn)
        .map(|s| s.first_lsn)
}

fn lsn_range(a: &Analysis) -> String {
    match first_lsn(a) {
        Some(first) => {
            let last = a.next_lsn - 1;
            format!("LSN {first}..={last} ({} records)", last - first + 1)
        }
        None => "no records".into(),
    }
}

/// Scan `dir` read-only, reporting progress on stderr at most once a second.
fn inspect(dir: &Path, what: &str) -> Result<Verdict, String> {
    let started = Instant::now();
    let mut last_report = started;
    let mut progress = |p: Progress| {
        let now = Instant::now();
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            last_report = now;
            eprintln!(
                "parley-wal {what}: segment {}/{}, {:.0}/{:.0} MiB read, {:.1} s",
                p.segment,
                p.segments,
                mib(p.bytes_done),
                mib(p.bytes_total),
                started.elapsed().as_secs_f64()
            );
        }
    };
    if !dir.is_dir() {
        // analyze would say the same through read_dir; this names the problem plainly.
        return Err(format!("{}: no such directory", dir.display()));
    }
    match analyze(dir, &mut progress) {
        Ok(a) if a.torn_tail.is_some() || !a.removable.is_empty() => Ok(Verdict::Torn(a)),
        Ok(a) => Ok(Verdict::Ok(a)),
        Err(WalError::Corruption {
            path,
            offset,
            detail,
        }) => Ok(Verdict::Corrupt {
            path,
            offset,
            detail,
        }),
        Err(error) => Err(error.to_string()),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn verify(dir: &Path) -> Result<u8, String> {
    let verdict = inspect(dir, "verify")?;
    println!("{}", verdict.line());
    Ok(verdict.exit_code())
}

/// A segment's readable part: records from the header to `end`.
struct Readable {
    path: PathBuf,
    first_lsn: Lsn,
    next_lsn: Lsn,
    end: u64,
}

/// With corruption, analyze gives no segments: scan them again, in order, and keep what
/// verifies before the damage (whole batches, contiguous LSNs).
fn readable_before_corruption(dir: &Path) -> Result<Vec<Readable>, String> {
    let mut readable = Vec::new();
    let mut expected: Option<Lsn> = None;
    for (first_lsn, path) in list_segments(dir).map_err(|e| e.to_string())? {
        let data = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let Ok(scan) = scan_segment(&data, first_lsn) else {
            break;
        };
        if expected.is_some_and(|lsn| lsn != scan.first_lsn) {
            break;
        }
        expected = Some(scan.next_lsn);
        let whole = scan.end == SegmentEnd::Clean && scan.incomplete_batch_bytes == 0;
        readable.push(Readable {
            path,
            first_lsn: scan.first_lsn,
            next_lsn: scan.next_lsn,
            end: scan.committed_end as u64,
        });
        if !whole {
            break;
        }
    }
    Ok(readable)
}

fn read_prefix(path: &Path, len: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut data = Vec::with_capacity(len as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(len).read_to_end(&mut data))
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(data)
}

fn dump(dir: &Path, from: Option<Lsn>, to: Option<Lsn>, json: bool) -> Result<u8, String> {
    let verdict = inspect(dir, "dump")?;
    let segments = match verdict.analysis() {
        Some(a) => a
            .segments
            .iter()
            .map(|s| Readable {
                path: s.path.clone(),
                first_lsn: s.first_lsn,
                next_lsn: s.next_lsn,
                end: s.end,
            })
            .collect(),
        None => readable_before_corruption(dir)?,
    };
    let from = from.unwrap_or(0);
    let to = to.unwrap_or(Lsn::MAX);
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = (|| -> std::io::Result<()> {
        for segment in &segments {
            if segment.next_lsn <= from || segment.first_lsn > to {
                continue;
            }
            let data = read_prefix(&segment.path, segment.end).map_err(std::io::Error::other)?;
            for (_, header, payload) in records_from(&data, 0, SEGMENT_HEADER) {
                if header.lsn < from {
                    continue;
                }
                if header.lsn > to || header.lsn >= segment.next_lsn {
                    break;
                }
                if json {
                    let line = json!({
                        "lsn": header.lsn,
                        "epoch": header.epoch,
                        "type": header.record_type,
                        "timestamp": header.timestamp,
                        "len": payload.len(),
                        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "lsn={} epoch={} type={} ts={} len={} payload=\"{}\"{}",
                        header.lsn,
                        header.epoch,
                        header.record_type,
                        header.timestamp,
                        payload.len(),
                        preview(payload),
                        if payload.len() > PREVIEW { "..." } else { "" }
                    )?;
                }
            }
        }
        out.flush()
    })();
    match written {
        Ok(()) => {}
        // A reader that stopped early (| head) is not an error of the log.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(format!("write: {e}")),
    }
    if !matches!(verdict, Verdict::Ok(_)) {
        eprintln!("parley-wal dump: {}", verdict.line());
    }
    Ok(verdict.exit_code())
}

/// Payload bytes shown by a human-readable dump.
const PREVIEW: usize = 40;

fn preview(payload: &[u8]) -> String {
    payload[..payload.len().min(PREVIEW)]
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

fn read_number_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn stat(dir: &Path, json: bool) -> Result<u8, String> {
    let verdict = inspect(dir, "stat")?;
    let Some(a) = verdict.analysis() else {
        if json {
            println!("{}", verdict.json());
        } else {
            println!("{}", verdict.line());
        }
        return Ok(verdict.exit_code());
    };
    let file_size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let epoch_file = read_number_file(&dir.join("epoch"));
    let snapshot = read_number_file(&dir.join("snapshot"));
    let first = first_lsn(a);
    let last = first.map(|_| a.next_lsn - 1);
    let used: u64 = a.segments.iter().map(|s| s.end).sum();
    if json {
        let segments: Vec<_> = a
            .segments
            .iter()
            .map(|s| {
                json!({
                    "name": s.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "first_lsn": s.first_lsn,
                    "last_lsn": (s.next_lsn > s.first_lsn).then(|| s.next_lsn - 1),
                    "records": s.next_lsn - s.first_lsn,
                    "bytes": file_size(&s.path),
                    "used_bytes": s.end,
                })
            })
            .collect();
        let doc = json!({
            "dir": dir.display().to_string(),
            "segments": segments,
            "first_lsn": first,
            "last_lsn": last,
            "next_lsn": a.next_lsn,
            "records": first.map_or(0, |f| a.next_lsn - f),
            "bytes_total": a.bytes_total,
            "used_bytes": used,
            "max_record_epoch": a.max_epoch,
            "epoch_file": epoch_file,
            "snapshot_lsn": snapshot,
            "status": verdict.json(),
        });
        println!("{doc}");
        return Ok(verdict.exit_code());
    }
    println!("dir: {}", dir.display());
    println!("segments: {}", a.segments.len());
    for s in &a.segments {
        let name = s
            .path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let last = if s.next_lsn > s.first_lsn {
            (s.next_lsn - 1).to_string()
        } else {
            "-".into()
        };
        println!(
            "  {name}  first {:>10}  last {:>10}  records {:>9}  bytes {:>11}  used {:>11}",
            s.first_lsn,
            last,
            s.next_lsn - s.first_lsn,
            file_size(&s.path),
            s.end
        );
    }
    println!("{}", lsn_range(a));
    println!(
        "bytes: {} in segment files, {used} up to the last record",
        a.bytes_total
    );
    println!(
        "epoch: {} (newest in records), epoch file: {}",
        a.max_epoch,
        epoch_file.as_deref().unwrap_or("none")
    );
    println!("snapshot: {}", snapshot.as_deref().unwrap_or("none"));
    println!("{}", verdict.line());
    Ok(verdict.exit_code())
}

// ---------------------------------------------------------------------------------------
// bench

/// Parse `100`, `1K`, `16KiB`, `8M`, `1G` (binary multiples).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (value, unit) = parley_tools::split_number_unit(text)
        .ok_or_else(|| format!("{text:?} is not a size such as 100, 16K, 8M or 1G"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `500ms`, or what `parley_tools::parse_duration` takes (`5s`, `2m`).
fn parse_bench_duration(text: &str) -> Result<Duration, String> {
    match text.trim().strip_suffix("ms") {
        Some(ms) => ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{text:?} is not a duration such as 500ms, 5s or 2m")),
        None => parley_tools::parse_duration(text),
    }
}

/// Every Nth pipelined append is timed.
const PIPELINED_SAMPLE: u64 = 16;

struct AppenderResult {
    records: u64,
    latency: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// One appender thread. Not pipelined, it carries `logical` appenders, each with one
/// record in flight: append, wait for that record to be durable, append the next (with
/// one logical appender that is exactly append + wait_durable in a loop).
fn appender(
    wal: &Wal,
    payload: &[u8],
    quota: Option<u64>,
    stop: &AtomicBool,
    pipelined: bool,
    logical: usize,
    timestamp: u64,
) -> Result<AppenderResult, WalError> {
    let mut latency = new_histogram();
    let mut records = 0u64;
    let more = |issued: u64| quota.is_none_or(|q| issued < q) && !stop.load(Ordering::Relaxed);
    if !pipelined {
        let mut issued = 0u64;
        let mut in_flight: VecDeque<(Lsn, Instant)> = VecDeque::with_capacity(logical);
        loop {
            while in_flight.len() < logical && more(issued) {
                let started = Instant::now();
                let lsn = wal.append(1, timestamp, payload)?;
                in_flight.push_back((lsn, started));
                issued += 1;
            }
            let Some(&(oldest, _)) = in_flight.front() else {
                break;
            };
            wal.wait_durable(oldest)?;
            let durable = wal.durable_lsn();
            let now = Instant::now();
            while let Some(&(lsn, started)) = in_flight.front() {
                if lsn > durable {
                    break;
                }
                latency.saturating_record(now.duration_since(started).as_nanos() as u64);
                in_flight.pop_front();
                records += 1;
            }
        }
        return Ok(AppenderResult { records, latency });
    }
    let mut timed: VecDeque<(Lsn, Instant)> = VecDeque::new();
    let mut last = 0;
    let mut observe = |timed: &mut VecDeque<(Lsn, Instant)>, durable: Lsn| {
        if timed.front().is_some_and(|&(lsn, _)| lsn <= durable) {
            let now = Instant::now();
            while let Some(&(lsn, started)) = timed.front() {
                if lsn > durable {
                    break;
                }
                latency.saturating_record(now.duration_since(started).as_nanos() as u64);
                timed.pop_front();
            }
        }
    };
    while more(records) {
        let started = records.is_multiple_of(PIPELINED_SAMPLE).then(Instant::now);
        let lsn = wal.append(1, timestamp, payload)?;
        if let Some(started) = started {
            timed.push_back((lsn, started));
        }
        if !timed.is_empty() {
            observe(&mut timed, wal.durable_lsn());
        }
        last = lsn;
        records += 1;
    }
    if last > 0 {
        wal.wait_durable(last)?;
        observe(&mut timed, wal.durable_lsn());
    }
    Ok(AppenderResult { records, latency })
}

/// CPU seconds (user, system) this process has used.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn bench(args: &BenchArgs) -> Result<u8, String> {
    let defaults = WalOptions::default();
    let options = WalOptions {
        segment_size: args.segment_size.unwrap_or(defaults.segment_size),
        max_batch_bytes: args
            .max_batch_bytes
            .map_or(defaults.max_batch_bytes, |b| b as usize),
        direct_io: !args.buffered,
        ..WalOptions::default()
    };
    if args.appenders == 0 || args.appenders > 4096 {
        return Err("--appenders must be from 1 to 4096".into());
    }
    let threads = args.threads.unwrap_or(args.appenders);
    if threads == 0 || threads > args.appenders {
        return Err("--threads must be from 1 to --appenders".into());
    }
    if args.pipelined && threads != args.appenders {
        return Err("--threads does not apply to --pipelined".into());
    }
    if options.segment_size < 2 * SEGMENT_HEADER as u64
        || !options.segment_size.is_multiple_of(4096)
    {
        return Err("--segment-size must be a multiple of 4K, at least 8K".into());
    }
    let record_size = args.record_size as usize;
    let stored = parley_wal::format::stored_len(record_size);
    let largest = options
        .max_batch_bytes
        .min(options.segment_size as usize - SEGMENT_HEADER);
    if stored > largest {
        return Err(format!(
            "a {record_size}-byte record takes {stored} bytes, more than the largest batch ({largest} bytes): raise --max-batch-bytes or --segment-size"
        ));
    }
    let duration = match (args.duration, args.records) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(5)),
    };

    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("create directory {}: {e}", args.dir.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let run_dir = args
        .dir
        .join(format!("parley-wal-bench-{}-{nanos}", std::process::id()));
    let (wal, report) =
        Wal::open(&run_dir, options.clone(), &mut |_| {}).map_err(|e| e.to_string())?;
    let mode = if args.pipelined {
        "pipelined (wait for the last record only)"
    } else {
        "durable ack per record"
    };
    eprintln!(
        "parley-wal bench: {record_size} B records, {} appender{} on {threads} thread{}, {mode}; {} I/O via {}, max batch {} B, segments {} B, in {}",
        args.appenders,
        plural(args.appenders),
        plural(threads),
        if report.direct_io { "direct" } else { "buffered" },
        report.io_path,
        options.max_batch_bytes,
        options.segment_size,
        run_dir.display()
    );

    let payload: Vec<u8> = (0..record_size).map(|i| (i % 251) as u8).collect();
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let stop = AtomicBool::new(false);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let results: Vec<Result<AppenderResult, WalError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let quota = args.records.map(|total| {
                    let n = threads as u64;
                    total / n + u64::from((i as u64) < total % n)
                });
                let logical = args.appenders / threads + usize::from(i < args.appenders % threads);
                let (wal, payload, stop) = (&wal, &payload, &stop);
                std::thread::Builder::new()
                    .name(format!("appender-{i}"))
                    .stack_size(256 << 10)
                    .spawn_scoped(scope, move || {
                        appender(
                            wal,
                            payload,
                            quota,
                            stop,
                            args.pipelined,
                            logical,
                            timestamp,
                        )
                    })
                    .expect("spawn appender thread")
            })
            .collect();
        let mut next_report = Duration::from_secs(1);
        let mut last_durable = 0;
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            let elapsed = started.elapsed();
            if duration.is_some_and(|d| elapsed >= d) {
                stop.store(true, Ordering::Relaxed);
            }
            if elapsed >= next_report {
                next_report += Duration::from_secs(1);
                let durable = wal.durable_lsn();
                eprintln!(
                    "  {:>5.1} s: {} records durable ({}/s in the last second), {} flushes",
                    elapsed.as_secs_f64(),
                    durable,
                    durable - last_durable,
                    wal.stats().flushes.load(Ordering::Relaxed)
                );
                last_durable = durable;
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("appender thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    let cpu_after = cpu_seconds();
    let flushes = wal.stats().flushes.load(Ordering::Relaxed);
    let bytes_written = wal.stats().bytes_written.load(Ordering::Relaxed);
    let durable_lsn = wal.durable_lsn();
    let closed = wal.close();
    if !args.keep {
        if let Err(e) = std::fs::remove_dir_all(&run_dir) {
            eprintln!(
                "parley-wal bench: could not remove {}: {e}",
                run_dir.display()
            );
        }
    }
    let mut latency = new_histogram();
    let mut records = 0u64;
    for result in results {
        let result = result.map_err(|e| format!("append: {e}"))?;
        records += result.records;
        latency
            .add(&result.latency)
            .map_err(|e| format!("histogram: {e:?}"))?;
    }
    closed.map_err(|e| format!("close: {e}"))?;

    let secs = elapsed.as_secs_f64();
    let records_per_sec = records as f64 / secs;
    let payload_mib_s = mib(records * args.record_size) / secs;
    let written_mib_s = mib(bytes_written) / secs;
    let per_flush = if flushes > 0 {
        records as f64 / flushes as f64
    } else {
        0.0
    };
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p90, p99, p999) = (us(0.5), us(0.9), us(0.99), us(0.999));
    let max = latency.max() as f64 / 1000.0;
    let mean = latency.mean() / 1000.0;
    let cpu_user = cpu_after.0 - cpu_before.0;
    let cpu_sys = cpu_after.1 - cpu_before.1;
    if args.json {
        let doc = json!({
            "record_size": args.record_size,
            "appenders": args.appenders,
            "threads": threads,
            "pipelined": args.pipelined,
            "max_batch_bytes": options.max_batch_bytes,
            "segment_size": options.segment_size,
            "direct_io": report.direct_io,
            "io_path": report.io_path,
            "seconds": secs,
            // Appends acknowledged durable (summed over the appenders' own counts).
            "records": records,
            "durable_lsn": durable_lsn,
            // The log, when --keep left it for inspection.
            "dir": args.keep.then(|| run_dir.display().to_string()),
            "records_per_sec": records_per_sec,
            "payload_mib_per_sec": payload_mib_s,
            "written_bytes": bytes_written,
            "written_mib_per_sec": written_mib_s,
            "flushes": flushes,
            "flushes_per_sec": flushes as f64 / secs,
            "records_per_flush": per_flush,
            "latency_us": {
                "samples": latency.len(),
                "mean": mean,
                "p50": p50,
                "p90": p90,
                "p99": p99,
                "p99_9": p999,
                "max": max,
            },
            "cpu_user_seconds": cpu_user,
            "cpu_system_seconds": cpu_sys,
        });
        println!("{doc}");
    } else {
        println!(
            "records: {records} in {secs:.2} s: {records_per_sec:.0} records/s, payload {payload_mib_s:.1} MiB/s, written {written_mib_s:.1} MiB/s"
        );
        println!(
            "flushes: {flushes} ({:.0}/s), {per_flush:.1} records per flush",
            flushes as f64 / secs
        );
        println!(
            "durable-ack latency{}: p50 {p50:.1} µs, p90 {p90:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs, max {max:.1} µs, mean {mean:.1} µs ({} samples)",
            if args.pipelined { " (sampled, upper bound)" } else { "" },
            latency.len()
        );
        println!(
            "cpu: {cpu_user:.2} s user, {cpu_sys:.2} s system ({:.0}% of one core)",
            (cpu_user + cpu_sys) / secs * 100.0
        );
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("16K"), Ok(16 << 10));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn bench_durations_take_milliseconds() {
        assert_eq!(
            parse_bench_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_bench_duration("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_bench_duration("5x").is_err());
    }

    #[test]
    fn previews_escape_and_cut() {
        assert_eq!(preview(b"hi \"there\"\n\x00"), "hi \\\"there\\\"\\n\\x00");
        assert_eq!(preview(&[b'a'; 100]).len(), PREVIEW);
    }
}
