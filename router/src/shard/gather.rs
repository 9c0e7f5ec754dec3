//! Questions every (or some) shard answers with a part: `conv.list`, a `sync` or
//! `resume` replay, `presence.get`. The asking shard scatters them and gathers the parts
//! into one answer; live events for a replaying session wait until its replay is done.

use crate::seeded_map::{FastMap, FastSet};
use std::sync::Arc;

use serde::Serialize;

use crate::clock::Now;
use crate::command::Cursor;
use crate::event::{self, MoreAfter};
use crate::output::{Caller, ConvSummary, Origin, Output, Part, PresenceInfo};
use crate::ownership::{conversation_home, user_home};
use crate::protocol::{encode_ok, Doc};
use crate::search::{SearchQuery, SearchRequest};
use crate::sequencer::SyncShare;

use super::{MeshEntry, ShardCore};

#[derive(Debug)]
pub struct Scatter {
    pub gather: u64,
    pub origin: Origin,
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub query: Query,
}

#[derive(Debug)]
pub enum Query {
    /// The user's conversations homed on the receiver.
    List,
    /// Replay after the cursors (those homed on the receiver), and list the rest.
    Sync {
        cursors: Vec<Cursor>,
        list_unnamed: bool,
        /// Messages to replay per named conversation at most.
        per_conv: usize,
    },
    /// Presence of these users (homed on the receiver).
    Presence { users: Vec<String> },
}

#[derive(Debug)]
pub(super) enum GatherKind {
    List,
    Sync,
    Resume,
    Presence {
        order: Vec<String>,
    },
    /// A search, once the user's conversations are known.
    Search(Box<SearchQuery>),
}

#[derive(Debug)]
pub(super) struct Gather {
    conn: u64,
    re: u64,
    user: Arc<str>,
    waiting: usize,
    kind: GatherKind,
    convs: Vec<ConvSummary>,
    more: Vec<MoreAfter>,
    presence: Vec<PresenceInfo>,
}

/// Live events held for a session while its replays run.
#[derive(Debug, Default)]
pub(super) struct Replaying {
    /// Replays (gathers) of this session still running.
    pub(super) running: usize,
    pub(super) held: Vec<(Doc, bool)>,
}

/// Live events held per replaying session at most; beyond it they go out as they come
/// (a session that far behind is about to overflow its queue and be closed with 4009).
pub const REPLAY_HOLD_MAX: usize = 4096;

impl ShardCore {
    /// Ask the home shards of `users` for their presence.
    pub(super) fn presence_get(&mut self, caller: &Caller, users: Vec<String>, now: Now) {
        let mut by_home: FastMap<usize, Vec<String>> = FastMap::default();
        for user in &users {
            by_home
                .entry(user_home(user, self.shards as u32) as usize)
                .or_default()
                .push(user.clone());
        }
        let mut shards: Vec<usize> = by_home.keys().copied().collect();
        shards.sort_unstable();
        let kind = GatherKind::Presence { order: users };
        let query = |shard| Query::Presence {
            users: by_home.remove(&shard).unwrap_or_default(),
        };
        self.scatter(caller, kind, &shards, query, now);
    }

    pub(super) fn answer(&mut self, scatter: Scatter, _now: Now) {
        let Scatter {
            gather,
            origin,
            user,
            device,
            query,
        } = scatter;
        let part = match query {
            Query::List => Part::Convs(self.sequencer.summaries(
                &user,
                &device,
                &FastSet::default(),
            )),
            Query::Sync {
                cursors,
                list_unnamed,
                per_conv,
            } => {
                let share = SyncShare {
                    to: origin,
                    gather,
                    user: &user,
                    device: &device,
                    cursors: &cursors,
                    list_unnamed,
                    per_conv,
                };
                let result = self.sequencer.sync(&share, &mut self.log, &mut self.turn);
                if let Err(error) = result {
                    self.failed.get_or_insert(error);
                }
                return;
            }
            Query::Presence { users } => Part::Presence(
                users
                    .into_iter()
                    .map(|user| {
                        let online = self.directory.is_online(&user);
                        PresenceInfo {
                            last_seen: if online {
                                None
                            } else {
                                self.sequencer.last_seen(&user)
                            },
                            user,
                            status: if online { "online" } else { "offline" },
                        }
                    })
                    .collect(),
            ),
        };
        self.turn.push(Output::Part {
            shard: origin.shard,
            gather,
            part,
        });
    }

    /// A `sync` or `resume`: every shard replays what it homes of `cursors` (and, for a
    /// sync, lists the rest). Every shard answers, even with nothing to replay: its answer
    /// comes after this shard's directory announcement, so live delivery from every shard
    /// is certain once `synced` arrives.
    pub(super) fn start_replay(
        &mut self,
        caller: &Caller,
        kind: GatherKind,
        cursors: &[Cursor],
        now: Now,
    ) {
        let per_conv = self.replay_share(cursors.len());
        let list_unnamed = matches!(kind, GatherKind::Sync);
        let by_home = self.cursors_by_home(cursors);
        let shards: Vec<usize> = (0..self.shards).collect();
        let query = |shard| Query::Sync {
            cursors: by_home.get(&shard).cloned().unwrap_or_default(),
            list_unnamed,
            per_conv,
        };
        self.scatter(caller, kind, &shards, query, now);
    }

    /// Ask `shards` and answer the session once all have.
    pub(super) fn scatter(
        &mut self,
        caller: &Caller,
        kind: GatherKind,
        shards: &[usize],
        mut query: impl FnMut(usize) -> Query,
        now: Now,
    ) {
        let gather = self.next_gather;
        self.next_gather += 1;
        let origin = caller.origin;
        if matches!(kind, GatherKind::Sync | GatherKind::Resume) {
            self.replaying.entry(origin.conn).or_default().running += 1;
        }
        self.gathers.insert(
            gather,
            Gather {
                conn: origin.conn,
                re: caller.re,
                user: caller.user.clone(),
                waiting: shards.len(),
                kind,
                convs: Vec::new(),
                more: Vec::new(),
                presence: Vec::new(),
            },
        );
        if shards.is_empty() {
            self.complete(gather);
            return;
        }
        for &shard in shards {
            let scatter = Scatter {
                gather,
                origin,
                user: caller.user.clone(),
                device: caller.device.clone(),
                query: query(shard),
            };
            if shard == self.shard {
                self.answer(scatter, now);
            } else {
                self.outgoing[shard].push_back(MeshEntry::Scatter(Box::new(scatter)));
            }
        }
    }

    pub(super) fn gathered(&mut self, gather: u64, part: Part) {
        let Some(pending) = self.gathers.get_mut(&gather) else {
            return;
        };
        match part {
            Part::Convs(convs) => pending.convs.extend(convs),
            Part::Synced { convs, more } => {
                pending.convs.extend(convs);
                pending.more.extend(more);
            }
            Part::Presence(users) => pending.presence.extend(users),
        }
        pending.waiting -= 1;
        if pending.waiting == 0 {
            self.complete(gather);
        }
    }

    fn complete(&mut self, gather: u64) {
        #[derive(Serialize)]
        struct ConvList<'a> {
            convs: &'a [ConvSummary],
        }
        #[derive(Serialize)]
        struct PresenceList<'a> {
            users: Vec<&'a PresenceInfo>,
        }
        let Some(mut done) = self.gathers.remove(&gather) else {
            return;
        };
        if matches!(done.kind, GatherKind::Search(_)) {
            self.hand_on_search(done);
            return;
        }
        done.convs
            .sort_by(|a, b| b.last_ts.cmp(&a.last_ts).then_with(|| a.conv.cmp(&b.conv)));
        done.more.sort_by(|a, b| a.conv.cmp(&b.conv));
        let conn = done.conn;
        match &done.kind {
            GatherKind::List => {
                let doc = encode_ok(done.re, &ConvList { convs: &done.convs });
                self.local.push((conn, Doc::Owned(doc), false));
            }
            GatherKind::Sync => {
                let doc = encode_ok(done.re, &ConvList { convs: &done.convs });
                self.local.push((conn, Doc::Owned(doc), false));
                self.replay_done(conn);
                let synced = Doc::Owned(event::synced(&done.more));
                self.local.push((conn, synced, false));
            }
            GatherKind::Resume => {
                self.replay_done(conn);
                let synced = Doc::Owned(event::synced(&done.more));
                self.local.push((conn, synced, false));
            }
            // Handed on above.
            GatherKind::Search(_) => {}
            GatherKind::Presence { order } => {
                let by_user: FastMap<&str, &PresenceInfo> =
                    done.presence.iter().map(|p| (p.user.as_str(), p)).collect();
                let users = order
                    .iter()
                    .filter_map(|u| by_user.get(u.as_str()).copied())
                    .collect();
                let doc = encode_ok(done.re, &PresenceList { users });
                self.local.push((conn, Doc::Owned(doc), false));
            }
        }
    }

    /// The user's conversations are known: the search can run (the conversation filter
    /// narrows them; a conversation the user is not in simply has no hits).
    fn hand_on_search(&mut self, done: Gather) {
        let GatherKind::Search(query) = done.kind else {
            return;
        };
        let mut convs: Vec<String> = done
            .convs
            .into_iter()
            .map(|summary| summary.conv)
            .filter(|conv| query.conv.as_ref().is_none_or(|only| only == conv))
            .collect();
        convs.sort_unstable();
        self.searches.push(SearchRequest {
            conn: done.conn,
            re: done.re,
            user: done.user,
            convs,
            query: *query,
        });
    }

    /// Each named conversation's share of one replay's `sync_max_messages`.
    fn replay_share(&self, named: usize) -> usize {
        (self.limits.sync_max_messages / named.max(1)).max(1)
    }

    /// A replay of `conn` finished: once none runs, what was held goes out (after the
    /// replayed messages, so the session sees each conversation in seq order; a message
    /// both replayed and held arrives twice, which the protocol allows).
    fn replay_done(&mut self, conn: u64) {
        let Some(replaying) = self.replaying.get_mut(&conn) else {
            return;
        };
        replaying.running -= 1;
        if replaying.running == 0 {
            if let Some(replaying) = self.replaying.remove(&conn) {
                self.local.extend(
                    replaying
                        .held
                        .into_iter()
                        .map(|(doc, eph)| (conn, doc, eph)),
                );
            }
        }
    }

    fn cursors_by_home(&self, cursors: &[Cursor]) -> FastMap<usize, Vec<Cursor>> {
        let mut by_home: FastMap<usize, Vec<Cursor>> = FastMap::default();
        for cursor in cursors {
            let home = conversation_home(&cursor.conv, self.shards as u32) as usize;
            by_home.entry(home).or_default().push(cursor.clone());
        }
        by_home
    }
}
