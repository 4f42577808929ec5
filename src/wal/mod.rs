//! WAL domain: LSNs, segment names, page headers, record walk, and a synthetic WAL generator.
//!
//! Everything here is pure computation over bytes (except `gen`, which writes test files, and
//! `read_segment_head`): no I/O in the parsers and no `unsafe`. Parsers never panic on input bytes; bad data is a typed error or an end reason.
#![forbid(unsafe_code)]

pub mod control;
pub mod gen;
pub mod history;
pub mod lsn;
pub mod page;
pub mod record;
pub mod segment;

pub use lsn::Lsn;
pub use page::*;
pub use record::*;
pub use segment::*;
