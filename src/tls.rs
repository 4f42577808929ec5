//! Optional TLS 1.3 for the sender–receiver connection (rustls): certificate and key loading, the
//! handshake, and a pump thread per connection that carries plaintext between the io_uring data path
//! and the encrypted TCP stream.
//!
//! The data path is untouched by TLS: it keeps posting io_uring sends and receives, on one end of a
//! Unix socket pair instead of on the TCP socket ([`Link::Tls`]). The pump owns the TCP socket and the
//! rustls connection and moves bytes between the two with non-blocking reads and writes and `poll`.
//! Zero-copy sends do not apply (every byte is encrypted into a fresh buffer); the cost of TLS on
//! throughput is measured by `cargo bench --bench ship` (see `results/REPORT.md`).
//!
//! Authentication is still the HMAC handshake of [`crate::auth`], inside the TLS channel; TLS adds
//! confidentiality, integrity of every byte, and the receiver's identity (its certificate, checked
//! against `--tls-ca` for `--tls-server-name`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use tracing::{info, warn};

use crate::wire::{self, ErrorCode, ErrorFrame, Message};

/// Plaintext read from the data path per pass (bytes).
const PLAINTEXT_CHUNK_BYTES: usize = 256 << 10;
/// Most ciphertext rustls buffers before the pump stops taking plaintext (bytes).
const TLS_BUFFER_BYTES_MAX: usize = 4 << 20;
/// Socket buffer asked for on the Unix pair (the kernel caps it at `net.core.wmem_max`).
const PAIR_BUFFER_BYTES: usize = 4 << 20;
/// First byte of a TLS handshake record (a ClientHello or ServerHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// First byte of a TLS alert record.
const TLS_ALERT_RECORD: u8 = 0x15;

/// Whether `bytes`, the first a peer sent, open a TLS handshake: a handshake record (0x16) of
/// record version 3.x (the second byte, when there is one).
pub fn starts_tls_handshake(bytes: &[u8]) -> bool {
    bytes.first() == Some(&TLS_HANDSHAKE_RECORD) && bytes.get(1).is_none_or(|&major| major == 0x03)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} {path}: {why}")]
    Pem { what: &'static str, path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("invalid --tls-server-name {name:?}: {why}")]
    ServerName { name: String, why: String },
    /// The receiver's certificate or the protocol was refused: retrying will not help.
    #[error("TLS handshake with {peer} failed: {why}")]
    Refused { peer: String, why: String },
    /// The connection broke during the handshake: worth retrying.
    #[error("TLS handshake with {peer} failed: {why}")]
    Io { peer: String, why: String },
}

impl TlsError {
    /// Whether reconnecting can help (a broken connection) or not (a certificate or configuration problem).
    pub fn is_transient(&self) -> bool {
        matches!(self, TlsError::Io { .. })
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first: the fastest with AES-NI, and the WAL stream is bulk data.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256],
        ..rustls::crypto::ring::default_provider()
    })
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, path: path.into(), why: format!("not valid PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, path: path.into(), why: "holds no certificate (expected PEM \"-----BEGIN CERTIFICATE-----\")".into() });
    }
    Ok(certs)
}

/// The receiver's side: its certificate chain and private key.
#[derive(Clone, Debug)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl TlsServer {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsServer, TlsError> {
        let certs = load_certs(cert_path, "--tls-cert")?;
        let key_text = std::fs::read(key_path).map_err(|source| TlsError::Read { what: "--tls-key", path: key_path.into(), source })?;
        let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| TlsError::Pem {
            what: "--tls-key",
            path: key_path.into(),
            why: format!("holds no usable private key (expected PEM \"-----BEGIN PRIVATE KEY-----\"): {e}"),
        })?;
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("{} and {} do not make a usable certificate and key: {e}", cert_path.display(), key_path.display())))?;
        Ok(TlsServer { config: Arc::new(config) })
    }
}

/// The sender's side: the roots it trusts and the name the receiver's certificate must carry.
#[derive(Clone, Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// Loads the PEM CA certificates that sign the receiver's certificate; `server_name` (a DNS
    /// name or an IP address) must appear in that certificate.
    pub fn load(ca_path: &Path, server_name: &str) -> Result<TlsClient, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in load_certs(ca_path, "--tls-ca")? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Pem { what: "--tls-ca", path: ca_path.into(), why: format!("holds a certificate rustls cannot use: {e}") })?;
        }
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| TlsError::ServerName { name: server_name.into(), why: e.to_string() })?;
        let config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient { config: Arc::new(config), server_name })
    }
}

/// The host part of a `host:port` address, the default `--tls-server-name`.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A connection as the data path sees it: the TCP socket itself, or the plaintext end of a TLS pump.
pub enum Link {
    Tcp(TcpStream),
    Tls(TlsLink),
    /// An in-process peer on a Unix socket pair (`recv --from-postgres`: the replication bridge).
    Local(UnixStream),
}

/// The data path's end of a TLS connection; the pump thread holds the other end and the TCP socket.
pub struct TlsLink {
    app: UnixStream,
    peer: SocketAddr,
}

impl Link {
    /// The socket the io_uring data path reads and writes.
    pub fn as_raw_fd(&self) -> RawFd {
        match self {
            Link::Tcp(s) => s.as_raw_fd(),
            Link::Tls(t) => t.app.as_raw_fd(),
            Link::Local(u) => u.as_raw_fd(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// Whether the peer is on this host (zero-copy does not pay on loopback).
    pub fn peer_is_loopback(&self) -> bool {
        match self {
            Link::Tcp(s) => s.peer_addr().map(|a| a.ip().is_loopback()).unwrap_or(false),
            Link::Tls(t) => t.peer.ip().is_loopback(),
            Link::Local(_) => true,
        }
    }

    /// Closes the connection. Over TLS, what was already written still goes out (the pump drains
    /// it, then sends close_notify).
    pub fn shutdown(&self) {
        let _ = match self {
            Link::Tcp(s) => s.shutdown(Shutdown::Both),
            Link::Tls(t) => t.app.shutdown(Shutdown::Both),
            Link::Local(u) => u.shutdown(Shutdown::Both),
        };
    }

    pub fn set_timeouts(&self, timeout: Option<Duration>) {
        match self {
            Link::Tcp(s) => {
                let _ = s.set_read_timeout(timeout);
                let _ = s.set_write_timeout(timeout);
            }
            Link::Tls(TlsLink { app: u, .. }) | Link::Local(u) => {
                let _ = u.set_read_timeout(timeout);
                let _ = u.set_write_timeout(timeout);
            }
        }
    }
}

impl Read for &Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => (&*s).read(buf),
            Link::Tls(TlsLink { app: u, .. }) | Link::Local(u) => (&*u).read(buf),
        }
    }
}

impl Write for &Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => (&*s).write(buf),
            Link::Tls(TlsLink { app: u, .. }) | Link::Local(u) => (&*u).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Records the first bytes the peer sends during the handshake, to explain a peer that does not
/// answer in TLS.
struct Recording<'a> {
    stream: &'a TcpStream,
    seen: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        if self.seen.len() < 4096 {
            let keep = n.min(4096 - self.seen.len());
            self.seen.extend_from_slice(&buf[..keep]);
        }
        Ok(n)
    }
}

impl Write for Recording<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Explains a handshake failure, reading a plaintext walship frame when the peer sent one.
fn explain_handshake_failure(seen: &[u8], error: &io::Error) -> (bool, String) {
    if seen.starts_with(&wire::FRAME_MAGIC) {
        let mut decoder = wire::Decoder::new(wire::Limits::default());
        decoder.feed(seen);
        let said = match decoder.next_message() {
            Ok(Some(Message::Error(e))) => format!(": it said \"{}\"", e.message),
            _ => String::new(),
        };
        return (
            true,
            format!(
                "the receiver answered in plaintext walship, not TLS{said}; start it with --tls-cert and --tls-key, or the \
                 sender without --tls-ca"
            ),
        );
    }
    if let Some(&first) = seen.first() {
        if first != TLS_HANDSHAKE_RECORD && first != TLS_ALERT_RECORD {
            return (true, format!("the peer does not speak TLS (first byte {first:#04x}); is it a walship receiver with --tls-cert?"));
        }
    }
    let fatal = error.kind() == io::ErrorKind::InvalidData;
    let hint = if fatal { " (check --tls-ca and --tls-server-name against the receiver's certificate)" } else { "" };
    (fatal, format!("{error}{hint}"))
}

/// Sender side: runs the TLS handshake on `tcp` (blocking, bounded by `timeout`), then starts the
/// pump and returns the data path's end.
pub fn connect(tcp: TcpStream, peer: SocketAddr, client: &TlsClient, timeout: Duration) -> Result<Link, TlsError> {
    let mut conn = ClientConnection::new(Arc::clone(&client.config), client.server_name.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let mut io = Recording { stream: &tcp, seen: Vec::new() };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut io) {
            // Tell the receiver why (the alert rustls queued, e.g. an unknown CA).
            while conn.wants_write() && conn.write_tls(&mut io).is_ok_and(|n| n > 0) {}
            let (fatal, why) = explain_handshake_failure(&io.seen, &e);
            let peer = peer.to_string();
            return Err(if fatal { TlsError::Refused { peer, why } } else { TlsError::Io { peer, why } });
        }
    }
    let conn = Connection::from(conn);
    info!(peer = %peer, "TLS established: {}", describe(&conn));
    start_pump(tcp, peer, conn).map_err(|e| TlsError::Io { peer: peer.to_string(), why: format!("cannot start the TLS pump: {e}") })
}

/// Receiver side: returns the data path's end at once; the pump thread runs the handshake (bounded
/// by `timeout`) and logs why, if it fails. A peer that speaks plaintext walship gets a walship
/// Error frame saying that this receiver requires TLS.
pub fn accept(tcp: TcpStream, peer: SocketAddr, server: &TlsServer, timeout: Duration) -> io::Result<Link> {
    let conn = ServerConnection::new(Arc::clone(&server.config)).map_err(io::Error::other)?;
    let (app, pump_end) = socket_pair()?;
    std::thread::Builder::new().name("walship-tls".into()).spawn(move || {
        let _ = tcp.set_read_timeout(Some(timeout));
        let _ = tcp.set_write_timeout(Some(timeout));
        if let Err(why) = refuse_plaintext(&tcp, peer) {
            warn!(peer = %peer, "{why}");
            return;
        }
        let mut conn = Connection::from(conn);
        let mut tcp_io = &tcp;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp_io) {
                let hint = if e.kind() == io::ErrorKind::UnexpectedEof {
                    " (the sender hung up: does its --tls-ca trust this receiver's certificate, for the name it dials? see its log)"
                } else {
                    ""
                };
                warn!(peer = %peer, "TLS handshake with sender {peer} failed: {e}{hint}; connection dropped before anything was read");
                let _ = tcp.shutdown(Shutdown::Both);
                return;
            }
        }
        info!(peer = %peer, "TLS established: {}", describe(&conn));
        pump(tcp, peer, conn, pump_end);
    })?;
    Ok(Link::Tls(TlsLink { app, peer }))
}

/// Waits for the sender's first byte; a plaintext walship sender is told to use TLS.
fn refuse_plaintext(tcp: &TcpStream, peer: SocketAddr) -> Result<(), String> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first) {
        Ok(0) => Err(format!("sender {peer} closed the connection before the TLS handshake")),
        Ok(_) if starts_tls_handshake(&first) => Ok(()),
        Ok(_) => {
            let message = "this receiver requires TLS: give the sender --tls-ca (the CA of the receiver's certificate)".to_string();
            let mut bytes = Vec::new();
            Message::Error(ErrorFrame { code: ErrorCode::Protocol, message }).encode(&mut bytes);
            let _ = (&*tcp).write_all(&bytes);
            let _ = tcp.shutdown(Shutdown::Both);
            Err(format!("sender {peer} did not start TLS (first byte {:#04x}); refused: this receiver requires TLS", first[0]))
        }
        Err(e) => Err(format!("sender {peer} sent nothing to start TLS: {e}")),
    }
}

fn describe(conn: &Connection) -> String {
    let version = conn.protocol_version().map_or("?".to_string(), |v| format!("{v:?}"));
    let suite = conn.negotiated_cipher_suite().map_or("?".to_string(), |s| format!("{:?}", s.suite()));
    format!("{version}, {suite}")
}

fn socket_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (app, pump_end) = UnixStream::pair()?;
    for s in [&app, &pump_end] {
        let fd = s.as_fd();
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(fd, PAIR_BUFFER_BYTES);
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(fd, PAIR_BUFFER_BYTES);
    }
    Ok((app, pump_end))
}

fn start_pump(tcp: TcpStream, peer: SocketAddr, conn: Connection) -> io::Result<Link> {
    let (app, pump_end) = socket_pair()?;
    std::thread::Builder::new().name("walship-tls".into()).spawn(move || pump(tcp, peer, conn, pump_end))?;
    Ok(Link::Tls(TlsLink { app, peer }))
}

/// `recv --from-postgres`: the pump for a client connection whose handshake the caller ran
/// (PostgreSQL's SSLRequest comes first); returns the plaintext end.
pub(crate) fn pump_client(tcp: TcpStream, peer: SocketAddr, conn: ClientConnection) -> io::Result<UnixStream> {
    let conn = Connection::from(conn);
    info!(peer = %peer, "TLS established: {}", describe(&conn));
    let (app, pump_end) = socket_pair()?;
    std::thread::Builder::new().name("walship-tls".into()).spawn(move || pump(tcp, peer, conn, pump_end))?;
    Ok(app)
}

/// Moves bytes until both directions are closed: plaintext from `app` is encrypted onto `tcp`,
/// records from `tcp` are decrypted onto `app`. Errors end the connection (both sockets shut).
fn pump(tcp: TcpStream, peer: SocketAddr, mut conn: Connection, app: UnixStream) {
    match Pump::new(&tcp, &app).and_then(|mut p| p.run(&mut conn)) {
        Ok(()) => {}
        Err(e) => warn!(peer = %peer, "TLS connection with {peer} ended: {e}"),
    }
    let _ = tcp.shutdown(Shutdown::Both);
    let _ = app.shutdown(Shutdown::Both);
}

/// A fixed buffer holding the bytes `start..end` not yet passed on.
struct Chunk {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk { buf: vec![0u8; PLAINTEXT_CHUNK_BYTES].into_boxed_slice(), start: 0, end: 0 }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }

    /// Refills an empty chunk with what `read` puts at its start; returns the bytes read.
    fn fill(&mut self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        debug_assert!(self.is_empty());
        let n = read(&mut self.buf)?;
        self.start = 0;
        self.end = n;
        Ok(n)
    }
}

/// What `fill` made of a non-blocking read.
enum Filled {
    Bytes,
    Eof,
    Nothing,
}

fn filled(r: io::Result<usize>) -> io::Result<Filled> {
    match r {
        Ok(0) => Ok(Filled::Eof),
        Ok(_) => Ok(Filled::Bytes),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::Nothing),
        Err(e) => Err(e),
    }
}

struct Pump<'a> {
    tcp: &'a TcpStream,
    app: &'a UnixStream,
    /// Plaintext from the data path not yet taken by rustls.
    outgoing: Chunk,
    /// Bytes read from the TCP socket and not yet taken by rustls.
    raw: Chunk,
    /// Plaintext decrypted and not yet taken by the data path.
    incoming: Chunk,
    app_eof: bool,
    tcp_eof: bool,
    close_sent: bool,
}

impl<'a> Pump<'a> {
    fn new(tcp: &'a TcpStream, app: &'a UnixStream) -> io::Result<Pump<'a>> {
        tcp.set_nonblocking(true)?;
        app.set_nonblocking(true)?;
        Ok(Pump { tcp, app, outgoing: Chunk::new(), raw: Chunk::new(), incoming: Chunk::new(), app_eof: false, tcp_eof: false, close_sent: false })
    }

    fn run(&mut self, conn: &mut Connection) -> io::Result<()> {
        conn.set_buffer_limit(Some(TLS_BUFFER_BYTES_MAX));
        let mut idle_since = Instant::now();
        loop {
            let moved = self.app_to_tls(conn)? | self.tls_to_tcp(conn)? | self.tcp_to_tls(conn)? | self.tls_to_app(conn)?;
            let said_goodbye = self.app_eof && self.close_sent && !conn.wants_write();
            if said_goodbye {
                let _ = self.tcp.shutdown(Shutdown::Write);
            }
            let incoming_done = self.tcp_eof && self.raw.is_empty() && self.incoming.is_empty();
            if incoming_done {
                let _ = self.app.shutdown(Shutdown::Write);
            }
            if said_goodbye && (incoming_done || idle_since.elapsed() > Duration::from_secs(5)) {
                // A peer that never closes its side does not keep this thread.
                return Ok(());
            }
            if moved {
                idle_since = Instant::now();
            } else {
                self.wait(conn)?;
            }
        }
    }

    /// Plaintext from the data path into rustls (which encrypts it into records).
    fn app_to_tls(&mut self, conn: &mut Connection) -> io::Result<bool> {
        let mut moved = false;
        if self.outgoing.is_empty() && !self.app_eof {
            let app = self.app;
            match filled(self.outgoing.fill(|b| (&*app).read(b)))
                .or_else(|e| if e.kind() == io::ErrorKind::ConnectionReset { Ok(Filled::Eof) } else { Err(e) })?
            {
                Filled::Bytes => moved = true,
                Filled::Eof => {
                    self.app_eof = true;
                    moved = true;
                }
                Filled::Nothing => {}
            }
        }
        if !self.outgoing.is_empty() {
            let n = conn.writer().write(self.outgoing.pending())?;
            self.outgoing.consume(n);
            moved |= n > 0;
        }
        if self.app_eof && self.outgoing.is_empty() && !self.close_sent {
            conn.send_close_notify();
            self.close_sent = true;
            moved = true;
        }
        Ok(moved)
    }

    /// Records from rustls onto the TCP socket.
    fn tls_to_tcp(&mut self, conn: &mut Connection) -> io::Result<bool> {
        let mut moved = false;
        while conn.wants_write() {
            match conn.write_tls(&mut self.tcp) {
                Ok(0) => break,
                Ok(_) => moved = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Records from the TCP socket into rustls (which decrypts and checks them). One read takes
    /// up to [`PLAINTEXT_CHUNK_BYTES`] from the socket; rustls is fed from that buffer.
    fn tcp_to_tls(&mut self, conn: &mut Connection) -> io::Result<bool> {
        let mut moved = false;
        while conn.wants_read() && self.incoming.is_empty() {
            if self.raw.is_empty() {
                if self.tcp_eof {
                    break;
                }
                let tcp = self.tcp;
                match filled(self.raw.fill(|b| (&*tcp).read(b)))? {
                    Filled::Bytes => {}
                    Filled::Eof => {
                        self.tcp_eof = true;
                        moved = true;
                        break;
                    }
                    Filled::Nothing => break,
                }
            }
            let n = conn.read_tls(&mut self.raw.pending())?;
            self.raw.consume(n);
            moved = true;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert), then give up on the connection.
                let _ = conn.write_tls(&mut self.tcp);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            self.take_plaintext(conn)?;
        }
        Ok(moved)
    }

    /// Decrypted plaintext from rustls into `incoming`, once that is empty.
    fn take_plaintext(&mut self, conn: &mut Connection) -> io::Result<()> {
        if !self.incoming.is_empty() {
            return Ok(());
        }
        match self.incoming.fill(|b| conn.reader().read(b)) {
            Ok(0) => self.tcp_eof = true, // close_notify: the peer sends no more
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.tcp_eof = true,
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Decrypted plaintext onto the data path.
    fn tls_to_app(&mut self, conn: &mut Connection) -> io::Result<bool> {
        let mut moved = false;
        loop {
            self.take_plaintext(conn)?;
            if self.incoming.is_empty() {
                return Ok(moved);
            }
            match (&*self.app).write(self.incoming.pending()) {
                Ok(n) => {
                    self.incoming.consume(n);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                    // The data path closed: drop what it will never read.
                    let n = self.incoming.pending().len();
                    self.incoming.consume(n);
                    self.app_eof = true;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps until one of the sockets can move what is waiting.
    fn wait(&self, conn: &Connection) -> io::Result<()> {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut tcp_flags = PollFlags::empty();
        if !self.tcp_eof && self.raw.is_empty() && self.incoming.is_empty() && conn.wants_read() {
            tcp_flags |= PollFlags::IN;
        }
        if conn.wants_write() {
            tcp_flags |= PollFlags::OUT;
        }
        let mut app_flags = PollFlags::empty();
        if !self.app_eof && self.outgoing.is_empty() {
            app_flags |= PollFlags::IN;
        }
        if !self.incoming.is_empty() {
            app_flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::new(self.tcp, tcp_flags), PollFd::new(self.app, app_flags)];
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("standby.example:5499"), "standby.example");
        assert_eq!(host_of("127.0.0.1:5499"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5499"), "::1");
        assert_eq!(host_of("standby"), "standby");
    }

    #[test]
    fn a_plaintext_walship_answer_is_explained() {
        let mut bytes = Vec::new();
        Message::Error(ErrorFrame { code: ErrorCode::Protocol, message: "bad frame".into() }).encode(&mut bytes);
        let (fatal, why) = explain_handshake_failure(&bytes, &io::Error::new(io::ErrorKind::InvalidData, "corrupt message"));
        assert!(fatal);
        assert!(why.contains("plaintext walship") && why.contains("bad frame"), "{why}");
    }

    /// A pump pair over real loopback TCP: 48 MiB each way through a slow reader (backpressure
    /// through rustls' buffer limit and both socket buffers), byte-exact, and EOF reaches the far
    /// side once the writer shuts its end.
    #[test]
    fn pumps_carry_bytes_exactly_under_backpressure_and_pass_on_eof() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let server = TlsServer::load(&cert, &key).unwrap();
        let client = TlsClient::load(&cert, "127.0.0.1").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::thread::spawn(move || {
            let (tcp, peer) = listener.accept().unwrap();
            accept(tcp, peer, &server, Duration::from_secs(10)).unwrap()
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let sender = connect(tcp, addr, &client, Duration::from_secs(10)).unwrap();
        let receiver = accepted.join().unwrap();
        assert!(sender.is_tls() && receiver.is_tls() && sender.peer_is_loopback());
        let pattern = |i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        const TOTAL: usize = 48 << 20;
        let send_all = |link: &Link| {
            let mut block = vec![0u8; 1 << 20];
            for base in (0..TOTAL).step_by(block.len()) {
                block.iter_mut().enumerate().for_each(|(i, b)| *b = pattern(base + i));
                (&*link).write_all(&block).unwrap();
            }
            if let Link::Tls(t) = link {
                t.app.shutdown(Shutdown::Write).unwrap();
            }
        };
        let read_all = |link: &Link| {
            let mut got = 0usize;
            let mut buf = vec![0u8; 100_000];
            loop {
                let n = (&*link).read(&mut buf).unwrap();
                if n == 0 {
                    return got;
                }
                for (i, &b) in buf[..n].iter().enumerate() {
                    assert_eq!(b, pattern(got + i), "byte {} differs", got + i);
                }
                got += n;
                if got % (8 << 20) < n {
                    std::thread::sleep(Duration::from_millis(20)); // a slow reader now and then
                }
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| send_all(&sender));
            s.spawn(|| send_all(&receiver));
            let a = s.spawn(|| read_all(&receiver));
            let b = s.spawn(|| read_all(&sender));
            assert_eq!(a.join().unwrap(), TOTAL);
            assert_eq!(b.join().unwrap(), TOTAL);
        });
    }

    #[test]
    fn missing_or_empty_pem_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = TlsClient::load(&empty, "localhost").expect_err("no certificate");
        assert!(e.to_string().contains("empty.pem") && e.to_string().contains("no certificate"), "{e}");
        let e = TlsServer::load(&dir.path().join("missing.pem"), &empty).expect_err("missing file");
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
