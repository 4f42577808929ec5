//! The sender's source when following a live PostgreSQL server: the horizon is the server's
//! flush LSN (`pg_current_wal_flush_lsn()`, or `pg_last_wal_receive_lsn()` on a standby), the
//! bytes come from the segment files in `pg_wal`, and a physical replication slot keeps the
//! server from recycling WAL the receiver does not hold durably yet.
//!
//! The flush LSN is polled by a thread of its own on a connection of its own ([`super::poller`]):
//! a query that a busy server answers late never holds up sending WAL or processing acks; the
//! poller wakes the sender's io_uring loop through an eventfd when it learns something new. How
//! the horizon moves on what the poller (or pg_control) says is [`LiveHorizon`]'s, with no server
//! and no pg_control read of its own, so its rules are unit tested.
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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::poller::{query_flush, FlushPoller, Polled, SlotAdvance, WakeConfig};

/// A burst of questions after a write ends after this long even if the flush LSN did not reach the
/// write (then the slow poll and the next write take over).
const WAKE_BURST_MAX: Duration = Duration::from_millis(50);
use super::{io_err, SegmentMaps, SourceError, WalSource};
pub use super::poller::describe_pg_error;
pub use super::read_history;
use crate::uring::SegmentMap;
use crate::wal::control::ControlData;
use crate::wal::{Lsn, RecordWalker, SegmentWalk, WalFileName, WalIdentity};

#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub pg_wal: PathBuf,
    /// libpq-style connection string for the server that writes `pg_wal`.
    pub conninfo: String,
    pub slot: Option<String>,
    /// How often to ask the server for its flush LSN at least (the fallback to the write events).
    pub poll_interval: Duration,
    /// Ask at once when the server writes to pg_wal (inotify), then every `wake_gap` until its
    /// flush LSN reaches what it wrote.
    pub wake_on_write: bool,
    /// Least time between two questions while following a write.
    pub wake_gap: Duration,
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

pub struct LiveSource {
    pgdata: PathBuf,
    /// Polls the flush position and advances the slot, on its own thread.
    poller: FlushPoller,
    last_poll: Instant,
    maps: SegmentMaps,
    /// The horizon and the server's state.
    h: LiveHorizon,
}

fn pg_err(conninfo: &str, e: postgres::Error) -> SourceError {
    SourceError::Server { conninfo: redact(conninfo), why: describe_pg_error(&e) }
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
        let (first_lsn, slot) = first_lsn_and_slot(&mut client, &cfg, identity)?;
        let first_poll = query_flush(&mut client).map_err(|e| pg_err(&cfg.conninfo, e))?;
        drop(client);
        let wake = WakeConfig {
            poll_interval: cfg.poll_interval,
            on_write: cfg.wake_on_write,
            gap: cfg.wake_gap,
            burst_max: WAKE_BURST_MAX,
        };
        let poller = FlushPoller::start(cfg.conninfo.clone(), &cfg.pg_wal, wake, slot)
            .map_err(|e| SourceError::Server { conninfo: redact(&cfg.conninfo), why: format!("cannot start the flush poller: {e}") })?;
        let history = read_history(&cfg.pg_wal, tli).unwrap_or_default();
        let mut source = LiveSource {
            pgdata,
            poller,
            last_poll: Instant::now() - Duration::from_secs(1),
            maps: SegmentMaps::new(identity.seg_size),
            h: LiveHorizon::new(cfg.pg_wal, cfg.conninfo, identity, first_lsn, is_standby, history),
        };
        source.apply(first_poll)?;
        info!(
            standby = source.h.is_standby,
            timeline = tli,
            first = %source.h.first_lsn,
            horizon = %source.h.horizon,
            "following a live {} server", if source.h.is_standby { "standby" } else { "primary" }
        );
        Ok(source)
    }

    pub fn state(&self) -> ServerState {
        self.h.state
    }

    /// Takes in what a poll found; pg_control is read here, when the server is unreachable.
    fn apply(&mut self, polled: Polled) -> Result<(), SourceError> {
        self.last_poll = Instant::now();
        match polled {
            Polled::Flush { lsn, tli, standby } => self.h.on_flush(lsn, tli, standby),
            Polled::Unreachable(why) => {
                self.h.on_lost(&why);
                let control = read_control(&self.pgdata)?;
                self.h.check_down(&control)
            }
        }
    }

    /// Where the slot was last advanced to (or found at start-up).
    pub fn slot_position(&self) -> Lsn {
        self.poller.slot().map_or(Lsn(0), SlotAdvance::restart)
    }
}

/// Where shipping starts (the oldest segment in pg_wal, or with `--slot` the slot's segment, see
/// [`first_protected`]) and the slot the poller advances.
fn first_lsn_and_slot(
    client: &mut postgres::Client,
    cfg: &LiveConfig,
    identity: WalIdentity,
) -> Result<(Lsn, Option<SlotAdvance>), SourceError> {
    let oldest = oldest_segment(&cfg.pg_wal, identity)?;
    let Some(slot) = &cfg.slot else {
        warn!(
            "no --slot: the server may recycle WAL before it is shipped; walship will notice (missing or \
             recycled segment) and stop rather than ship garbage. Use --slot NAME to prevent it"
        );
        return Ok((oldest, None));
    };
    let (restart, created) = ensure_slot(client, &cfg.conninfo, slot)?;
    info!(slot = %slot, restart_lsn = %restart, "replication slot keeps WAL from {restart} on");
    let first_lsn = first_protected(oldest, slot, restart, created, identity.seg_size);
    Ok((first_lsn, Some(SlotAdvance::new(slot.clone(), cfg.slot_advance_interval, restart))))
}

impl WalSource for LiveSource {
    fn identity(&self) -> WalIdentity {
        self.h.identity
    }

    fn first_lsn(&self) -> Lsn {
        self.h.first_lsn
    }

    fn horizon(&self) -> Lsn {
        self.h.horizon
    }

    /// Takes in what the poller learned since the last call (`want` does not matter: the server
    /// says how far WAL goes); while the server is down and not known to be cleanly shut down,
    /// re-reads pg_control twice a second.
    fn refresh(&mut self, _want: Lsn) -> Result<(), SourceError> {
        if let Some(polled) = self.poller.take_new() {
            return self.apply(polled);
        }
        if !self.h.reachable && self.h.state == ServerState::Down && self.last_poll.elapsed() >= Duration::from_millis(500) {
            self.last_poll = Instant::now();
            let control = read_control(&self.pgdata)?;
            self.h.check_down(&control)?;
        }
        Ok(())
    }

    /// The eventfd the poller signals when it learned something new.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.poller.wake_fd())
    }

    /// When `refresh` should run again at the latest (the poller's eventfd wakes the sender sooner).
    fn wait_hint(&self) -> Duration {
        let next = if self.h.reachable { Duration::from_millis(50) } else { Duration::from_millis(200) };
        next.max(Duration::from_micros(200))
    }

    fn map_for(&mut self, lsn: Lsn) -> Result<Arc<SegmentMap>, SourceError> {
        assert!(lsn < self.h.horizon, "asked for {lsn}, at or past the horizon {}", self.h.horizon);
        let segno = lsn.0 / self.h.identity.seg_size;
        let path = self.h.segment_path(segno);
        self.maps.map(segno, &path, |e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SourceError::Recycled {
                    path: path.clone(),
                    lsn,
                    why: "the file is gone: the server removed or recycled it before it was shipped (use --slot)".into(),
                }
            } else {
                SourceError::Io { path: path.clone(), source: e }
            }
        })
    }

    fn segment_path(&self, lsn: Lsn) -> PathBuf {
        self.h.segment_path(lsn.0 / self.h.identity.seg_size)
    }

    fn release_below(&mut self, lsn: Lsn) {
        self.maps.release_below(lsn);
    }

    /// The receiver holds everything below `flushed` durably: the poller may move the slot that
    /// far (never beyond, never backwards), at most once per `slot_advance_interval`.
    fn on_durable(&mut self, flushed: Lsn) {
        if let Some(slot) = self.poller.slot() {
            slot.allow_up_to(flushed);
        }
    }

    fn history(&self) -> String {
        self.h.history.clone()
    }

    fn switch_point(&self) -> Option<Lsn> {
        self.h.switch_point()
    }

    /// Continue on the new timeline from the segment holding the switch point.
    fn apply_switch(&mut self) -> Result<(), SourceError> {
        self.h.switch_timeline();
        self.maps.clear();
        self.poller.replay_latest();
        WalSource::refresh(self, self.h.horizon)
    }

    fn server_state(&self) -> Option<ServerState> {
        Some(self.h.state)
    }

    /// The slot's name and the start of the oldest segment it keeps.
    fn slot_protects_from(&self) -> Option<(&str, Lsn)> {
        let slot = self.poller.slot()?;
        Some((slot.name(), slot.restart().segment_start(self.h.identity.seg_size)))
    }
}

/// The live server's horizon and state, and the rules that move them: on what a poll of the
/// server found, or (while it is unreachable) on what pg_control says, which the caller reads and
/// passes in. The only files read here are pg_wal's segments and history files.
#[derive(Debug)]
pub(crate) struct LiveHorizon {
    pg_wal: PathBuf,
    conninfo: String,
    identity: WalIdentity,
    first_lsn: Lsn,
    horizon: Lsn,
    is_standby: bool,
    state: ServerState,
    /// The poller's last answer was a flush position (not an error).
    reachable: bool,
    /// This timeline's history file (empty on timeline 1).
    history: String,
    /// Since when the server is unreachable, and whether that was reported.
    down_since: Option<Instant>,
    warned_down: bool,
    /// The server moved to a newer timeline: (new timeline, where ours ends, its history).
    pending_switch: Option<(u32, Lsn, String)>,
}

impl LiveHorizon {
    pub(crate) fn new(
        pg_wal: PathBuf,
        conninfo: String,
        identity: WalIdentity,
        first_lsn: Lsn,
        is_standby: bool,
        history: String,
    ) -> LiveHorizon {
        LiveHorizon {
            pg_wal,
            conninfo,
            identity,
            first_lsn,
            horizon: first_lsn,
            is_standby,
            state: ServerState::Up,
            reachable: true,
            history,
            down_since: None,
            warned_down: false,
            pending_switch: None,
        }
    }

    fn segment_path(&self, segno: u64) -> PathBuf {
        self.pg_wal.join(WalFileName::Segment { tli: self.identity.tli, segno }.file_name(self.identity.seg_size))
    }

    /// Where our timeline ends, when the server moved on to a newer one.
    fn switch_point(&self) -> Option<Lsn> {
        self.pending_switch.as_ref().map(|p| p.1)
    }

    /// The server answered: its flush LSN (never moving the horizon backwards), the timeline it
    /// writes on a primary, and whether it is a standby.
    fn on_flush(&mut self, lsn: Option<Lsn>, tli: Option<u32>, standby: bool) -> Result<(), SourceError> {
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

    /// The server could not be reached (`why`); `check_down` follows with pg_control.
    fn on_lost(&mut self, why: &str) {
        if self.reachable {
            // A clean shutdown closes connections before it writes the shutdown checkpoint:
            // say what happened only once pg_control tells (see check_down).
            info!("lost the server connection ({why}); checking whether it is shutting down");
            self.reachable = false;
            self.down_since = Some(Instant::now());
        }
    }

    /// The server is unreachable and `control` is its pg_control: a clean shutdown ends its WAL
    /// with the shutdown checkpoint, which becomes the horizon; otherwise wait.
    fn check_down(&mut self, control: &ControlData) -> Result<(), SourceError> {
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

    /// The server writes a newer timeline: our timeline ends at the switch point in the new
    /// timeline's history file; ship up to there, then the sender switches (`switch_timeline`).
    fn on_new_timeline(&mut self, tli: u32) -> Result<(), SourceError> {
        if self.pending_switch.as_ref().is_some_and(|p| p.0 == tli) {
            return Ok(());
        }
        let history = read_history(&self.pg_wal, tli)?;
        let entries = crate::wal::history::parse_history(&history).map_err(|e| SourceError::BadFirstSegment {
            path: self.pg_wal.join(WalFileName::History { tli }.file_name(self.identity.seg_size)),
            why: e.to_string(),
        })?;
        let Some(switch) = crate::wal::history::switch_point(&entries, self.identity.tli) else {
            return Err(SourceError::Server {
                conninfo: redact(&self.conninfo),
                why: format!("the server moved to timeline {tli}, which does not branch off timeline {}", self.identity.tli),
            });
        };
        info!(from = self.identity.tli, to = tli, switch = %switch, "the server switched to timeline {tli}; shipping timeline {} up to {switch} first", self.identity.tli);
        self.horizon = self.horizon.max(switch);
        self.pending_switch = Some((tli, switch, history));
        Ok(())
    }

    /// Moves to the pending timeline, from the segment holding the switch point.
    fn switch_timeline(&mut self) {
        let (tli, switch, history) = self.pending_switch.take().expect("a pending switch");
        self.identity.tli = tli;
        self.history = history;
        self.first_lsn = switch.segment_start(self.identity.seg_size);
        self.horizon = self.first_lsn;
    }
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
    let seg_size = super::dir::read_identity(&path)?.seg_size;
    let segno = match WalFileName::parse(first, seg_size) {
        Some(WalFileName::Segment { segno, .. }) => segno,
        _ => return Err(SourceError::BadFirstSegment { path, why: "not a canonical segment name for its segment size".into() }),
    };
    super::dir::read_identity_named(&path, tli, segno, pg_wal)
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

    mod horizon {
        use super::super::*;
        use crate::wal::control::ClusterState;
        use crate::wal::gen::{generate, GenOptions};

        const SEG: u64 = 1 << 20;

        fn identity(tli: u32) -> WalIdentity {
            WalIdentity { system_id: 7, seg_size: SEG, block_size: 8192, magic: 0xD110, tli }
        }

        fn horizon_in(pg_wal: &Path, id: WalIdentity, first: Lsn) -> LiveHorizon {
            LiveHorizon::new(pg_wal.to_path_buf(), "host=h password=secret".into(), id, first, false, String::new())
        }

        fn control(state: ClusterState, checkpoint: Lsn) -> ControlData {
            ControlData { system_id: 7, control_version: 1300, state, checkpoint, redo: checkpoint, timeline: 1 }
        }

        #[test]
        fn the_horizon_follows_the_flush_lsn_and_never_moves_backwards() {
            let dir = tempfile::tempdir().unwrap();
            let mut h = horizon_in(dir.path(), identity(1), Lsn(SEG));
            assert_eq!(h.horizon, Lsn(SEG));
            h.on_flush(Some(Lsn(SEG + 4096)), Some(1), false).unwrap();
            assert_eq!(h.horizon, Lsn(SEG + 4096));
            h.on_flush(Some(Lsn(SEG + 100)), Some(1), false).unwrap();
            assert_eq!(h.horizon, Lsn(SEG + 4096), "a flush LSN behind the horizon does not move it back");
            h.on_flush(None, None, true).unwrap();
            assert_eq!(h.horizon, Lsn(SEG + 4096));
            assert!(h.is_standby);
            h.on_lost("connection refused");
            h.check_down(&control(ClusterState::InProduction, Lsn(SEG))).unwrap();
            assert_eq!((h.state, h.horizon), (ServerState::Down, Lsn(SEG + 4096)), "a crash leaves the horizon where it was");
            h.on_flush(Some(Lsn(SEG + 8192)), None, true).unwrap();
            assert_eq!((h.state, h.horizon), (ServerState::Up, Lsn(SEG + 8192)));
        }

        #[test]
        fn a_clean_shutdown_moves_the_horizon_to_the_end_of_wal_past_the_checkpoint() {
            let dir = tempfile::tempdir().unwrap();
            let opts = GenOptions { dir: dir.path().into(), seg_size: SEG, start_segno: 1, wal_bytes: SEG + SEG / 2, ..Default::default() };
            let report = generate(&opts).unwrap();
            let id = super::super::super::dir::read_identity(&report.segment_files[0]).unwrap();
            let mut h = horizon_in(dir.path(), id, Lsn(SEG));
            h.on_flush(Some(Lsn(SEG + 8192)), None, false).unwrap();
            h.on_lost("the server closed the connection");
            // Shutting down, but the checkpoint is not written yet: wait.
            h.check_down(&control(ClusterState::ShuttingDown, Lsn(SEG))).unwrap();
            assert_eq!((h.state, h.horizon), (ServerState::Down, Lsn(SEG + 8192)));
            // pg_control names a checkpoint at or past the end of valid WAL: do not move.
            h.check_down(&control(ClusterState::ShutDown, report.end_lsn)).unwrap();
            assert_eq!((h.state, h.horizon), (ServerState::Down, Lsn(SEG + 8192)));
            let checkpoint = Lsn(report.end_lsn.0 - 200);
            h.check_down(&control(ClusterState::ShutDown, checkpoint)).unwrap();
            assert_eq!(h.horizon, report.end_lsn);
            assert_eq!(h.state, ServerState::ShutDown { checkpoint, end: report.end_lsn });
            h.on_flush(Some(Lsn(SEG)), None, false).unwrap();
            assert_eq!((h.state, h.horizon), (ServerState::Up, report.end_lsn), "back up, behind: the horizon stays");
        }

        #[test]
        fn a_newer_timeline_sets_a_pending_switch_at_the_history_s_switch_point() {
            let dir = tempfile::tempdir().unwrap();
            let history = "1\t0/180000\tno recovery target specified\n";
            std::fs::write(dir.path().join("00000002.history"), history).unwrap();
            let mut h = horizon_in(dir.path(), identity(1), Lsn(SEG));
            h.on_flush(Some(Lsn(SEG + 4096)), Some(1), false).unwrap();
            h.on_flush(Some(Lsn(0x20_0000)), Some(2), false).unwrap();
            assert_eq!(h.switch_point(), Some(Lsn(0x18_0000)));
            assert_eq!(h.horizon, Lsn(0x18_0000), "the horizon goes to the switch point, not the new timeline's flush LSN");
            h.on_flush(Some(Lsn(0x30_0000)), None, false).unwrap();
            assert_eq!(h.horizon, Lsn(0x18_0000), "nothing moves while the switch is pending");
            h.switch_timeline();
            assert_eq!((h.identity.tli, h.first_lsn, h.horizon), (2, Lsn(SEG), Lsn(SEG)));
            assert_eq!(h.history, history);
            assert_eq!(h.switch_point(), None);
        }

        #[test]
        fn a_newer_timeline_that_does_not_branch_off_ours_is_an_error() {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("00000003.history"), "2\t0/180000\tno recovery target specified\n").unwrap();
            let mut h = horizon_in(dir.path(), identity(1), Lsn(SEG));
            let e = h.on_flush(Some(Lsn(0x20_0000)), Some(3), false).unwrap_err().to_string();
            assert!(e.contains("does not branch off timeline 1") && !e.contains("secret"), "{e}");
        }
    }
}
