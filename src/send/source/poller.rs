//! The flush poller: a thread of its own, on a connection of its own, asks the live server for
//! its flush position (the SQL below), keeps the latest answer, wakes the sender's io_uring loop
//! through an eventfd when it changes, and advances the replication slot (forward only, never past
//! what the receiver acknowledged as durable), so the sender's loop never waits for SQL.
//!
//! When to ask is [`QueryPacer`]'s (no I/O): at once when the server writes to pg_wal (inotify
//! `IN_MODIFY` on the directory), then again every `wake_gap` while the flush LSN is behind the
//! insert LSN seen at the first answer (PostgreSQL writes, then fdatasyncs, then moves its flush
//! LSN; a burst ends after `burst_max` if records stay unflushed, e.g. async commits), and otherwise every `poll_interval` (the fallback when no event comes, or inotify is not
//! available).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::wal::Lsn;

/// What one poll of the server's flush position found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Polled {
    /// The flush LSN (None if the server has none yet), on a primary the timeline it writes, and
    /// whether the server is a standby.
    Flush { lsn: Option<Lsn>, tli: Option<u32>, standby: bool },
    /// The server could not be reached or asked.
    Unreachable(String),
}

const FLUSH_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text \
          ELSE pg_current_wal_flush_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8) END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END";

/// The server's flush LSN and, on a primary, the timeline it writes (a standby that was promoted
/// becomes a primary on a new timeline).
pub(crate) fn query_flush(client: &mut postgres::Client) -> Result<Polled, postgres::Error> {
    query_flush_write(client).map(|(p, _)| p)
}

/// [`query_flush`] and, on a primary, its insert LSN: what a flush in progress will reach at most.
/// (Not `pg_current_wal_lsn()`: PostgreSQL publishes its write and flush positions together, after
/// the fdatasync, so while a flush is in progress both still show the old value.)
fn query_flush_write(client: &mut postgres::Client) -> Result<(Polled, Option<Lsn>), postgres::Error> {
    let row = client.query_one(FLUSH_SQL, &[])?;
    let text: Option<String> = row.get(1);
    let tli: Option<String> = row.get(2);
    let write: Option<String> = row.get(3);
    let polled = Polled::Flush {
        lsn: text.and_then(|t| t.parse::<Lsn>().ok()),
        tli: tli.and_then(|t| u32::from_str_radix(&t, 16).ok()),
        standby: row.get(0),
    };
    Ok((polled, write.and_then(|t| t.parse::<Lsn>().ok())))
}

/// How the poller learns that the server wrote WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WakeConfig {
    /// The slow poll: ask at least this often (the fallback).
    pub(crate) poll_interval: Duration,
    /// Watch pg_wal with inotify and ask at once when the server writes to it.
    pub(crate) on_write: bool,
    /// Least time between the end of one answer and the next question while following a write.
    pub(crate) gap: Duration,
    /// A burst (asking every `gap` until the flush LSN reaches the write LSN) ends after this long
    /// even if the flush LSN did not get there (a stalled disk must not make the poller spin).
    pub(crate) burst_max: Duration,
}

/// When to ask the server next, as a state machine fed the poller's events (no I/O, no clock of
/// its own: every call is given `now`).
#[derive(Debug)]
pub(crate) struct QueryPacer {
    cfg: WakeConfig,
    /// Start of the last question asked.
    last_start: Option<Instant>,
    /// End of the last answer.
    last_end: Option<Instant>,
    /// The server wrote WAL since the last question was asked.
    written: bool,
    /// Following a write: (LSN the flush LSN must reach, when the burst started).
    burst: Option<(Lsn, Instant)>,
    /// The question in flight was asked because of a write event.
    asked_on_write: bool,
    /// The last flush LSN answered.
    last_flush: Option<Lsn>,
}

impl QueryPacer {
    pub(crate) fn new(cfg: WakeConfig) -> QueryPacer {
        QueryPacer { cfg, last_start: None, last_end: None, written: false, burst: None, asked_on_write: false, last_flush: None }
    }

    /// inotify said the server wrote to pg_wal.
    pub(crate) fn on_write(&mut self) {
        self.written = true;
    }

    /// A question is being asked now.
    pub(crate) fn on_query_start(&mut self, now: Instant) {
        self.last_start = Some(now);
        self.asked_on_write = self.written;
        self.written = false;
    }

    /// The answer: the flush LSN and (on a primary) the write LSN; `None` for both after an error.
    pub(crate) fn on_answer(&mut self, now: Instant, flush: Option<Lsn>, write: Option<Lsn>) {
        self.last_end = Some(now);
        let behind = |target: Lsn| flush.is_some_and(|f| f < target);
        self.burst = match self.burst {
            // Still short of the write that started the burst, and not for too long.
            Some((target, since)) if behind(target) && now.duration_since(since) < self.cfg.burst_max => Some((target, since)),
            Some(_) => None,
            None => match (write, self.last_flush) {
                (Some(w), _) if self.cfg.on_write && behind(w) => Some((w, now)),
                // A standby has no insert LSN: after a write to its pg_wal, follow until its
                // flush (receive) LSN moves.
                (None, Some(last)) if self.cfg.on_write && self.asked_on_write && flush == Some(last) => {
                    Some((Lsn(last.0 + 1), now))
                }
                _ => None,
            },
        };
        if flush.is_some() {
            self.last_flush = flush;
        }
    }

    /// When to ask next: `now` or later (wait for a write event until then).
    pub(crate) fn next_query(&self, now: Instant) -> Instant {
        let Some(start) = self.last_start else { return now };
        let end = self.last_end.unwrap_or(start);
        if self.burst.is_some() || self.written {
            return (end + self.cfg.gap).max(now).min(start + self.cfg.poll_interval);
        }
        start + self.cfg.poll_interval
    }

    /// A write event may move the next question earlier (nothing is pending already).
    pub(crate) fn waits_for_events(&self) -> bool {
        self.cfg.on_write && self.burst.is_none() && !self.written
    }
}

/// What the poller did, for its final log line and `--report-json` (the cost on the server).
#[derive(Debug, Default)]
pub(crate) struct PollerCounts {
    /// Questions asked (each one statement on the poller's connection).
    pub(crate) queries: AtomicU64,
    /// Wake-ups by a write to pg_wal (inotify).
    pub(crate) write_wakes: AtomicU64,
}

/// Polls the flush position every `interval` on its own thread and connection (reconnecting at
/// most once a second while the server is away), keeps the latest answer, and signals an eventfd
/// whenever the answer changed. It also advances the replication slot (on the same connection), so
/// the sender's loop never waits for SQL.
pub struct FlushPoller {
    shared: Arc<PollerShared>,
    thread: Option<JoinHandle<()>>,
    seen_seq: u64,
}

struct PollerShared {
    /// (sequence number, latest answer).
    latest: Mutex<(u64, Option<Polled>)>,
    stop: AtomicBool,
    wake: OwnedFd,
    slot: Option<SlotAdvance>,
    counts: PollerCounts,
}

/// The slot and how far it may go: only to what the receiver acknowledged as flushed.
pub(crate) struct SlotAdvance {
    name: String,
    interval: Duration,
    /// Acknowledged flushed LSN (set by the sender, forward only).
    target: AtomicU64,
    /// Where the slot was last advanced to (or found at start-up).
    restart: AtomicU64,
}

impl SlotAdvance {
    /// A slot found (or created) at `restart`, advanced at most once per `interval`.
    pub(crate) fn new(name: String, interval: Duration, restart: Lsn) -> SlotAdvance {
        SlotAdvance { name, interval, target: AtomicU64::new(restart.0), restart: AtomicU64::new(restart.0) }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Where the slot was last advanced to (or found at start-up).
    pub(crate) fn restart(&self) -> Lsn {
        Lsn(self.restart.load(Ordering::Acquire))
    }

    /// The receiver holds everything below `flushed` durably: the slot may go that far (never
    /// backwards).
    pub(crate) fn allow_up_to(&self, flushed: Lsn) {
        self.target.fetch_max(flushed.0, Ordering::AcqRel);
    }

    /// Moves the slot to the target if that is ahead; forward only.
    fn advance(&self, client: &mut postgres::Client) {
        let target = Lsn(self.target.load(Ordering::Acquire));
        if target.0 <= self.restart.load(Ordering::Acquire) {
            return;
        }
        let sql = format!("SELECT pg_replication_slot_advance($1::text::name, '{target}'::pg_lsn)");
        match client.execute(sql.as_str(), &[&self.name]) {
            Ok(_) => self.restart.store(target.0, Ordering::Release),
            Err(e) => warn!(slot = %self.name, target = %target, "could not advance the replication slot: {e}"),
        }
    }
}

impl PollerShared {
    fn publish(&self, polled: Polled) {
        let mut latest = self.latest.lock().expect("poller lock");
        if latest.1.as_ref() == Some(&polled) {
            return;
        }
        latest.0 += 1;
        latest.1 = Some(polled);
        drop(latest);
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

impl FlushPoller {
    /// Starts the poller's thread; with `wake.on_write`, it watches `pg_wal` (falling back to the
    /// slow poll alone, with a warning, when inotify cannot watch it).
    pub(crate) fn start(conninfo: String, pg_wal: &Path, wake: WakeConfig, slot: Option<SlotAdvance>) -> std::io::Result<FlushPoller> {
        let wake_fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let shared = Arc::new(PollerShared {
            latest: Mutex::new((0, None)),
            stop: AtomicBool::new(false),
            wake: wake_fd,
            slot,
            counts: PollerCounts::default(),
        });
        let (watch, wake) = if wake.on_write {
            match watch_wal(pg_wal) {
                Ok(fd) => (Some(fd), wake),
                Err(e) => {
                    warn!(pg_wal = %pg_wal.display(), "cannot watch pg_wal for writes ({e}); asking for the flush LSN every {:?} only", wake.poll_interval);
                    (None, WakeConfig { on_write: false, ..wake })
                }
            }
        } else {
            (None, wake)
        };
        let s = Arc::clone(&shared);
        let thread =
            std::thread::Builder::new().name("walship-horizon".into()).spawn(move || poll_loop(&s, &conninfo, wake, watch))?;
        Ok(FlushPoller { shared, thread: Some(thread), seen_seq: 0 })
    }

    /// (questions asked, wake-ups by a write to pg_wal) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let c = &self.shared.counts;
        (c.queries.load(Ordering::Relaxed), c.write_wakes.load(Ordering::Relaxed))
    }

    /// The latest answer, if it is new since the last call.
    pub(crate) fn take_new(&mut self) -> Option<Polled> {
        let latest = self.shared.latest.lock().expect("poller lock");
        if latest.0 == self.seen_seq {
            return None;
        }
        self.seen_seq = latest.0;
        latest.1.clone()
    }

    /// Makes the next `take_new` return the latest answer even if it was taken already.
    pub(crate) fn replay_latest(&mut self) {
        self.seen_seq = u64::MAX;
    }

    /// The eventfd signalled when the poller learned something new (for the sender's ring).
    pub(crate) fn wake_fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }

    /// The slot this poller advances (None without `--slot`).
    pub(crate) fn slot(&self) -> Option<&SlotAdvance> {
        self.shared.slot.as_ref()
    }
}

impl Drop for FlushPoller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (queries, write_wakes) = self.counts();
        info!(queries, write_wakes, "flush poller: {queries} flush-LSN queries, {write_wakes} wake-ups by a write to pg_wal");
    }
}

/// The poller's connection: `conninfo` with `application_name = walship-horizon` unless it names
/// one (so its backend can be found in pg_stat_activity).
fn connect(conninfo: &str) -> Result<postgres::Client, postgres::Error> {
    match conninfo.parse::<postgres::Config>() {
        Ok(mut cfg) => {
            if cfg.get_application_name().is_none() {
                cfg.application_name("walship-horizon");
            }
            cfg.connect(postgres::NoTls)
        }
        Err(_) => postgres::Client::connect(conninfo, postgres::NoTls),
    }
}

/// An inotify descriptor (non-blocking) watching `pg_wal` for writes to its files.
fn watch_wal(pg_wal: &Path) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(&fd, pg_wal, inotify::WatchFlags::MODIFY)?;
    Ok(fd)
}

/// Waits until `deadline` or, when `watch` is given, until the server writes to pg_wal (then
/// drains the events: one write or many, one question). Returns whether a write woke it.
fn wait_for_write(watch: Option<&OwnedFd>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let Some(fd) = watch else {
        std::thread::sleep(left);
        return false;
    };
    let mut pfd = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
    match rustix::event::poll(&mut pfd, Some(&timeout)) {
        Ok(n) if n > 0 => {
            let mut buf = [0u8; 4096];
            while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
            true
        }
        _ => false,
    }
}

fn poll_loop(shared: &PollerShared, conninfo: &str, wake: WakeConfig, watch: Option<OwnedFd>) {
    let mut client: Option<postgres::Client> = None;
    let mut last_connect: Option<Instant> = None;
    let mut last_slot_advance = Instant::now();
    let mut pacer = QueryPacer::new(wake);
    while !shared.stop.load(Ordering::Acquire) {
        if client.is_none() && last_connect.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_connect = Some(Instant::now());
            match connect(conninfo) {
                Ok(c) => client = Some(c),
                Err(e) => shared.publish(Polled::Unreachable(describe_pg_error(&e))),
            }
        }
        let Some(c) = client.as_mut() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        pacer.on_query_start(Instant::now());
        shared.counts.queries.fetch_add(1, Ordering::Relaxed);
        match query_flush_write(c) {
            Ok((polled, write)) => {
                let flush = match &polled {
                    Polled::Flush { lsn, .. } => *lsn,
                    Polled::Unreachable(_) => None,
                };
                pacer.on_answer(Instant::now(), flush, write);
                shared.publish(polled);
                if let Some(slot) = &shared.slot {
                    if last_slot_advance.elapsed() >= slot.interval {
                        last_slot_advance = Instant::now();
                        slot.advance(c);
                    }
                }
            }
            Err(e) => {
                pacer.on_answer(Instant::now(), None, None);
                client = None;
                shared.publish(Polled::Unreachable(describe_pg_error(&e)));
                continue;
            }
        }
        // Wait for the next question: a write event may bring it forward (checked in slices, so
        // that a stop is seen within 100 ms even with a long poll interval).
        loop {
            let now = Instant::now();
            let next = pacer.next_query(now);
            if next <= now || shared.stop.load(Ordering::Acquire) {
                break;
            }
            let until = next.min(now + Duration::from_millis(100));
            let events = if pacer.waits_for_events() { watch.as_ref() } else { None };
            if wait_for_write(events, until) {
                shared.counts.write_wakes.fetch_add(1, Ordering::Relaxed);
                pacer.on_write();
            }
        }
    }
    // Leaving: the slot goes as far as the receiver acknowledged, not a second behind.
    if let (Some(c), Some(slot)) = (client.as_mut(), &shared.slot) {
        slot.advance(c);
    }
}

/// PostgreSQL's own words for a failed call: severity, SQLSTATE, message, detail and hint of a
/// server error (the client library's Display says only "db error"); otherwise the error and its
/// causes (connection refused, bad connection string ...).
pub fn describe_pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; DETAIL: {detail}"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("; HINT: {hint}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacer(on_write: bool) -> QueryPacer {
        QueryPacer::new(WakeConfig { poll_interval: 1000 * MS, on_write, gap: MS / 10, burst_max: 50 * MS })
    }

    #[test]
    fn idle_it_asks_once_per_poll_interval_and_waits_for_writes() {
        let t0 = Instant::now();
        let mut p = pacer(true);
        assert_eq!(p.next_query(t0), t0, "the first question is asked at once");
        p.on_query_start(t0);
        p.on_answer(t0 + MS, Some(Lsn(100)), Some(Lsn(100)));
        assert!(p.waits_for_events());
        assert_eq!(p.next_query(t0 + 2 * MS), t0 + 1000 * MS);
    }

    #[test]
    fn a_write_brings_the_question_forward_then_it_follows_until_the_flush_reaches_the_write() {
        let t0 = Instant::now();
        let mut p = pacer(true);
        p.on_query_start(t0);
        p.on_answer(t0 + MS, Some(Lsn(100)), Some(Lsn(100)));
        p.on_write();
        assert!(!p.waits_for_events());
        assert_eq!(p.next_query(t0 + 5 * MS), t0 + 5 * MS, "asked at once after a write");
        p.on_query_start(t0 + 5 * MS);
        // Written to 200 but not yet flushed: ask again one gap after this answer.
        p.on_answer(t0 + 6 * MS, Some(Lsn(100)), Some(Lsn(200)));
        assert_eq!(p.next_query(t0 + 6 * MS), t0 + 6 * MS + MS / 10);
        p.on_query_start(t0 + 7 * MS);
        // A later write (300) does not extend the burst past its first target (200).
        p.on_answer(t0 + 8 * MS, Some(Lsn(150)), Some(Lsn(300)));
        assert_eq!(p.next_query(t0 + 8 * MS), t0 + 8 * MS + MS / 10);
        p.on_query_start(t0 + 9 * MS);
        p.on_answer(t0 + 10 * MS, Some(Lsn(200)), Some(Lsn(300)));
        assert!(p.waits_for_events(), "flushed to the burst's target: back to waiting");
        assert_eq!(p.next_query(t0 + 10 * MS), t0 + 1009 * MS);
    }

    #[test]
    fn a_burst_ends_after_burst_max_and_never_without_the_event_path() {
        let t0 = Instant::now();
        let mut p = pacer(true);
        p.on_query_start(t0);
        p.on_answer(t0, Some(Lsn(100)), Some(Lsn(200)));
        assert!(!p.waits_for_events());
        p.on_query_start(t0 + 60 * MS);
        p.on_answer(t0 + 60 * MS, Some(Lsn(100)), Some(Lsn(200)));
        assert!(p.waits_for_events(), "a stalled flush does not keep the poller asking");
        let mut off = pacer(false);
        off.on_query_start(t0);
        off.on_answer(t0, Some(Lsn(100)), Some(Lsn(200)));
        assert!(!off.waits_for_events());
        assert_eq!(off.next_query(t0), t0 + 1000 * MS, "without the event path: the poll interval only");
    }

    #[test]
    fn on_a_standby_a_write_is_followed_until_the_flush_lsn_moves() {
        let t0 = Instant::now();
        let mut p = pacer(true);
        p.on_query_start(t0);
        p.on_answer(t0, Some(Lsn(100)), None);
        assert!(p.waits_for_events(), "no write event: no burst");
        p.on_write();
        p.on_query_start(t0 + MS);
        p.on_answer(t0 + MS, Some(Lsn(100)), None);
        assert!(!p.waits_for_events(), "written, not yet flushed: follow it");
        p.on_query_start(t0 + 2 * MS);
        p.on_answer(t0 + 2 * MS, Some(Lsn(180)), None);
        assert!(p.waits_for_events(), "moved: back to waiting");
    }

    #[test]
    fn a_burst_never_waits_longer_than_the_poll_interval() {
        let t0 = Instant::now();
        let mut p = QueryPacer::new(WakeConfig { poll_interval: MS, on_write: true, gap: 10 * MS, burst_max: 50 * MS });
        p.on_query_start(t0);
        p.on_answer(t0, Some(Lsn(100)), Some(Lsn(200)));
        assert_eq!(p.next_query(t0), t0 + MS);
    }
}
