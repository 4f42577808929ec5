//! Incremental, bounded frame decoder: bytes in any split -> whole messages; never panics.
//!
//! Usage: after every [`Decoder::feed`], call [`Decoder::next_message`] until it returns `Ok(None)`. The
//! buffer never holds more than [`Decoder::buffered_max`] bytes = 2 x (header + largest body): room for one
//! partial frame plus one read of up to a whole frame. Feeding more than [`Decoder::room`] bytes fails the
//! decoder with [`WireError::BufferOverflow`] instead of growing. Each header is validated (limits included)
//! as soon as its 32 bytes arrive, before any of its body is waited for.
//!
//! After any error the decoder stays failed: every later `next_message` returns the same error and `feed`
//! drops its input. A stream that lost sync cannot be resynchronised safely, so the connection must close.
//!
//! Data payloads are copied into [`Message::Data`]. A data path that wants zero copies can instead read 32
//! bytes, validate them with [`FrameHeader::decode`], receive `body_len` bytes straight into its own (aligned)
//! buffer, and check them with [`FrameHeader::verify_body`]; control bodies then go through [`decode_control`].

use crate::wire::frame::{
    decode_control, FrameHeader, Limits, Message, WireError, FRAME_HEADER_LEN,
};

/// Incremental decoder: feed bytes as they arrive in any split; yields whole messages.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// Bytes received; `buf[start..]` are not yet consumed.
    buf: Vec<u8>,
    start: usize,
    /// Header of the frame at `buf[start..]`, once validated.
    pending: Option<FrameHeader>,
    failed: Option<WireError>,
    buffered_max: usize,
}

impl Decoder {
    /// A decoder enforcing `limits` (Data bodies above [`crate::wire::DATA_BODY_BYTES_MAX_LIMIT`] are
    /// rejected whatever `limits` says).
    pub fn new(limits: Limits) -> Decoder {
        let frame_max = FRAME_HEADER_LEN + limits.body_bytes_max() as usize;
        Decoder {
            limits,
            buf: Vec::new(),
            start: 0,
            pending: None,
            failed: None,
            buffered_max: 2 * frame_max,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends `bytes` to the buffer. If that would exceed [`Decoder::buffered_max`], the decoder fails with
    /// [`WireError::BufferOverflow`] (reported by the next `next_message`) and the buffer is released.
    /// Input fed after a failure is dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() || bytes.is_empty() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let needed = self.buf.len().saturating_add(bytes.len());
        if needed > self.buffered_max {
            self.fail(WireError::BufferOverflow {
                buffered: needed,
                max: self.buffered_max,
            });
            return;
        }
        if needed > self.buf.capacity() {
            // Grow geometrically but never past the cap, so capacity stays bounded too.
            let target = needed
                .max(self.buf.capacity().saturating_mul(2))
                .min(self.buffered_max);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
        debug_assert!(self.buf.len() <= self.buffered_max);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed, or the error that failed the stream.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let header = match self.pending {
            Some(h) => h,
            None => {
                if avail.len() < FRAME_HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; FRAME_HEADER_LEN];
                raw.copy_from_slice(&avail[..FRAME_HEADER_LEN]);
                match FrameHeader::decode(&raw, &self.limits) {
                    Ok(h) => {
                        self.pending = Some(h);
                        h
                    }
                    Err(e) => return Err(self.fail(e)),
                }
            }
        };
        let total = FRAME_HEADER_LEN + header.body_len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        match decode_control(&header, &avail[FRAME_HEADER_LEN..total]) {
            Ok(msg) => {
                self.start += total;
                self.pending = None;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                debug_assert_eq!(msg.kind(), header.kind);
                Ok(Some(msg))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Bytes buffered and not yet returned as messages (0 after a failure).
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Most bytes the buffer ever holds: 2 x (header + largest body under the limits).
    pub fn buffered_max(&self) -> usize {
        self.buffered_max
    }

    /// Bytes that can be fed right now without overflowing (call after draining with `next_message`).
    pub fn room(&self) -> usize {
        self.buffered_max - self.buffered_len()
    }

    /// The error that failed this decoder, if any.
    pub fn error(&self) -> Option<&WireError> {
        self.failed.as_ref()
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.failed = Some(e.clone());
        self.pending = None;
        self.buf = Vec::new();
        self.start = 0;
        e
    }
}
