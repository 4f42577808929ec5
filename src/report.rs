//! The machine-readable end-of-run reports: `walship send --report-json FILE` and
//! `walship recv --report-json FILE`, one JSON object each, written with serde from the run's
//! summary. Scripts and the benches read these files, never the human log lines.

use std::path::Path;

use serde::Serialize;

use crate::recv::RecvSummary;
use crate::send::SendSummary;

/// Percentiles of one latency, microseconds (all 0 when nothing was measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencyUs {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencyUs {
    fn of(h: &Option<hdrhistogram::Histogram<u64>>) -> LatencyUs {
        h.as_ref().filter(|h| !h.is_empty()).map_or_else(LatencyUs::default, |h| LatencyUs {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// What `walship send` shipped.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub bytes: u64,
    pub segments: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub start_lsn: String,
    pub end_lsn: String,
    pub connections: u64,
    pub zero_copy_sends: u64,
    pub zero_copy_copied: u64,
    /// From seeing a horizon to the receiver's durable ack covering it.
    pub ack_latency_us: LatencyUs,
}

impl From<&SendSummary> for SendReport {
    fn from(s: &SendSummary) -> SendReport {
        SendReport {
            bytes: s.bytes,
            segments: s.segments,
            seconds: s.seconds,
            mb_per_s: s.mb_per_s(),
            start_lsn: s.start_lsn.to_string(),
            end_lsn: s.end_lsn.to_string(),
            connections: s.connections,
            zero_copy_sends: s.zero_copy_sends,
            zero_copy_copied: s.zero_copy_copied,
            ack_latency_us: LatencyUs::of(&s.ack_latency_us),
        }
    }
}

/// What `walship recv` received and how its group commit went.
#[derive(Debug, Clone, Serialize)]
pub struct RecvReport {
    /// Everything below this is durable in the directory.
    pub flushed_lsn: String,
    pub bytes_received: u64,
    pub connections: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub fdatasyncs: u64,
    pub fsync_batches: u64,
    pub bytes_per_batch: u64,
    pub fdatasync_us: LatencyUs,
    /// O_DIRECT write, submission to completion.
    pub write_us: LatencyUs,
    /// From a data frame's header arriving to the ack covering it.
    pub frame_to_durable_us: LatencyUs,
    pub frame_stalls: u64,
    pub spares_created: u64,
    pub spares_used: u64,
    pub spares_missed: u64,
}

impl From<&RecvSummary> for RecvReport {
    fn from(s: &RecvSummary) -> RecvReport {
        RecvReport {
            flushed_lsn: s.flushed.to_string(),
            bytes_received: s.bytes_received,
            connections: s.connections,
            writes: s.writes,
            write_bytes: s.bytes_written,
            fdatasyncs: s.fsyncs,
            fsync_batches: s.fsync_batches,
            bytes_per_batch: s.bytes_written.checked_div(s.fsync_batches).unwrap_or(0),
            fdatasync_us: LatencyUs::of(&s.fsync_latency_us),
            write_us: LatencyUs::of(&s.write_latency_us),
            frame_to_durable_us: LatencyUs::of(&s.frame_to_durable_us),
            frame_stalls: s.frame_stalls,
            spares_created: s.spares.created,
            spares_used: s.spares.used,
            spares_missed: s.spares.missed,
        }
    }
}

/// Writes `report` to `path` as one JSON object and a newline (temp file + rename, so a reader
/// never sees half a report).
pub fn write(path: &Path, report: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string(report).map_err(std::io::Error::other)?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Lsn;

    #[test]
    fn reports_are_json_objects_with_the_documented_keys() {
        let mut s = SendSummary { start_lsn: Lsn(0x100_0000), end_lsn: Lsn(0x200_0000), bytes: 1 << 24, seconds: 0.5, ..Default::default() };
        let mut h = hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        h.record(700).unwrap();
        s.ack_latency_us = Some(h);
        let v: serde_json::Value = serde_json::to_value(SendReport::from(&s)).unwrap();
        assert_eq!(v["end_lsn"], "0/02000000");
        assert_eq!(v["ack_latency_us"]["p50"].as_u64().unwrap() / 10, 70);
        assert!((v["mb_per_s"].as_f64().unwrap() - 33.554432).abs() < 1e-6);
        let r = RecvSummary { flushed: Lsn(42), bytes_written: 300, fsync_batches: 3, ..Default::default() };
        let v: serde_json::Value = serde_json::to_value(RecvReport::from(&r)).unwrap();
        assert_eq!(v["flushed_lsn"], "0/0000002A");
        assert_eq!(v["bytes_per_batch"], 100);
        assert_eq!(v["fdatasync_us"]["p99"], 0);
    }
}
