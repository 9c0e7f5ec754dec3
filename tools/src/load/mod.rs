//! `parley-load`'s engine: clients, workers, scenarios, statistics and reports.
//!
//! A run is planned up front (`scenario`), executed by pinned worker threads each
//! running an epoll loop over its share of the clients (`worker`, `client`) or, for the
//! idle scenario, io_uring over direct descriptors (`uring`), paced and
//! watched by the main thread (`run`, which a signal stops early: `stop`), and summarised
//! as a `report::Report` that the binary prints as a table, JSON or an HTML page (`html`).
//! The mixed scenario's churn (`--churn`) adds misbehaving sessions of its own (`churn`)
//! and chat clients that drop or stop reading (`client`), each checked against the protocol.

pub mod churn;
pub mod client;
pub mod html;
pub mod nats;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod stop;
pub mod uring;
pub mod wire;
pub mod worker;
