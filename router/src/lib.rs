//! Parley's chat core. It knows nothing of sockets or of the runtime: its state machines
//! take inputs with `now` passed in and return effects (ARCHITECTURE.md, "Style").

pub mod auth;
pub mod chat_log;
pub mod clock;
pub mod command;
pub mod conversation;
pub mod directory;
pub mod event;
pub mod framing;
pub mod limits;
pub mod memory_pipe;
pub mod mesh;
pub mod output;
pub mod ownership;
pub mod protocol;
pub mod rate;
pub mod record;
pub mod search;
pub mod seeded_map;
pub mod sequencer;
pub mod session;
pub mod shard;
