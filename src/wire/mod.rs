//! Wire protocol v1: frames exchanged between sender and receiver over TCP.
//!
//! Every frame is a fixed 32-byte [`FrameHeader`] followed by `body_len` body bytes; both the header and the
//! body carry a CRC-32C. `frame` encodes and validates single frames and control bodies; `decode` turns a
//! byte stream, split in any way, into whole [`Message`]s with a bounded buffer.
//!
//! LSNs are plain `u64` here (byte positions in the WAL stream), so this module depends on nothing else in
//! the crate. Decoding never panics on any input bytes: every length is checked against a limit first.
pub mod decode;
pub mod frame;

pub use decode::*;
pub use frame::*;

#[cfg(test)]
mod tests;
