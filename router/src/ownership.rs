//! Who owns what (ARCHITECTURE.md, "Ownership"): a conversation's home shard is its
//! sequencer; a user's home shard keeps presence, last seen and the session directory.
//!
//! Both use jump consistent hashing (Lamping and Veach, 2014) of a stable 64-bit hash of
//! the id: every node computes the same owner with no table, and growing from n to n+1
//! buckets moves only about 1/(n+1) of the keys. The hash is written here rather than
//! taken from a crate so that it can never change under us: owners are persisted facts.

/// 64-bit FNV-1a.
pub fn fnv1a64(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a, then the splitmix64 finaliser so that similar ids spread over all 64 bits.
pub fn stable_hash(id: &str) -> u64 {
    let mut hash = fnv1a64(id);
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Jump consistent hash: the bucket in `0..buckets` for `key`.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "at least one bucket");
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < i64::from(buckets) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// The shard that sequences conversation `conv`.
pub fn conversation_home(conv: &str, shards: u32) -> u32 {
    jump_hash(stable_hash(conv), shards)
}

/// The shard that keeps user `user`'s presence and session directory.
pub fn user_home(user: &str, shards: u32) -> u32 {
    // A distinct domain, so a user and a conversation with the same id spread independently.
    jump_hash(stable_hash(user) ^ 0x5bd1_e995_5bd1_e995, shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    }

    // Golden values from an independent transcription of the algorithms (Python, in the
    // commit that added them). If these change, every persisted ownership decision does.
    #[test]
    fn owners_are_stable_across_versions() {
        let ids = ["alice", "bob", "d:alice:bob", "g:01HZX", "conv-7", "x"];
        let convs: Vec<u32> = ids.iter().map(|id| conversation_home(id, 16)).collect();
        assert_eq!(convs, [5, 2, 0, 5, 8, 5]);
        let users: Vec<u32> = ids.iter().map(|id| user_home(id, 16)).collect();
        assert_eq!(users, [15, 12, 15, 9, 9, 7]);
        let keys = [0, 1, 2, 0xdead_beef, u64::MAX];
        let buckets: Vec<u32> = keys.iter().map(|&k| jump_hash(k, 1000)).collect();
        assert_eq!(buckets, [0, 549, 338, 285, 313]);
    }

    #[test]
    fn spreads_evenly() {
        let shards = 8;
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[conversation_home(&format!("conv-{i}"), shards) as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn growing_moves_few_keys() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let moved = ids
            .iter()
            .filter(|id| user_home(id, 10) != user_home(id, 11))
            .count();
        // Ideal: 1/11 of the keys (about 1,818).
        assert!((1_500..2_200).contains(&moved), "{moved} moved");
        // And every moved key moved to the new shard.
        assert!(ids
            .iter()
            .filter(|id| user_home(id, 10) != user_home(id, 11))
            .all(|id| user_home(id, 11) == 10));
    }

    #[test]
    fn one_shard_owns_everything() {
        assert_eq!(conversation_home("x", 1), 0);
        assert_eq!(user_home("x", 1), 0);
    }
}
