//! walship: ship PostgreSQL WAL with io_uring; acknowledge only what is durable.
//!
//! Imports flow one way: {`send`, `recv`} -> {`wal`, `wire`, `uring`}; `wal` and `wire` import
//! nothing of the crate (`wire` is bytes on the wire, `wal` is PostgreSQL's formats), and `uring`
//! holds all `unsafe`. `hub` (recv's `--serve-replication`) imports `wal` and `tls`; `recv` only
//! publishes durable positions to it. `recv::session` and the state machines (`send::sender`, `recv::receiver`,
//! `recv::flusher`) are pure: events in, decisions out.
pub mod archive;
pub mod auth;
pub mod config_file;
pub mod demo;
pub mod hub;
pub mod metrics;
pub mod progress;
pub mod recv;
pub mod report;
pub mod restore;
pub mod send;
pub mod status;
pub mod tls;
pub mod uring;
pub mod wal;
pub mod wire;
