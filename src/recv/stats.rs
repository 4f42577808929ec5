//! The receiver's figures, owned once: the io loop reports what happened ([`RecvStats`]'s event
//! methods), and both the Prometheus metrics (`crate::metrics::RecvMetrics`, served at /metrics)
//! and the end-of-run [`RecvSummary`] (the final log line, `--report-json`) are read from here.
//!
//! Counters that Prometheus exposes (payload bytes, bytes written, connections) are kept only in
//! the metric's atomic; the summary reads them back (less their value when this run started, in
//! case the metrics outlive a run). Figures Prometheus does not carry (write and fdatasync counts,
//! fdatasync batches, frame stalls, microsecond latency histograms) live here.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::metrics::{recv_error, RecvMetrics};
use crate::wal::Lsn;
use crate::wire::ErrorCode;

use super::spares::SpareCounts;

/// What the receiver did, for the final log line and tests.
#[derive(Debug, Clone, Default)]
pub struct RecvSummary {
    pub flushed: Lsn,
    pub bytes_received: u64,
    pub connections: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    pub fsync_batches: u64,
    /// fdatasync latency, microseconds.
    pub fsync_latency_us: Option<Histogram<u64>>,
    /// O_DIRECT write latency (submission to completion), microseconds.
    pub write_latency_us: Option<Histogram<u64>>,
    /// From a data frame's header arriving to the ack that covers it (its bytes durable),
    /// microseconds: the receiver's share of the sender's flush-to-durable-ack latency.
    pub frame_to_durable_us: Option<Histogram<u64>>,
    /// Frames that had to wait for a free buffer slot or a chunk write.
    pub frame_stalls: u64,
    /// Pre-zeroed spare segments: created, used for a new segment, or missing when one was needed.
    pub spares: SpareCounts,
}

impl RecvSummary {
    /// One line for the log: what was written and how the group commit went.
    pub fn describe(&self) -> String {
        let pcts = |h: &Option<Histogram<u64>>| {
            h.as_ref().map_or((0, 0, 0), |h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
        };
        let (p50, p99, max) = pcts(&self.fsync_latency_us);
        let (w50, w99, _) = pcts(&self.write_latency_us);
        let (d50, d99, _) = pcts(&self.frame_to_durable_us);
        let per_batch = self.bytes_written.checked_div(self.fsync_batches).unwrap_or(0);
        format!(
            "{} bytes received, {} writes ({} bytes), {} fdatasyncs in {} batches ({} bytes/batch), fdatasync p50 {} us p99 {} us max {} us, {} frame stalls, spare segments {} created {} used {} missed, write p50 {w50} us p99 {w99} us, frame-to-durable p50 {d50} us p99 {d99} us",
            self.bytes_received, self.writes, self.bytes_written, self.fsyncs, self.fsync_batches, per_batch, p50, p99, max, self.frame_stalls,
            self.spares.created, self.spares.used, self.spares.missed
        )
    }
}

/// Records `d` (at least 1 us) into a microsecond histogram, made on first use.
fn record_us(h: &mut Option<Histogram<u64>>, d: Duration) {
    let h = h.get_or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"));
    let _ = h.record((d.as_micros() as u64).max(1));
}

/// Data frames whose acks are awaited: (frame end, when its header arrived), oldest first.
const ARRIVALS_MAX: usize = 1 << 16;

/// Values of the Prometheus counters when this run started.
#[derive(Debug, Clone, Copy, Default)]
struct CounterBase {
    bytes: u64,
    bytes_written: u64,
    connections: u64,
}

/// The one observer of the receive loop: every figure of the run is counted here, once.
pub struct RecvStats {
    metrics: Arc<RecvMetrics>,
    base: CounterBase,
    flushed: Lsn,
    writes: u64,
    fsyncs: u64,
    fsync_batches: u64,
    frame_stalls: u64,
    fsync_latency_us: Option<Histogram<u64>>,
    write_latency_us: Option<Histogram<u64>>,
    frame_to_durable_us: Option<Histogram<u64>>,
    /// Data frames not yet covered by an ack: (frame end, header arrival), in LSN order.
    arrivals: VecDeque<(Lsn, Instant)>,
    /// fsync batches in flight: id -> issue time.
    fsync_started: HashMap<u64, Instant>,
}

impl RecvStats {
    /// Starts counting; the directory already holds everything below `durable_end` durably.
    pub fn new(metrics: Arc<RecvMetrics>, durable_end: Lsn) -> RecvStats {
        let base = CounterBase {
            bytes: metrics.bytes.get(),
            bytes_written: metrics.bytes_written.get(),
            connections: metrics.connections.get(),
        };
        metrics.set_acked(durable_end.0, durable_end.0);
        RecvStats {
            metrics,
            base,
            flushed: durable_end,
            writes: 0,
            fsyncs: 0,
            fsync_batches: 0,
            frame_stalls: 0,
            fsync_latency_us: None,
            write_latency_us: None,
            frame_to_durable_us: None,
            arrivals: VecDeque::new(),
            fsync_started: HashMap::new(),
        }
    }

    /// A sender was accepted.
    pub fn connection_opened(&mut self) {
        self.metrics.connections.inc();
        self.metrics.connected.set(1);
    }

    /// The connection starts closing: frames it sent that were not acknowledged are sent again by
    /// the next one, so their arrival times no longer count.
    pub fn connection_closing(&mut self) {
        self.arrivals.clear();
    }

    /// The connection is gone; everything below `flushed` (if a receiver exists) is durable.
    pub fn connection_closed(&mut self, flushed: Option<Lsn>) {
        if let Some(flushed) = flushed {
            self.flushed = flushed;
        }
        self.metrics.connected.set(0);
    }

    /// A data frame's header arrived; its body ends at `end`.
    pub fn frame_arrived(&mut self, end: Lsn) {
        if self.arrivals.len() == ARRIVALS_MAX {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back((end, Instant::now()));
    }

    /// A data frame had to wait for a free buffer slot or a chunk write.
    pub fn frame_stalled(&mut self) {
        self.frame_stalls += 1;
    }

    /// A data frame ending at `end` passed its CRC and page checks: `len_bytes` payload bytes.
    pub fn frame_verified(&mut self, end: Lsn, len_bytes: u64) {
        self.metrics.on_frame(end.0, len_bytes);
    }

    /// A write of `len_bytes` completed `latency` after it was issued.
    pub fn write_done(&mut self, len_bytes: u64, latency: Duration) {
        self.writes += 1;
        record_us(&mut self.write_latency_us, latency);
        self.metrics.bytes_written.inc_by(len_bytes);
    }

    /// An fdatasync of batch `batch_id` was issued (a batch may hold several: segment, directory).
    pub fn fsync_issued(&mut self, batch_id: u64) {
        if self.fsync_started.insert(batch_id, Instant::now()).is_none() {
            self.fsync_batches += 1;
        }
    }

    /// An fdatasync of batch `batch_id` succeeded; it made `durable_bytes` more bytes durable, and
    /// the batch is finished unless `batch_pending`.
    pub fn fsync_done(&mut self, batch_id: u64, durable_bytes: u64, batch_pending: bool) {
        self.fsyncs += 1;
        if let Some(t) = self.fsync_started.get(&batch_id) {
            let latency = t.elapsed();
            record_us(&mut self.fsync_latency_us, latency);
            self.metrics.observe_fsync(latency.as_secs_f64());
        }
        if durable_bytes > 0 {
            self.metrics.observe_fsync_batch(durable_bytes);
        }
        if !batch_pending {
            self.fsync_started.remove(&batch_id);
        }
    }

    /// `written` and `flushed` were acknowledged (and `flushed` published).
    pub fn acked(&mut self, written: Lsn, flushed: Lsn) {
        self.flushed = flushed;
        self.metrics.set_acked(written.0, flushed.0);
        while self.arrivals.front().is_some_and(|&(end, _)| end <= flushed) {
            let (_, arrived) = self.arrivals.pop_front().expect("front");
            record_us(&mut self.frame_to_durable_us, arrived.elapsed());
        }
    }

    /// One error of `kind` (see [`recv_error`]).
    pub fn error(&mut self, kind: &'static str) {
        self.metrics.inc_error(kind);
    }

    /// The receiver refused a sender with `code`.
    pub fn refused(&mut self, code: ErrorCode) {
        self.error(match code {
            ErrorCode::Protocol => recv_error::PROTOCOL,
            ErrorCode::Identity => recv_error::IDENTITY,
            ErrorCode::Gap => recv_error::GAP,
            ErrorCode::Corrupt => recv_error::CRC,
            _ => recv_error::OTHER,
        });
    }

    /// The durable position last reported.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// The figures so far, with the final durable position and the spare pool's counts.
    pub fn summary(&self, flushed: Lsn, spares: SpareCounts) -> RecvSummary {
        RecvSummary {
            flushed,
            bytes_received: self.metrics.bytes.get() - self.base.bytes,
            connections: self.metrics.connections.get() - self.base.connections,
            writes: self.writes,
            bytes_written: self.metrics.bytes_written.get() - self.base.bytes_written,
            fsyncs: self.fsyncs,
            fsync_batches: self.fsync_batches,
            fsync_latency_us: self.fsync_latency_us.clone(),
            write_latency_us: self.write_latency_us.clone(),
            frame_to_durable_us: self.frame_to_durable_us.clone(),
            frame_stalls: self.frame_stalls,
            spares,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::report::RecvReport;

    fn exposition_value(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// One run's events, fed in the loop's order; the same figures must show in /metrics, the
    /// summary and the JSON report.
    #[test]
    fn every_event_is_counted_once_and_read_by_metrics_summary_and_report() {
        let metrics = Metrics::receiver();
        let mut stats = RecvStats::new(metrics.recv.clone().unwrap(), Lsn(0x100));
        stats.connection_opened();
        stats.frame_arrived(Lsn(0x2100));
        stats.frame_stalled();
        stats.frame_verified(Lsn(0x2100), 0x2000);
        stats.write_done(0x2000, Duration::from_micros(300));
        stats.fsync_issued(7);
        stats.fsync_issued(7); // the directory's fdatasync of the same batch
        stats.fsync_done(7, 0, true);
        stats.fsync_done(7, 0x2000, false);
        stats.acked(Lsn(0x2100), Lsn(0x2100));
        stats.refused(ErrorCode::Gap);
        stats.error(recv_error::TIMEOUT);
        stats.connection_closing();
        stats.connection_closed(Some(Lsn(0x2100)));

        let s = stats.summary(stats.flushed(), SpareCounts::default());
        assert_eq!((s.flushed, s.bytes_received, s.connections), (Lsn(0x2100), 0x2000, 1));
        assert_eq!((s.writes, s.bytes_written, s.fsyncs, s.fsync_batches, s.frame_stalls), (1, 0x2000, 2, 1, 1));
        assert_eq!(s.fsync_latency_us.as_ref().map(|h| h.len()), Some(2), "every fdatasync timed");
        assert_eq!(s.write_latency_us.as_ref().map(|h| h.len()), Some(1));
        assert_eq!(s.frame_to_durable_us.as_ref().map(|h| h.len()), Some(1), "the acked frame is timed");

        let text = metrics.encode();
        for (name, want) in [
            ("walship_recv_bytes_total", 0x2000 as f64),
            ("walship_recv_frames_total", 1.0),
            ("walship_recv_bytes_written_total", 0x2000 as f64),
            ("walship_recv_connections_total", 1.0),
            ("walship_recv_connected", 0.0),
            ("walship_recv_received_lsn", 0x2100 as f64),
            ("walship_recv_flushed_lsn", 0x2100 as f64),
            ("walship_recv_fsync_duration_seconds_count", 2.0),
            ("walship_recv_fsync_batch_bytes_count", 1.0),
            ("walship_recv_fsync_batch_bytes_sum", 0x2000 as f64),
        ] {
            assert_eq!(exposition_value(&text, name), Some(want), "{name} in\n{text}");
        }
        assert!(text.contains("walship_recv_errors_total{kind=\"gap\"} 1"), "{text}");
        assert!(text.contains("walship_recv_errors_total{kind=\"peer_timeout\"} 1"), "{text}");

        let report = serde_json::to_value(RecvReport::from(&s)).unwrap();
        assert_eq!(report["fdatasyncs"], 2);
        assert_eq!(report["write_bytes"], 0x2000);
        assert_eq!(report["bytes_per_batch"], 0x2000);
        assert_eq!(report["flushed_lsn"], "0/00002100");
    }

    /// Frames not acknowledged when their connection closes are not timed (they are sent again).
    #[test]
    fn frames_of_a_closed_connection_are_not_timed() {
        let mut stats = RecvStats::new(Arc::new(RecvMetrics::new()), Lsn(0));
        stats.frame_arrived(Lsn(0x1000));
        stats.connection_closing();
        stats.acked(Lsn(0x1000), Lsn(0x1000));
        assert!(stats.summary(Lsn(0x1000), SpareCounts::default()).frame_to_durable_us.is_none());
    }

    /// Metrics that outlive a run: the summary counts this run only.
    #[test]
    fn the_summary_counts_this_run_only() {
        let metrics = Arc::new(RecvMetrics::new());
        RecvStats::new(metrics.clone(), Lsn(0)).frame_verified(Lsn(10), 10);
        let mut stats = RecvStats::new(metrics, Lsn(10));
        stats.frame_verified(Lsn(15), 5);
        assert_eq!(stats.summary(Lsn(10), SpareCounts::default()).bytes_received, 5);
    }
}
