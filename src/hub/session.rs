//! One standby's connection to the hub: start-up (SSLRequest/TLS, the replication startup
//! packet, SCRAM-SHA-256), replication commands, and the copy stream (a reader thread takes the
//! standby's status updates while this thread sends WAL and keepalives).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::proto::{self, sqlstate, Command, MessageBuffer, Out, PgError, StandbyMessage, Startup};
use super::scram::{ScramError, ScramServer, MECHANISM};
use super::wal_read::WalFiles;
use super::{Durable, Hub, HubConfig, StandbyStatus};
use crate::tls::Link;
use crate::wal::history::parse_history;
use crate::wal::{Lsn, WalIdentity};

/// Largest frontend message body accepted before streaming (queries, SASL messages).
const COMMAND_BYTES_MAX: usize = 64 << 10;
/// Largest history file served (PostgreSQL's are a line per promotion).
const HISTORY_FILE_BYTES_MAX: u64 = 1 << 20;
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// How a session ended early.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("the standby closed the connection")]
    Closed,
    #[error("the standby sent nothing for {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(io::Error),
    /// Told to the standby in an ErrorResponse already.
    #[error("{0}")]
    Refused(PgError),
}

/// Serves one connection to its end; nothing it does can fail the receiver.
pub(super) fn serve(hub: Arc<Hub>, cfg: Arc<HubConfig>, dir: PathBuf, tcp: TcpStream, peer: SocketAddr) {
    let link = Link::Tcp(tcp);
    link.set_timeouts(Some(cfg.standby_timeout));
    let mut s = Session { hub, cfg, dir, link: Some(Arc::new(link)), peer, inbuf: MessageBuffer::default(), tls: false, user: String::new(), name: String::new(), id: None };
    let result = s.run();
    if let Some(id) = s.id.take() {
        s.hub.unregister(id);
    }
    let who = if s.name.is_empty() { format!("standby {peer}") } else { format!("standby {}@{peer}", s.name) };
    match result {
        Ok(()) | Err(End::Closed) => info!(peer = %peer, "{who} disconnected"),
        Err(End::Refused(e)) => warn!(peer = %peer, "{who}: {e}"),
        Err(e) => warn!(peer = %peer, "{who}: connection ended: {e}"),
    }
    if let Some(link) = &s.link {
        link.shutdown();
    }
}

struct Session {
    hub: Arc<Hub>,
    cfg: Arc<HubConfig>,
    dir: PathBuf,
    /// The connection (None only while TLS replaces it).
    link: Option<Arc<Link>>,
    peer: SocketAddr,
    inbuf: MessageBuffer,
    tls: bool,
    user: String,
    /// application_name (or the user name when the standby sets none).
    name: String,
    /// Registered in the hub's standby list once authenticated.
    id: Option<u64>,
}

/// Where a START_REPLICATION streams to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The receiver's newest timeline: up to `flushed`, forever.
    Live,
    /// An older timeline: up to its switch point, then the next timeline.
    Historic { switch: Lsn, next_tli: u32 },
}

/// What the standby's reader thread tells the sending thread.
#[derive(Debug)]
struct Flags {
    epoch: Instant,
    last_heard_ms: AtomicU64,
    reply_requested: AtomicBool,
    copy_done: AtomicBool,
    ended: AtomicBool,
    stop_reading: AtomicBool,
}

impl Flags {
    fn heard(&self) {
        self.last_heard_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn silent_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed)))
    }
    fn wake(&self) -> bool {
        self.ended.load(Ordering::Relaxed) || self.copy_done.load(Ordering::Relaxed) || self.reply_requested.load(Ordering::Relaxed)
    }
}

fn no_wal_yet() -> PgError {
    PgError::error(sqlstate::OBJECT_NOT_IN_STATE, "the walship receiver holds no WAL yet")
        .hint("standbys can stream once a walship sender has shipped WAL to this receiver")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Session {
    fn run(&mut self) -> Result<(), End> {
        let params = self.startup()?;
        self.admit(&params)?;
        self.command_loop()
    }

    fn link(&self) -> &Arc<Link> {
        self.link.as_ref().expect("a connection")
    }

    fn send(&self, out: &Out) -> Result<(), End> {
        (&**self.link()).write_all(&out.bytes).map_err(|e| if is_timeout(&e) { End::Timeout(self.cfg.standby_timeout) } else { End::Io(e) })
    }

    /// Sends `e` (FATAL: the connection ends) and returns it as the session's end.
    fn refuse(&self, e: PgError) -> End {
        let mut out = Out::new();
        out.error(&e);
        let _ = self.send(&out);
        End::Refused(e)
    }

    fn read_more(&mut self) -> Result<(), End> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        match (&**self.link()).read(&mut chunk) {
            Ok(0) => Err(End::Closed),
            Ok(n) => {
                self.inbuf.extend(&chunk[..n]);
                Ok(())
            }
            Err(e) if is_timeout(&e) => Err(End::Timeout(self.cfg.standby_timeout)),
            Err(e) => Err(End::Io(e)),
        }
    }

    fn read_message(&mut self) -> Result<proto::Frontend, End> {
        loop {
            match self.inbuf.next_message(COMMAND_BYTES_MAX) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => self.read_more()?,
                Err(e) => return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))),
            }
        }
    }

    /// SSLRequest and GSSENCRequest answered (TLS started when the hub has a certificate), then
    /// the startup packet's parameters.
    fn startup(&mut self) -> Result<Vec<(String, String)>, End> {
        loop {
            let body = loop {
                match self.inbuf.next_startup() {
                    Ok(Some(b)) => break b,
                    Ok(None) => self.read_more()?,
                    Err(e) => return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))),
                }
            };
            match proto::parse_startup(&body) {
                Err(e) => return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))),
                Ok(Startup::SslRequest) => {
                    if !self.inbuf.is_empty() {
                        return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "received unencrypted data after SSL request")));
                    }
                    match self.cfg.tls.clone() {
                        Some(tls) if !self.tls => self.start_tls(&tls)?,
                        _ => self.send(&Out { bytes: b"N".to_vec() })?,
                    }
                }
                Ok(Startup::GssEncRequest) => self.send(&Out { bytes: b"N".to_vec() })?,
                Ok(Startup::CancelRequest) => return Err(End::Closed),
                Ok(Startup::Params { minor, params, unsupported_options }) => {
                    if minor > 0 || !unsupported_options.is_empty() {
                        let mut out = Out::new();
                        out.negotiate_protocol_version(&unsupported_options);
                        self.send(&out)?;
                    }
                    return Ok(params);
                }
            }
        }
    }

    fn start_tls(&mut self, tls: &crate::tls::TlsServer) -> Result<(), End> {
        self.send(&Out { bytes: b"S".to_vec() })?;
        let link = self.link.take().expect("a connection");
        let Ok(Link::Tcp(tcp)) = Arc::try_unwrap(link) else { unreachable!("TLS starts once, before the link is shared") };
        let link = crate::tls::accept(tcp, self.peer, tls, self.cfg.standby_timeout).map_err(End::Io)?;
        link.set_timeouts(Some(self.cfg.standby_timeout));
        self.link = Some(Arc::new(link));
        self.tls = true;
        Ok(())
    }

    /// Checks the startup parameters, TLS and the standby limit, authenticates, then says the
    /// connection is ready.
    fn admit(&mut self, params: &[(String, String)]) -> Result<(), End> {
        let Some(user) = Startup::param(params, "user").filter(|u| !u.is_empty()) else {
            return Err(self.refuse(PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")));
        };
        self.user = user.to_string();
        let app = Startup::param(params, "application_name").unwrap_or("");
        self.name = if app.is_empty() { self.user.clone() } else { app.to_string() };
        match Startup::param(params, "replication").map(str::to_ascii_lowercase).as_deref() {
            Some("true" | "on" | "yes" | "1") => {}
            Some("database") => {
                return Err(self.refuse(PgError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "walship's WAL hub serves physical replication only (replication=true); logical replication is not supported",
                )))
            }
            _ => {
                return Err(self.refuse(
                    PgError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, "walship's WAL hub accepts only physical replication connections (replication=true); it is not a database server")
                        .hint("point a standby's primary_conninfo (or pg_receivewal) at it"),
                ))
            }
        }
        if self.cfg.require_tls && !self.tls {
            let msg = format!("no pg_hba.conf entry for replication connection from host \"{}\", user \"{}\", no encryption", self.peer.ip(), self.user);
            return Err(self.refuse(
                PgError::fatal(sqlstate::INVALID_AUTHORIZATION, msg).hint("this walship hub requires TLS (--replication-require-tls): connect with sslmode=require or verify-full"),
            ));
        }
        if self.hub.sessions() >= self.cfg.standbys_max {
            return Err(self.refuse(
                PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                    .detail(format!("this walship hub serves at most {} standbys (--replication-standbys-max)", self.cfg.standbys_max)),
            ));
        }
        self.authenticate()?;
        let d = self.hub.durable();
        let version = d.identity.and_then(|id| super::server_version_for_magic(id.magic)).unwrap_or("15.0");
        let mut out = Out::new();
        out.authentication(0, &[]);
        for (name, value) in [
            ("server_version", format!("{version} (walship {})", env!("CARGO_PKG_VERSION"))),
            ("server_encoding", "UTF8".into()),
            ("client_encoding", "UTF8".into()),
            ("DateStyle", "ISO, MDY".into()),
            ("IntervalStyle", "postgres".into()),
            ("TimeZone", "UTC".into()),
            ("integer_datetimes", "on".into()),
            ("standard_conforming_strings", "on".into()),
            ("is_superuser", "off".into()),
            ("session_authorization", self.user.clone()),
            ("application_name", app.to_string()),
        ] {
            out.parameter_status(name, &value);
        }
        let mut key = [0u8; 4];
        let _ = getrandom::fill(&mut key);
        out.backend_key_data(std::process::id(), u32::from_be_bytes(key));
        out.ready_for_query();
        self.send(&out)?;
        self.id = Some(self.hub.register(StandbyStatus {
            application_name: self.name.clone(),
            user: self.user.clone(),
            peer: self.peer,
            tls: self.tls,
            state: "startup",
            timeline: d.identity.map_or(0, |i| i.tli),
            sent: Lsn(0),
            write: Lsn(0),
            flush: Lsn(0),
            replay: Lsn(0),
            xmin: None,
        }));
        info!(peer = %self.peer, user = %self.user, application_name = %self.name, tls = self.tls, "standby {}@{} authenticated", self.name, self.peer);
        Ok(())
    }

    /// SCRAM-SHA-256 against the password file; an unknown user runs the same exchange and fails
    /// the same way as a wrong password.
    fn authenticate(&mut self) -> Result<(), End> {
        let mut out = Out::new();
        out.authentication_sasl(MECHANISM);
        self.send(&out)?;
        let m = self.read_message()?;
        if m.kind != b'p' {
            return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("expected SASL response, got message type {}", m.kind))));
        }
        let (mechanism, first) = match proto::parse_sasl_initial(&m.body) {
            Ok((mech, first)) => (mech.to_string(), first.to_vec()),
            Err(e) => return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))),
        };
        if mechanism != MECHANISM {
            return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "client selected an invalid SASL authentication mechanism")));
        }
        let mut random = [0u8; 48];
        getrandom::fill(&mut random).map_err(|e| self.refuse(PgError::fatal(sqlstate::INTERNAL_ERROR, format!("no random bytes from the OS: {e}"))))?;
        let known = self.cfg.users.verifier(&self.user);
        let known_user = known.is_some();
        let mut scram = ScramServer::new(known, &random);
        let server_first = scram.client_first(&first).map_err(|e| self.auth_failed(e, known_user))?;
        let mut out = Out::new();
        out.authentication(11, server_first.as_bytes());
        self.send(&out)?;
        let m = self.read_message()?;
        if m.kind != b'p' {
            return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("expected SASL response, got message type {}", m.kind))));
        }
        let server_final = scram.client_final(&m.body).map_err(|e| self.auth_failed(e, known_user))?;
        let mut out = Out::new();
        out.authentication(12, server_final.as_bytes());
        self.send(&out)
    }

    fn auth_failed(&self, e: ScramError, known_user: bool) -> End {
        match e {
            ScramError::WrongProof => {
                let why = if known_user { "wrong password" } else { "no such user in --replication-password-file" };
                warn!(peer = %self.peer, user = %self.user, "standby {} authentication failed: {why}", self.peer);
                self.refuse(PgError::fatal(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user \"{}\"", self.user)))
            }
            other => self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, other.to_string())),
        }
    }

    fn command_loop(&mut self) -> Result<(), End> {
        loop {
            let m = self.read_message()?;
            match m.kind {
                b'Q' => {
                    let text = match proto::query_text(&m.body) {
                        Ok(t) => t.to_string(),
                        Err(e) => return Err(self.refuse(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))),
                    };
                    self.command(&text)?;
                }
                b'X' => return Ok(()),
                other => {
                    return Err(self.refuse(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("invalid frontend message type {} (walship's hub speaks the simple query protocol only)", other as char),
                    )))
                }
            }
        }
    }

    /// Answers one command; an ERROR leaves the connection usable (ReadyForQuery follows).
    fn command(&mut self, text: &str) -> Result<(), End> {
        let answer = match proto::parse_command(text) {
            Err(e) => Err(e),
            Ok(Command::Empty) => {
                let mut out = Out::new();
                out.bytes.extend_from_slice(&[b'I', 0, 0, 0, 4]); // EmptyQueryResponse
                Ok(out)
            }
            Ok(Command::IdentifySystem) => self.identify_system(),
            Ok(Command::TimelineHistory(tli)) => self.timeline_history(tli),
            Ok(Command::Show(name)) => self.show(&name),
            Ok(Command::StartReplication { slot, start, timeline }) => return self.start_replication(slot, start, timeline),
        };
        self.answer(answer)
    }

    fn answer(&self, answer: Result<Out, PgError>) -> Result<(), End> {
        let mut out = match answer {
            Ok(out) => out,
            Err(e) => {
                warn!(peer = %self.peer, "standby {}@{}: {e}", self.name, self.peer);
                let mut out = Out::new();
                out.error(&e);
                out
            }
        };
        out.ready_for_query();
        self.send(&out)
    }

    fn identify_system(&self) -> Result<Out, PgError> {
        let d = self.hub.durable();
        let id = d.identity.ok_or_else(no_wal_yet)?;
        let mut out = Out::new();
        out.row_description(&[("systemid", proto::OID_TEXT), ("timeline", proto::OID_INT8), ("xlogpos", proto::OID_TEXT), ("dbname", proto::OID_TEXT)]);
        let (sysid, tli, pos) = (id.system_id.to_string(), id.tli.to_string(), d.flushed.to_string());
        out.data_row(&[Some(sysid.as_bytes()), Some(tli.as_bytes()), Some(pos.as_bytes()), None]);
        out.command_complete("IDENTIFY_SYSTEM");
        Ok(out)
    }

    fn history_file(&self, tli: u32) -> Result<(String, Vec<u8>), PgError> {
        let name = format!("{tli:08X}.history");
        let path = self.dir.join(&name);
        let read = || -> io::Result<Vec<u8>> {
            let f = std::fs::File::open(&path)?;
            let mut content = Vec::new();
            f.take(HISTORY_FILE_BYTES_MAX + 1).read_to_end(&mut content)?;
            Ok(content)
        };
        match read() {
            Ok(c) if c.len() as u64 > HISTORY_FILE_BYTES_MAX => Err(PgError::error(sqlstate::IO_ERROR, format!("{} is larger than {HISTORY_FILE_BYTES_MAX} bytes", path.display()))),
            Ok(c) => Ok((name, c)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(PgError::error(sqlstate::UNDEFINED_FILE, format!("could not open file \"pg_wal/{name}\": No such file or directory")))
            }
            Err(e) => Err(PgError::error(sqlstate::IO_ERROR, format!("could not read file \"{}\": {e}", path.display()))),
        }
    }

    fn timeline_history(&self, tli: u32) -> Result<Out, PgError> {
        let (name, content) = self.history_file(tli)?;
        let mut out = Out::new();
        out.row_description(&[("filename", proto::OID_TEXT), ("content", proto::OID_BYTEA)]);
        out.data_row(&[Some(name.as_bytes()), Some(&content)]);
        out.command_complete("TIMELINE_HISTORY");
        Ok(out)
    }

    fn show(&self, name: &str) -> Result<Out, PgError> {
        let id = self.hub.durable().identity;
        let value = match (name, id) {
            ("wal_segment_size", Some(id)) if id.seg_size % (1 << 30) == 0 => format!("{}GB", id.seg_size >> 30),
            ("wal_segment_size", Some(id)) => format!("{}MB", id.seg_size >> 20),
            ("wal_block_size", Some(id)) => id.block_size.to_string(),
            ("wal_segment_size" | "wal_block_size", None) => return Err(no_wal_yet()),
            _ => return Err(PgError::error(sqlstate::UNDEFINED_OBJECT, format!("unrecognized configuration parameter \"{name}\""))),
        };
        let mut out = Out::new();
        out.row_description(&[(name, proto::OID_TEXT)]);
        out.data_row(&[Some(value.as_bytes())]);
        out.command_complete("SHOW");
        Ok(out)
    }

    /// How far timeline `tli` goes here: the newest timeline is live; an older one ends at its
    /// switch point in the newest timeline's history file.
    fn plan(&self, tli: u32, d: &Durable) -> Result<Plan, PgError> {
        let id = d.identity.ok_or_else(no_wal_yet)?;
        if tli == id.tli {
            return Ok(Plan::Live);
        }
        let not_ours = || PgError::error(sqlstate::INTERNAL_ERROR, format!("requested timeline {tli} is not in this server's history"));
        if tli > id.tli {
            return Err(not_ours());
        }
        let (name, content) = self.history_file(id.tli)?;
        let text = String::from_utf8_lossy(&content);
        let history = parse_history(&text).map_err(|e| PgError::error(sqlstate::INTERNAL_ERROR, format!("{name}: {e}")))?;
        let at = history.iter().position(|e| e.tli == tli).ok_or_else(not_ours)?;
        let next_tli = history.get(at + 1).map_or(id.tli, |e| e.tli);
        Ok(Plan::Historic { switch: history[at].switch_lsn, next_tli })
    }

    fn start_replication(&mut self, slot: Option<String>, start: Lsn, timeline: Option<u32>) -> Result<(), End> {
        if let Some(slot) = slot {
            return self.answer(Err(PgError::error(sqlstate::UNDEFINED_OBJECT, format!("replication slot \"{slot}\" does not exist"))
                .hint("walship's hub keeps no replication slots: remove primary_slot_name from the standby (the receiver's retention decides how long WAL stays)")));
        }
        let d = self.hub.durable();
        let Some(id) = d.identity else { return self.answer(Err(no_wal_yet())) };
        let tli = timeline.unwrap_or(id.tli);
        let plan = match self.plan(tli, &d) {
            Ok(p) => p,
            Err(e) => return self.answer(Err(e)),
        };
        let mut files = WalFiles::new(&self.dir);
        match plan {
            Plan::Historic { switch, .. } if start > switch => {
                return self.answer(Err(PgError::error(
                    sqlstate::OBJECT_NOT_IN_STATE,
                    format!("requested starting point {start} on timeline {tli} is not in this server's history"),
                )
                .detail(format!("This server's history forked from timeline {tli} at {switch}."))));
            }
            Plan::Historic { switch, next_tli } if start == switch => return self.finish_stream(Some((next_tli, switch))),
            Plan::Historic { .. } => {
                if let Err(e) = files.check_present(&[tli], start.segno(id.seg_size), &id) {
                    return self.answer(Err(e));
                }
            }
            Plan::Live if start < d.flushed => {
                if let Err(e) = files.check_present(&[tli], start.segno(id.seg_size), &id) {
                    return self.answer(Err(e));
                }
            }
            // At or past what is durable: wait for it, as a primary waits for WAL to be flushed.
            Plan::Live => {}
        }
        let mut out = Out::new();
        out.copy_both_response();
        self.send(&out)?;
        let state = if matches!(plan, Plan::Live) { "streaming" } else { "catchup" };
        if let Some(n) = self.id {
            self.hub.update(n, |s| {
                s.state = state;
                s.timeline = tli;
                s.sent = start;
            });
        }
        info!(peer = %self.peer, timeline = tli, start = %start, "standby {}@{} streams timeline {tli} from {start}", self.name, self.peer);
        let ended = self.stream(tli, start, plan, files)?;
        self.finish_stream(ended)
    }

    /// After the copy stream: for a historic timeline the next timeline and where it starts,
    /// then CommandComplete and ReadyForQuery.
    fn finish_stream(&mut self, next: Option<(u32, Lsn)>) -> Result<(), End> {
        let mut out = Out::new();
        if let Some((next_tli, switch)) = next {
            out.row_description(&[("next_tli", proto::OID_INT8), ("next_tli_startpos", proto::OID_TEXT)]);
            let (t, p) = (next_tli.to_string(), switch.to_string());
            out.data_row(&[Some(t.as_bytes()), Some(p.as_bytes())]);
        }
        out.command_complete("START_STREAMING");
        out.ready_for_query();
        self.send(&out)?;
        if let Some(n) = self.id {
            self.hub.update(n, |s| s.state = "startup");
        }
        Ok(())
    }

    /// The copy stream. Returns (next timeline, switch point) when a historic timeline ended and
    /// both sides sent CopyDone, None when the standby ended the stream on the live timeline.
    fn stream(&mut self, tli: u32, start: Lsn, plan: Plan, files: WalFiles) -> Result<Option<(u32, Lsn)>, End> {
        let flags = Arc::new(Flags {
            epoch: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            reply_requested: AtomicBool::new(false),
            copy_done: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            stop_reading: AtomicBool::new(false),
        });
        let inbuf = std::mem::take(&mut self.inbuf);
        let reader = {
            let (link, flags, hub, id, peer) = (Arc::clone(self.link()), Arc::clone(&flags), Arc::clone(&self.hub), self.id, self.peer);
            std::thread::Builder::new()
                .name("walship-standby-rx".into())
                .spawn(move || read_copy_stream(&link, inbuf, &flags, &hub, id, peer))
                .map_err(End::Io)?
        };
        let result = self.send_loop(tli, start, plan, files, &flags);
        flags.stop_reading.store(true, Ordering::Relaxed);
        if result.is_err() {
            // Unblocks the reader.
            self.link().shutdown();
        }
        match reader.join() {
            Ok(inbuf) => self.inbuf = inbuf,
            Err(_) => return Err(End::Io(io::Error::other("the standby's reader thread panicked"))),
        }
        result
    }

    fn send_loop(&self, tli: u32, start: Lsn, mut plan: Plan, mut files: WalFiles, flags: &Flags) -> Result<Option<(u32, Lsn)>, End> {
        let mut sent = start;
        let mut buf = vec![0u8; self.cfg.message_bytes_max];
        let mut last_keepalive = Instant::now();
        let mut copy_done_sent = false;
        loop {
            if flags.ended.load(Ordering::Relaxed) {
                return Err(End::Closed);
            }
            let d = self.hub.durable();
            if d.stopping {
                return Err(self.refuse(PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection because the walship receiver is shutting down")));
            }
            let id: WalIdentity = d.identity.expect("identity known once streaming");
            if plan == Plan::Live && id.tli != tli {
                // The upstream was promoted: this timeline is history now, ending at its switch point.
                plan = self.plan(tli, &d).map_err(|e| self.refuse(e))?;
                info!(peer = %self.peer, "timeline {tli} ended upstream (now {}); standby {}@{} is sent the rest of it", id.tli, self.name, self.peer);
            }
            if flags.copy_done.load(Ordering::Relaxed) {
                if !copy_done_sent {
                    let mut out = Out::new();
                    out.copy_done();
                    self.send(&out)?;
                }
                return Ok(match plan {
                    Plan::Historic { switch, next_tli } => Some((next_tli, switch)),
                    Plan::Live => None,
                });
            }
            let silent = flags.silent_for();
            if silent > self.cfg.standby_timeout {
                return Err(End::Timeout(silent));
            }
            let limit = match plan {
                Plan::Live => d.flushed,
                Plan::Historic { switch, .. } => switch,
            };
            if flags.reply_requested.swap(false, Ordering::Relaxed) || last_keepalive.elapsed() >= self.cfg.keepalive_interval {
                let mut out = Out::new();
                out.keepalive(sent, proto::pg_now(), silent >= self.cfg.standby_timeout / 2);
                self.send(&out)?;
                last_keepalive = Instant::now();
            }
            if sent < limit {
                let seg_end = Lsn((sent.segno(id.seg_size) + 1) * id.seg_size);
                let n = (limit.0 - sent.0).min(buf.len() as u64).min(seg_end.0 - sent.0) as usize;
                if let Err(e) = files.read(&[tli], sent, &mut buf[..n], &id) {
                    return Err(self.refuse(e));
                }
                let mut out = Out { bytes: Vec::with_capacity(n + 32) };
                out.xlog_data(sent, limit, proto::pg_now(), &buf[..n]);
                self.send(&out)?;
                sent = sent + n as u64;
                if let Some(n) = self.id {
                    self.hub.update(n, |s| s.sent = sent);
                }
                continue;
            }
            if let Plan::Historic { .. } = plan {
                if !copy_done_sent {
                    let mut out = Out::new();
                    out.copy_done();
                    self.send(&out)?;
                    copy_done_sent = true;
                }
            }
            // Everything durable is sent: sleep until `flushed` moves, the standby says
            // something that needs an answer, or the next keepalive is due.
            let until_keepalive = self.cfg.keepalive_interval.saturating_sub(last_keepalive.elapsed()).max(Duration::from_millis(1));
            self.hub.wait(d.generation, until_keepalive, || flags.wake());
        }
    }
}

/// The standby's side of the copy stream: status updates and feedback recorded, CopyDone,
/// Terminate or the end of the connection flagged. Returns the bytes read past CopyDone (the
/// next command).
fn read_copy_stream(link: &Link, mut inbuf: MessageBuffer, flags: &Flags, hub: &Hub, id: Option<u64>, peer: SocketAddr) -> MessageBuffer {
    let end = |why: Option<String>| {
        if let Some(why) = why {
            warn!(peer = %peer, "standby {peer}: {why}");
        }
        flags.ended.store(true, Ordering::Relaxed);
        hub.poke();
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        loop {
            let m = match inbuf.next_message(COMMAND_BYTES_MAX) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    end(Some(format!("bad message in the copy stream: {e}")));
                    return inbuf;
                }
            };
            flags.heard();
            match m.kind {
                b'd' => match proto::parse_standby_message(&m.body) {
                    Ok(StandbyMessage::Status { write, flush, apply, reply_requested, .. }) => {
                        if let Some(n) = id {
                            hub.update(n, |s| {
                                s.write = write;
                                s.flush = flush;
                                s.replay = apply;
                            });
                        }
                        if reply_requested {
                            flags.reply_requested.store(true, Ordering::Relaxed);
                            hub.poke();
                        }
                    }
                    Ok(StandbyMessage::HotStandbyFeedback { xmin, .. }) => {
                        if let Some(n) = id {
                            hub.update(n, |s| s.xmin = (xmin != 0).then_some(xmin));
                        }
                    }
                    Err(e) => {
                        end(Some(e.to_string()));
                        return inbuf;
                    }
                },
                b'c' => {
                    flags.copy_done.store(true, Ordering::Relaxed);
                    hub.poke();
                    return inbuf;
                }
                b'X' => {
                    end(None);
                    return inbuf;
                }
                b'f' => {
                    end(Some(format!("the standby aborted the copy: {}", String::from_utf8_lossy(&m.body).trim_end_matches('\0'))));
                    return inbuf;
                }
                other => {
                    end(Some(format!("unexpected message type {} in the copy stream", other as char)));
                    return inbuf;
                }
            }
        }
        match (&*link).read(&mut chunk) {
            Ok(0) => {
                end(None);
                return inbuf;
            }
            Ok(n) => inbuf.extend(&chunk[..n]),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if flags.stop_reading.load(Ordering::Relaxed) {
                    return inbuf;
                }
            }
            Err(e) => {
                if !flags.stop_reading.load(Ordering::Relaxed) {
                    end(Some(format!("receive failed: {e}")));
                }
                return inbuf;
            }
        }
    }
}
