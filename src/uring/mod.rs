//! The io_uring layer: the ring, its buffers, and nothing else. All `unsafe` of the data path lives here.
pub mod buffers;
pub mod ring;

pub use buffers::{prefetch, BufferPool, SegmentMap, POOL_ALIGN_BYTES};
pub use ring::{accepted_stream, Capabilities, Completion, CompletionKind, Ring, RingError, SendBatch, IOV_MAX};

#[cfg(test)]
mod tests;
