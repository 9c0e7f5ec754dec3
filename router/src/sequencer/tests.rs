//! The sequencer's own bounds, where the shard core's tests cannot reach.

use std::sync::Arc;

use super::turn::Handled;
use super::Sequencer;
use crate::chat_log::MemoryLog;
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
