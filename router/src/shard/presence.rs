//! Which shards hold whose sessions (the directory), and a user's coming online or
//! going offline, told to their co-members.

use std::sync::Arc;

use crate::clock::Now;
use crate::directory::PresenceChange;
use crate::event;
use crate::output::{Delivery, Output};
use crate::ownership::user_home;

use super::{MeshEntry, ShardCore};

impl ShardCore {
    /// Tell every shard (this one included) that this shard now holds, or no longer
    /// holds, sessions of `user`.
    pub(super) fn announce(&mut self, user: Arc<str>, present: bool, now: Now) {
        for shard in 0..self.shards {
            if shard != self.shard {
                self.outgoing[shard].push_back(MeshEntry::Directory {
                    user: user.clone(),
                    present,
                });
            }
        }
        self.on_directory(self.shard, user, present, now);
    }

    pub(super) fn on_directory(&mut self, from: usize, user: Arc<str>, present: bool, now: Now) {
        let change = self.directory.update(&user, from, present);
        let Some(change) = change else {
            return;
        };
        if user_home(&user, self.shards as u32) as usize != self.shard {
            return;
        }
        let last_seen = match change {
            PresenceChange::Online => None,
            PresenceChange::Offline => {
                if let Err(error) =
                    self.sequencer
                        .record_last_seen(&user, now.unix_ms, &mut self.log)
                {
                    self.failed.get_or_insert(error);
                }
                Some(now.unix_ms)
            }
        };
        let online = change == PresenceChange::Online;
        for shard in 0..self.shards {
            if shard != self.shard {
                self.outgoing[shard].push_back(MeshEntry::Presence {
                    user: user.clone(),
                    online,
                    last_seen,
                });
            }
        }
        self.tell_co_members(&user, online, last_seen);
    }

    pub(super) fn tell_co_members(&mut self, user: &str, online: bool, last_seen: Option<u64>) {
        let co_members = self.sequencer.co_members(user);
        if co_members.is_empty() {
            return;
        }
        let users: Arc<[Arc<str>]> = co_members.into_iter().collect();
        let delivery = Delivery {
            users,
            except: None,
            doc: event::presence(user, online, last_seen),
            ephemeral: true,
        };
        self.route(Output::Deliver(Arc::new(delivery)));
    }
}
