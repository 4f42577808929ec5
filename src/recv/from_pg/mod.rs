//! `walship recv --from-postgres`: a physical replication client of a real walsender, bridged into
//! the receiver as an in-process walship sender.
//!
//! Design: the bridge thread speaks PostgreSQL's replication protocol to the server and walship's
//! own frames to the receiver's io loop over a Unix socket pair (as the TLS pump does), so every
//! XLogData goes through the receiver's unchanged path: page checks, O_DIRECT writes, group-commit
//! fdatasync, recovery, `.walship-flushed`. The receiver's Acks come back over the pair and become
//! 'r' status updates (write = written, flush = the receiver's durable position), sent the moment
//! an Ack arrives and whenever the server asks. Nothing here can report a flush position the
//! receiver did not make durable: the only source of `flush` is the receiver's Ack.
//!
//! Per connection: IDENTIFY_SYSTEM (the system id must be the directory's), the slot (created with
//! RESERVE_WAL when missing), TIMELINE_HISTORY, START_REPLICATION from the directory's durable end
//! (an empty directory starts at the segment holding the slot's restart LSN, else the server's
//! position), and at the end of a timeline a new walship session and START_REPLICATION on the next
//! timeline from the segment holding the switch point (as pg_receivewal does).

pub mod conninfo;
pub mod proto;
pub mod tls;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver as Rx, Sender as Tx};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tracing::{info, warn};

use crate::metrics::LsnGauge;
use crate::tls::Link;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use crate::wal::{Lsn, WalIdentity};
use crate::wire::{self, Hello, Keepalive, Message, PROTOCOL_VERSION};
pub use conninfo::{ConnInfo, SslMode};
use proto::{AuthRequest, PgError, ReplMessage};

/// Everything the bridge needs, validated.
#[derive(Debug, Clone)]
pub struct FromPgConfig {
    pub conninfo: ConnInfo,
    pub slot: String,
    /// Sent as `application_name`: the name to list in `synchronous_standby_names`.
    pub application_name: String,
    /// Largest backend message accepted (a walsender sends at most 128 KiB of WAL per message).
    pub message_bytes_max: u32,
    /// Wait between reconnects after a lost connection.
    pub retry_interval: Duration,
    /// Bound on connecting and on each blocking step of the start-up conversation.
    pub connect_timeout: Duration,
    /// The upstream's numbers for `/metrics` and `walship status`.
    pub metrics: FromPgMetrics,
}

/// The upstream server as the bridge sees it (`walship_recv_upstream_*`): whether it streams,
/// the server's end of WAL last seen, the last status update sent (write/flush), reconnects.
#[derive(Debug, Clone, Default)]
pub struct FromPgMetrics {
    pub connected: Gauge,
    pub tls: Gauge,
    pub reconnects: Counter,
    pub server_lsn: LsnGauge,
    pub reported_write_lsn: LsnGauge,
    pub reported_flush_lsn: LsnGauge,
    pub last_status_time_s: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub last_message_time_s: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl FromPgMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("recv_upstream");
        r.register("connected", "1 while streaming from the PostgreSQL server (--from-postgres)", self.connected.clone());
        r.register("tls", "1 while the replication connection to PostgreSQL uses TLS", self.tls.clone());
        r.register("reconnects", "Replication connections re-made after a loss", self.reconnects.clone());
        r.register("server_lsn", "The server's end of WAL as last reported by its walsender (u64 LSN)", self.server_lsn.clone());
        r.register("reported_write_lsn", "The write position of the last status update sent to the server (u64 LSN)", self.reported_write_lsn.clone());
        r.register(
            "reported_flush_lsn",
            "The flush position of the last status update sent to the server: durable here (u64 LSN)",
            self.reported_flush_lsn.clone(),
        );
        r.register("last_status_time_seconds", "Unix time of the last status update sent to the server", self.last_status_time_s.clone());
        r.register("last_message_time_seconds", "Unix time of the last message from the server's walsender", self.last_message_time_s.clone());
    }

    fn on_status(&self, write: Lsn, flush: Lsn) {
        debug_assert!(flush <= write, "flush {flush} past write {write}");
        self.reported_write_lsn.set(write.0);
        self.reported_flush_lsn.set(flush.0);
        self.last_status_time_s.set(unix_us() as f64 / 1e6);
    }

    fn on_server(&self, wal_end: Lsn) {
        if wal_end.0 > self.server_lsn.get() {
            self.server_lsn.set(wal_end.0);
        }
        self.last_message_time_s.set(unix_us() as f64 / 1e6);
    }
}

impl FromPgConfig {
    pub fn validate(&self) -> Result<(), String> {
        proto::check_slot_name(&self.slot).map_err(|e| format!("--slot: {e}"))?;
        if self.application_name.is_empty() || self.application_name.len() > 63 || !self.application_name.is_ascii() {
            return Err(format!("--application-name {:?}: expected 1 to 63 ASCII characters", self.application_name));
        }
        if !(64 << 10..=64 << 20).contains(&self.message_bytes_max) {
            return Err(format!("--pg-message-bytes-max must be between 64KiB and 64MiB, got {}", self.message_bytes_max));
        }
        if self.retry_interval.is_zero() || self.connect_timeout.is_zero() {
            return Err("--pg-retry-interval and --pg-connect-timeout must be longer than zero".into());
        }
        tls::PgTls::from_conninfo(&self.conninfo).map_err(|e| format!("--from-postgres: {e}"))?;
        Ok(())
    }
}

/// What the bridge hands the receiver's io loop.
pub enum BridgeEvent {
    /// A walship session to serve: the receiver's end of the pair, and the server's address.
    Link(Link, SocketAddr),
    /// The bridge stopped for good: the receiver drains and exits with this error.
    Fatal(String),
}

#[derive(Debug, thiserror::Error)]
pub enum FromPgError {
    #[error("cannot connect to PostgreSQL at {peer}: {source}")]
    Connect { peer: String, source: std::io::Error },
    #[error("connection to PostgreSQL at {peer} failed: {source}")]
    Io { peer: String, source: std::io::Error },
    #[error("PostgreSQL at {peer} refused {what}: {error}")]
    Server { peer: String, what: String, error: Box<PgError> },
    #[error("authentication with PostgreSQL at {peer} failed: {why}")]
    Auth { peer: String, why: String },
    #[error("PostgreSQL at {peer} sent {why}")]
    Protocol { peer: String, why: String },
    #[error(
        "PostgreSQL at {peer} is another cluster: its system identifier is {server} but the directory holds WAL of system {ours}; \
         nothing was written"
    )]
    WrongCluster { peer: String, server: u64, ours: u64 },
    #[error("the receiver refused the stream from {peer}: {why}")]
    Receiver { peer: String, why: String },
    /// TLS refused or failed; `transient` when the connection broke (not the certificate or the mode).
    #[error("TLS with PostgreSQL at {peer} failed: {why}")]
    Tls { peer: String, why: String, transient: bool },
}

impl FromPgError {
    /// Worth reconnecting: a broken or refused connection, a server starting or stopping, a slot
    /// still held by the walsender of a connection that just died.
    fn is_transient(&self) -> bool {
        match self {
            FromPgError::Connect { .. } | FromPgError::Io { .. } => true,
            FromPgError::Tls { transient, .. } => *transient,
            FromPgError::Server { error, .. } => matches!(error.code.as_str(), "55006" | "57P01" | "57P02" | "57P03" | "53300"),
            _ => false,
        }
    }
}

/// Where the directory stands when the bridge starts.
#[derive(Debug, Clone, Copy)]
pub struct DirStart {
    pub identity: Option<WalIdentity>,
    pub durable_end: Lsn,
}

/// Starts the bridge thread; its sessions and its end arrive on the returned channel.
pub fn spawn(cfg: FromPgConfig, dir: DirStart, frame_bytes_max: u32) -> std::io::Result<Rx<BridgeEvent>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("walship-from-pg".into()).spawn(move || {
        let mut bridge = Bridge { cfg, identity: dir.identity.filter(|_| dir.durable_end > Lsn(0)), frame_bytes_max: frame_bytes_max as usize, tx };
        let why = bridge.run();
        let _ = bridge.tx.send(BridgeEvent::Fatal(why.to_string()));
    })?;
    Ok(rx)
}

struct Bridge {
    cfg: FromPgConfig,
    /// The directory's identity as of the last session (None: empty).
    identity: Option<WalIdentity>,
    frame_bytes_max: usize,
    tx: Tx<BridgeEvent>,
}

/// How a streaming session ended without an error.
enum Ended {
    /// The server ended the stream (it is shutting down): reconnect.
    ByServer,
}

impl Bridge {
    /// Streams until a fatal error; transient ones reconnect after `retry_interval`.
    fn run(&mut self) -> FromPgError {
        let mut streamed = false;
        loop {
            let result = self.session(&mut streamed);
            self.cfg.metrics.connected.set(0);
            self.cfg.metrics.tls.set(0);
            match result {
                Ok(Ended::ByServer) => info!(server = %self.cfg.conninfo.describe(), "the server ended the replication stream; reconnecting"),
                // The first connection fails fast (a wrong address or a server that is down is
                // most likely a configuration error); once streaming, walship keeps trying.
                Err(e) if e.is_transient() && (streamed || matches!(e, FromPgError::Server { .. })) => {
                    warn!(server = %self.cfg.conninfo.describe(), "{e}; retrying in {:?}", self.cfg.retry_interval)
                }
                Err(e) => return e,
            }
            if streamed {
                self.cfg.metrics.reconnects.inc();
            }
            std::thread::sleep(self.cfg.retry_interval);
        }
    }

    /// One replication connection, across as many timelines as it follows.
    fn session(&mut self, streamed: &mut bool) -> Result<Ended, FromPgError> {
        let (mut pg, peer_addr) = PgConn::connect(&self.cfg)?;
        self.cfg.metrics.tls.set(i64::from(pg.tls));
        let peer = pg.peer.clone();
        let ident = pg.query("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM")?;
        let row = ident.first().ok_or_else(|| pg.protocol("no row for IDENTIFY_SYSTEM"))?;
        let col = |i: usize| row.get(i).cloned().flatten();
        let system_id: u64 = col(0).and_then(|s| s.parse().ok()).ok_or_else(|| pg.protocol("IDENTIFY_SYSTEM without a system identifier"))?;
        let server_tli: u32 = col(1).and_then(|s| s.parse().ok()).ok_or_else(|| pg.protocol("IDENTIFY_SYSTEM without a timeline"))?;
        let server_pos: Lsn = col(2).and_then(|s| s.parse().ok()).ok_or_else(|| pg.protocol("IDENTIFY_SYSTEM without an xlogpos"))?;
        if let Some(id) = self.identity {
            if id.system_id != system_id {
                return Err(FromPgError::WrongCluster { peer, server: system_id, ours: id.system_id });
            }
        }
        info!(server = %peer, system_id, timeline = server_tli, position = %server_pos, "connected to PostgreSQL");
        self.cfg.metrics.on_server(server_pos);
        let slot_restart = self.ensure_slot(&mut pg)?;
        // Where this connection starts: the directory's durable end on its timeline (the
        // receiver's Welcome says exactly where), or, for an empty directory, the segment holding
        // the slot's restart LSN (else the server's position).
        let mut fresh: Option<(Lsn, u32, u64)> = None;
        if self.identity.is_none() {
            let shown = pg.query("SHOW wal_segment_size", "SHOW wal_segment_size")?;
            let text = shown.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
            let seg_size = proto::parse_size_setting(&text)
                .filter(|s| crate::wal::is_valid_seg_size(*s))
                .ok_or_else(|| pg.protocol(&format!("wal_segment_size {text:?}, which is not a valid segment size")))?;
            let (from, tli) = slot_restart.filter(|(l, _)| *l > Lsn(0)).unwrap_or((server_pos, server_tli));
            fresh = Some((from.segment_start(seg_size), tli, seg_size));
        }
        let mut tli = self.identity.map_or_else(|| fresh.expect("fresh").1, |id| id.tli);
        loop {
            let history = if tli > 1 { self.timeline_history(&mut pg, tli)? } else { String::new() };
            let end = match fresh.take() {
                // Empty directory: the Hello needs the WAL's identity, from the first page.
                Some((start, _, seg_size)) => match pg.start_replication(&self.cfg.slot, start, tli)? {
                    Some(StreamEnd::Timeline { next_tli, switch }) => {
                        // That timeline ended before `start`: begin on the next one instead.
                        fresh = Some((switch.segment_start(seg_size), next_tli, seg_size));
                        tli = next_tli;
                        continue;
                    }
                    Some(StreamEnd::Server) => return Ok(Ended::ByServer),
                    None => {
                        let mut stream = Stream::new(&self.cfg, self.frame_bytes_max);
                        let first = stream.first_page(&mut pg, start)?;
                        let id = WalIdentity::from_first_page(&first)
                            .map_err(|e| pg.protocol(&format!("a first page at {start} that is not a segment's first page: {e}")))?;
                        if id.system_id != system_id {
                            return Err(pg.protocol(&format!("WAL of system {} while IDENTIFY_SYSTEM said {system_id}", id.system_id)));
                        }
                        let (link, welcome) = self.open_session(hello(&id, tli, start, server_pos, &history), peer_addr, &peer)?;
                        if welcome.durable_lsn != 0 {
                            return Err(FromPgError::Receiver { peer: peer.clone(), why: format!("it resumes at {} but holds nothing", Lsn(welcome.durable_lsn)) });
                        }
                        self.identity = Some(WalIdentity { tli, ..id });
                        // Nothing is durable yet: status updates say so (0) until the first Ack.
                        stream.start(link, &id, start, Lsn(0));
                        *streamed = true;
                        stream.stream(&mut pg)
                    }
                },
                None => {
                    let id = self.identity.expect("identity");
                    let (link, welcome) = self.open_session(hello(&id, tli, Lsn(0), server_pos, &history), peer_addr, &peer)?;
                    let resume = Lsn(welcome.durable_lsn);
                    self.identity = Some(WalIdentity { tli, ..id });
                    let mut stream = Stream::new(&self.cfg, self.frame_bytes_max);
                    stream.start(link, &id, resume, resume);
                    match pg.start_replication(&self.cfg.slot, resume, tli) {
                        // The timeline ended exactly where the directory does: nothing to stream.
                        Ok(Some(end)) => {
                            stream.close();
                            Ok(end)
                        }
                        Ok(None) => {
                            *streamed = true;
                            stream.stream(&mut pg)
                        }
                        Err(e) => {
                            stream.close();
                            Err(e)
                        }
                    }
                }
            };
            match end? {
                StreamEnd::Timeline { next_tli, switch } => {
                    info!(server = %peer, from = tli, to = next_tli, switch = %switch, "timeline {tli} ends at {switch}; following timeline {next_tli}");
                    if next_tli <= tli {
                        return Err(pg.protocol(&format!("the end of timeline {tli} with next timeline {next_tli}")));
                    }
                    tli = next_tli;
                }
                StreamEnd::Server => return Ok(Ended::ByServer),
            }
        }
    }

    /// The slot exists afterwards; returns its restart LSN and timeline when known.
    fn ensure_slot(&mut self, pg: &mut PgConn) -> Result<Option<(Lsn, u32)>, FromPgError> {
        let slot = self.cfg.slot.clone();
        match pg.query(&format!("READ_REPLICATION_SLOT {slot}"), "READ_REPLICATION_SLOT") {
            Ok(rows) => {
                let row = rows.first().cloned().unwrap_or_default();
                match row.first().cloned().flatten().as_deref() {
                    Some("physical") => {
                        let lsn = row.get(1).cloned().flatten().and_then(|s| s.parse().ok());
                        let tli = row.get(2).cloned().flatten().and_then(|s| s.parse().ok());
                        return Ok(lsn.zip(tli));
                    }
                    Some(other) => return Err(pg.protocol(&format!("slot {slot:?} of type {other:?}; walship needs a physical slot"))),
                    None => {}
                }
            }
            // Before PostgreSQL 15 there is no READ_REPLICATION_SLOT: create, and accept "exists".
            Err(FromPgError::Server { error, .. }) if error.code == "42601" => {}
            Err(e) => return Err(e),
        }
        match pg.query(&format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"), "CREATE_REPLICATION_SLOT") {
            Ok(rows) => {
                let lsn = rows.first().and_then(|r| r.get(1).cloned().flatten()).and_then(|s| s.parse::<Lsn>().ok());
                info!(server = %pg.peer, slot = %slot, restart = ?lsn, "created the physical replication slot {slot}");
                Ok(None)
            }
            Err(FromPgError::Server { error, .. }) if error.code == "42710" => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn timeline_history(&mut self, pg: &mut PgConn, tli: u32) -> Result<String, FromPgError> {
        let rows = pg.query(&format!("TIMELINE_HISTORY {tli}"), "TIMELINE_HISTORY")?;
        let content = rows.first().and_then(|r| r.get(1).cloned().flatten()).ok_or_else(|| pg.protocol("TIMELINE_HISTORY without content"))?;
        if content.len() > wire::HISTORY_BYTES_MAX {
            return Err(pg.protocol(&format!("a history file of timeline {tli} of {} bytes; walship carries at most {}", content.len(), wire::HISTORY_BYTES_MAX)));
        }
        Ok(content)
    }

    /// A new walship session with the receiver: the pair, the Hello, the receiver's Welcome.
    fn open_session(&self, hello: Hello, peer_addr: SocketAddr, peer: &str) -> Result<(UnixStream, wire::Welcome), FromPgError> {
        let io = |source| FromPgError::Io { peer: "the receiver (socket pair)".into(), source };
        let (ours, theirs) = UnixStream::pair().map_err(io)?;
        let mut bytes = Vec::new();
        Message::Hello(hello).encode(&mut bytes);
        (&ours).write_all(&bytes).map_err(io)?;
        if self.tx.send(BridgeEvent::Link(Link::Local(theirs), peer_addr)).is_err() {
            return Err(FromPgError::Receiver { peer: peer.into(), why: "the receiver stopped".into() });
        }
        let mut dec = wire::Decoder::new(wire::Limits::default());
        let mut buf = [0u8; 4096];
        loop {
            match dec.next_message() {
                Ok(Some(Message::Welcome(w))) => return Ok((ours, w)),
                Ok(Some(Message::Error(e))) => return Err(FromPgError::Receiver { peer: peer.into(), why: e.message }),
                Ok(Some(other)) => return Err(FromPgError::Receiver { peer: peer.into(), why: format!("unexpected {} before Welcome", other.kind()) }),
                Ok(None) => {}
                Err(e) => return Err(FromPgError::Receiver { peer: peer.into(), why: e.to_string() }),
            }
            let n = (&ours).read(&mut buf).map_err(io)?;
            if n == 0 {
                return Err(FromPgError::Receiver { peer: peer.into(), why: "it closed the session before its Welcome".into() });
            }
            dec.feed(&buf[..n]);
        }
    }
}

fn hello(id: &WalIdentity, tli: u32, first: Lsn, horizon: Lsn, history: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        page_magic: id.magic,
        timeline: tli,
        system_id: id.system_id,
        seg_size: id.seg_size as u32,
        block_size: id.block_size as u32,
        first_lsn: first.0,
        horizon_lsn: horizon.0,
        sender_name: "postgres walsender (--from-postgres)".into(),
        history: history.to_string(),
    }
}

/// How a CopyBoth stream ended.
enum StreamEnd {
    /// End of a historic timeline: go on with `next_tli` at `switch`.
    Timeline { next_tli: u32, switch: Lsn },
    /// The server ended replication (it stops).
    Server,
}

/// Positions the receiver acknowledged, shared with the thread that reads its Acks.
struct Acked {
    written: AtomicU64,
    flushed: AtomicU64,
}

/// One START_REPLICATION stream bridged into one walship session.
struct Stream {
    frame_bytes_max: usize,
    message_bytes_max: u32,
    link: Option<UnixStream>,
    /// The next LSN the server must send.
    next: Lsn,
    seg_size: u64,
    block_size: u64,
    /// Where the zero pages after an `XLOG_SWITCH` began in the current segment: everything up to
    /// the segment's end must be zeros too.
    padding_from: Option<Lsn>,
    /// WAL read before the session opened (an empty directory's first page), written on start.
    early: Vec<(Lsn, Vec<u8>)>,
    acked: Arc<Acked>,
    ack_thread: Option<std::thread::JoinHandle<Option<String>>>,
    metrics: FromPgMetrics,
}

impl Stream {
    fn new(cfg: &FromPgConfig, frame_bytes_max: usize) -> Stream {
        Stream {
            frame_bytes_max,
            message_bytes_max: cfg.message_bytes_max,
            link: None,
            next: Lsn(0),
            seg_size: 16 << 20,
            block_size: 8192,
            padding_from: None,
            early: Vec::new(),
            acked: Arc::new(Acked { written: AtomicU64::new(0), flushed: AtomicU64::new(0) }),
            ack_thread: None,
            metrics: cfg.metrics.clone(),
        }
    }

    /// Reads XLogData until the long page header at `start` is whole; keeps what it read.
    fn first_page(&mut self, pg: &mut PgConn, start: Lsn) -> Result<Vec<u8>, FromPgError> {
        let mut have: Vec<u8> = Vec::new();
        while have.len() < crate::wal::LONG_PAGE_HEADER_LEN {
            let (tag, body) = pg.read_message()?;
            match tag {
                b'd' => match proto::parse_copy_data(&body).map_err(|e| pg.protocol(&e.to_string()))? {
                    ReplMessage::XLogData { start: at, data, wal_end, .. } => {
                        self.metrics.on_server(wal_end);
                        if at != start + have.len() as u64 {
                            return Err(pg.protocol(&format!("XLogData at {at} where {} was expected", start + have.len() as u64)));
                        }
                        have.extend_from_slice(data);
                        self.early.push((at, data.to_vec()));
                    }
                    ReplMessage::Keepalive { reply_requested: true, wal_end, .. } => {
                        self.metrics.on_server(wal_end);
                        pg.send(&proto::status_update(Lsn(0), Lsn(0), unix_us(), false))?;
                        self.metrics.on_status(Lsn(0), Lsn(0));
                    }
                    ReplMessage::Keepalive { wal_end, .. } => self.metrics.on_server(wal_end),
                },
                b'E' => return Err(pg.server_error(&body, "the replication stream")),
                b'N' | b'S' => {}
                other => return Err(pg.protocol(&format!("message {:?} before the first WAL", other as char))),
            }
        }
        Ok(have)
    }

    /// The session is open: write what was read early, start the Ack reader.
    fn start(&mut self, link: UnixStream, id: &WalIdentity, from: Lsn, durable: Lsn) {
        self.next = from;
        self.seg_size = id.seg_size;
        self.block_size = id.block_size;
        self.acked.written.store(durable.0, Ordering::Relaxed);
        self.acked.flushed.store(durable.0, Ordering::Relaxed);
        self.link = Some(link);
    }

    fn spawn_ack_reader(&mut self, pg_writer: Arc<Mutex<Option<PgSocket>>>) -> std::io::Result<()> {
        let link = self.link.as_ref().expect("link").try_clone()?;
        let acked = Arc::clone(&self.acked);
        let metrics = self.metrics.clone();
        self.ack_thread = Some(std::thread::Builder::new().name("walship-from-pg-acks".into()).spawn(move || {
            let mut dec = wire::Decoder::new(wire::Limits::default());
            let mut buf = [0u8; 4096];
            loop {
                let n = match (&link).read(&mut buf) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => n,
                };
                dec.feed(&buf[..n]);
                loop {
                    match dec.next_message() {
                        Ok(Some(Message::Ack(a))) => {
                            // Acks never move backwards (the receiver's rule); keep it so here.
                            let written = acked.written.fetch_max(a.written_lsn, Ordering::Relaxed).max(a.written_lsn);
                            let flushed = acked.flushed.fetch_max(a.flushed_lsn, Ordering::Relaxed).max(a.flushed_lsn);
                            let status = proto::status_update(Lsn(written), Lsn(flushed), unix_us(), false);
                            let mut w = pg_writer.lock().expect("pg writer");
                            if let Some(s) = w.as_mut() {
                                if s.write_all(&status).is_err() {
                                    *w = None;
                                } else {
                                    metrics.on_status(Lsn(written), Lsn(flushed));
                                }
                            }
                        }
                        Ok(Some(Message::Error(e))) => {
                            // Wake the reader: the stream cannot go on.
                            if let Some(s) = pg_writer.lock().expect("pg writer").take() {
                                s.shutdown();
                            }
                            return Some(e.message);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return Some(format!("bad frame from the receiver: {e}")),
                    }
                }
            }
        })?);
        Ok(())
    }

    /// Runs the stream to its end, then ends the walship session (the receiver makes everything
    /// durable); the receiver's error, if it gave up, wins.
    fn stream(mut self, pg: &mut PgConn) -> Result<StreamEnd, FromPgError> {
        let end = self.run(pg);
        match self.close() {
            Some(why) => Err(FromPgError::Receiver { peer: pg.peer.clone(), why }),
            None => end,
        }
    }

    /// Forwards the stream until it ends.
    fn run(&mut self, pg: &mut PgConn) -> Result<StreamEnd, FromPgError> {
        let writer = Arc::new(Mutex::new(Some(pg.socket.try_clone().map_err(|source| FromPgError::Io { peer: pg.peer.clone(), source })?)));
        pg.shared_writer = Some(Arc::clone(&writer));
        self.metrics.connected.set(1);
        // Tell the server at once what is durable here (as pg_receivewal does on starting), before
        // the Ack reader may send anything newer.
        let (w, f) = (self.acked.written.load(Ordering::Relaxed), self.acked.flushed.load(Ordering::Relaxed));
        if f > 0 {
            pg.send(&proto::status_update(Lsn(w), Lsn(f), unix_us(), false))?;
            self.metrics.on_status(Lsn(w), Lsn(f));
        }
        self.spawn_ack_reader(Arc::clone(&writer)).map_err(|source| FromPgError::Io { peer: "the receiver (socket pair)".into(), source })?;
        let result = self.forward(pg);
        // No status update may follow the end of the copy stream.
        *writer.lock().expect("pg writer") = None;
        pg.shared_writer = None;
        result.and_then(|end| match end {
            StreamEnd::Timeline { .. } => pg.finish_timeline(),
            StreamEnd::Server => Ok(end),
        })
    }

    fn forward(&mut self, pg: &mut PgConn) -> Result<StreamEnd, FromPgError> {
        for (at, data) in std::mem::take(&mut self.early) {
            self.send_wal(pg, at, &data)?;
        }
        loop {
            let (tag, body) = match pg.read_message() {
                Ok(m) => m,
                Err(e) => {
                    // The Ack reader may have cut the connection because the receiver gave up.
                    if let Some(why) = self.close() {
                        return Err(FromPgError::Receiver { peer: pg.peer.clone(), why });
                    }
                    return Err(e);
                }
            };
            match tag {
                b'd' => match proto::parse_copy_data(&body).map_err(|e| pg.protocol(&e.to_string()))? {
                    ReplMessage::XLogData { start, data, wal_end, .. } => {
                        self.metrics.on_server(wal_end);
                        self.send_wal(pg, start, data)?
                    }
                    ReplMessage::Keepalive { reply_requested, wal_end, .. } => {
                        self.metrics.on_server(wal_end);
                        self.send_link(pg, &keepalive_frame())?;
                        if reply_requested {
                            let (w, f) = (self.acked.written.load(Ordering::Relaxed), self.acked.flushed.load(Ordering::Relaxed));
                            pg.send(&proto::status_update(Lsn(w), Lsn(f), unix_us(), false))?;
                            self.metrics.on_status(Lsn(w), Lsn(f));
                        }
                    }
                },
                b'c' => return Ok(StreamEnd::Timeline { next_tli: 0, switch: Lsn(0) }),
                b'C' => return Ok(StreamEnd::Server),
                b'E' => return Err(pg.server_error(&body, "the replication stream")),
                b'N' | b'S' => {}
                other => return Err(pg.protocol(&format!("message {:?} inside the replication stream", other as char))),
            }
        }
    }

    fn send_wal(&mut self, pg: &mut PgConn, start: Lsn, data: &[u8]) -> Result<(), FromPgError> {
        if data.is_empty() {
            return Ok(());
        }
        if start != self.next {
            return Err(pg.protocol(&format!("XLogData at {start} where {} was expected (the stream must be contiguous)", self.next)));
        }
        debug_assert!(data.len() as u64 <= u64::from(self.message_bytes_max));
        let (mut at, mut rest) = (start, data);
        while !rest.is_empty() {
            let to_segment_end = self.seg_size - at.segment_offset(self.seg_size);
            let (piece, tail) = rest.split_at(rest.len().min(to_segment_end as usize));
            self.send_segment_piece(pg, at, piece)?;
            at = at + piece.len() as u64;
            rest = tail;
            if at.segment_offset(self.seg_size) == 0 {
                self.padding_from = None;
            }
        }
        self.next = at;
        Ok(())
    }

    /// WAL inside one segment. After an `XLOG_SWITCH` PostgreSQL leaves the rest of the segment
    /// as zeros, page headers included, and the walsender sends them: that run (from a page
    /// boundary to the segment's end, all zeros) goes in frames flagged as switch padding, which
    /// the receiver stores without its page checks; every other byte is checked as usual.
    fn send_segment_piece(&mut self, pg: &PgConn, at: Lsn, piece: &[u8]) -> Result<(), FromPgError> {
        let zero_from = match self.padding_from {
            Some(from) => {
                if let Some(i) = piece.iter().position(|&b| b != 0) {
                    return Err(pg.protocol(&format!(
                        "WAL at {} after zero pages from {from} in the same segment (zeros there are only the padding after a WAL switch)",
                        at + i as u64
                    )));
                }
                0
            }
            None => match proto::switch_padding_start(at, piece, self.block_size) {
                Some(off) => {
                    let page = at + off as u64;
                    self.padding_from = Some(page);
                    info!(server = %pg.peer, from = %page, "zero pages from {page} to the end of its segment (after a WAL switch)");
                    off
                }
                None => piece.len(),
            },
        };
        let (wal, padding) = piece.split_at(zero_from);
        for (chunk, flags) in [(wal, 0u8), (padding, wire::DATA_FLAG_SWITCH_PADDING)] {
            let base = at + (chunk.as_ptr() as usize - piece.as_ptr() as usize) as u64;
            for (i, frame) in chunk.chunks(self.frame_bytes_max).enumerate() {
                let mut header = wire::FrameHeader::data((base + (i * self.frame_bytes_max) as u64).0, frame);
                header.flags = flags;
                self.send_link(pg, &header.encode())?;
                self.send_link(pg, frame)?;
            }
        }
        Ok(())
    }

    fn send_link(&mut self, pg: &PgConn, bytes: &[u8]) -> Result<(), FromPgError> {
        let link = self.link.as_ref().expect("link");
        if (&*link).write_all(bytes).is_err() {
            let why = self.close().unwrap_or_else(|| "it closed the session".into());
            return Err(FromPgError::Receiver { peer: pg.peer.clone(), why });
        }
        Ok(())
    }

    /// Ends the walship session (the receiver then makes everything it got durable); returns the
    /// receiver's error, if it gave up.
    fn close(&mut self) -> Option<String> {
        if let Some(link) = self.link.take() {
            let _ = link.shutdown(Shutdown::Write);
            // The receiver answers the end of its input by draining and closing its end.
            let why = self.ack_thread.take().and_then(|t| t.join().ok().flatten());
            let _ = link.shutdown(Shutdown::Both);
            return why;
        }
        None
    }
}

fn keepalive_frame() -> Vec<u8> {
    let mut bytes = Vec::new();
    Message::Keepalive(Keepalive { time_us: unix_us(), reply_requested: false }).encode(&mut bytes);
    bytes
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The server connection: TCP or a Unix socket.
enum PgSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl PgSocket {
    fn try_clone(&self) -> std::io::Result<PgSocket> {
        Ok(match self {
            PgSocket::Tcp(s) => PgSocket::Tcp(s.try_clone()?),
            PgSocket::Unix(s) => PgSocket::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            PgSocket::Tcp(s) => s.shutdown(Shutdown::Both),
            PgSocket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            PgSocket::Tcp(s) => s.set_read_timeout(t),
            PgSocket::Unix(s) => s.set_read_timeout(t),
        };
    }
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            PgSocket::Tcp(s) => s.write_all(bytes),
            PgSocket::Unix(s) => s.write_all(bytes),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PgSocket::Tcp(s) => s.read(buf),
            PgSocket::Unix(s) => s.read(buf),
        }
    }
}

/// Bytes of the read buffer of a replication connection (grows for a larger message).
const READ_BUFFER_BYTES: usize = 256 << 10;

/// A blocking replication connection: start-up, authentication, simple queries, messages.
struct PgConn {
    socket: PgSocket,
    /// While streaming, writes go through this (shared with the Ack reader) so messages never interleave.
    shared_writer: Option<Arc<Mutex<Option<PgSocket>>>>,
    /// Received bytes `start..end` not yet taken as messages; `buf` keeps its length (zeroed
    /// once, grown only for a message larger than it), so a read does not clear memory.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    peer: String,
    message_bytes_max: u32,
    /// Whether the connection is TLS.
    tls: bool,
}

impl PgConn {
    /// Connects as `sslmode` says: disable never tries TLS; allow tries without, then with TLS
    /// when the server refuses (pg_hba `hostssl`); prefer tries TLS, then without when the
    /// server has none or the handshake fails; require and verify-* insist on TLS.
    fn connect(cfg: &FromPgConfig) -> Result<(PgConn, SocketAddr), FromPgError> {
        let ci = &cfg.conninfo;
        let tls = tls::PgTls::from_conninfo(ci).map_err(|e| FromPgError::Tls { peer: ci.describe(), why: e.to_string(), transient: false })?;
        match (ci.sslmode, tls) {
            (_, None) => Self::connect_with(cfg, None),
            (SslMode::Allow, Some(t)) => match Self::connect_with(cfg, None) {
                Err(e @ (FromPgError::Auth { .. } | FromPgError::Server { .. })) => {
                    info!(server = %ci.describe(), "without TLS: {e}; sslmode=allow tries again with TLS");
                    Self::connect_with(cfg, Some(&t))
                }
                r => r,
            },
            (SslMode::Prefer, Some(t)) => match Self::connect_with(cfg, Some(&t)) {
                Err(e @ FromPgError::Tls { .. }) => {
                    warn!(server = %ci.describe(), "{e}; sslmode=prefer tries again without TLS");
                    Self::connect_with(cfg, None)
                }
                r => r,
            },
            (_, Some(t)) => Self::connect_with(cfg, Some(&t)),
        }
    }

    fn connect_with(cfg: &FromPgConfig, tls: Option<&tls::PgTls>) -> Result<(PgConn, SocketAddr), FromPgError> {
        let ci = &cfg.conninfo;
        let peer = ci.describe();
        let timeout = ci.connect_timeout_s.map_or(cfg.connect_timeout, Duration::from_secs);
        let connect_err = |source| FromPgError::Connect { peer: peer.clone(), source };
        let (socket, addr) = match ci.unix_socket() {
            Some(path) => (PgSocket::Unix(UnixStream::connect(&path).map_err(connect_err)?), SocketAddr::from(([127, 0, 0, 1], 0))),
            None => {
                let addrs: Vec<SocketAddr> = (ci.host.as_str(), ci.port).to_socket_addrs().map_err(connect_err)?.collect();
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the host name resolves to no address");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some((s, a));
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let (s, a) = found.ok_or_else(|| connect_err(last))?;
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(timeout));
                let _ = s.set_read_timeout(Some(timeout));
                match tls {
                    None => (PgSocket::Tcp(s), a),
                    Some(t) => Self::start_tls(ci, t, s, a, timeout)?,
                }
            }
        };
        socket.set_read_timeout(Some(timeout));
        let tls = matches!(socket, PgSocket::Unix(_)) && ci.unix_socket().is_none();
        let mut pg = PgConn { socket, shared_writer: None, buf: vec![0; READ_BUFFER_BYTES], start: 0, end: 0, peer, message_bytes_max: cfg.message_bytes_max, tls };
        pg.startup(cfg)?;
        // Streaming waits as long as the server is quiet (it sends keepalives itself).
        pg.socket.set_read_timeout(None);
        Ok((pg, addr))
    }

    /// SSLRequest, then the handshake when the server says 'S'. A server without TLS ('N') is
    /// refused under require and verify-*; prefer goes on in plaintext on the same connection.
    fn start_tls(ci: &ConnInfo, t: &tls::PgTls, s: TcpStream, a: SocketAddr, timeout: Duration) -> Result<(PgSocket, SocketAddr), FromPgError> {
        let peer = ci.describe();
        let accepted = tls::request_ssl(&s).map_err(|source| FromPgError::Io { peer: peer.clone(), source })?;
        match accepted {
            Err(why) => Err(FromPgError::Protocol { peer, why }),
            Ok(true) => match t.handshake(s, a, timeout) {
                Ok(app) => Ok((PgSocket::Unix(app), a)),
                Err((certificate, why)) => Err(FromPgError::Tls { peer, why, transient: !certificate }),
            },
            Ok(false) if matches!(ci.sslmode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => Err(FromPgError::Tls {
                peer,
                why: format!(
                    "the server does not accept TLS (it answered 'N' to the SSLRequest: ssl = off?), and sslmode={} refuses to go on without it",
                    tls::mode_name(ci.sslmode)
                ),
                transient: false,
            }),
            Ok(false) => {
                info!(server = %peer, "the server does not accept TLS; sslmode={} goes on without it", tls::mode_name(ci.sslmode));
                Ok((PgSocket::Tcp(s), a))
            }
        }
    }

    fn startup(&mut self, cfg: &FromPgConfig) -> Result<(), FromPgError> {
        let ci = &cfg.conninfo;
        let app = ci.application_name.clone().unwrap_or_else(|| cfg.application_name.clone());
        let mut out = BytesMut::new();
        let params = [("user", ci.user.as_str()), ("replication", "true"), ("application_name", app.as_str())];
        frontend::startup_message(params.iter().copied(), &mut out).map_err(|e| self.protocol(&e.to_string()))?;
        self.send(&out)?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_message()?;
            match tag {
                b'R' => {
                    let req = proto::parse_auth(&body).map_err(|e| self.protocol(&e.to_string()))?;
                    let mut out = BytesMut::new();
                    let auth_err = |why: String| FromPgError::Auth { peer: self.peer.clone(), why };
                    let password = || {
                        ci.password.clone().ok_or_else(|| {
                            auth_err(format!("the server asks user {:?} for a password and none was given (password= in the conninfo, PGPASSWORD or a password file)", ci.user))
                        })
                    };
                    match req {
                        AuthRequest::Ok => continue,
                        AuthRequest::Cleartext => frontend::password_message(password()?.as_bytes(), &mut out).map_err(|e| auth_err(e.to_string()))?,
                        AuthRequest::Md5 { salt } => {
                            let hash = postgres_protocol::authentication::md5_hash(ci.user.as_bytes(), password()?.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| auth_err(e.to_string()))?
                        }
                        AuthRequest::Sasl { mechanisms } => {
                            if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                                return Err(auth_err(format!("the server offers only {mechanisms:?}; walship speaks SCRAM-SHA-256")));
                            }
                            let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out).map_err(|e| auth_err(e.to_string()))?;
                            scram = Some(s);
                        }
                        AuthRequest::SaslContinue(data) => {
                            let s = scram.as_mut().ok_or_else(|| auth_err("SASL continue without a SASL start".into()))?;
                            s.update(&data).map_err(|e| auth_err(format!("SCRAM: {e}")))?;
                            frontend::sasl_response(s.message(), &mut out).map_err(|e| auth_err(e.to_string()))?;
                        }
                        AuthRequest::SaslFinal(data) => {
                            let s = scram.as_mut().ok_or_else(|| auth_err("SASL final without a SASL start".into()))?;
                            // Checks the server's signature: it knows the password too.
                            s.finish(&data).map_err(|e| auth_err(format!("SCRAM: the server's proof is wrong: {e}")))?;
                            continue;
                        }
                        AuthRequest::Unsupported(code) => {
                            return Err(auth_err(format!("the server asks for authentication method {code} (walship speaks password, md5 and SCRAM-SHA-256)")))
                        }
                    }
                    self.send(&out)?;
                }
                b'E' => {
                    let e = proto::parse_error(tag, &body).map_err(|e| self.protocol(&e.to_string()))?;
                    if e.code.starts_with("28") {
                        return Err(FromPgError::Auth { peer: self.peer.clone(), why: e.to_string() });
                    }
                    return Err(FromPgError::Server { peer: self.peer.clone(), what: "the replication connection".into(), error: Box::new(e) });
                }
                b'Z' => return Ok(()),
                b'S' | b'K' | b'N' | b'v' => {}
                other => return Err(self.protocol(&format!("message {:?} during start-up", other as char))),
            }
        }
    }

    fn protocol(&self, why: &str) -> FromPgError {
        FromPgError::Protocol { peer: self.peer.clone(), why: why.to_string() }
    }

    fn server_error(&self, body: &[u8], what: &str) -> FromPgError {
        match proto::parse_error(b'E', body) {
            Ok(error) => FromPgError::Server { peer: self.peer.clone(), what: what.into(), error: Box::new(error) },
            Err(e) => self.protocol(&e.to_string()),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), FromPgError> {
        let r = match &self.shared_writer {
            Some(w) => match w.lock().expect("pg writer").as_mut() {
                Some(s) => s.write_all(bytes),
                None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection was closed")),
            },
            None => self.socket.write_all(bytes),
        };
        r.map_err(|source| FromPgError::Io { peer: self.peer.clone(), source })
    }

    /// The next whole backend message (tag, body).
    fn read_message(&mut self) -> Result<(u8, Vec<u8>), FromPgError> {
        loop {
            match proto::split_message(&self.buf[self.start..self.end], self.message_bytes_max) {
                Ok(Some((tag, body, used))) => {
                    let body = body.to_vec();
                    self.start += used;
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok((tag, body));
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&e.to_string())),
            }
            if self.end == self.buf.len() {
                // Move the partial message to the front; grow only when it fills the buffer
                // (bounded: split_message refused anything above message_bytes_max).
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.end == self.buf.len() {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
            }
            let len = self.end;
            let n = self.socket.read(&mut self.buf[len..]);
            self.end = len + *n.as_ref().unwrap_or(&0);
            debug_assert!(self.start <= self.end && self.end <= self.buf.len());
            match n {
                Ok(0) => {
                    let source = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection");
                    return Err(FromPgError::Io { peer: self.peer.clone(), source });
                }
                Ok(_) => {}
                Err(source) => return Err(FromPgError::Io { peer: self.peer.clone(), source }),
            }
        }
    }

    /// A simple query: its rows, or the server's error.
    fn query(&mut self, sql: &str, what: &str) -> Result<Vec<Vec<Option<String>>>, FromPgError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.protocol(&e.to_string()))?;
        self.send(&out)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message()?;
            match tag {
                b'T' | b'C' | b'N' | b'S' | b'I' => {}
                b'D' => {
                    if rows.len() >= 1024 {
                        return Err(self.protocol(&format!("more than 1024 rows for {what}")));
                    }
                    rows.push(proto::parse_data_row(&body).map_err(|e| self.protocol(&e.to_string()))?);
                }
                b'E' => error = Some(proto::parse_error(tag, &body).map_err(|e| self.protocol(&e.to_string()))?),
                b'Z' => break,
                other => return Err(self.protocol(&format!("message {:?} in the answer to {what}", other as char))),
            }
        }
        match error {
            Some(error) => Err(FromPgError::Server { peer: self.peer.clone(), what: what.into(), error: Box::new(error) }),
            None => Ok(rows),
        }
    }

    /// Starts streaming (`None`), or learns that `tli` ended at or before `start` (the server
    /// answers with the next timeline at once, without CopyBoth).
    fn start_replication(&mut self, slot: &str, start: Lsn, tli: u32) -> Result<Option<StreamEnd>, FromPgError> {
        let sql = proto::start_replication(slot, start, tli);
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| self.protocol(&e.to_string()))?;
        self.send(&out)?;
        loop {
            let (tag, body) = self.read_message()?;
            match tag {
                b'W' => {
                    info!(server = %self.peer, start = %start, timeline = tli, "streaming from {start} on timeline {tli}");
                    return Ok(None);
                }
                b'T' => return self.timeline_result().map(Some),
                b'E' => {
                    let e = self.server_error(&body, &sql);
                    // The error is followed by ReadyForQuery; the connection is dropped anyway.
                    return Err(e);
                }
                b'N' | b'S' => {}
                other => return Err(self.protocol(&format!("message {:?} in the answer to {sql}", other as char))),
            }
        }
    }

    /// After the server's CopyDone at the end of a timeline: our CopyDone, then the next
    /// timeline and its start, then the command's completion.
    fn finish_timeline(&mut self) -> Result<StreamEnd, FromPgError> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        self.send(&out)?;
        self.timeline_result()
    }

    /// The next timeline and its start (a one-row result), up to ReadyForQuery.
    fn timeline_result(&mut self) -> Result<StreamEnd, FromPgError> {
        let mut next = None;
        loop {
            let (tag, body) = self.read_message()?;
            match tag {
                b'd' => {} // WAL or keepalives still in flight before our CopyDone arrived
                b'T' | b'C' | b'N' | b'S' => {}
                b'D' => {
                    let row = proto::parse_data_row(&body).map_err(|e| self.protocol(&e.to_string()))?;
                    let tli = row.first().cloned().flatten().and_then(|s| s.parse::<u32>().ok());
                    let lsn = row.get(1).cloned().flatten().and_then(|s| s.parse::<Lsn>().ok());
                    next = tli.zip(lsn);
                }
                b'E' => return Err(self.server_error(&body, "the end of the timeline")),
                b'Z' => break,
                other => return Err(self.protocol(&format!("message {:?} after the end of a timeline", other as char))),
            }
        }
        let (next_tli, switch) = next.ok_or_else(|| self.protocol("the end of a timeline without the next timeline"))?;
        Ok(StreamEnd::Timeline { next_tli, switch })
    }
}
