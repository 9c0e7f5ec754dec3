//! Parley's append-only write-ahead log. It knows nothing of chat: records are typed bytes
//! with an LSN, an epoch and a timestamp.

pub mod format;
pub mod scan;
