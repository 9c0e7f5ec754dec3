//! Parley's append-only write-ahead log. It knows nothing of chat.
//!
//! The log itself (segments, framing, group commit, recovery) is built in its own issue;
//! this crate exists now so the dependency direction `gateway -> router -> wal` is fixed
//! from the first commit.
