//! Property test: random sequences of appends, batches, reopens and truncations, with
//! every read compared against a plain in-memory model of the log.

use std::path::Path;

use parley_wal::format::stored_len;
use parley_wal::{Entry, Wal, WalError, WalOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append one record of this many bytes.
    Append(usize),
    /// Append a batch of records of these sizes.
    Batch(Vec<usize>),
    /// Close and reopen the log.
    Reopen,
    /// Cut everything after the last batch end at or before this fraction (per mille) of
    /// the log; and check that cutting inside a batch is refused.
    TruncateAfter(u16),
    /// Wait for everything appended so far, then read a sample back.
    Check,
}

fn op() -> impl Strategy<Value = Op> {
    // Sizes straddle the 8-byte record alignment and the 4 KiB block, and reach past the
    // small segments so roll-over happens often.
    let size = prop_oneof![0usize..64, 4000usize..4200, 9000usize..13000];
    prop_oneof![
        6 => size.clone().prop_map(Op::Append),
        2 => prop::collection::vec(size, 1..5).prop_map(Op::Batch),
        1 => Just(Op::Reopen),
        1 => (0u16..1000).prop_map(Op::TruncateAfter),
        2 => Just(Op::Check),
    ]
}

fn options() -> WalOptions {
    WalOptions {
        segment_size: 64 * 1024,
        max_batch_bytes: 48 * 1024,
        direct_io: true,
        ..WalOptions::default()
    }
}

fn payload(lsn: u64, len: usize, generation: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (lsn.wrapping_mul(131) + i as u64 + generation * 7) as u8)
        .collect()
}

fn open(dir: &Path) -> Wal {
    Wal::open(dir, options(), &mut |_| {}).expect("open").0
}

/// (record type, payload, ends its batch)
type Model = Vec<(u8, Vec<u8>, bool)>;

/// Every record in the model is in the log, and nothing more.
fn check(wal: &Wal, model: &Model) -> Result<(), TestCaseError> {
    let last = model.len() as u64;
    if last > 0 {
        wal.wait_durable(last)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    prop_assert_eq!(wal.next_lsn(), last + 1);
    let mut count = 0;
    for record in wal.iter(1, last) {
        let record = record.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (record_type, payload, _) = &model[record.lsn as usize - 1];
        prop_assert_eq!(
            record.record_type,
            *record_type,
            "type at LSN {}",
            record.lsn
        );
        prop_assert_eq!(&record.payload, payload, "payload at LSN {}", record.lsn);
        count += 1;
    }
    prop_assert_eq!(count, model.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_log_matches_its_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let mut model: Model = Vec::new();
        // Distinguishes payloads written after a truncation from the ones it removed.
        let mut generation = 0u64;
        for op in ops {
            match op {
                Op::Append(len) => {
                    let lsn = model.len() as u64 + 1;
                    let bytes = payload(lsn, len, generation);
                    prop_assert_eq!(wal.append((lsn % 200) as u8 + 1, lsn, &bytes).unwrap(), lsn);
                    model.push(((lsn % 200) as u8 + 1, bytes, true));
                }
                Op::Batch(sizes) => {
                    let first = model.len() as u64 + 1;
                    let payloads: Vec<Vec<u8>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &len)| payload(first + i as u64, len, generation))
                        .collect();
                    let entries: Vec<Entry> = payloads
                        .iter()
                        .map(|p| Entry { record_type: 9, timestamp: 0, payload: p })
                        .collect();
                    // Four of the largest records exceed the batch limit: the whole batch
                    // must be refused and the log left as it was.
                    let size: usize = sizes.iter().map(|&len| stored_len(len)).sum();
                    if size > wal.max_batch_size() {
                        let refused = wal.append_batch(&entries);
                        prop_assert!(matches!(refused, Err(WalError::TooLarge { .. })), "{:?}", refused);
                        prop_assert_eq!(wal.next_lsn(), first);
                        continue;
                    }
                    let last = wal.append_batch(&entries).unwrap();
                    prop_assert_eq!(last, first + sizes.len() as u64 - 1);
                    let count = payloads.len();
                    model.extend(payloads.into_iter().enumerate().map(|(i, p)| (9, p, i + 1 == count)));
                }
                Op::Reopen => {
                    wal.close().unwrap();
                    wal = open(dir.path());
                    check(&wal, &model)?;
                }
                Op::TruncateAfter(per_mille) => {
                    let mut keep = model.len() * per_mille as usize / 1000;
                    if keep > 0 && !model[keep - 1].2 {
                        let inside = wal.truncate_after(keep as u64);
                        prop_assert!(matches!(inside, Err(WalError::NotBatchEnd(_))), "{:?}", inside.err());
                    }
                    while keep > 0 && !model[keep - 1].2 {
                        keep -= 1;
                    }
                    wal.truncate_after(keep as u64).unwrap();
                    model.truncate(keep);
                    generation += 1;
                    check(&wal, &model)?;
                }
                Op::Check => check(&wal, &model)?,
            }
        }
        check(&wal, &model)?;
        wal.close().unwrap();
        let wal = open(dir.path());
        check(&wal, &model)?;
    }
}
