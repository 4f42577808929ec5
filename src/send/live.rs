//! The sender's source when following a live PostgreSQL server: the horizon is the server's
//! flush LSN (`pg_current_wal_flush_lsn()`, or `pg_last_wal_receive_lsn()` on a standby), the
//! bytes come from the segment files in `pg_wal`, and a physical replication slot keeps the
//! server from recycling WAL the receiver does not hold durably yet.
//!
//! The flush LSN is polled by a thread of its own on a connection of its own ([`FlushPoller`]): a
//! query that a busy server answers late never holds up sending WAL or processing acks; the
//! poller wakes the sender's io_uring loop through an eventfd when it learns something new.
//!
//! Before anything is done on the server, its system identifier must equal pg_control's and the
//! WAL's (a `--pg-wal` of another cluster is refused). With `--slot`, shipping never starts before
//! the segment holding the slot's restart_lsn: a new slot reserves WAL only from the server's last
//! checkpoint redo (PostgreSQL cannot reserve older WAL through SQL), and older WAL, unprotected,
//! could be recycled half-way through shipping it, leaving the receiver behind a slot that moved
//! on. Skipping it is said in a WARN; a receiver that holds less than the slot keeps is refused.
//!
//! When the server stops cleanly its WAL ends with the shutdown checkpoint: `global/pg_control`
//! says so, and a record walk from the current horizon finds the checkpoint's end, which becomes
//! the horizon. After a crash the horizon stays where the server last confirmed it until the server
//! is back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::source::SourceError;
use crate::uring::SegmentMap;
use crate::wal::control::ControlData;
use crate::wal::{Lsn, RecordWalker, SegmentWalk, WalFileName, WalIdentity};

#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub pg_wal: PathBuf,
    /// libpq-style connection string for the server that writes `pg_wal`.
    pub conninfo: String,
    pub slot: Option<String>,
    /// How often to ask the server for its flush LSN while WAL is flowing.
    pub poll_interval: Duration,
    /// How often to advance the slot (at most).
    pub slot_advance_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Up,
    /// Stopped cleanly; its WAL ends at `end` (just past the shutdown checkpoint).
    ShutDown { checkpoint: Lsn, end: Lsn },
    /// Unreachable and not cleanly stopped (crashed, restarting): the horizon waits.
    Down,
}

/// What one poll of the server's flush position found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Polled {
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
fn query_flush(client: &mut postgres::Client) -> Result<Polled, postgres::Error> {
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
struct SlotAdvance {
    name: String,
    interval: Duration,
    /// Acknowledged flushed LSN (set by the sender, forward only).
    target: AtomicU64,
    /// Where the slot was last advanced to (or found at start-up).
    restart: AtomicU64,
}

impl SlotAdvance {
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
    fn start(conninfo: String, interval: Duration, slot: Option<SlotAdvance>) -> std::io::Result<FlushPoller> {
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let shared = Arc::new(PollerShared { latest: Mutex::new((0, None)), stop: AtomicBool::new(false), wake, slot });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("walship-horizon".into()).spawn(move || poll_loop(&s, &conninfo, interval))?;
        Ok(FlushPoller { shared, thread: Some(thread), seen_seq: 0 })
    }

    /// The latest answer, if it is new since the last call.
    fn take_new(&mut self) -> Option<Polled> {
        let latest = self.shared.latest.lock().expect("poller lock");
        if latest.0 == self.seen_seq {
            return None;
        }
        self.seen_seq = latest.0;
        latest.1.clone()
    }

    /// Makes the next `take_new` return the latest answer even if it was taken already.
    fn replay_latest(&mut self) {
        self.seen_seq = u64::MAX;
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

pub struct LiveSource {
    cfg: LiveConfig,
    pgdata: PathBuf,
    /// Polls the flush position and advances the slot, on its own thread.
    poller: FlushPoller,
    /// The poller's last answer was a flush position (not an error).
    reachable: bool,
    identity: WalIdentity,
    first_lsn: Lsn,
    horizon: Lsn,
    is_standby: bool,
    state: ServerState,
    last_poll: Instant,
    maps: BTreeMap<u64, Arc<SegmentMap>>,
    /// This timeline's history file (empty on timeline 1).
    history: String,
    /// Since when the server is unreachable, and whether that was reported.
    down_since: Option<Instant>,
    warned_down: bool,
    /// The server moved to a newer timeline: (new timeline, where ours ends, its history).
    pending_switch: Option<(u32, Lsn, String)>,
}

fn pg_err(conninfo: &str, e: postgres::Error) -> SourceError {
    SourceError::Server { conninfo: redact(conninfo), why: describe_pg_error(&e) }
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

/// The connection string without its password (`password=...`, and in a URI the `user:password@`
/// part and a `password=` parameter).
pub fn redact(conninfo: &str) -> String {
    if let Some((scheme, rest)) = conninfo.split_once("://") {
        let rest = match rest.split_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                format!("{}:***@{host}", userinfo.split(':').next().unwrap_or_default())
            }
            _ => rest.to_string(),
        };
        let Some((path, query)) = rest.split_once('?') else { return format!("{scheme}://{rest}") };
        let query: Vec<&str> = query.split('&').map(|kv| if kv.starts_with("password=") { "password=***" } else { kv }).collect();
        return format!("{scheme}://{path}?{}", query.join("&"));
    }
    conninfo
        .split_whitespace()
        .map(|kv| if kv.starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join(" ")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_path_buf(), source }
}

impl LiveSource {
    pub fn open(cfg: LiveConfig) -> Result<LiveSource, SourceError> {
        let pgdata = cfg.pg_wal.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let control = read_control(&pgdata)?;
        let mut client = postgres::Client::connect(&cfg.conninfo, postgres::NoTls).map_err(|e| pg_err(&cfg.conninfo, e))?;
        // Same cluster on both sides before anything is done on the server (no slot yet).
        let tli = control.timeline;
        let identity = find_identity(&cfg.pg_wal, tli)?;
        check_same_cluster(&mut client, &cfg, &pgdata, &control, identity)?;
        let is_standby: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .map_err(|e| pg_err(&cfg.conninfo, e))?
            .get(0);
        warn_if_wal_level_minimal(&mut client, &cfg.conninfo)?;
        let oldest = oldest_segment(&cfg.pg_wal, identity)?;
        let mut slot_restart = Lsn(0);
        let mut first_lsn = oldest;
        if let Some(slot) = &cfg.slot {
            let (restart, created) = ensure_slot(&mut client, &cfg.conninfo, slot)?;
            slot_restart = restart;
            info!(slot = %slot, restart_lsn = %slot_restart, "replication slot keeps WAL from {slot_restart} on");
            first_lsn = first_protected(oldest, slot, restart, created, identity.seg_size);
        } else {
            warn!(
                "no --slot: the server may recycle WAL before it is shipped; walship will notice (missing or \
                 recycled segment) and stop rather than ship garbage. Use --slot NAME to prevent it"
            );
        }
        let first_poll = query_flush(&mut client).map_err(|e| pg_err(&cfg.conninfo, e))?;
        drop(client);
        let slot = cfg.slot.clone().map(|name| SlotAdvance {
            name,
            interval: cfg.slot_advance_interval,
            target: AtomicU64::new(slot_restart.0),
            restart: AtomicU64::new(slot_restart.0),
        });
        let poller = FlushPoller::start(cfg.conninfo.clone(), cfg.poll_interval, slot)
            .map_err(|e| SourceError::Server { conninfo: redact(&cfg.conninfo), why: format!("cannot start the flush poller: {e}") })?;
        let mut source = LiveSource {
            cfg,
            pgdata,
            poller,
            reachable: true,
            identity,
            first_lsn,
            horizon: first_lsn,
            is_standby,
            state: ServerState::Up,
            last_poll: Instant::now() - Duration::from_secs(1),
            maps: BTreeMap::new(),
            history: String::new(),
            pending_switch: None,
            down_since: None,
            warned_down: false,
        };
        source.history = read_history(&source.cfg.pg_wal, tli).unwrap_or_default();
        source.apply(first_poll)?;
        info!(
            standby = source.is_standby,
            timeline = tli,
            first = %source.first_lsn,
            horizon = %source.horizon,
            "following a live {} server", if source.is_standby { "standby" } else { "primary" }
        );
        Ok(source)
    }

    pub fn identity(&self) -> WalIdentity {
        self.identity
    }
    pub fn first_lsn(&self) -> Lsn {
        self.first_lsn
    }
    pub fn horizon(&self) -> Lsn {
        self.horizon
    }
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// The eventfd the poller signals when it learned something new (for the sender's ring).
    pub fn wake_fd(&self) -> RawFd {
        self.poller.shared.wake.as_raw_fd()
    }

    /// The server writes a newer timeline: our timeline ends at the switch point in the new
    /// timeline's history file; ship up to there, then the sender switches (`apply_switch`).
    fn on_new_timeline(&mut self, tli: u32) -> Result<(), SourceError> {
        if self.pending_switch.as_ref().is_some_and(|p| p.0 == tli) {
            return Ok(());
        }
        let history = read_history(&self.cfg.pg_wal, tli)?;
        let entries = crate::wal::history::parse_history(&history).map_err(|e| SourceError::BadFirstSegment {
            path: self.cfg.pg_wal.join(WalFileName::History { tli }.file_name(self.identity.seg_size)),
            why: e.to_string(),
        })?;
        let Some(switch) = crate::wal::history::switch_point(&entries, self.identity.tli) else {
            return Err(SourceError::Server {
                conninfo: redact(&self.cfg.conninfo),
                why: format!("the server moved to timeline {tli}, which does not branch off timeline {}", self.identity.tli),
            });
        };
        info!(from = self.identity.tli, to = tli, switch = %switch, "the server switched to timeline {tli}; shipping timeline {} up to {switch} first", self.identity.tli);
        self.horizon = self.horizon.max(switch);
        self.pending_switch = Some((tli, switch, history));
        Ok(())
    }

    /// Where our timeline ends, when the server moved on to a newer one.
    pub fn switch_point(&self) -> Option<Lsn> {
        self.pending_switch.as_ref().map(|p| p.1)
    }

    /// Continue on the new timeline from the segment holding the switch point.
    pub fn apply_switch(&mut self) -> Result<(), SourceError> {
        let (tli, switch, history) = self.pending_switch.take().expect("a pending switch");
        self.identity.tli = tli;
        self.history = history;
        self.first_lsn = switch.segment_start(self.identity.seg_size);
        self.horizon = self.first_lsn;
        self.maps.clear();
        self.poller.replay_latest();
        self.refresh()
    }

    /// This timeline's history file, for the handshake.
    pub fn history(&self) -> &str {
        &self.history
    }

    /// Takes in what a poll found.
    fn apply(&mut self, polled: Polled) -> Result<(), SourceError> {
        self.last_poll = Instant::now();
        match polled {
            Polled::Flush { lsn, tli, standby } => {
                if !self.reachable {
                    info!(standby, "server is back; following it again");
                    self.down_since = None;
                    self.warned_down = false;
                    self.state = ServerState::Up;
                    self.reachable = true;
                }
                self.is_standby = standby;
                match (lsn, tli) {
                    (_, Some(tli)) if tli > self.identity.tli => self.on_new_timeline(tli),
                    _ if self.pending_switch.is_some() => Ok(()),
                    (Some(lsn), _) if lsn < self.horizon => {
                        // A server restarted from a backup, or a different server: never move backwards.
                        warn!(server = %lsn, horizon = %self.horizon, "the server's flush LSN is behind what was already confirmed");
                        Ok(())
                    }
                    (Some(lsn), _) => {
                        self.horizon = lsn;
                        Ok(())
                    }
                    (None, _) => Ok(()),
                }
            }
            Polled::Unreachable(why) => {
                if self.reachable {
                    // A clean shutdown closes connections before it writes the shutdown checkpoint:
                    // say what happened only once pg_control tells (see on_server_unreachable).
                    info!("lost the server connection ({why}); checking whether it is shutting down");
                    self.reachable = false;
                    self.down_since = Some(Instant::now());
                }
                self.on_server_unreachable()
            }
        }
    }

    /// The server is unreachable: a clean shutdown ends its WAL with the shutdown checkpoint,
    /// which becomes the horizon; otherwise wait.
    fn on_server_unreachable(&mut self) -> Result<(), SourceError> {
        let control = read_control(&self.pgdata)?;
        if !control.is_shut_down() {
            let down_for = self.down_since.map_or(Duration::ZERO, |t| t.elapsed());
            if !self.warned_down && down_for > Duration::from_secs(3) {
                warn!(state = ?control.state, "server is down and was not shut down cleanly; waiting for it, horizon stays at {}", self.horizon);
                self.warned_down = true;
            }
            self.state = ServerState::Down;
            return Ok(());
        }
        if let ServerState::ShutDown { checkpoint, .. } = self.state {
            if checkpoint == control.checkpoint {
                return Ok(());
            }
        }
        let end = self.walk_to_end_of_wal()?;
        if end <= control.checkpoint {
            warn!(checkpoint = %control.checkpoint, end = %end, "server shut down, but the valid WAL ends before its checkpoint; not moving the horizon");
            self.state = ServerState::Down;
            return Ok(());
        }
        info!(
            checkpoint = %control.checkpoint,
            end = %end,
            "server shut down cleanly; shipping through its shutdown checkpoint (WAL ends at {end})"
        );
        self.horizon = self.horizon.max(end);
        self.state = ServerState::ShutDown { checkpoint: control.checkpoint, end };
        Ok(())
    }

    /// Walks records from the segment holding the horizon to the end of valid WAL.
    fn walk_to_end_of_wal(&mut self) -> Result<Lsn, SourceError> {
        let seg_size = self.identity.seg_size;
        let start = self.horizon.segment_start(seg_size);
        let mut walker = RecordWalker::new(self.identity, start);
        loop {
            let seg_start = walker.next_segment_start();
            let segno = seg_start.0 / seg_size;
            let path = self.segment_path(segno);
            if !path.exists() {
                return Ok(walker.valid_end());
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            if bytes.len() as u64 != seg_size {
                return Ok(walker.valid_end());
            }
            match walker.walk_segment(seg_start, &bytes) {
                Ok(SegmentWalk::Continues { .. }) => continue,
                Ok(SegmentWalk::Ended { valid_end, .. }) => return Ok(valid_end),
                Err(e) => return Err(SourceError::BadFirstSegment { path, why: e.to_string() }),
            }
        }
    }

    /// Takes in what the poller learned since the last call; while the server is down and not
    /// known to be cleanly shut down, re-reads pg_control twice a second.
    pub fn refresh(&mut self) -> Result<(), SourceError> {
        if let Some(polled) = self.poller.take_new() {
            return self.apply(polled);
        }
        if !self.reachable && self.state == ServerState::Down && self.last_poll.elapsed() >= Duration::from_millis(500) {
            self.last_poll = Instant::now();
            self.on_server_unreachable()?;
        }
        Ok(())
    }

    /// When `refresh` should run again at the latest (the poller's eventfd wakes the sender sooner).
    pub fn next_refresh_in(&self) -> Duration {
        if self.reachable {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(200)
        }
    }

    pub fn segment_path(&self, segno: u64) -> PathBuf {
        self.cfg.pg_wal.join(WalFileName::Segment { tli: self.identity.tli, segno }.file_name(self.identity.seg_size))
    }

    pub fn map_for(&mut self, lsn: Lsn) -> Result<Arc<SegmentMap>, SourceError> {
        assert!(lsn < self.horizon, "asked for {lsn}, at or past the horizon {}", self.horizon);
        let segno = lsn.0 / self.identity.seg_size;
        if let Some(m) = self.maps.get(&segno) {
            return Ok(Arc::clone(m));
        }
        let path = self.segment_path(segno);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SourceError::Recycled {
                    path: path.clone(),
                    lsn,
                    why: "the file is gone: the server removed or recycled it before it was shipped (use --slot)".into(),
                }
            } else {
                SourceError::Io { path: path.clone(), source: e }
            }
        })?;
        let map = SegmentMap::map(&file, self.identity.seg_size).map_err(io_err(&path))?;
        self.maps.insert(segno, Arc::clone(&map));
        Ok(map)
    }

    pub fn release_below(&mut self, lsn: Lsn) {
        let segno = lsn.0 / self.identity.seg_size;
        self.maps.retain(|&s, _| s >= segno);

    }

    /// The receiver holds everything below `flushed` durably: the poller may move the slot that
    /// far (never beyond, never backwards), at most once per `slot_advance_interval`.
    pub fn on_durable(&mut self, flushed: Lsn) {
        if let Some(slot) = &self.poller.shared.slot {
            slot.target.fetch_max(flushed.0, Ordering::AcqRel);
        }
    }

    /// The slot's name and the start of the oldest segment it keeps (None without `--slot`).
    pub fn slot_protects_from(&self) -> Option<(&str, Lsn)> {
        let slot = self.poller.shared.slot.as_ref()?;
        Some((&slot.name, Lsn(slot.restart.load(Ordering::Acquire)).segment_start(self.identity.seg_size)))
    }

    /// Where the slot was last advanced to (or found at start-up).
    pub fn slot_position(&self) -> Lsn {
        self.poller.shared.slot.as_ref().map_or(Lsn(0), |s| Lsn(s.restart.load(Ordering::Acquire)))
    }
}

/// The history file of timeline `tli` in `pg_wal` (empty for timeline 1).
pub fn read_history(pg_wal: &Path, tli: u32) -> Result<String, SourceError> {
    if tli <= 1 {
        return Ok(String::new());
    }
    let path = pg_wal.join(WalFileName::History { tli }.file_name(16 << 20));
    std::fs::read_to_string(&path).map_err(io_err(&path))
}

/// The slot's restart_lsn and whether it was created now. A new slot reserves WAL from the
/// server's latest checkpoint redo (PostgreSQL's `ReplicationSlotReserveWal`): older WAL still in
/// pg_wal is not protected, and no SQL call reserves it (`pg_replication_slot_advance` only moves
/// forward, and refuses a slot that never reserved WAL). An existing slot without a restart_lsn
/// protects nothing and is refused.
fn ensure_slot(client: &mut postgres::Client, conninfo: &str, slot: &str) -> Result<(Lsn, bool), SourceError> {
    let rows = client
        .query("SELECT restart_lsn::text, slot_type FROM pg_replication_slots WHERE slot_name = $1::text::name", &[&slot])
        .map_err(|e| pg_err(conninfo, e))?;
    if let Some(row) = rows.first() {
        let kind: String = row.get(1);
        if kind != "physical" {
            return Err(SourceError::Server {
                conninfo: redact(conninfo),
                why: format!("replication slot {slot} is a {kind} slot; walship needs a physical slot"),
            });
        }
        let restart: Option<String> = row.get(0);
        return match restart.and_then(|t| t.parse().ok()) {
            Some(lsn) => Ok((lsn, false)),
            None => Err(SourceError::Server {
                conninfo: redact(conninfo),
                why: format!(
                    "replication slot {slot} exists but reserves no WAL (its restart_lsn is NULL: created without \
                     reserving WAL, or invalidated after falling behind max_slot_wal_keep_size), so it protects \
                     nothing. Drop it (SELECT pg_drop_replication_slot('{slot}')) to let walship create it, or use \
                     another --slot"
                ),
            }),
        };
    }
    let row = client
        .query_one("SELECT lsn::text FROM pg_create_physical_replication_slot($1::text::name, true)", &[&slot])
        .map_err(|e| pg_err(conninfo, e))?;
    info!(slot = %slot, "created physical replication slot");
    let lsn: Option<String> = row.get(0);
    let lsn = lsn.and_then(|t| t.parse().ok()).ok_or_else(|| SourceError::Server {
        conninfo: redact(conninfo),
        why: format!("created replication slot {slot}, but the server reported no restart_lsn for it"),
    })?;
    Ok((lsn, true))
}

/// Where shipping starts with a slot: never before the segment holding the slot's restart_lsn
/// (older WAL in pg_wal is not protected: a checkpoint may recycle it half-way through shipping it,
/// leaving the receiver behind a slot that moved on). Says so loudly when that skips WAL.
fn first_protected(oldest: Lsn, slot: &str, restart: Lsn, created: bool, seg_size: u64) -> Lsn {
    let slot_segment = restart.segment_start(seg_size);
    if slot_segment <= oldest {
        return oldest;
    }
    let skipped_mib = (slot_segment - oldest) as f64 / f64::from(1u32 << 20);
    if created {
        warn!(
            slot = %slot, restart_lsn = %restart, pg_wal_from = %oldest,
            "pg_wal holds WAL from {oldest}, but the new replication slot {slot} reserves WAL only from {restart} \
             (PostgreSQL reserves a new physical slot at the latest checkpoint's redo; older WAL cannot be reserved). \
             Shipping starts at {slot_segment}: the {skipped_mib:.0} MiB before it are NOT shipped, since the server may \
             recycle them at any checkpoint. A base backup that starts before {slot_segment} cannot be restored from \
             this receiver: take a new one, or ship the older WAL from an archive first"
        );
    } else {
        warn!(
            slot = %slot, restart_lsn = %restart, pg_wal_from = %oldest,
            "pg_wal holds WAL from {oldest}, but replication slot {slot} keeps WAL only from {restart}: the older WAL \
             is not protected and is NOT shipped; shipping starts at {slot_segment}"
        );
    }
    slot_segment
}

/// Refuses a `--pg-wal` that belongs to another cluster than the server `--conninfo` reaches:
/// the server's system identifier must equal both pg_control's and the WAL segments'.
fn check_same_cluster(
    client: &mut postgres::Client,
    cfg: &LiveConfig,
    pgdata: &Path,
    control: &ControlData,
    identity: WalIdentity,
) -> Result<(), SourceError> {
    let server: i64 = client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .map_err(|e| pg_err(&cfg.conninfo, e))?
        .get(0);
    let server = server as u64;
    if server == control.system_id && identity.system_id != control.system_id {
        return Err(SourceError::BadFirstSegment {
            path: cfg.pg_wal.clone(),
            why: format!("WAL of system {} but pg_control says system {}", identity.system_id, control.system_id),
        });
    }
    if server != control.system_id || server != identity.system_id {
        return Err(SourceError::WrongCluster {
            conninfo: redact(&cfg.conninfo),
            server,
            pg_wal: cfg.pg_wal.clone(),
            wal: identity.system_id,
            pg_control: pgdata.join("global").join("pg_control"),
            control: control.system_id,
        });
    }
    Ok(())
}

/// `wal_level=minimal` WAL cannot be replayed by a standby: say so (shipping it still works).
fn warn_if_wal_level_minimal(client: &mut postgres::Client, conninfo: &str) -> Result<(), SourceError> {
    let level: String = client.query_one("SHOW wal_level", &[]).map_err(|e| pg_err(conninfo, e))?.get(0);
    if level == "minimal" {
        warn!(
            "the server runs with wal_level=minimal: its WAL lacks what a standby or a restore from a base backup \
             needs, so what walship ships cannot be replayed. Set wal_level=replica (restart needed)"
        );
    }
    Ok(())
}

fn read_control(pgdata: &Path) -> Result<ControlData, SourceError> {
    let path = pgdata.join("global").join("pg_control");
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    ControlData::parse(&bytes).map_err(|e| SourceError::BadFirstSegment { path, why: e.to_string() })
}

/// The identity of the WAL in `pg_wal` for timeline `tli` (the file names' timeline), from the
/// first page of its oldest segment (whose `xlp_tli` may be an ancestor's, see `read_identity_named`).
fn find_identity(pg_wal: &Path, tli: u32) -> Result<WalIdentity, SourceError> {
    let prefix = format!("{tli:08X}");
    let mut names: Vec<String> = std::fs::read_dir(pg_wal)
        .map_err(io_err(pg_wal))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(String::from)))
        .filter(|n| crate::wal::has_segment_name_shape(n) && n.starts_with(&prefix))
        .collect();
    names.sort();
    let first = names.first().ok_or_else(|| SourceError::Empty { dir: pg_wal.to_path_buf() })?;
    let path = pg_wal.join(first);
    let seg_size = super::source::read_identity(&path)?.seg_size;
    let segno = match WalFileName::parse(first, seg_size) {
        Some(WalFileName::Segment { segno, .. }) => segno,
        _ => return Err(SourceError::BadFirstSegment { path, why: "not a canonical segment name for its segment size".into() }),
    };
    super::source::read_identity_named(&path, tli, segno, pg_wal)
}

/// Start of the oldest segment of the identity's timeline present in `pg_wal`.
fn oldest_segment(pg_wal: &Path, id: WalIdentity) -> Result<Lsn, SourceError> {
    let mut oldest: Option<u64> = None;
    for entry in std::fs::read_dir(pg_wal).map_err(io_err(pg_wal))? {
        let entry = entry.map_err(io_err(pg_wal))?;
        if let Some(WalFileName::Segment { tli, segno }) = entry.file_name().to_str().and_then(|n| WalFileName::parse(n, id.seg_size)) {
            if tli == id.tli {
                oldest = Some(oldest.map_or(segno, |o: u64| o.min(segno)));
            }
        }
    }
    oldest.map(|s| Lsn(s * id.seg_size)).ok_or_else(|| SourceError::Empty { dir: pg_wal.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_passwords_in_both_conninfo_forms() {
        assert_eq!(redact("host=h password=secret user=u"), "host=h password=*** user=u");
        assert_eq!(redact("postgresql://u:secret@h:5432/db"), "postgresql://u:***@h:5432/db");
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(redact("postgres://u@h/db?sslmode=disable&password=secret"), "postgres://u@h/db?sslmode=disable&password=***");
    }

    #[test]
    fn shipping_starts_at_the_slot_s_segment_never_before() {
        let seg = 16u64 << 20;
        assert_eq!(first_protected(Lsn(5 * seg), "s", Lsn(0xF77_C5D0), true, seg), Lsn(0xF00_0000));
        assert_eq!(first_protected(Lsn(0xF00_0000), "s", Lsn(0xF77_C5D0), false, seg), Lsn(0xF00_0000));
        // A slot older than pg_wal's oldest segment: pg_wal's oldest.
        assert_eq!(first_protected(Lsn(0x1000_0000), "s", Lsn(0xF77_C5D0), false, seg), Lsn(0x1000_0000));
    }
}
