//! The bodies of Parley's fuzz targets, one plain function per target, so that the same
//! code runs under libFuzzer (tools/fuzz, cargo-fuzz) and, on stable Rust, in `cargo
//! test`, which replays the checked-in corpora and regression inputs through it
//! (tests/corpus.rs). docs/fuzzing.md lists the targets and what each asserts.
//!
//! Each function takes any bytes. It returns normally when the code under test kept its
//! invariants, and panics (the fuzzer's crash) when it did not.

mod admin;
mod config;
pub mod fixture;
mod framing;
pub mod input;
mod jwt;
mod quic;
mod records;
pub mod seeds;
mod session;
mod wal;
mod ws;

pub use admin::admin;
pub use config::config;
pub use framing::framing;
pub use jwt::jwt;
pub use quic::quic;
pub use records::{record, snapshot};
pub use session::session;
pub use wal::wal_recovery;
pub use ws::ws;

/// A fuzz target: its name (the file under tools/fuzz/fuzz_targets, the corpus folder)
/// and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("session", session),
    ("ws", ws),
    ("quic", quic),
    ("framing", framing),
    ("wal_recovery", wal_recovery),
    ("record", record),
    ("snapshot", snapshot),
    ("jwt", jwt),
    ("admin", admin),
    ("config", config),
];
