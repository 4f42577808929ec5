//! walship: ship PostgreSQL WAL with io_uring; acknowledge only what is durable.
//!
//! Imports flow one way: `wal` <- `wire` <- {`send`, `recv`} -> `uring`.
pub mod auth;
pub mod config_file;
pub mod demo;
pub mod metrics;
pub mod progress;
pub mod recv;
pub mod restore;
pub mod send;
pub mod status;
pub mod tls;
pub mod uring;
pub mod wal;
pub mod wire;
