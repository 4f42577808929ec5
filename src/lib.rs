//! walship: ship PostgreSQL WAL with io_uring; acknowledge only what is durable.
//!
//! Imports flow one way: `wal` <- `wire` <- {`send`, `recv`} -> `uring`.
pub mod demo;
pub mod recv;
pub mod restore;
pub mod send;
pub mod uring;
pub mod wal;
pub mod wire;
