//! The long-term archive in S3-compatible object storage (issue #13): settings, key layout, the
//! store client (create-only uploads carrying a SHA-256, verified reads) and the receiver's archiver.
//!
//! The store is driven by `object_store` on a tokio runtime that runs on a thread of its own (the
//! archiver's) or inside a [`BlockingStore`]: nothing here runs on, or waits for, the receiver's
//! io_uring loop. The archiver learns what to upload from the receiver's directory alone (complete
//! segments are durable by construction, history files are written durably before they get their
//! name), so it needs no hook in the data path.
#![forbid(unsafe_code)]

pub mod archiver;
pub mod compress;
pub mod keys;
pub mod partial;
pub mod restore;
pub mod prune;
pub mod retention;
pub mod settings;
pub mod store;
pub mod verify;

pub use archiver::{ArchiveConfig, ArchiveMetrics, Archiver};
pub use compress::Compression;
pub use settings::{ArchiveSettings, ArchiveUrl, Secret};
pub use store::{BlockingStore, ObjectInfo, PutOutcome, Store};

use std::path::PathBuf;

/// What can go wrong with the archive. Messages name the object (`s3://BUCKET/KEY`) or the setting.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive location {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("archive endpoint {endpoint:?}: {why}")]
    BadEndpoint { endpoint: String, why: String },
    #[error("archive credentials: {0}")]
    Credentials(String),
    #[error("archive option: {0}")]
    Option(String),
    #[error("cannot set up the S3 client: {0}")]
    Client(String),
    #[error("cannot start the archive's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("archive store: {op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error(
        "archive CONFLICT: {object} already exists with SHA-256 {theirs}, but the local {local} has SHA-256 {ours}: \
         another primary (or another receiver) writes into the same archive; archiving stopped"
    )]
    Conflict { object: String, local: String, ours: String, theirs: String },
    #[error("object {object} carries no walship-sha256 metadata: it was not written by walship, its content cannot be verified")]
    NoChecksum { object: String },
    #[error("object {object} is damaged: its content has SHA-256 {actual}, its metadata says {expected}")]
    Corrupt { object: String, expected: String, actual: String },
    #[error("object {object} is damaged: its {compression} body does not decode ({why}); its metadata says the file has SHA-256 {expected}")]
    Undecodable { object: String, compression: String, why: String, expected: String },
    #[error("object {object} says it is compressed with {value:?}, which this walship cannot read (none, zstd, lz4)")]
    UnknownCompression { object: String, value: String },
    #[error("object {object} was reported as existing and then was not there")]
    Vanished { object: String },
    #[error("reading {path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
