//! The pieces of PostgreSQL's frontend/backend protocol (v3) the WAL hub speaks, as pure codecs:
//! the startup packet, framed frontend messages, backend messages, replication commands and the
//! standby's CopyData messages. No I/O; every parser is bounded and never panics on input bytes.

use crate::wal::Lsn;

/// Longest startup packet accepted (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const STARTUP_PACKET_BYTES_MAX: usize = 10_000;
/// Protocol 3.0 (`PG_PROTOCOL(3, 0)`); minor versions above 0 are answered with
/// NegotiateProtocolVersion.
pub const PROTOCOL_MAJOR_3: u32 = 3;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Microseconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// PostgreSQL type OIDs used in result sets.
pub const OID_INT4: u32 = 23;
pub const OID_INT8: u32 = 20;
pub const OID_TEXT: u32 = 25;
pub const OID_BYTEA: u32 = 17;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("startup packet of {len} bytes (expected 8 to {STARTUP_PACKET_BYTES_MAX})")]
    StartupLength { len: u32 },
    #[error("unsupported frontend protocol {major}.{minor}: the hub speaks 3.0")]
    ProtocolVersion { major: u32, minor: u32 },
    #[error("startup packet: {0}")]
    StartupParams(String),
    #[error("message '{kind}' of {len} bytes (expected 4 to {max})")]
    MessageLength { kind: char, len: u32, max: usize },
    #[error("malformed '{kind}' message: {why}")]
    Malformed { kind: char, why: String },
}

/// What the first packet of a connection asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    CancelRequest,
    /// A protocol 3 startup: its minor version, its parameters, and the `_pq_.` options it asked
    /// for (the hub supports none).
    Params { minor: u32, params: Vec<(String, String)>, unsupported_options: Vec<String> },
}

impl Startup {
    pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
        params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The length word of a startup packet (it counts itself), checked.
pub fn startup_len(word: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(word);
    if !(8..=STARTUP_PACKET_BYTES_MAX as u32).contains(&len) {
        return Err(ProtoError::StartupLength { len });
    }
    Ok(len as usize)
}

/// Parses a startup packet's body (everything after the length word).
pub fn parse_startup(body: &[u8]) -> Result<Startup, ProtoError> {
    if body.len() < 4 {
        return Err(ProtoError::StartupLength { len: body.len() as u32 + 4 });
    }
    let code = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
    match code {
        SSL_REQUEST_CODE => return Ok(Startup::SslRequest),
        GSSENC_REQUEST_CODE => return Ok(Startup::GssEncRequest),
        CANCEL_REQUEST_CODE => return Ok(Startup::CancelRequest),
        _ => {}
    }
    let (major, minor) = (code >> 16, code & 0xFFFF);
    if major != PROTOCOL_MAJOR_3 {
        return Err(ProtoError::ProtocolVersion { major, minor });
    }
    let mut params = Vec::new();
    let mut unsupported_options = Vec::new();
    let mut rest = &body[4..];
    loop {
        let (key, after) = cstr(rest).ok_or_else(|| ProtoError::StartupParams("a parameter name is not terminated".into()))?;
        if key.is_empty() {
            if !after.is_empty() {
                return Err(ProtoError::StartupParams(format!("{} bytes after the terminating zero", after.len())));
            }
            break;
        }
        let (value, after) = cstr(after).ok_or_else(|| ProtoError::StartupParams(format!("the value of {key:?} is not terminated")))?;
        if key.starts_with("_pq_.") {
            unsupported_options.push(key.to_string());
        } else {
            params.push((key.to_string(), value.to_string()));
        }
        rest = after;
    }
    Ok(Startup::Params { minor, params, unsupported_options })
}

/// A zero-terminated UTF-8 string at the start of `bytes`, and what follows it.
fn cstr(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&bytes[..nul]).ok()?;
    Some((s, &bytes[nul + 1..]))
}

/// Accumulates bytes read from a connection and cuts complete frontend messages out of them.
#[derive(Debug, Default)]
pub struct MessageBuffer {
    buf: Vec<u8>,
}

/// A frontend message: its type byte and body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl MessageBuffer {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next startup packet's body, once it is complete.
    pub fn next_startup(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = startup_len(self.buf[..4].try_into().expect("4 bytes"))?;
        if self.buf.len() < len {
            return Ok(None);
        }
        let body = self.buf[4..len].to_vec();
        self.buf.drain(..len);
        Ok(Some(body))
    }

    /// The next complete message; a length outside `4..=4 + body_bytes_max` is an error.
    pub fn next_message(&mut self, body_bytes_max: usize) -> Result<Option<Frontend>, ProtoError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes"));
        if len < 4 || len as usize - 4 > body_bytes_max {
            return Err(ProtoError::MessageLength { kind: kind as char, len, max: body_bytes_max + 4 });
        }
        let total = 1 + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[5..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frontend { kind, body }))
    }
}

/// The text of a Simple Query ('Q') body.
pub fn query_text(body: &[u8]) -> Result<&str, ProtoError> {
    let malformed = |why: &str| ProtoError::Malformed { kind: 'Q', why: why.into() };
    let (text, rest) = cstr(body).ok_or_else(|| malformed("not a zero-terminated UTF-8 string"))?;
    if !rest.is_empty() {
        return Err(malformed("bytes after the query string"));
    }
    Ok(text)
}

/// A SASLInitialResponse ('p' during authentication): the mechanism and the client's first message.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ProtoError> {
    let malformed = |why: &str| ProtoError::Malformed { kind: 'p', why: why.into() };
    let (mechanism, rest) = cstr(body).ok_or_else(|| malformed("no mechanism name"))?;
    if rest.len() < 4 {
        return Err(malformed("no length of the initial response"));
    }
    let len = i32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed("the initial response's length does not match the message"));
    }
    Ok((mechanism, data))
}

/// Backend messages, appended to a buffer that is written out as one piece.
#[derive(Debug, Default)]
pub struct Out {
    pub bytes: Vec<u8>,
}

impl Out {
    pub fn new() -> Out {
        Out { bytes: Vec::new() }
    }

    /// Starts a message of `kind`; `end` fills in its length.
    fn begin(&mut self, kind: u8) -> usize {
        self.bytes.push(kind);
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.bytes.len() - at) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn cstring(&mut self, s: &str) {
        debug_assert!(!s.contains('\0'));
        self.bytes.extend(s.bytes().filter(|&b| b != 0));
        self.bytes.push(0);
    }

    /// An Authentication message: `code` (0 ok, 10 SASL, 11 SASL continue, 12 SASL final) and its data.
    pub fn authentication(&mut self, code: u32, data: &[u8]) {
        let at = self.begin(b'R');
        self.bytes.extend_from_slice(&code.to_be_bytes());
        self.bytes.extend_from_slice(data);
        self.end(at);
    }

    /// AuthenticationSASL offering one mechanism.
    pub fn authentication_sasl(&mut self, mechanism: &str) {
        let mut data = mechanism.as_bytes().to_vec();
        data.extend_from_slice(&[0, 0]);
        self.authentication(10, &data);
    }

    pub fn parameter_status(&mut self, name: &str, value: &str) {
        let at = self.begin(b'S');
        self.cstring(name);
        self.cstring(value);
        self.end(at);
    }

    pub fn backend_key_data(&mut self, pid: u32, key: u32) {
        let at = self.begin(b'K');
        self.bytes.extend_from_slice(&pid.to_be_bytes());
        self.bytes.extend_from_slice(&key.to_be_bytes());
        self.end(at);
    }

    pub fn ready_for_query(&mut self) {
        let at = self.begin(b'Z');
        self.bytes.push(b'I');
        self.end(at);
    }

    /// NegotiateProtocolVersion: the newest minor version of 3 the hub supports (0), and the
    /// protocol options it does not.
    pub fn negotiate_protocol_version(&mut self, unsupported_options: &[String]) {
        let at = self.begin(b'v');
        self.bytes.extend_from_slice(&((PROTOCOL_MAJOR_3 << 16) as i32).to_be_bytes());
        self.bytes.extend_from_slice(&(unsupported_options.len() as i32).to_be_bytes());
        for o in unsupported_options {
            self.cstring(o);
        }
        self.end(at);
    }

    /// An ErrorResponse (or, with severity "NOTICE"/"WARNING", what a NoticeResponse holds).
    pub fn error(&mut self, e: &PgError) {
        let at = self.begin(b'E');
        for (field, value) in [(b'S', e.severity.as_str()), (b'V', e.severity.as_str()), (b'C', e.code), (b'M', e.message.as_str())] {
            self.bytes.push(field);
            self.cstring(value);
        }
        if let Some(d) = &e.detail {
            self.bytes.push(b'D');
            self.cstring(d);
        }
        if let Some(h) = &e.hint {
            self.bytes.push(b'H');
            self.cstring(h);
        }
        self.bytes.push(0);
        self.end(at);
    }

    /// RowDescription for text-format columns `(name, type oid)`.
    pub fn row_description(&mut self, columns: &[(&str, u32)]) {
        let at = self.begin(b'T');
        self.bytes.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for &(name, oid) in columns {
            self.cstring(name);
            self.bytes.extend_from_slice(&0u32.to_be_bytes()); // table oid
            self.bytes.extend_from_slice(&0u16.to_be_bytes()); // column number
            self.bytes.extend_from_slice(&oid.to_be_bytes());
            let typlen: i16 = match oid {
                OID_INT4 => 4,
                OID_INT8 => 8,
                _ => -1,
            };
            self.bytes.extend_from_slice(&typlen.to_be_bytes());
            self.bytes.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
            self.bytes.extend_from_slice(&0u16.to_be_bytes()); // text format
        }
        self.end(at);
    }

    /// DataRow of text values (`None` is NULL).
    pub fn data_row(&mut self, values: &[Option<&[u8]>]) {
        let at = self.begin(b'D');
        self.bytes.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => self.bytes.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    self.bytes.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    self.bytes.extend_from_slice(v);
                }
            }
        }
        self.end(at);
    }

    pub fn command_complete(&mut self, tag: &str) {
        let at = self.begin(b'C');
        self.cstring(tag);
        self.end(at);
    }

    /// CopyBothResponse: binary, no columns (what a walsender sends for START_REPLICATION).
    pub fn copy_both_response(&mut self) {
        let at = self.begin(b'W');
        self.bytes.push(0);
        self.bytes.extend_from_slice(&0u16.to_be_bytes());
        self.end(at);
    }

    pub fn copy_done(&mut self) {
        let at = self.begin(b'c');
        self.end(at);
    }

    /// CopyData holding an XLogData ('w') message: header first, then `wal`.
    pub fn xlog_data(&mut self, data_start: Lsn, wal_end: Lsn, send_time: i64, wal: &[u8]) {
        let at = self.begin(b'd');
        self.bytes.push(b'w');
        self.bytes.extend_from_slice(&data_start.0.to_be_bytes());
        self.bytes.extend_from_slice(&wal_end.0.to_be_bytes());
        self.bytes.extend_from_slice(&send_time.to_be_bytes());
        self.bytes.extend_from_slice(wal);
        self.end(at);
    }

    /// CopyData holding a primary keepalive ('k').
    pub fn keepalive(&mut self, wal_end: Lsn, send_time: i64, reply_requested: bool) {
        let at = self.begin(b'd');
        self.bytes.push(b'k');
        self.bytes.extend_from_slice(&wal_end.0.to_be_bytes());
        self.bytes.extend_from_slice(&send_time.to_be_bytes());
        self.bytes.push(u8::from(reply_requested));
        self.end(at);
    }
}

/// `XLogData` header bytes inside a CopyData: 'w' + 3 x int64.
pub const XLOG_DATA_HEADER_BYTES: usize = 25;

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as PostgreSQL reports it: severity, SQLSTATE, message, optional detail and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// SQLSTATEs the hub uses (PostgreSQL's `errcodes.txt`).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const UNDEFINED_FILE: &str = "58P01";
    pub const OBJECT_NOT_IN_STATE: &str = "55000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IO_ERROR: &str = "58030";
    pub const QUERY_CANCELED: &str = "57014";
}

impl PgError {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> PgError {
        PgError { severity, code, message: message.into(), detail: None, hint: None }
    }
    pub fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError::new(Severity::Error, code, message)
    }
    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError::new(Severity::Fatal, code, message)
    }
    pub fn detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }
    pub fn hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// A replication command (simple query on a `replication=true` connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    IdentifySystem,
    TimelineHistory(u32),
    StartReplication { slot: Option<String>, start: Lsn, timeline: Option<u32> },
    /// `SHOW name`.
    Show(String),
    /// An empty query string.
    Empty,
}

/// Parses a replication command the hub understands; anything else is an error to answer with.
pub fn parse_command(text: &str) -> Result<Command, PgError> {
    let trimmed = text.trim().trim_end_matches(';').trim();
    if trimmed.is_empty() {
        return Ok(Command::Empty);
    }
    let words = split_words(trimmed).map_err(|why| PgError::error(sqlstate::SYNTAX_ERROR, format!("{why} in {text:?}")))?;
    let upper: Vec<String> = words.iter().map(|(w, quoted)| if *quoted { w.clone() } else { w.to_ascii_uppercase() }).collect();
    let syntax = |expected: &str| {
        PgError::error(sqlstate::SYNTAX_ERROR, format!("syntax error in replication command {trimmed:?}: expected {expected}"))
    };
    match upper[0].as_str() {
        "IDENTIFY_SYSTEM" if words.len() == 1 => Ok(Command::IdentifySystem),
        "IDENTIFY_SYSTEM" => Err(syntax("no arguments to IDENTIFY_SYSTEM")),
        "TIMELINE_HISTORY" => match words.get(1).map(|(w, _)| w.parse::<u32>()) {
            Some(Ok(tli)) if words.len() == 2 && tli > 0 => Ok(Command::TimelineHistory(tli)),
            _ => Err(syntax("TIMELINE_HISTORY <timeline, a positive integer>")),
        },
        "SHOW" if words.len() == 2 => Ok(Command::Show(words[1].0.to_ascii_lowercase())),
        "SHOW" => Err(syntax("SHOW <name>")),
        "START_REPLICATION" => parse_start_replication(&words[1..], &upper[1..]).ok_or_else(|| {
            if upper.iter().any(|w| w == "LOGICAL") {
                PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "walship serves physical replication only; logical replication is not supported")
            } else {
                syntax("START_REPLICATION [SLOT name] [PHYSICAL] X/X [TIMELINE n]")
            }
        }),
        other => Err(PgError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("walship's WAL hub does not support the command {other:?}"),
        )
        .hint("the hub serves IDENTIFY_SYSTEM, TIMELINE_HISTORY, START_REPLICATION [SLOT s] [PHYSICAL] X/X [TIMELINE n] and SHOW")),
    }
}

fn parse_start_replication(words: &[(String, bool)], upper: &[String]) -> Option<Command> {
    let mut i = 0;
    let mut slot = None;
    if upper.get(i).map(String::as_str) == Some("SLOT") {
        slot = Some(words.get(i + 1)?.0.clone());
        i += 2;
    }
    if upper.get(i).map(String::as_str) == Some("PHYSICAL") {
        i += 1;
    }
    let start: Lsn = words.get(i)?.0.parse().ok()?;
    i += 1;
    let mut timeline = None;
    if upper.get(i).map(String::as_str) == Some("TIMELINE") {
        let tli: u32 = words.get(i + 1)?.0.parse().ok()?;
        if tli == 0 {
            return None;
        }
        timeline = Some(tli);
        i += 2;
    }
    (i == words.len()).then_some(Command::StartReplication { slot, start, timeline })
}

/// Splits on whitespace; a double-quoted word keeps its case and may hold `""` for a quote.
fn split_words(text: &str) -> Result<Vec<(String, bool)>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '"' {
            chars.next();
            let mut w = String::new();
            loop {
                match chars.next() {
                    None => return Err("an unterminated quoted identifier".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        w.push('"');
                    }
                    Some('"') => break,
                    Some(ch) => w.push(ch),
                }
            }
            words.push((w, true));
        } else {
            let mut w = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                w.push(ch);
                chars.next();
            }
            words.push((w, false));
        }
    }
    Ok(words)
}

/// What a standby sends inside the copy stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyMessage {
    /// 'r': standby status update; every position is "last byte + 1".
    Status { write: Lsn, flush: Lsn, apply: Lsn, send_time: i64, reply_requested: bool },
    /// 'h': hot standby feedback.
    HotStandbyFeedback { send_time: i64, xmin: u32, xmin_epoch: u32, catalog_xmin: u32, catalog_xmin_epoch: u32 },
}

/// Parses the payload of a standby's CopyData.
pub fn parse_standby_message(payload: &[u8]) -> Result<StandbyMessage, ProtoError> {
    let malformed = |why: String| ProtoError::Malformed { kind: 'd', why };
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    match payload.first() {
        Some(b'r') if payload.len() == 34 => Ok(StandbyMessage::Status {
            write: Lsn(be64(payload, 1)),
            flush: Lsn(be64(payload, 9)),
            apply: Lsn(be64(payload, 17)),
            send_time: be64(payload, 25) as i64,
            reply_requested: payload[33] != 0,
        }),
        Some(b'h') if payload.len() == 25 => Ok(StandbyMessage::HotStandbyFeedback {
            send_time: be64(payload, 1) as i64,
            xmin: be32(payload, 9),
            xmin_epoch: be32(payload, 13),
            catalog_xmin: be32(payload, 17),
            catalog_xmin_epoch: be32(payload, 21),
        }),
        Some(&k) if k == b'r' || k == b'h' => Err(malformed(format!("'{}' message of {} bytes", k as char, payload.len()))),
        Some(&k) => Err(malformed(format!("unexpected standby message type {:?}", k as char))),
        None => Err(malformed("empty CopyData".into())),
    }
}

/// Now as PostgreSQL's `TimestampTz`: microseconds since 2000-01-01 UTC.
pub fn pg_now() -> i64 {
    let unix_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    unix_us - PG_EPOCH_UNIX_US
}

/// A client's start-up packet (protocol `code`, then `params`), as a frontend sends it: for tests.
#[cfg(test)]
pub(crate) fn startup_bytes(code: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_walreceiver_startup_packet_parses() {
        let bytes = startup_bytes(3 << 16, &[("user", "rep"), ("database", "replication"), ("replication", "true"), ("application_name", "s1")]);
        let mut mb = MessageBuffer::default();
        mb.extend(&bytes[..7]);
        assert_eq!(mb.next_startup().unwrap(), None);
        mb.extend(&bytes[7..]);
        let body = mb.next_startup().unwrap().unwrap();
        assert!(mb.is_empty());
        let Startup::Params { minor, params, unsupported_options } = parse_startup(&body).unwrap() else { panic!("params") };
        assert_eq!((minor, unsupported_options.len()), (0, 0));
        assert_eq!(Startup::param(&params, "replication"), Some("true"));
        assert_eq!(Startup::param(&params, "application_name"), Some("s1"));
    }

    #[test]
    fn special_requests_and_bad_versions() {
        for (code, want) in [(SSL_REQUEST_CODE, Startup::SslRequest), (GSSENC_REQUEST_CODE, Startup::GssEncRequest), (CANCEL_REQUEST_CODE, Startup::CancelRequest)] {
            assert_eq!(parse_startup(&code.to_be_bytes()).unwrap(), want);
        }
        assert!(matches!(parse_startup(&(2u32 << 16).to_be_bytes()), Err(ProtoError::ProtocolVersion { major: 2, .. })));
        assert!(matches!(startup_len(100_000u32.to_be_bytes()), Err(ProtoError::StartupLength { .. })));
        let mut unterminated = (3u32 << 16).to_be_bytes().to_vec();
        unterminated.extend_from_slice(b"user");
        assert!(parse_startup(&unterminated).is_err());
        let with_option = startup_bytes((3 << 16) | 2, &[("user", "u"), ("_pq_.x", "1")]);
        let Startup::Params { minor, unsupported_options, .. } = parse_startup(&with_option[4..]).unwrap() else { panic!() };
        assert_eq!((minor, unsupported_options), (2, vec!["_pq_.x".to_string()]));
    }

    #[test]
    fn replication_commands_as_walreceiver_and_pg_receivewal_send_them() {
        assert_eq!(parse_command("IDENTIFY_SYSTEM").unwrap(), Command::IdentifySystem);
        assert_eq!(parse_command("identify_system;").unwrap(), Command::IdentifySystem);
        assert_eq!(parse_command("TIMELINE_HISTORY 2").unwrap(), Command::TimelineHistory(2));
        assert_eq!(
            parse_command("START_REPLICATION 0/3000000 TIMELINE 1").unwrap(),
            Command::StartReplication { slot: None, start: Lsn(0x300_0000), timeline: Some(1) }
        );
        assert_eq!(
            parse_command("START_REPLICATION SLOT \"My\"\"slot\" PHYSICAL 1/A0 TIMELINE 3").unwrap(),
            Command::StartReplication { slot: Some("My\"slot".into()), start: Lsn(0x1_0000_00A0), timeline: Some(3) }
        );
        assert_eq!(
            parse_command("START_REPLICATION SLOT s 0/0").unwrap(),
            Command::StartReplication { slot: Some("s".into()), start: Lsn(0), timeline: None }
        );
        assert_eq!(parse_command("SHOW wal_segment_size").unwrap(), Command::Show("wal_segment_size".into()));
        assert_eq!(parse_command("  ").unwrap(), Command::Empty);
        let e = parse_command("START_REPLICATION SLOT s LOGICAL 0/0").unwrap_err();
        assert_eq!(e.code, sqlstate::FEATURE_NOT_SUPPORTED);
        assert_eq!(parse_command("BASE_BACKUP").unwrap_err().code, sqlstate::FEATURE_NOT_SUPPORTED);
        for bad in ["START_REPLICATION", "START_REPLICATION 0/0 TIMELINE", "START_REPLICATION 0/0 TIMELINE 0", "TIMELINE_HISTORY x", "START_REPLICATION \"x"] {
            assert_eq!(parse_command(bad).unwrap_err().code, sqlstate::SYNTAX_ERROR, "{bad}");
        }
    }

    #[test]
    fn standby_messages_decode() {
        let mut r = vec![b'r'];
        for v in [0x10u64, 0x20, 0x30, 7] {
            r.extend_from_slice(&v.to_be_bytes());
        }
        r.push(1);
        assert_eq!(
            parse_standby_message(&r).unwrap(),
            StandbyMessage::Status { write: Lsn(0x10), flush: Lsn(0x20), apply: Lsn(0x30), send_time: 7, reply_requested: true }
        );
        let mut h = vec![b'h'];
        h.extend_from_slice(&5i64.to_be_bytes());
        for v in [1u32, 2, 3, 4] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(parse_standby_message(&h).unwrap(), StandbyMessage::HotStandbyFeedback { xmin: 1, catalog_xmin_epoch: 4, .. }));
        assert!(parse_standby_message(&r[..20]).is_err());
        assert!(parse_standby_message(b"x").is_err());
        assert!(parse_standby_message(b"").is_err());
    }

    #[test]
    fn backend_messages_carry_their_lengths() {
        let mut out = Out::new();
        out.error(&PgError::fatal(sqlstate::INVALID_PASSWORD, "password authentication failed for user \"x\""));
        assert_eq!(out.bytes[0], b'E');
        let len = u32::from_be_bytes(out.bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, out.bytes.len());
        assert!(out.bytes.windows(6).any(|w| w == b"C28P01"));
        let mut out = Out::new();
        out.xlog_data(Lsn(1), Lsn(2), 3, b"abc");
        assert_eq!(out.bytes.len(), 5 + XLOG_DATA_HEADER_BYTES + 3);
    }

    proptest! {
        /// However the bytes are split, the buffer cuts the same messages out, and never panics
        /// on garbage.
        #[test]
        fn messages_survive_any_split(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8), cut in 0usize..600, garbage in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = Vec::new();
            for b in &bodies {
                bytes.push(b'd');
                bytes.extend_from_slice(&((b.len() + 4) as u32).to_be_bytes());
                bytes.extend_from_slice(b);
            }
            let cut = cut.min(bytes.len());
            let mut mb = MessageBuffer::default();
            let mut got = Vec::new();
            for piece in [&bytes[..cut], &bytes[cut..]] {
                mb.extend(piece);
                while let Some(m) = mb.next_message(1 << 10).unwrap() {
                    got.push(m.body);
                }
            }
            prop_assert_eq!(got, bodies);
            let mut mb = MessageBuffer::default();
            mb.extend(&garbage);
            while let Ok(Some(_)) = mb.next_message(64) {}
            let mut mb = MessageBuffer::default();
            mb.extend(&garbage);
            if let Ok(Some(body)) = mb.next_startup() {
                let _ = parse_startup(&body);
            }
            let _ = parse_standby_message(&garbage);
            let _ = parse_sasl_initial(&garbage);
            if let Ok(text) = std::str::from_utf8(&garbage) {
                let _ = parse_command(text);
            }
        }
    }
}
