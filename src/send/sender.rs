//! The sender's state machine: which frames to send next, and what the receiver's acks mean.
//! No I/O here.
//!
//! Positions: `sent` (handed to the kernel), and from the receiver's acks `written` and
//! `flushed`. Invariants: `flushed <= written <= sent`, acks never move backwards within a
//! connection, `sent` never passes the horizon, and `sent - flushed` stays within the
//! in-flight budget.

use crate::wal::Lsn;

#[derive(Debug, Clone, Copy)]
pub struct SenderLimits {
    /// Frames end at multiples of this in LSN space (and at segment ends and the horizon).
    pub frame_bytes: u64,
    /// Most bytes sent but not yet acknowledged durable.
    pub in_flight_bytes_max: u64,
    pub seg_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("receiver acknowledged flushed {flushed} past written {written}")]
    FlushedPastWritten { written: Lsn, flushed: Lsn },
    #[error("receiver acknowledged written {written}, but only {sent} was sent")]
    PastSent { written: Lsn, sent: Lsn },
    #[error("receiver's acknowledgement moved backwards: flushed {flushed} after {previous}")]
    Backwards { previous: Lsn, flushed: Lsn },
}

#[derive(Debug, Clone)]
pub struct Sender {
    limits: SenderLimits,
    sent: Lsn,
    written: Lsn,
    flushed: Lsn,
}

/// One data frame: `len` bytes starting at `lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePlan {
    pub lsn: Lsn,
    pub len: u64,
}

impl Sender {
    pub fn new(limits: SenderLimits, resume: Lsn) -> Sender {
        assert!(limits.frame_bytes > 0 && limits.seg_size % limits.frame_bytes == 0);
        assert!(limits.in_flight_bytes_max >= limits.frame_bytes);
        Sender { limits, sent: resume, written: resume, flushed: resume }
    }

    pub fn sent(&self) -> Lsn {
        self.sent
    }
    pub fn written(&self) -> Lsn {
        self.written
    }
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Bytes sent and not yet acknowledged durable.
    pub fn unacked_bytes(&self) -> u64 {
        self.sent - self.flushed
    }

    /// Plans frames up to `horizon`, within the in-flight budget, totalling at most
    /// `batch_bytes_max`; advances `sent` over them.
    pub fn plan(&mut self, horizon: Lsn, batch_bytes_max: u64, frames_max: usize, out: &mut Vec<FramePlan>) {
        let budget_end = self.flushed + self.limits.in_flight_bytes_max;
        let mut batch_bytes = 0u64;
        let mut frames = 0usize;
        while self.sent < horizon && self.sent < budget_end && batch_bytes < batch_bytes_max && frames < frames_max {
            let next_boundary = Lsn((self.sent.0 / self.limits.frame_bytes + 1) * self.limits.frame_bytes);
            let end = next_boundary.min(horizon).min(budget_end.max(self.sent + 1));
            let len = end - self.sent;
            debug_assert!(len > 0 && len <= self.limits.frame_bytes);
            debug_assert_eq!((end.0 - 1) / self.limits.seg_size, self.sent.0 / self.limits.seg_size, "frame crosses a segment");
            out.push(FramePlan { lsn: self.sent, len });
            self.sent = end;
            batch_bytes += len;
            frames += 1;
        }
        assert!(self.sent <= horizon, "sent {} past the horizon {horizon}", self.sent);
    }

    /// An ack arrived. Returns whether `flushed` advanced.
    pub fn on_ack(&mut self, written: Lsn, flushed: Lsn) -> Result<bool, AckError> {
        if flushed > written {
            return Err(AckError::FlushedPastWritten { written, flushed });
        }
        if written > self.sent {
            return Err(AckError::PastSent { written, sent: self.sent });
        }
        if flushed < self.flushed {
            return Err(AckError::Backwards { previous: self.flushed, flushed });
        }
        let advanced = flushed > self.flushed;
        self.written = self.written.max(written);
        self.flushed = flushed;
        debug_assert!(self.flushed <= self.written && self.written <= self.sent);
        Ok(advanced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> SenderLimits {
        SenderLimits { frame_bytes: 1 << 20, in_flight_bytes_max: 8 << 20, seg_size: 16 << 20 }
    }

    #[test]
    fn frames_align_to_frame_bytes_and_stop_at_horizon() {
        let mut s = Sender::new(limits(), Lsn(16 << 20) + 100);
        let mut out = Vec::new();
        s.plan(Lsn((16 << 20) + (3 << 20) + 5), u64::MAX, usize::MAX, &mut out);
        assert_eq!(out[0], FramePlan { lsn: Lsn((16 << 20) + 100), len: (1 << 20) - 100 });
        assert_eq!(out.last().unwrap().len, 5);
        assert_eq!(s.sent(), Lsn((16 << 20) + (3 << 20) + 5));
    }

    #[test]
    fn budget_limits_unacked_bytes() {
        let mut s = Sender::new(limits(), Lsn(0));
        let mut out = Vec::new();
        s.plan(Lsn(1 << 30), u64::MAX, usize::MAX, &mut out);
        assert_eq!(s.unacked_bytes(), 8 << 20);
        assert!(s.on_ack(Lsn(4 << 20), Lsn(2 << 20)).unwrap());
        out.clear();
        s.plan(Lsn(1 << 30), u64::MAX, usize::MAX, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn bad_acks_are_refused() {
        let mut s = Sender::new(limits(), Lsn(0));
        let mut out = Vec::new();
        s.plan(Lsn(3 << 20), u64::MAX, usize::MAX, &mut out);
        assert!(matches!(s.on_ack(Lsn(1), Lsn(2)), Err(AckError::FlushedPastWritten { .. })));
        assert!(matches!(s.on_ack(Lsn(4 << 20), Lsn(0)), Err(AckError::PastSent { .. })));
        s.on_ack(Lsn(2 << 20), Lsn(2 << 20)).unwrap();
        assert!(matches!(s.on_ack(Lsn(2 << 20), Lsn(1 << 20)), Err(AckError::Backwards { .. })));
    }

    proptest! {
        /// Frames are contiguous, never cross a frame boundary or the horizon, and cover exactly
        /// the range, however the horizon advances and acks arrive.
        #[test]
        fn frames_tile_the_range(start in 0u64..(64 << 20), steps in proptest::collection::vec((1u64..(5 << 20), any::<bool>()), 1..40)) {
            let mut s = Sender::new(limits(), Lsn(start));
            let mut horizon = Lsn(start);
            let mut next = Lsn(start);
            for (grow, ack) in steps {
                horizon = horizon + grow;
                let mut out = Vec::new();
                s.plan(horizon, 3 << 20, 64, &mut out);
                for f in out {
                    prop_assert_eq!(f.lsn, next);
                    prop_assert!(f.len > 0);
                    prop_assert_eq!((f.lsn.0) / (1 << 20), (f.lsn.0 + f.len - 1) / (1 << 20));
                    next = f.lsn + f.len;
                }
                prop_assert!(s.sent() <= horizon);
                prop_assert!(s.unacked_bytes() <= 8 << 20);
                if ack {
                    let sent = s.sent();
                    s.on_ack(sent, sent).unwrap();
                }
            }
        }
    }
}
