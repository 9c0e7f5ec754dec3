//! Parley's chat core. It knows nothing of sockets or of the runtime: its state machines
//! take inputs with `now` passed in and return effects (ARCHITECTURE.md, "Style").

pub mod auth;
pub mod chat_log;
pub mod command;
pub mod conversation;
pub mod event;
pub mod fast;
pub mod framing;
pub mod limits;
pub mod mesh;
pub mod output;
pub mod ownership;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod record;
pub mod sequencer;
pub mod session;
pub mod shard;
