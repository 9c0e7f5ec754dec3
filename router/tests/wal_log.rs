//! The chat core over the real WAL (`WalLog` over `parley_wal::Wal`), with a batch limit
//! small enough to reach: a record larger than the log takes is refused with `too_large`,
//! cursor advances are split into records that fit, and nothing fail-stops the shard.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parley_router::chat_log::{ChatLog, WalLog};
use parley_router::clock::Now;
use parley_router::command::{ChatCommand, SendArgs};
use parley_router::limits::ChatLimits;
use parley_router::output::{Caller, Origin};
use parley_router::record::{ChatRecord, ConvKind, MessageKind};
use parley_router::sequencer::HomeCommand;
use parley_router::shard::{MeshEntry, ShardCore};
use parley_wal::{Wal, WalOptions};
use serde_json::Value;

/// The WAL's batch limit here: a record's payload may be 4064 bytes at most.
const BATCH: usize = 4096;
const MEMBERS: usize = 60;

/// A directory of its own under the system's temporary one, removed at the end.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("parley-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: 1_800_000_000_000,
    }
}

fn open(dir: &Path) -> Arc<Wal> {
    let options = WalOptions {
        segment_size: 1 << 20,
        max_batch_bytes: BATCH,
        direct_io: false,
        ..WalOptions::default()
    };
    Arc::new(
        Wal::open(dir, options, &mut |_| {})
            .expect("the log opens")
            .0,
    )
}

fn core_over(wal: &Arc<Wal>) -> ShardCore {
    let limits = Arc::new(ChatLimits::default());
    ShardCore::new(0, 1, limits, Box::new(WalLog(wal.clone())))
}

/// Run a command of `user`'s session `conn`, let the log catch up, and return its reply.
fn request(core: &mut ShardCore, wal: &Wal, conn: u64, user: &str, command: ChatCommand) -> Value {
    core.on_request(conn, 7, user, "d0", command, now());
    wal.wait_durable(core.last_appended()).expect("durable");
    core.on_durable(wal.durable_lsn());
    let docs: Vec<Value> = core
        .take_local()
        .map(|(_, doc, _)| serde_json::from_str(doc.as_str()).expect("JSON"))
        .collect();
    docs.into_iter()
        .find(|doc| doc["re"] == 7)
        .expect("a reply")
}

fn member(i: usize) -> String {
    format!("member{i:02}")
}

/// The acks and reads of every member on two devices, as one turn of mesh entries.
fn cursor_turn(conv: &str) -> Vec<(usize, MeshEntry)> {
    let mut entries = Vec::new();
    for i in 0..MEMBERS {
        for (device, read) in [("d0", false), ("d1", true)] {
            let command = if read {
                ChatCommand::Read {
                    conv: conv.into(),
                    seq: 1,
                }
            } else {
                ChatCommand::Ack {
                    conv: conv.into(),
                    seq: 1,
                }
            };
            let caller = Caller {
                origin: Origin {
                    shard: 0,
                    conn: 100 + i as u64,
                },
                re: 1,
                user: Arc::from(member(i)),
                device: Arc::from(device),
            };
            let conv = Arc::from(conv);
            let home = HomeCommand {
                caller,
                conv,
                command,
            };
            entries.push((0, MeshEntry::Command(Box::new(home))));
        }
    }
    entries
}

fn send(conv: &str, cmid: &str, body: String) -> ChatCommand {
    ChatCommand::Send(Box::new(SendArgs {
        conv: conv.into(),
        cmid: cmid.into(),
        body,
        kind: MessageKind::Text,
        media: None,
        reply_to: None,
    }))
}

#[test]
fn records_beyond_the_wal_batch_limit_are_refused_or_split_never_fatal() {
    let dir = ScratchDir::new("wal-log");
    let wal = open(&dir.0);
    let mut core = core_over(&wal);
    assert_eq!(WalLog(wal.clone()).max_record_bytes(), BATCH - 32);
    core.session_opened(1, &member(0), now());
    let members = (1..MEMBERS).map(member).collect();
    let create = ChatCommand::ConvCreate {
        kind: ConvKind::Group,
        members,
        title: None,
    };
    let created = request(&mut core, &wal, 1, &member(0), create);
    let conv = created["ok"]["conv"].as_str().expect("created").to_string();
    let sent = request(
        &mut core,
        &wal,
        1,
        &member(0),
        send(&conv, "a", "hi".into()),
    );
    assert_eq!(sent["ok"]["seq"], 1);

    // A message the limits allow (16 KiB) but the log does not take in one record.
    let before = wal.next_lsn();
    let big = request(
        &mut core,
        &wal,
        1,
        &member(0),
        send(&conv, "b", "x".repeat(5000)),
    );
    assert_eq!(big["err"]["code"], "too_large", "{big}");
    assert!(core.failed().is_none(), "{:?}", core.failed());
    assert_eq!(wal.next_lsn(), before, "nothing was appended");

    // 180 cursor advances in one turn: more than twice what one record holds, and
    // more than the log's buffer holds until its writer catches up (it answers `Full`,
    // and the rest goes at the next tick).
    core.on_entries(cursor_turn(&conv), now());
    while core.flush_pending() {
        assert!(core.failed().is_none(), "{:?}", core.failed());
        wal.wait_durable(core.last_appended()).expect("durable");
        core.on_durable(wal.durable_lsn());
        core.on_tick(now());
    }
    assert!(core.failed().is_none(), "{:?}", core.failed());
    wal.wait_durable(core.last_appended()).expect("durable");
    core.on_durable(wal.durable_lsn());
    let replies = core
        .take_local()
        .filter(|(conn, _, _)| *conn >= 100)
        .count();
    assert_eq!(
        replies,
        MEMBERS * 2,
        "every ack and read answered, once durable"
    );
    let mut advances = 0;
    for record in wal.iter(before, core.last_appended()) {
        let record = record.expect("readable");
        assert!(record.payload.len() <= BATCH - 32);
        match ChatRecord::decode(&record.payload).expect("a chat record") {
            ChatRecord::Cursors(written) => advances += written.len(),
            other => panic!("not a cursor record: {other:?}"),
        }
    }
    assert_eq!(
        advances,
        MEMBERS * 3,
        "two delivered cursors and a read per member"
    );
    assert!(core.last_appended() > before, "split into records");
    let last = core.last_appended();
    drop(core);
    drop(wal);

    // A restart replays it all.
    let wal = open(&dir.0);
    let mut core = core_over(&wal);
    for record in wal.iter(1, last) {
        let record = record.expect("readable");
        core.replay(record.lsn, &record.payload).expect("replays");
    }
    core.session_opened(2, &member(59), now());
    let list = request(&mut core, &wal, 2, &member(59), ChatCommand::ConvList);
    assert_eq!(list["ok"]["convs"][0]["read_seq"], 1, "{list}");
}
