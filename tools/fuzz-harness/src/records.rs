//! Targets `record` and `snapshot`: what recovery decodes after the log's checksums
//! passed. A chat record (router/src/record.rs) is replayed into the sequencer; a state
//! snapshot is the wal's state file (wal/src/state_file.rs) around the sequencer's
//! state (router/src/sequencer/state.rs).
//!
//! `record` input: the whole input is decoded as one record; it is also read as chunks,
//! each a record's payload replayed in order at LSNs 1, 2, ..., except that a first chunk
//! of kind 1 is a state snapshot, restored first (recovery's order) as of LSN 2^32, the
//! records then replayed after it.
//! `snapshot` input: the whole input is decoded as a state file, and as the sequencer's
//! state bytes.
//!
//! Invariants:
//! - a record that decodes encodes to `encoded_len` bytes that decode to it again;
//! - replay accepts a record or refuses it with `Decode` (exactly when it does not
//!   decode) or `Inconsistent`, and a refused record changes nothing;
//! - a state file decodes exactly when it is the file `encode_state` writes for its LSN
//!   and state, and otherwise is refused with one of its three named reasons;
//! - state bytes the sequencer restores are, once encoded again by `snapshot`, the same
//!   state (compared in a canonical form: decoded, as JSON, conversations sorted); that
//!   encoding restores too. The same holds for the state any replay builds.

use std::sync::Arc;

use parley_router::conversation::Conversation;
use parley_router::record::{encoded_len, ChatRecord};
use parley_router::seeded_map::FastMap;
use parley_router::sequencer::{ApplyError, Sequencer};
use parley_wal::fuzzing::{decode_state, encode_state};

use crate::fixture;
use crate::input::Input;

/// The LSN a `record` input's snapshot is taken at: past any its seeds name.
const SNAPSHOT_LSN: u64 = 1 << 32;

pub fn record(data: &[u8]) {
    if let Ok(record) = ChatRecord::decode(data) {
        let bytes = record.encode();
        assert_eq!(encoded_len(&record), bytes.len());
        let again = ChatRecord::decode(&bytes).expect("an encoded record decodes");
        assert_eq!(again, record);
    }
    let mut sequencer = sequencer();
    let mut input = Input::new(data);
    let mut lsn = 0;
    let mut first = true;
    while let Some((kind, payload)) = input.chunk() {
        lsn += 1;
        if std::mem::take(&mut first) && kind == 1 {
            lsn = SNAPSHOT_LSN;
            // A refused snapshot changes nothing (snapshot checks that); replay goes on.
            let _restored_or_refused = sequencer.restore(lsn, payload);
            continue;
        }
        let before = sequencer.snapshot().map(|bytes| canonical(&bytes));
        match sequencer.replay(lsn, payload) {
            Ok(()) => {}
            Err(ApplyError::Decode { .. }) => {
                assert!(
                    ChatRecord::decode(payload).is_err(),
                    "a record that decodes was undecodable"
                );
            }
            Err(ApplyError::Inconsistent { .. }) => {
                let after = sequencer.snapshot().map(|bytes| canonical(&bytes));
                assert_eq!(before, after, "a refused record changed the state");
            }
        }
    }
    if let Some(bytes) = sequencer.snapshot() {
        round_trip(&bytes, lsn);
    }
}

pub fn snapshot(data: &[u8]) {
    match decode_state(data) {
        Ok((lsn, state)) => assert_eq!(encode_state(lsn, state), data, "slack in a state file"),
        Err(reason) => assert!(
            [
                "not a state snapshot",
                "state snapshot is truncated",
                "state snapshot checksum mismatch",
            ]
            .contains(&reason),
            "{reason}"
        ),
    }
    let file = encode_state(SNAPSHOT_LSN, data);
    assert_eq!(decode_state(&file), Ok((SNAPSHOT_LSN, data)));
    let mut sequencer = sequencer();
    // As of an LSN past any position the seeds' states hold (restore refuses a later one).
    match sequencer.restore(SNAPSHOT_LSN, data) {
        Ok(()) => {
            let canonical_in = canonical(data).expect("restored state decodes");
            let bytes = sequencer
                .snapshot()
                .expect("a restored sequencer has no dirty cursors");
            assert_eq!(
                canonical(&bytes).as_ref(),
                Some(&canonical_in),
                "restore lost state"
            );
            round_trip(&bytes, SNAPSHOT_LSN);
        }
        Err(ApplyError::Inconsistent { .. }) => {}
        Err(error) => panic!("restore failed with {error}"),
    }
}

fn sequencer() -> Sequencer {
    Sequencer::new(Arc::new(fixture::chat_limits()))
}

/// `bytes`, a snapshot taken at `lsn`, restore into a fresh sequencer whose snapshot is
/// the same state.
fn round_trip(bytes: &[u8], lsn: u64) {
    let mut restored = sequencer();
    restored.restore(lsn, bytes).expect("a snapshot restores");
    let again = restored
        .snapshot()
        .expect("a restored sequencer has no dirty cursors");
    assert_eq!(
        canonical(&again),
        canonical(bytes),
        "a snapshot did not survive a restore"
    );
}

/// The sequencer's state bytes as the sequencer reads them (state.rs `restore`).
#[derive(serde::Deserialize)]
struct State {
    convs: Vec<Conversation>,
    last_seen: FastMap<Arc<str>, u64>,
}

/// A snapshot's state as JSON with the hash maps' order gone: object keys are sorted
/// (serde_json's map), conversations sorted by id, a repeated id kept once (the last,
/// as `restore` keeps it). `None` when the bytes are not a state.
fn canonical(bytes: &[u8]) -> Option<serde_json::Value> {
    let state: State = postcard::from_bytes(bytes).ok()?;
    let mut convs: Vec<(String, serde_json::Value)> = Vec::new();
    for conv in state.convs {
        let id = conv.id.to_string();
        let value = serde_json::to_value(&conv).expect("a conversation is JSON");
        convs.retain(|(other, _)| *other != id);
        convs.push((id, value));
    }
    convs.sort_by(|a, b| a.0.cmp(&b.0));
    let last_seen = serde_json::to_value(&state.last_seen).expect("last seen is JSON");
    Some(serde_json::json!({
        "convs": convs.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "last_seen": last_seen,
    }))
}
