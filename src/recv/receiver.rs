//! The receiver's state machine: frames in, writes/fsyncs/renames/acks out. No I/O here.
//!
//! Positions, each "last byte + 1" as in PostgreSQL's walreceiver:
//! - `received`: every byte below it arrived in a frame whose CRC verified;
//! - `written`: every byte below it is in a completed write;
//! - `flushed`: every byte below it is covered by a completed fdatasync (and its file's
//!   directory entry is durable). Only `flushed` is ever acknowledged as durable.
//!
//! Invariant, asserted on every transition: `flushed <= written <= received`, acks never move
//! backwards.
//!
//! Buffers: the LSN space is cut into chunks of `chunk_bytes` (one pool slot each, never
//! crossing a segment boundary). A frame's body is received piece by piece straight into the
//! chunks it covers; it is written only after the whole frame verified. A chunk is written with
//! O_DIRECT from its slot, whole aligned blocks only: a tail that ends mid-block is written as
//! the whole block (zero padded) and rewritten as more bytes arrive.

use std::collections::{BTreeSet, VecDeque};

use super::flusher::{FlushPolicy, Flusher, FsyncRequest};
use crate::wal::Lsn;

#[derive(Debug, Clone, Copy)]
pub struct ReceiverConfig {
    pub seg_size: u64,
    /// Bytes per chunk (== pool slot); a power of two dividing `seg_size`.
    pub chunk_bytes: u64,
    /// Number of pool slots.
    pub slots: usize,
    /// O_DIRECT alignment for offsets and lengths (logical block size of the device).
    pub align_bytes: u64,
    pub flush: FlushPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create (or open, when it exists) `segno`'s `.partial` file, ready for O_DIRECT writes.
    OpenSegment { segno: u64 },
    /// Copy `len` bytes at `file_offset` of `segno`'s file into `slot` at `slot_offset` (the part
    /// of an aligned block that is already durable on disk, before a resumed stream extends it).
    Prefill { segno: u64, slot: usize, slot_offset: usize, file_offset: u64, len: usize },
    /// Receive exactly `len` body bytes into `slot` at `slot_offset`.
    RecvPiece { slot: usize, slot_offset: usize, len: usize },
    /// Write `len` bytes of `slot` from `slot_offset` to `file_offset` of `segno`'s file, after
    /// zeroing the slot from `slot_offset + valid_len` to `slot_offset + len` (block padding).
    Write { write_id: u64, segno: u64, slot: usize, slot_offset: usize, len: usize, valid_len: usize, file_offset: u64 },
    Fsync(FsyncRequest),
    /// The segment is complete and durable: rename `.partial` to its final name and close it.
    CompleteSegment { segno: u64 },
    /// Tell the sender how far we got.
    Ack { written: Lsn, flushed: Lsn },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiverError {
    #[error("data frame at {got} does not continue the stream at {expected}")]
    NotContiguous { expected: Lsn, got: Lsn },
    #[error("data frame at {lsn} is empty")]
    EmptyFrame { lsn: Lsn },
    #[error("data frame of {len} bytes at {lsn} exceeds what the buffer pool can hold ({max} bytes)")]
    FrameTooLarge { lsn: Lsn, len: u64, max: u64 },
    #[error("data frame at {lsn} arrived while another frame was still being received")]
    FrameInProgress { lsn: Lsn },
    #[error("write of {segment} at offset {offset} failed: {reason}")]
    WriteFailed { segment: u64, offset: u64, reason: String },
}

#[derive(Debug)]
struct Chunk {
    slot: usize,
    /// LSN of the chunk's first byte (chunk-aligned).
    start: Lsn,
    /// Bytes below this are verified and in the slot.
    received_end: Lsn,
    /// Bytes below this are in completed writes.
    written_end: Lsn,
    /// Lowest byte not yet covered by an issued write.
    unwritten_from: Lsn,
    /// Bytes below this are in the slot but belong to a frame not yet verified.
    unverified_end: Lsn,
    /// The write in flight and the data end it covers.
    write_in_flight: Option<(u64, Lsn)>,
}

#[derive(Debug)]
struct FrameInProgress {
    end: Lsn,
    /// Next body byte to ask for.
    next: Lsn,
    /// A piece has been asked for and has not completed.
    piece_pending: bool,
}

#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    received: Lsn,
    written: Lsn,
    acked_flushed: Lsn,
    chunks: VecDeque<Chunk>,
    free_slots: Vec<usize>,
    /// Segments with an open file, not yet complete and durable.
    open_segments: BTreeSet<u64>,
    frame: Option<FrameInProgress>,
    /// The connection ended: settled tail chunks may be released.
    stream_stopped: bool,
    flusher: Flusher,
    next_write_id: u64,
}

impl Receiver {
    /// `durable`: what the directory already holds durably; the stream continues there.
    pub fn new(cfg: ReceiverConfig, durable: Lsn) -> Receiver {
        assert!(cfg.chunk_bytes.is_power_of_two() && cfg.seg_size % cfg.chunk_bytes == 0);
        assert!(cfg.align_bytes.is_power_of_two() && cfg.chunk_bytes % cfg.align_bytes == 0);
        assert!(cfg.slots >= 2);
        Receiver {
            cfg,
            received: durable,
            written: durable,
            acked_flushed: durable,
            chunks: VecDeque::new(),
            free_slots: (0..cfg.slots).rev().collect(),
            open_segments: BTreeSet::new(),
            frame: None,
            stream_stopped: false,
            flusher: Flusher::new(cfg.flush, durable),
            next_write_id: 1,
        }
    }

    pub fn received(&self) -> Lsn {
        self.received
    }
    pub fn written(&self) -> Lsn {
        self.written
    }
    pub fn flushed(&self) -> Lsn {
        self.flusher.flushed()
    }

    /// Largest body a frame may have: half the pool, so a frame never waits on itself.
    pub fn frame_bytes_max(&self) -> u64 {
        self.cfg.chunk_bytes * (self.cfg.slots as u64 / 2).max(1)
    }

    /// Everything received is written and flushed, and nothing is in flight.
    pub fn is_drained(&self) -> bool {
        self.frame.is_none()
            && self.chunks.iter().all(|c| c.write_in_flight.is_none())
            && self.written == self.received
            && self.flushed() == self.received
            && self.flusher.batches_in_flight() == 0
    }

    fn check_invariants(&self) {
        let flushed = self.flushed();
        assert!(flushed <= self.written, "flushed {flushed} ahead of written {}", self.written);
        assert!(self.written <= self.received, "written {} ahead of received {}", self.written, self.received);
        assert!(self.acked_flushed <= flushed);
        debug_assert!(self.chunks.iter().zip(self.chunks.iter().skip(1)).all(|(a, b)| a.start < b.start));
    }

    /// A data frame header arrived. Returns the first actions for receiving its body.
    pub fn on_data_header(&mut self, lsn: Lsn, len: u64, out: &mut Vec<Action>) -> Result<(), ReceiverError> {
        if self.frame.is_some() {
            return Err(ReceiverError::FrameInProgress { lsn });
        }
        if len == 0 {
            return Err(ReceiverError::EmptyFrame { lsn });
        }
        if len > self.frame_bytes_max() {
            return Err(ReceiverError::FrameTooLarge { lsn, len, max: self.frame_bytes_max() });
        }
        if lsn != self.received {
            return Err(ReceiverError::NotContiguous { expected: self.received, got: lsn });
        }
        self.frame = Some(FrameInProgress { end: lsn + len, next: lsn, piece_pending: false });
        self.next_piece(out);
        Ok(())
    }

    /// Whether a frame body is being received (and so the socket must not be read for headers).
    pub fn frame_in_progress(&self) -> bool {
        self.frame.is_some()
    }

    /// Whether the frame is blocked waiting for a slot or a chunk write (retry `next_piece` later).
    pub fn frame_waiting(&self) -> bool {
        matches!(&self.frame, Some(f) if !f.piece_pending && f.next < f.end)
    }

    /// Asks for the next piece of the frame body, if a chunk can take it now.
    pub fn next_piece(&mut self, out: &mut Vec<Action>) {
        let Some(frame) = &self.frame else { return };
        if frame.piece_pending || frame.next >= frame.end {
            return;
        }
        let next = frame.next;
        let end = frame.end;
        let chunk_start = Lsn(next.0 & !(self.cfg.chunk_bytes - 1));
        let chunk_end = chunk_start + self.cfg.chunk_bytes;
        let index = match self.chunks.iter().position(|c| c.start == chunk_start) {
            Some(i) => i,
            None => match self.new_chunk(chunk_start, next, out) {
                Some(i) => i,
                None => return, // no free slot: wait for a write to complete
            },
        };
        let chunk = &mut self.chunks[index];
        if chunk.write_in_flight.is_some() {
            return; // the kernel reads this slot; receive into it after the write completes
        }
        let piece_end = end.min(chunk_end);
        let len = (piece_end - next) as usize;
        let slot_offset = (next - chunk.start) as usize;
        chunk.unverified_end = piece_end;
        out.push(Action::RecvPiece { slot: chunk.slot, slot_offset, len });
        let frame = self.frame.as_mut().expect("frame");
        frame.next = piece_end;
        frame.piece_pending = true;
    }

    fn new_chunk(&mut self, chunk_start: Lsn, first: Lsn, out: &mut Vec<Action>) -> Option<usize> {
        let slot = self.free_slots.pop()?;
        let segno = chunk_start.0 / self.cfg.seg_size;
        if self.open_segments.insert(segno) {
            out.push(Action::OpenSegment { segno });
        }
        // The stream may resume mid-block: the block's head is on disk already; put it back
        // into the slot so the block can be rewritten whole.
        let block_start = Lsn(first.0 & !(self.cfg.align_bytes - 1)).max(chunk_start);
        if block_start < first {
            out.push(Action::Prefill {
                segno,
                slot,
                slot_offset: (block_start - chunk_start) as usize,
                file_offset: block_start.0 % self.cfg.seg_size,
                len: (first - block_start) as usize,
            });
        }
        self.chunks.push_back(Chunk {
            slot,
            start: chunk_start,
            received_end: first,
            written_end: first,
            unwritten_from: first,
            unverified_end: first,
            write_in_flight: None,
        });
        Some(self.chunks.len() - 1)
    }

    /// The piece asked for last has fully arrived (the io layer guarantees all `len` bytes).
    /// Returns true when the whole body is in: the io layer then verifies the CRC over the
    /// frame's pieces and calls `on_frame_verified` or fails the connection.
    pub fn on_piece_received(&mut self, out: &mut Vec<Action>) -> bool {
        let frame = self.frame.as_mut().expect("piece without frame");
        assert!(frame.piece_pending);
        frame.piece_pending = false;
        if frame.next < frame.end {
            self.next_piece(out);
            return false;
        }
        true
    }

    /// The pieces holding the frame's body, in order, for CRC verification:
    /// (LSN, slot, slot offset, length).
    pub fn frame_pieces(&self) -> Vec<(Lsn, usize, usize, usize)> {
        let mut pieces = Vec::new();
        for chunk in &self.chunks {
            if chunk.unverified_end > chunk.received_end {
                let off = (chunk.received_end - chunk.start) as usize;
                pieces.push((chunk.received_end, chunk.slot, off, (chunk.unverified_end - chunk.received_end) as usize));
            }
        }
        pieces
    }

    /// The frame's CRC verified: its bytes count as received; write what can be written.
    pub fn on_frame_verified(&mut self, now_us: u64, out: &mut Vec<Action>) {
        let frame = self.frame.take().expect("verified without frame");
        assert!(!frame.piece_pending && frame.next == frame.end);
        for chunk in self.chunks.iter_mut() {
            if chunk.unverified_end > chunk.received_end {
                chunk.received_end = chunk.unverified_end;
            }
        }
        assert!(frame.end > self.received);
        self.received = frame.end;
        self.issue_writes(out);
        self.poll_flush(now_us, out);
        self.check_invariants();
    }

    /// The connection ended (possibly mid-frame): forget unverified bytes, let the tail go once
    /// it is written.
    pub fn abandon_frame(&mut self) {
        self.frame = None;
        self.stream_stopped = true;
        for chunk in self.chunks.iter_mut() {
            chunk.unverified_end = chunk.received_end;
        }
        self.release_idle_chunks(true);
    }

    fn issue_writes(&mut self, out: &mut Vec<Action>) {
        let align = self.cfg.align_bytes;
        for chunk in self.chunks.iter_mut() {
            if chunk.write_in_flight.is_some() || chunk.unwritten_from >= chunk.received_end {
                continue;
            }
            let from = Lsn(chunk.unwritten_from.0 & !(align - 1)).max(chunk.start);
            let to = Lsn((chunk.received_end.0 + align - 1) & !(align - 1));
            debug_assert!(to <= chunk.start + self.cfg.chunk_bytes);
            let write_id = self.next_write_id;
            self.next_write_id += 1;
            let segno = chunk.start.0 / self.cfg.seg_size;
            out.push(Action::Write {
                write_id,
                segno,
                slot: chunk.slot,
                slot_offset: (from - chunk.start) as usize,
                len: (to - from) as usize,
                valid_len: (chunk.received_end - from) as usize,
                file_offset: from.0 % self.cfg.seg_size,
            });
            chunk.write_in_flight = Some((write_id, chunk.received_end));
            chunk.unwritten_from = chunk.received_end;
        }
    }

    /// A write completed successfully (all bytes: a short O_DIRECT write is an error).
    pub fn on_write_done(&mut self, write_id: u64, now_us: u64, out: &mut Vec<Action>) {
        let index = self
            .chunks
            .iter()
            .position(|c| matches!(c.write_in_flight, Some((id, _)) if id == write_id))
            .expect("completion for an unknown write");
        let chunk = &mut self.chunks[index];
        let (_, covered_end) = chunk.write_in_flight.take().expect("write in flight");
        assert!(covered_end >= chunk.written_end);
        chunk.written_end = covered_end;
        let segno = chunk.start.0 / self.cfg.seg_size;
        self.flusher.on_write_completed(segno, now_us);
        self.recompute_written();
        self.issue_writes(out);
        self.release_idle_chunks(self.stream_stopped);
        self.next_piece(out);
        self.poll_flush(now_us, out);
        self.check_invariants();
    }

    /// A file was created in (or renamed within) the directory.
    pub fn on_directory_changed(&mut self, now_us: u64) {
        self.flusher.on_directory_changed(now_us);
    }

    fn recompute_written(&mut self) {
        let written = self
            .chunks
            .iter()
            .find(|c| c.written_end < c.received_end)
            .map_or(self.received, |c| c.written_end);
        assert!(written >= self.written, "written would move backwards");
        self.written = written;
    }

    /// Frees slots of chunks that are full and written; with `include_tail` (the stream
    /// stopped) also a settled partial tail chunk: its bytes are on disk, and a resumed stream
    /// prefills the block from there.
    fn release_idle_chunks(&mut self, include_tail: bool) {
        let chunk_bytes = self.cfg.chunk_bytes;
        let mut i = 0;
        while i < self.chunks.len() {
            let c = &self.chunks[i];
            let full = c.received_end == c.start + chunk_bytes;
            let settled = c.write_in_flight.is_none() && c.written_end == c.received_end && c.unverified_end == c.received_end;
            if settled && (full || include_tail) {
                let c = self.chunks.remove(i).expect("chunk");
                self.free_slots.push(c.slot);
            } else {
                i += 1;
            }
        }
    }

    /// Lets the flusher cut a batch. `idle`: no frame is being received right now.
    pub fn poll_flush(&mut self, now_us: u64, out: &mut Vec<Action>) {
        let idle = self.frame.is_none();
        self.poll_flush_with(now_us, idle, false, out);
    }

    /// Flush everything written regardless of thresholds (disconnect, shutdown).
    pub fn force_flush(&mut self, now_us: u64, out: &mut Vec<Action>) {
        self.poll_flush_with(now_us, true, true, out);
    }

    fn poll_flush_with(&mut self, now_us: u64, idle: bool, force: bool, out: &mut Vec<Action>) {
        let mut requests = Vec::new();
        self.flusher.poll(now_us, self.written, idle, force, &mut requests);
        out.extend(requests.into_iter().map(Action::Fsync));
    }

    /// An fsync failed. Fatal (never retried): `flushed` stays where it is for good; the io layer
    /// exits, and the sender, which still holds the data, resumes after a restart.
    pub fn on_fsync_failed(&mut self, batch_id: u64) -> Lsn {
        self.flusher.on_fsync_failed(batch_id);
        self.flushed()
    }

    /// Whether fsyncs of `batch_id` are still outstanding.
    pub fn fsync_batch_pending(&self, batch_id: u64) -> bool {
        self.flusher.batch_pending(batch_id)
    }

    /// An fsync of a batch succeeded (a failed fsync is fatal and never reaches here).
    pub fn on_fsync_done(&mut self, batch_id: u64, out: &mut Vec<Action>) {
        if let Some(flushed) = self.flusher.on_fsync_done(batch_id) {
            self.on_flushed(flushed, out);
        }
        self.check_invariants();
    }

    fn on_flushed(&mut self, flushed: Lsn, out: &mut Vec<Action>) {
        // Segments whose every byte is durable: give them their final name.
        let still_open = self.open_segments.split_off(&(flushed.0 / self.cfg.seg_size));
        let complete = std::mem::replace(&mut self.open_segments, still_open);
        out.extend(complete.into_iter().map(|segno| Action::CompleteSegment { segno }));
        assert!(flushed >= self.acked_flushed, "ack would move backwards");
        if flushed > self.acked_flushed {
            self.acked_flushed = flushed;
            out.push(Action::Ack { written: self.written, flushed });
        }
    }

    /// The current positions for a periodic status ack.
    pub fn status(&self) -> Action {
        Action::Ack { written: self.written, flushed: self.flushed() }
    }

    /// A sender connected and the directory resumes at `flushed`: only valid when drained.
    pub fn resume_point(&self) -> Lsn {
        assert!(self.is_drained());
        self.flushed()
    }

    /// The first sender of an empty directory starts at `start` (a segment start).
    pub fn set_start(&mut self, start: Lsn) {
        assert!(self.received == Lsn(0) && self.chunks.is_empty());
        assert!(start.0 % self.cfg.seg_size == 0);
        self.received = start;
        self.written = start;
        self.acked_flushed = start;
        self.flusher = Flusher::new(self.cfg.flush, start);
    }
}

#[cfg(test)]
mod tests;
