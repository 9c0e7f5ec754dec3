#![no_main]
//! Target `snapshot`: the body and its invariants are in the harness (docs/fuzzing.md).

libfuzzer_sys::fuzz_target!(|data: &[u8]| parley_fuzz_harness::snapshot(data));
