//! The chat core's limits. Every field is a named, documented setting of `parleyd`
//! (docs/configuration.md); the defaults are the protocol's where it names one.

use std::time::Duration;

/// How long a `typing` signal lasts without a fresh `on` (PROTOCOL.md section 6: 5 s).
pub const TYPING_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ChatLimits {
    /// Largest message body, in bytes (`too_large` above it).
    pub max_body_bytes: usize,
    /// Largest `media` object of a message, in bytes of JSON.
    pub max_media_bytes: usize,
    /// Members per group, the creator included.
    pub max_group_members: usize,
    /// `history` page size when the client names none.
    pub history_page_default: usize,
    /// Largest `history` page a client may ask for.
    pub history_page_max: usize,
    /// Resent `cmid`s are recognised for at least this long...
    pub dedupe_window: Duration,
    /// ...and for at least this many of the conversation's latest sends.
    pub dedupe_window_sends: usize,
    /// Messages one `sync` or `hello` resume replays in all, shared evenly by the named
    /// conversations (at least one each); the rest is named in `synced.more` for the
    /// client to fetch. Bounded so that a replay fits the session's outbound queue.
    pub sync_max_messages: usize,
    /// Cursors one `sync` or `resume` may name.
    pub sync_max_convs: usize,
    /// Users one `presence.get` may name.
    pub presence_get_max_users: usize,
    /// Newest messages per conversation kept in memory; older ones are read from the log.
    pub message_cache_per_conv: usize,
    /// Hits one `search` can page through (its cursors stop there).
    pub search_max_results: usize,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024,
            max_media_bytes: 4 * 1024,
            max_group_members: 1_000,
            history_page_default: 50,
            history_page_max: 200,
            dedupe_window: Duration::from_secs(24 * 3600),
            dedupe_window_sends: 10_000,
            sync_max_messages: 500,
            sync_max_convs: 256,
            presence_get_max_users: 500,
            message_cache_per_conv: 64,
            search_max_results: 1_000,
        }
    }
}

/// The most members a group may be configured for.
pub const MAX_GROUP_MEMBERS_CEILING: usize = 100_000;
