//! Criterion micro-benchmarks for Parley live in `benches/benches/`; run `cargo bench -p parley-benches`.
