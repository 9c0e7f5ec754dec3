//! The sequencer's own bounds, where the shard core's tests cannot reach.

use std::sync::Arc;

use super::turn::Handled;
use super::Sequencer;
use crate::chat_log::{ChatLog, LogError, MemoryLog, MIN_RECORD_BYTES};
use crate::clock::Now;
use crate::limits::ChatLimits;
use crate::protocol::ErrorCode;
use crate::record::{ChatRecord, ConvKind, MessageKind, StoredMessage};

fn empty() -> Sequencer {
    Sequencer::new(Arc::new(ChatLimits::default()))
}

fn created(conv: &str) -> ChatRecord {
    ChatRecord::ConvCreated {
        conv: conv.into(),
        kind: ConvKind::Group,
        title: None,
        creator: "amy".into(),
        members: vec!["amy".into(), "bob".into()],
        ts: 1,
    }
}

fn message(conv: &str, seq: u64) -> ChatRecord {
    ChatRecord::Message(StoredMessage {
        conv: conv.into(),
        seq,
        from: "amy".into(),
        cmid: format!("c{seq}"),
        ts: 2,
        kind: MessageKind::Text,
        body: "hi".into(),
        media: None,
        reply_to: None,
    })
}

/// A record that would not apply (a bug in a command's checks would make one) is
/// refused before the log holds it: a restart replays the log without meeting it.
#[test]
fn a_record_that_does_not_fit_is_refused_before_it_is_logged() {
    let mut sequencer = empty();
    let mut log = MemoryLog::default();
    sequencer.commit(&mut log, 1, &created("g")).expect("fits");
    sequencer
        .commit(&mut log, 2, &message("g", 1))
        .expect("fits");
    for unfit in [created("g"), message("g", 3), message("nowhere", 1)] {
        match sequencer.commit(&mut log, 3, &unfit) {
            Err(Handled::Refused((ErrorCode::Internal, _))) => {}
            other => panic!("{unfit:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(log.last_lsn(), 2, "the log holds only the records that fit");
    let mut restarted = empty();
    for (i, payload) in log.records.iter().enumerate() {
        restarted.replay(i as u64 + 1, payload).expect("replays");
    }
    assert_eq!(restarted.conversations(), 1);
    assert_eq!(restarted.convs["g"].last_seq, 1);
}

/// A log that takes `room` more records, then answers `Full`.
struct FillingLog {
    inner: MemoryLog,
    room: usize,
}

impl ChatLog for FillingLog {
    fn append(&mut self, timestamp: u64, payload: &[u8]) -> Result<u64, LogError> {
        if self.room == 0 {
            return Err(LogError::Full);
        }
        self.room -= 1;
        self.inner.append(timestamp, payload)
    }

    fn read(&mut self, lsn: u64) -> Result<Vec<u8>, LogError> {
        self.inner.read(lsn)
    }

    fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes()
    }
}

/// Cursor advances are written in records within the log's limit; when the log fills
/// after some of them, those stay written and only the rest wait for the next flush.
#[test]
fn cursor_advances_are_split_to_fit_and_a_cut_short_flush_keeps_the_rest() {
    let mut sequencer = empty();
    let inner = MemoryLog::with_max_record_bytes(MIN_RECORD_BYTES);
    let mut log = FillingLog { inner, room: 1 };
    sequencer.commit(&mut log, 1, &created("g")).expect("fits");
    for i in 0..100 {
        let key = (Arc::from("g"), Arc::from(format!("user{i:03}")), None);
        sequencer.dirty_cursors.insert(key, 1);
    }
    let now = Now::system();
    assert_eq!(sequencer.flush_cursors(now, &mut log), Err(LogError::Full));
    assert_eq!(
        log.inner.last_lsn(),
        1,
        "nothing written while the log is full"
    );
    assert_eq!(sequencer.dirty_cursors.len(), 100);
    log.room = 1;
    assert_eq!(sequencer.flush_cursors(now, &mut log), Err(LogError::Full));
    let written = 100 - sequencer.dirty_cursors.len();
    assert!(
        written > 0 && written < 100,
        "one record of them: {written}"
    );
    log.room = usize::MAX;
    let last = sequencer.flush_cursors(now, &mut log).expect("written");
    assert_eq!(last, Some(log.inner.last_lsn()));
    assert!(!sequencer.has_dirty_cursors());
    let mut advances = 0;
    for payload in &log.inner.records[1..] {
        assert!(payload.len() <= MIN_RECORD_BYTES);
        match ChatRecord::decode(payload).expect("decodes") {
            ChatRecord::Cursors(written) => advances += written.len(),
            other => panic!("not cursors: {other:?}"),
        }
    }
    assert_eq!(advances, 100, "each advance written once");
    let mut restarted = empty();
    for (i, payload) in log.inner.records.iter().enumerate() {
        restarted.replay(i as u64 + 1, payload).expect("replays");
    }
    assert_eq!(restarted.convs["g"].read_seq("user099"), 1);
}
