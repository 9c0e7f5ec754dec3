//! `parleyd`: the gateway daemon. Configuration, the shard runtime, the WebSocket
//! and QUIC transports, the admin listener and the process lifecycle.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod kernel_tcp;
pub mod metrics;
pub mod quic;

pub mod runtime;
pub mod search;
pub mod uring;
pub mod wheel;
pub mod ws;
