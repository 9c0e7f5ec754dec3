//! The deterministic simulator (issue 8): many shards' cores, their WALs on simulated
//! disks, sessions and clients, crashes and faults, all driven by one seed, with the
//! invariants checked after every step and at the end.
//!
//! - `cargo test -p parley-router --test simulator` runs a fixed set of seeds.
//! - `PARLEY_SIM_SEED=<seed>` runs one seed and prints its whole trace.
//! - `PARLEY_SIM_SEEDS=<n>` (with `-- --ignored sweep`, best in `--release`) runs seeds
//!   `1..=n` and reports the rate. `PARLEY_SIM_FIRST=<k>` starts the sweep at seed k.
//! - `PARLEY_SIM_STEPS=<n>` lengthens (or shortens) the faulty phase of every run.
//! - The fixed seeds' trace digests are kept in `digests.txt`: a change that moves any
//!   seed's path fails `fixed_seeds_keep_every_invariant` and names the seeds. Where the
//!   change of behaviour is meant, `PARLEY_SIM_BLESS=1` writes the new digests (say why in
//!   the commit); a refactoring must leave them as they are.
//!
//! A failure prints the seed, the violation and the end of the trace; running that seed
//! again reproduces it exactly.

mod client;
mod disk;
mod oracle;
mod rng;
mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use world::{Stats, World};

/// Steps of the faulty phase of each run, unless `PARLEY_SIM_STEPS` says otherwise.
const STEPS: u64 = 3_000;

fn steps() -> u64 {
    env_u64("PARLEY_SIM_STEPS").unwrap_or(STEPS)
}
/// Seeds `cargo test` runs.
const FIXED_SEEDS: u64 = 100;

/// Run one seed on this thread; a violation or a panic is returned with a report.
fn run_seed(seed: u64, verbose: bool) -> Result<(Stats, u64), String> {
    parley_router::seeded_map::fix_seeds_on_this_thread();
    let steps = steps();
    let mut world = World::new(seed, steps);
    world.verbose = verbose;
    let outcome = catch_unwind(AssertUnwindSafe(|| world.run()));
    let failure = match outcome {
        Ok(Ok(())) => return Ok((world.stats.clone(), world.digest)),
        Ok(Err(violation)) => violation,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {what}")
        }
    };
    let mut report = format!(
        "seed {seed} FAILED: {failure}\n  reproduce: PARLEY_SIM_SEED={seed} PARLEY_SIM_STEPS={steps} cargo test -p parley-router --test simulator one_seed -- --ignored --nocapture\n  last steps:\n"
    );
    for line in world.trace() {
        report.push_str("    ");
        report.push_str(line);
        report.push('\n');
    }
    Err(report)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[test]
fn fixed_seeds_keep_every_invariant() {
    let mut totals = Stats::default();
    let mut digests = Vec::new();
    for seed in 1..=FIXED_SEEDS {
        match run_seed(seed, false) {
            Ok((stats, digest)) => {
                totals.add(&stats);
                digests.push((seed, digest));
            }
            Err(report) => panic!("{report}"),
        }
    }
    if steps() == STEPS {
        check_digests(&digests);
    }
    // The faults must actually happen, or the seeds prove little.
    assert!(
        totals.crashes >= FIXED_SEEDS / 2,
        "too few crashes: {totals:?}"
    );
    assert!(totals.fsync_failures > 0, "no fsync failure: {totals:?}");
    assert!(
        totals.snapshots_loaded > 0,
        "no snapshot loaded: {totals:?}"
    );
    assert!(totals.torn_bytes_cut > 0, "no torn tail: {totals:?}");
    // And the clients must react, ack, read and end sessions, or the checks of those
    // records and of what the clients are told about them prove nothing.
    for (what, count) in [
        ("cursor records", totals.cursor_records),
        ("reaction records", totals.reaction_records),
        ("last-seen records", totals.last_seen_records),
        ("cursors told", totals.cursors_checked),
        ("reactions told", totals.reactions_checked),
        ("last seen told", totals.presence_checked),
    ] {
        assert!(
            count >= FIXED_SEEDS,
            "only {count} {what} checked: {totals:?}"
        );
    }
    eprintln!("{FIXED_SEEDS} seeds: {totals:?}");
}

/// The digests of the fixed seeds, as `seed digest` lines (digest in hex).
const DIGESTS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/simulator/digests.txt");

/// Every fixed seed took the path it took when `digests.txt` was written, or
/// `PARLEY_SIM_BLESS=1` writes the new paths down.
fn check_digests(digests: &[(u64, u64)]) {
    let text: String = digests
        .iter()
        .map(|(seed, digest)| format!("{seed} {digest:016x}\n"))
        .collect();
    if std::env::var_os("PARLEY_SIM_BLESS").is_some() {
        std::fs::write(DIGESTS_FILE, &text).expect("write digests.txt");
        eprintln!("wrote {} digests to {DIGESTS_FILE}", digests.len());
        return;
    }
    let kept = std::fs::read_to_string(DIGESTS_FILE)
        .unwrap_or_else(|e| panic!("read {DIGESTS_FILE}: {e} (PARLEY_SIM_BLESS=1 writes it)"));
    let moved: Vec<String> = kept
        .lines()
        .zip(text.lines())
        .filter(|(was, is)| was != is)
        .map(|(was, is)| format!("{was} -> {is}"))
        .collect();
    assert!(
        moved.is_empty() && kept.lines().count() == digests.len(),
        "{} of {} fixed seeds took another path than digests.txt records (seed was -> is): {}; \
         a refactoring must not move them; a meant change of behaviour is blessed with \
         PARLEY_SIM_BLESS=1",
        moved.len(),
        digests.len(),
        moved.join(", ")
    );
}

#[test]
fn a_seed_replays_exactly() {
    let first = run_seed(7, false).expect("seed 7 passes");
    let second = run_seed(7, false).expect("seed 7 passes");
    assert_eq!(first.1, second.1, "the same seed took a different path");
    let other = run_seed(8, false).expect("seed 8 passes");
    assert_ne!(first.1, other.1, "different seeds took the same path");
}

/// The checks have teeth: with disks whose fdatasync returns before the data is stable,
/// some seed must report acknowledged messages lost.
#[test]
fn a_disk_that_lies_about_fsync_is_caught() {
    parley_router::seeded_map::fix_seeds_on_this_thread();
    for seed in 1..=FIXED_SEEDS {
        let mut world = World::new(seed, STEPS);
        world.lying_disks();
        if let Err(violation) = world.run() {
            assert!(
                ["is gone", "beyond the log", "corruption"]
                    .iter()
                    .any(|lost| violation.contains(lost)),
                "seed {seed} failed, but not for the lost data: {violation}"
            );
            eprintln!("seed {seed} caught the lying disk: {violation}");
            return;
        }
    }
    panic!("{FIXED_SEEDS} seeds with lying disks found nothing");
}

/// `PARLEY_SIM_SEED=<seed>`: one seed with its whole trace.
#[test]
#[ignore = "runs the seed named by PARLEY_SIM_SEED"]
fn one_seed() {
    let seed = env_u64("PARLEY_SIM_SEED").expect("set PARLEY_SIM_SEED");
    if let Err(report) = run_seed(seed, true) {
        panic!("{report}");
    }
}

/// `PARLEY_SIM_SEEDS=<n>`: a long sweep; stops at the first failure.
#[test]
#[ignore = "a long sweep: set PARLEY_SIM_SEEDS"]
fn sweep() {
    let count = env_u64("PARLEY_SIM_SEEDS").unwrap_or(1000);
    let first = env_u64("PARLEY_SIM_FIRST").unwrap_or(1);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut totals = Stats::default();
    for seed in first..first + count {
        match run_seed(seed, false) {
            Ok((stats, _)) => totals.add(&stats),
            Err(report) => panic!("after {} seeds: {report}", seed - first),
        }
        if last_report.elapsed().as_secs() >= 5 {
            last_report = Instant::now();
            let done = seed - first + 1;
            eprintln!(
                "{done}/{count} seeds, {:.1} seeds/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{count} seeds passed in {secs:.1} s: {:.1} seeds/s\n{totals:?}",
        count as f64 / secs
    );
}
