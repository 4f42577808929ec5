//! The flush poller: a thread of its own, on a connection of its own, asks the live server for
//! its flush position (the SQL below), keeps the latest answer, wakes the sender's io_uring loop
//! through an eventfd when it changes, and advances the replication slot (forward only, never past
//! what the receiver acknowledged as durable), so the sender's loop never waits for SQL.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

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
          ELSE substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8) END";

/// The server's flush LSN and, on a primary, the timeline it writes (a standby that was promoted
/// becomes a primary on a new timeline).
pub(crate) fn query_flush(client: &mut postgres::Client) -> Result<Polled, postgres::Error> {
    let row = client.query_one(FLUSH_SQL, &[])?;
    let text: Option<String> = row.get(1);
    let tli: Option<String> = row.get(2);
    Ok(Polled::Flush {
        lsn: text.and_then(|t| t.parse::<Lsn>().ok()),
        tli: tli.and_then(|t| u32::from_str_radix(&t, 16).ok()),
        standby: row.get(0),
    })
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
    pub(crate) fn start(conninfo: String, interval: Duration, slot: Option<SlotAdvance>) -> std::io::Result<FlushPoller> {
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let shared = Arc::new(PollerShared { latest: Mutex::new((0, None)), stop: AtomicBool::new(false), wake, slot });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("walship-horizon".into()).spawn(move || poll_loop(&s, &conninfo, interval))?;
        Ok(FlushPoller { shared, thread: Some(thread), seen_seq: 0 })
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
    }
}

fn poll_loop(shared: &PollerShared, conninfo: &str, interval: Duration) {
    let mut client: Option<postgres::Client> = None;
    let mut last_connect: Option<Instant> = None;
    let mut last_slot_advance = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        if client.is_none() && last_connect.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_connect = Some(Instant::now());
            match postgres::Client::connect(conninfo, postgres::NoTls) {
                Ok(c) => client = Some(c),
                Err(e) => shared.publish(Polled::Unreachable(describe_pg_error(&e))),
            }
        }
        if let Some(c) = client.as_mut() {
            match query_flush(c) {
                Ok(polled) => {
                    shared.publish(polled);
                    if let Some(slot) = &shared.slot {
                        if last_slot_advance.elapsed() >= slot.interval {
                            last_slot_advance = Instant::now();
                            slot.advance(c);
                        }
                    }
                }
                Err(e) => {
                    client = None;
                    shared.publish(Polled::Unreachable(describe_pg_error(&e)));
                }
            }
        }
        let pause = if client.is_some() { interval } else { Duration::from_millis(50) };
        std::thread::sleep(pause.saturating_sub(started.elapsed()));
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
