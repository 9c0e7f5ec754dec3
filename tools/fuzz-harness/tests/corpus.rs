//! Every checked-in input of every fuzz target, replayed through the target's body on
//! stable Rust: the seed corpora (tools/fuzz/corpus/<target>/) and the inputs of fixed
//! findings (tools/fuzz/regressions/<target>/), so a found crash stays fixed.

use std::path::{Path, PathBuf};

use parley_fuzz_harness::{seeds, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(target: &str, kind: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    paths.sort();
    paths
}

fn replay(target: &str, kind: &str) -> usize {
    let body = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, body)| *body)
        .expect("a target");
    let paths = inputs(target, kind);
    for path in &paths {
        let data = std::fs::read(path).expect("read input");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
    }
    paths.len()
}

macro_rules! replays {
    ($($target:ident),* $(,)?) => { $(
        #[test]
        fn $target() {
            let seeds = replay(stringify!($target), "corpus");
            assert!(seeds > 0, "target {} has no seed corpus", stringify!($target));
            replay(stringify!($target), "regressions");
        }
    )* };
}

replays!(
    session,
    ws,
    quic,
    framing,
    wal_recovery,
    record,
    snapshot,
    jwt,
    admin,
    config
);

/// The replays above, the fuzz targets of tools/fuzz and the harness's table name the
/// same targets.
#[test]
fn every_target_is_replayed_and_has_a_fuzz_target() {
    let replayed = [
        "session",
        "ws",
        "quic",
        "framing",
        "wal_recovery",
        "record",
        "snapshot",
        "jwt",
        "admin",
        "config",
    ];
    let table: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(table, replayed);
    let cargo =
        std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("tools/fuzz/Cargo.toml");
    for name in table {
        let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let body = std::fs::read_to_string(&source)
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            body.contains(&format!("parley_fuzz_harness::{name}(")),
            "{} does not call the harness",
            source.display()
        );
        assert!(
            cargo.contains(&format!("name = \"{name}\"")),
            "tools/fuzz/Cargo.toml lacks {name}"
        );
    }
}

/// The seeds as they are made now pass their targets (the checked-in ones are replayed
/// above; these may differ where randomness enters, as in a QUIC Initial).
#[test]
fn fresh_seeds_pass() {
    for (target, name, data) in seeds::all() {
        let body = TARGETS
            .iter()
            .find(|(n, _)| *n == target)
            .expect("a target")
            .1;
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "fresh seed {target}/{name} fails");
    }
}

/// Writes the seed corpora: `cargo test -p parley-fuzz-harness --test corpus --
/// --ignored write_seeds`.
#[test]
#[ignore = "writes tools/fuzz/corpus; run by hand"]
fn write_seeds() {
    for (target, name, data) in seeds::all() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
    }
}

/// Runs one input through one target, for a reproducer on stable:
/// `FUZZ_TARGET=ws FUZZ_INPUT=path cargo test -p parley-fuzz-harness --test corpus --
/// --ignored run_input --nocapture`.
#[test]
#[ignore = "runs the input FUZZ_INPUT names through FUZZ_TARGET"]
fn run_input() {
    let target = std::env::var("FUZZ_TARGET").expect("FUZZ_TARGET");
    let path = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT");
    let body = TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .expect("a target")
        .1;
    body(&std::fs::read(&path).expect("read FUZZ_INPUT"));
}
