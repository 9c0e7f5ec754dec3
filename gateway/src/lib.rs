//! `parleyd`: the gateway daemon. Configuration, the shard runtime, the WebSocket
//! transport, the admin listener and the process lifecycle.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod runtime;
pub mod ws;
