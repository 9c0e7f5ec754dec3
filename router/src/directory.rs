//! The session directory: which shards hold live sessions of which users. Every shard
//! keeps a copy (a bit per shard per online user), fed by the shards' announcements, so
//! a fan-out goes only to the shards that need it. On a user's home shard the same copy
//! decides presence: online while any shard holds a session, offline when the last ends.

use crate::seeded_map::FastMap;
use std::sync::Arc;

/// Shards a directory can name: one bit each.
pub const MAX_SHARDS: usize = 64;

/// A user's presence moved (seen on their home shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    Online,
    Offline,
}

#[derive(Debug, Default)]
pub struct Directory {
    /// user -> bit k set while shard k holds a live session of theirs. Offline users
    /// have no entry, so the map is as large as the online population.
    shards_of: FastMap<Arc<str>, u64>,
}

impl Directory {
    /// Shard `shard` announced that it now holds (or no longer holds) sessions of `user`.
    /// Returns the presence change, if the user came online or went offline.
    pub fn update(
        &mut self,
        user: &Arc<str>,
        shard: usize,
        present: bool,
    ) -> Option<PresenceChange> {
        assert!(
            shard < MAX_SHARDS,
            "shard {shard} beyond the directory's {MAX_SHARDS}"
        );
        let bit = 1u64 << shard;
        let before = self.mask(user);
        let after = if present { before | bit } else { before & !bit };
        if after == 0 {
            self.shards_of.remove(user);
        } else {
            self.shards_of.insert(user.clone(), after);
        }
        match (before == 0, after == 0) {
            (true, false) => Some(PresenceChange::Online),
            (false, true) => Some(PresenceChange::Offline),
            _ => None,
        }
    }

    /// The shards holding sessions of `user`, as a bit mask.
    pub fn mask(&self, user: &str) -> u64 {
        self.shards_of.get(user).copied().unwrap_or(0)
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.mask(user) != 0
    }

    /// Users with at least one live session anywhere.
    pub fn online_users(&self) -> usize {
        self.shards_of.len()
    }
}

/// Iterate the shard indices set in a mask.
pub fn shards_in(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let shard = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(shard)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_until_the_last_shard_lets_go() {
        let mut directory = Directory::default();
        let alice: Arc<str> = Arc::from("alice");
        assert_eq!(
            directory.update(&alice, 0, true),
            Some(PresenceChange::Online)
        );
        // A second shard (another device) changes nothing visible.
        assert_eq!(directory.update(&alice, 3, true), None);
        assert_eq!(directory.mask("alice"), 0b1001);
        assert_eq!(
            shards_in(directory.mask("alice")).collect::<Vec<_>>(),
            vec![0, 3]
        );
        assert_eq!(directory.update(&alice, 0, false), None);
        assert!(directory.is_online("alice"));
        assert_eq!(
            directory.update(&alice, 3, false),
            Some(PresenceChange::Offline)
        );
        assert!(!directory.is_online("alice"));
        assert_eq!(directory.online_users(), 0);
        // A repeated announcement is harmless.
        assert_eq!(directory.update(&alice, 3, false), None);
    }
}
