//! Progress of a long `send --once`: a bar with bytes, rate and ETA on a terminal, plain periodic
//! log lines otherwise. Reads the sender's metrics (atomics); never touches the data path.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::SenderMetrics;
use crate::wal::Lsn;

/// Draws until `done` is set. `end_estimate`: where the WAL probably ends (the bar's length).
pub fn spawn(m: Arc<SenderMetrics>, end_estimate: Option<Lsn>, done: Arc<AtomicBool>, log_every: Duration) -> JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            if terminal {
                draw_bar(&m, end_estimate, &done);
            } else {
                log_lines(&m, end_estimate, &done, log_every);
            }
        })
        .expect("spawn progress thread")
}

/// The stream's first durable LSN, once connected.
fn start_of(m: &SenderMetrics) -> Option<u64> {
    let s = m.snapshot();
    (s.flushed_lsn > 0).then_some(s.flushed_lsn)
}

fn draw_bar(m: &SenderMetrics, end: Option<Lsn>, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} durable, {bytes_per_sec}, ETA {eta}",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    let mut start = None;
    while !done.load(Ordering::Relaxed) {
        if start.is_none() {
            start = start_of(m);
        }
        if let Some(s0) = start {
            let snap = m.snapshot();
            let total_end = end.map_or(snap.horizon_lsn, |e| e.0.max(snap.horizon_lsn));
            bar.set_length(total_end.saturating_sub(s0));
            bar.set_position(snap.flushed_lsn.saturating_sub(s0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

fn log_lines(m: &SenderMetrics, end: Option<Lsn>, done: &AtomicBool, every: Duration) {
    let mut start: Option<(u64, Instant)> = None;
    let mut last = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if start.is_none() {
            start = start_of(m).map(|s| (s, Instant::now()));
        }
        let Some((s0, t0)) = start else { continue };
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let snap = m.snapshot();
        let bytes = snap.flushed_lsn.saturating_sub(s0);
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        let remaining = end.map(|e| e.0.saturating_sub(snap.flushed_lsn));
        let eta = remaining.filter(|_| rate > 0.0).map(|r| format!("{:.0}s", r as f64 / rate));
        tracing::info!(
            durable = %Lsn(snap.flushed_lsn),
            bytes,
            mb_per_s = format_args!("{:.1}", rate / 1e6),
            eta = eta.as_deref().unwrap_or("?"),
            "progress"
        );
    }
}
