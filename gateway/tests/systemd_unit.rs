//! The shipped systemd unit (`systemd/parleyd.service`): systemd accepts it, its sandbox
//! rates 2.0 or lower on `systemd-analyze security`, and its system call filter leaves
//! parleyd the calls it cannot run without (io_uring, pinning shards to cores).
//!
//! This machine has no systemd as PID 1, so the unit is checked offline; running parleyd
//! under it is not tested here.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/parleyd.service");
/// The exposure `systemd-analyze security` may give the unit at most ("OK" is below 2.1).
const MAX_EXPOSURE: f64 = 2.0;

/// The unit as shipped, with ExecStart pointed at the binary this test built (verify
/// checks that the command exists), written as `parleyd.service` in a temporary directory.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(UNIT).expect("read the unit");
    assert!(
        text.contains("ExecStart=/usr/local/bin/parleyd "),
        "docs/operations.md installs the binary in /usr/local/bin; the unit must run that"
    );
    let text = text.replace("/usr/local/bin/parleyd", env!("CARGO_BIN_EXE_parleyd"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("parleyd.service");
    std::fs::write(&path, text).expect("write the unit copy");
    (dir, path)
}

/// Run `systemd-analyze ARGS`: (exit success, stdout, stderr).
fn analyze(args: &[&str], unit: &Path) -> (bool, String, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed for this test");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn systemd_accepts_the_unit_without_a_warning() {
    let (_dir, unit) = unit_copy();
    let (ok, stdout, stderr) = analyze(&["verify"], &unit);
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    assert!(
        stderr.trim().is_empty() && stdout.trim().is_empty(),
        "systemd-analyze verify warned:\n{stdout}{stderr}"
    );
}

#[test]
fn the_sandbox_rates_ok() {
    let (_dir, unit) = unit_copy();
    let (_, stdout, stderr) = analyze(&["security", "--offline=yes"], &unit);
    let line = stdout
        .lines()
        .find(|line| line.contains("Overall exposure level for parleyd.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line:\n{stdout}{stderr}"));
    let exposure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure in {line:?}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} is above {MAX_EXPOSURE}:\n{stdout}"
    );
}

/// The system calls a `SystemCallFilter=` set names, as systemd expands it (groups such
/// as `@system-service` contain other groups).
fn expand(sets: &str) -> Vec<String> {
    let mut calls = Vec::new();
    for set in sets.split_whitespace() {
        if !set.starts_with('@') {
            calls.push(set.to_string());
            continue;
        }
        let output = Command::new("systemd-analyze")
            .args(["syscall-filter", set])
            .output()
            .expect("systemd-analyze syscall-filter");
        let text = String::from_utf8_lossy(&output.stdout);
        for word in text.lines().map(str::trim) {
            if word.starts_with('@') && word != set {
                calls.extend(expand(word));
            } else if !word.is_empty() && !word.starts_with('#') && !word.starts_with('@') {
                calls.push(word.to_string());
            }
        }
    }
    calls
}

#[test]
fn the_system_call_filter_keeps_io_uring_and_pinning() {
    let text = std::fs::read_to_string(UNIT).expect("read the unit");
    let (mut allowed, mut denied) = (Vec::new(), Vec::new());
    for value in text
        .lines()
        .filter_map(|line| line.strip_prefix("SystemCallFilter="))
    {
        match value.strip_prefix('~') {
            Some(deny) => denied.extend(expand(deny)),
            None => allowed.extend(expand(value)),
        }
    }
    assert!(
        !allowed.is_empty(),
        "the unit sets no system call allow list"
    );
    for call in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "sched_setaffinity",
        "mlock",
        "fdatasync",
        "fallocate",
    ] {
        assert!(
            allowed.iter().any(|c| c == call),
            "{call} is not allowed by the unit's SystemCallFilter"
        );
        assert!(
            !denied.iter().any(|c| c == call),
            "{call} is denied by the unit's SystemCallFilter=~"
        );
    }
}
