//! Parley's chat core. It knows nothing of sockets or of the runtime: its state machines
//! take inputs with `now` passed in and return effects (ARCHITECTURE.md, "Style").

pub mod auth;
pub mod mesh;
pub mod ownership;
pub mod protocol;
pub mod rate;
pub mod session;
