//! The kernel's TCP buffer memory, watched off the shards: what every socket's queued
//! bytes take (`/proc/net/sockstat`, `TCP: ... mem N`, in pages) against
//! `net.ipv4.tcp_mem` (low, pressure, high), and the kernel's count of entries into
//! pressure (`TcpExtTCPMemoryPressures`, `/proc/net/netstat`). Above "pressure" the
//! kernel shrinks socket buffers; at "high" it refuses buffer memory ("TCP: out of
//! memory -- consider tuning tcp_mem"): sockets drop packets and writes stall, which
//! looks like a node that stopped serving. Shown in /metrics and logged once per episode,
//! so the operator sees it coming (tuning/README.md says what to set).
//!
//! The parsing and the episode logic are plain functions of text and readings; only
//! [`spawn`] touches /proc.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// One reading, in pages (4 KiB on x86-64) except the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpMemory {
    /// TCP buffer memory in use, all sockets of the host.
    pub pages: u64,
    /// `net.ipv4.tcp_mem`: below `low` the kernel does not regulate; from `pressure` it
    /// shrinks buffers until usage falls below `low`; at `high` it refuses memory.
    pub low: u64,
    pub pressure: u64,
    pub high: u64,
    /// Times the kernel entered its pressure mode (this network namespace).
    pub pressures_total: u64,
}

/// The `mem` figure of the `TCP:` line of `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// `/proc/sys/net/ipv4/tcp_mem`: three numbers of pages.
pub fn parse_tcp_mem(text: &str) -> Option<[u64; 3]> {
    let mut numbers = text.split_whitespace().map(str::parse::<u64>);
    let low = numbers.next()?.ok()?;
    let pressure = numbers.next()?.ok()?;
    let high = numbers.next()?.ok()?;
    Some([low, pressure, high])
}

/// A counter of `/proc/net/netstat` (or `/proc/net/snmp`): a header line `Prefix: A B C`
/// followed by a value line `Prefix: 1 2 3`.
pub fn parse_netstat(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let Some(header) = lines.next() {
        let values = lines.next()?;
        let Some(names) = header.strip_prefix(prefix) else {
            continue;
        };
        let names = names.trim_start_matches(':').split_whitespace();
        let values = values
            .strip_prefix(prefix)?
            .trim_start_matches(':')
            .split_whitespace();
        return names
            .zip(values)
            .find(|(name, _)| *name == field)
            .and_then(|(_, value)| value.parse().ok());
    }
    None
}

/// How close the host is to refusing TCP buffer memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Normal = 0,
    /// At or above `pressure` (or the kernel counted an entry into pressure).
    Pressure = 1,
    /// At or above `high`: the kernel refuses TCP buffer memory.
    Exhausted = 2,
}

/// What the log should say after a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Episode {
    /// Usage reached `level` (from a lower one) in this episode for the first time.
    Reached(Level),
    /// Back below `low`: the episode is over.
    Over,
}

/// Episodes of memory pressure: a warning when one starts, one more if it worsens to
/// exhaustion, and a note when usage is back below `low` (where the kernel, too, stops
/// regulating). Usage between `low` and `pressure` after an episode stays in it, so a
/// node hovering at the mark does not log every second.
#[derive(Debug, Default)]
pub struct PressureWatch {
    /// The worst level of the current episode; `None` outside one.
    worst: Option<Level>,
    last_pressures: Option<u64>,
}

impl PressureWatch {
    pub fn observe(&mut self, reading: TcpMemory) -> Option<Episode> {
        let counted = self
            .last_pressures
            .is_some_and(|last| reading.pressures_total > last);
        self.last_pressures = Some(reading.pressures_total);
        let level = if reading.high > 0 && reading.pages >= reading.high {
            Level::Exhausted
        } else if (reading.pressure > 0 && reading.pages >= reading.pressure) || counted {
            Level::Pressure
        } else {
            Level::Normal
        };
        match self.worst {
            None if level > Level::Normal => {
                self.worst = Some(level);
                Some(Episode::Reached(level))
            }
            Some(worst) if level > worst => {
                self.worst = Some(level);
                Some(Episode::Reached(level))
            }
            Some(_) if level == Level::Normal && reading.pages < reading.low => {
                self.worst = None;
                Some(Episode::Over)
            }
            _ => None,
        }
    }

    /// The level shown in /metrics: the current episode's worst.
    pub fn level(&self) -> Level {
        self.worst.unwrap_or(Level::Normal)
    }
}

/// The latest reading, for /metrics. `readable` is 0 when /proc could not be read (a
/// kernel or sandbox without it): the figures are then not shown.
#[derive(Debug, Default)]
pub struct KernelTcpMetrics {
    pub readable: AtomicU64,
    pub pages: AtomicU64,
    pub low: AtomicU64,
    pub pressure: AtomicU64,
    pub high: AtomicU64,
    pub pressures_total: AtomicU64,
    pub level: AtomicU64,
}

impl KernelTcpMetrics {
    fn store(&self, reading: TcpMemory, level: Level) {
        self.pages.store(reading.pages, Relaxed);
        self.low.store(reading.low, Relaxed);
        self.pressure.store(reading.pressure, Relaxed);
        self.high.store(reading.high, Relaxed);
        self.pressures_total.store(reading.pressures_total, Relaxed);
        self.level.store(level as u64, Relaxed);
        self.readable.store(1, Relaxed);
    }
}

/// Read the three files; `None` if any is missing or unexpected.
pub fn read() -> Option<TcpMemory> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp_mem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let [low, pressure, high] = parse_tcp_mem(&tcp_mem)?;
    Some(TcpMemory {
        pages: parse_sockstat(&sockstat)?,
        low,
        pressure,
        high,
        pressures_total: parse_netstat(&netstat, "TcpExt", "TCPMemoryPressures")?,
    })
}

/// Read every `interval` on a thread of its own, update `metrics`, log episodes.
pub fn spawn(interval: Duration, metrics: Arc<KernelTcpMetrics>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("parley-tcp-mem".into())
        .spawn(move || {
            let mut watch = PressureWatch::default();
            let mut unreadable_logged = false;
            loop {
                match read() {
                    Some(reading) => {
                        let episode = watch.observe(reading);
                        metrics.store(reading, watch.level());
                        log_episode(episode, reading);
                    }
                    None if !unreadable_logged => {
                        unreadable_logged = true;
                        tracing::warn!("cannot read /proc/net/sockstat, /proc/sys/net/ipv4/tcp_mem or /proc/net/netstat: kernel TCP memory is not watched");
                    }
                    None => {}
                }
                std::thread::sleep(interval);
            }
        })?;
    Ok(())
}

fn log_episode(episode: Option<Episode>, r: TcpMemory) {
    let mib = |pages: u64| (pages * 4096) >> 20;
    match episode {
        Some(Episode::Reached(Level::Pressure)) => tracing::warn!(
            pages = r.pages,
            mib = mib(r.pages),
            tcp_mem = %format!("{} {} {}", r.low, r.pressure, r.high),
            pressures_total = r.pressures_total,
            "kernel TCP memory under pressure: socket buffers are being shrunk; at tcp_mem's high mark the kernel refuses buffer memory (tuning/README.md)"
        ),
        Some(Episode::Reached(Level::Exhausted)) => tracing::error!(
            pages = r.pages,
            mib = mib(r.pages),
            tcp_mem = %format!("{} {} {}", r.low, r.pressure, r.high),
            "kernel TCP memory exhausted (tcp_mem's high mark): the kernel drops packets and stalls writes on every socket of the host"
        ),
        Some(Episode::Over) => tracing::info!(
            pages = r.pages,
            "kernel TCP memory back below tcp_mem's low mark"
        ),
        Some(Episode::Reached(Level::Normal)) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKSTAT: &str =
        "sockets: used 180\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 329\nUDP: inuse 2 mem 4\n";
    const NETSTAT: &str = "TcpExt: SyncookiesSent TCPMemoryPressures TCPMemoryPressuresChrono\n\
                           TcpExt: 0 12 3456\n\
                           IpExt: InNoRoutes\nIpExt: 0\n";

    #[test]
    fn the_three_files_parse() {
        assert_eq!(parse_sockstat(SOCKSTAT), Some(329));
        assert_eq!(parse_sockstat("TCP: inuse 5\n"), None);
        assert_eq!(
            parse_tcp_mem("287892\t383858\t575784\n"),
            Some([287892, 383858, 575784])
        );
        assert_eq!(parse_tcp_mem("1 2\n"), None);
        assert_eq!(
            parse_netstat(NETSTAT, "TcpExt", "TCPMemoryPressures"),
            Some(12)
        );
        assert_eq!(parse_netstat(NETSTAT, "IpExt", "InNoRoutes"), Some(0));
        assert_eq!(parse_netstat(NETSTAT, "TcpExt", "NoSuchField"), None);
    }

    fn at(pages: u64, pressures_total: u64) -> TcpMemory {
        TcpMemory {
            pages,
            low: 100,
            pressure: 200,
            high: 300,
            pressures_total,
        }
    }

    #[test]
    fn one_warning_per_episode_and_one_more_if_it_worsens() {
        let mut watch = PressureWatch::default();
        assert_eq!(watch.observe(at(50, 0)), None);
        assert_eq!(
            watch.observe(at(200, 0)),
            Some(Episode::Reached(Level::Pressure))
        );
        // Hovering at and under the mark, but above low: the same episode.
        assert_eq!(watch.observe(at(250, 0)), None);
        assert_eq!(watch.observe(at(150, 0)), None);
        assert_eq!(watch.observe(at(210, 0)), None);
        assert_eq!(watch.level(), Level::Pressure);
        assert_eq!(
            watch.observe(at(300, 0)),
            Some(Episode::Reached(Level::Exhausted))
        );
        assert_eq!(watch.observe(at(250, 0)), None);
        assert_eq!(watch.observe(at(99, 0)), Some(Episode::Over));
        assert_eq!(watch.level(), Level::Normal);
        // A new episode warns again.
        assert_eq!(
            watch.observe(at(201, 0)),
            Some(Episode::Reached(Level::Pressure))
        );
    }

    #[test]
    fn the_kernels_own_count_starts_an_episode_between_two_readings() {
        let mut watch = PressureWatch::default();
        assert_eq!(
            watch.observe(at(10, 5)),
            None,
            "the first count is a baseline"
        );
        // Pressure came and went between readings: usage is low again, but it happened.
        assert_eq!(
            watch.observe(at(10, 6)),
            Some(Episode::Reached(Level::Pressure))
        );
        assert_eq!(watch.observe(at(10, 6)), Some(Episode::Over));
    }
}
