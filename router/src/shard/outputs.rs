//! The end of a turn: its cursor advances written, its outputs held until the log is
//! durable up to what they depend on, and routed to local sessions or other shards.

use crate::chat_log::LogError;
use crate::clock::Now;
use crate::directory::shards_in;
use crate::output::{Delivery, Output};
use crate::protocol::Doc;

use super::{MeshEntry, ShardCore, REPLAY_HOLD_MAX};

/// Entries waiting for one destination's ring beyond which typing and presence for it
/// are dropped instead of queued (the driver stops reading sockets at about this backlog).
pub const SHED_EPHEMERAL_BACKLOG: usize = 1024;

/// Held outputs waiting for a cursor record that could not be written yet.
const AWAITING_FLUSH: u64 = u64::MAX;

impl ShardCore {
    /// End of a turn: write the turn's cursor advances, then hold or send its outputs.
    pub(super) fn end_turn(&mut self, now: Now) {
        let flushed = match self.sequencer.flush_cursors(now, &mut self.log) {
            Ok(_) => true,
            // Held with the turn's outputs; the driver retries soon.
            Err(LogError::Full | LogError::NoSpace(_)) => false,
            // Cursor records are split to fit the log's limit, so a `TooLarge` here is
            // the log breaking its word: as failed as any other error.
            Err(error) => {
                self.failed.get_or_insert(error);
                false
            }
        };
        if flushed {
            let last = self.log.last_appended;
            for (needed, _) in self.held.iter_mut().rev() {
                if *needed != AWAITING_FLUSH {
                    break;
                }
                *needed = last;
            }
        }
        let needed = if flushed {
            self.log.last_appended
        } else {
            AWAITING_FLUSH
        };
        let mut turn = std::mem::take(&mut self.turn);
        for output in turn.drain(..) {
            let ephemeral = matches!(&output, Output::Deliver(d) if d.ephemeral);
            if ephemeral || (self.held.is_empty() && needed <= self.durable_lsn) {
                self.route(output);
            } else {
                self.held.push_back((needed, output));
            }
        }
        self.turn = turn;
        debug_assert!(self.held_in_log_order(), "held outputs leave in order");
    }

    /// Held outputs wait for LSNs that never decrease along the queue and were all
    /// appended (or for the cursor record not written yet, at the tail).
    fn held_in_log_order(&self) -> bool {
        let needs = self.held.iter().map(|(needed, _)| *needed);
        needs.clone().zip(needs.skip(1)).all(|(a, b)| a <= b)
            && self
                .held
                .iter()
                .all(|(needed, _)| *needed == AWAITING_FLUSH || *needed <= self.log.last_appended)
    }

    pub(super) fn route(&mut self, output: Output) {
        match output {
            Output::ToSession { to, doc } => {
                if to.shard == self.shard {
                    self.local.push((to.conn, doc, false));
                } else {
                    self.outgoing[to.shard].push_back(MeshEntry::ToSession { conn: to.conn, doc });
                }
            }
            Output::Part {
                shard,
                gather,
                part,
            } => {
                if shard == self.shard {
                    self.gathered(gather, part);
                } else {
                    self.outgoing[shard].push_back(MeshEntry::Part {
                        gather,
                        part: Box::new(part),
                    });
                }
            }
            Output::Deliver(delivery) => {
                let mut mask = 0u64;
                for user in delivery.users.iter() {
                    if delivery.except.as_ref() != Some(user) {
                        mask |= self.directory.mask(user);
                    }
                }
                for shard in shards_in(mask) {
                    if shard == self.shard {
                        self.deliver_local(&delivery);
                    } else if delivery.ephemeral
                        && self.outgoing[shard].len() >= SHED_EPHEMERAL_BACKLOG
                    {
                        // That ring is backed up: typing and presence are shed first.
                        self.stats.shed_ephemeral += 1;
                    } else {
                        self.outgoing[shard].push_back(MeshEntry::Deliver(delivery.clone()));
                    }
                }
            }
        }
    }

    pub(super) fn deliver_local(&mut self, delivery: &Delivery) {
        for user in delivery.users.iter() {
            if delivery.except.as_ref() == Some(user) {
                continue;
            }
            if let Some(conns) = self.sessions_of.get(user) {
                for conn in conns {
                    let doc = Doc::Shared(delivery.doc.clone());
                    match self.replaying.get_mut(conn) {
                        Some(replaying) if replaying.held.len() < REPLAY_HOLD_MAX => {
                            replaying.held.push((doc, delivery.ephemeral));
                        }
                        _ => self.local.push((*conn, doc, delivery.ephemeral)),
                    }
                }
            }
        }
    }
}
