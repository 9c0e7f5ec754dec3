//! Hash maps of the hot path, with a fast seeded hasher instead of SipHash.
//!
//! Seeds are random per process, so peers cannot aim collisions at the maps. The
//! deterministic simulator needs the same run for the same seed, iteration orders and
//! minted ids included: it asks for fixed seeds on its own thread.

use std::cell::Cell;
use std::hash::BuildHasher;

use foldhash::fast::{FoldHasher, SeedableRandomState};

pub type FastMap<K, V> = std::collections::HashMap<K, V, Seeds>;
pub type FastSet<T> = std::collections::HashSet<T, Seeds>;

thread_local! {
    static FIXED_SEEDS: Cell<bool> = const { Cell::new(false) };
}

/// Maps and ids created on this thread from now on hash with fixed seeds, so a
/// simulation replays exactly. Never called by `parleyd`.
pub fn fix_seeds_on_this_thread() {
    FIXED_SEEDS.with(|fixed| fixed.set(true));
}

/// The hasher of [`FastMap`] and [`FastSet`]: random seeds, or fixed ones on a thread
/// that asked for them.
#[derive(Clone, Debug)]
pub struct Seeds(SeedableRandomState);

impl Default for Seeds {
    fn default() -> Self {
        if FIXED_SEEDS.with(Cell::get) {
            Self(SeedableRandomState::fixed())
        } else {
            Self(SeedableRandomState::random())
        }
    }
}

impl BuildHasher for Seeds {
    type Hasher = FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}
