//! The client side of PostgreSQL's physical streaming replication protocol as pure codecs: backend
//! message framing (bounded, never panics on any bytes), the few backend bodies a replication
//! client reads (authentication requests, errors, rows, CopyData with 'w' XLogData and 'k'
//! keepalives), and the replication commands and 'r' status updates it sends. No I/O.
//!
//! Frontend messages that need no replication knowledge (startup, password, SASL, query, CopyDone)
//! come from `postgres-protocol`; its backend parser lacks CopyBothResponse and has no length bound,
//! so backend framing is ours.

use crate::wal::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_US: u64 = 946_684_800_000_000;

/// Bytes of a backend message header: tag u8 + length u32 (the length counts itself).
const HEADER_LEN: usize = 5;

/// Bytes that cannot be a replication backend message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("backend message {tag:?}: length field {len} is below 4")]
    ShortLength { tag: char, len: u32 },
    #[error("backend message {tag:?}: {len} bytes, more than the limit of {max} bytes (--pg-message-bytes-max)")]
    TooLong { tag: char, len: u32, max: u32 },
    #[error("backend message {tag:?}: expected {what}")]
    Malformed { tag: char, what: String },
}

fn malformed(tag: u8, what: impl Into<String>) -> ProtoError {
    ProtoError::Malformed { tag: tag as char, what: what.into() }
}

/// One whole backend message at the front of a buffer: tag, body, bytes it takes.
pub type Split<'a> = (u8, &'a [u8], usize);

/// Splits one whole backend message off the front of `buf`: `(tag, body, bytes consumed)`, or
/// `None` when more bytes are needed. A body above `body_bytes_max` is an error before any of it is
/// buffered.
pub fn split_message(buf: &[u8], body_bytes_max: u32) -> Result<Option<Split<'_>>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtoError::ShortLength { tag: tag as char, len });
    }
    if len - 4 > body_bytes_max {
        return Err(ProtoError::TooLong { tag: tag as char, len, max: body_bytes_max });
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((tag, &buf[HEADER_LEN..total], total)))
}

/// A bounded big-endian reader over a message body.
struct Body<'a> {
    tag: u8,
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(malformed(self.tag, format!("{what} ({n} bytes), found {} bytes", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &str) -> Result<i16, ProtoError> {
        Ok(i16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn i32(&mut self, what: &str) -> Result<i32, ProtoError> {
        Ok(i32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn cstr(&mut self, what: &str) -> Result<&'a [u8], ProtoError> {
        let Some(end) = self.bytes.iter().position(|&b| b == 0) else {
            return Err(malformed(self.tag, format!("a NUL-terminated {what}")));
        };
        let s = &self.bytes[..end];
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }
}

/// An 'R' authentication request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    /// SASL with the mechanisms the server offers.
    Sasl { mechanisms: Vec<String> },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// A method walship does not speak (Kerberos, GSS, SSPI...), by its code.
    Unsupported(i32),
}

pub fn parse_auth(body: &[u8]) -> Result<AuthRequest, ProtoError> {
    let mut b = Body { tag: b'R', bytes: body };
    Ok(match b.i32("the authentication code")? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5 { salt: b.take(4, "the MD5 salt")?.try_into().expect("4 bytes") },
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = b.cstr("SASL mechanism name")?;
                if m.is_empty() {
                    break;
                }
                if mechanisms.len() >= 16 {
                    return Err(malformed(b'R', "at most 16 SASL mechanisms"));
                }
                mechanisms.push(String::from_utf8_lossy(m).into_owned());
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(b.bytes.to_vec()),
        12 => AuthRequest::SaslFinal(b.bytes.to_vec()),
        other => AuthRequest::Unsupported(other),
    })
}

/// An 'E' ErrorResponse (or 'N' notice): the fields a person needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgError {
    pub severity: String,
    /// SQLSTATE, e.g. `58P01` (WAL removed), `55006` (slot in use), `28P01` (bad password).
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (SQLSTATE {})", self.severity, self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

pub fn parse_error(tag: u8, body: &[u8]) -> Result<PgError, ProtoError> {
    let mut b = Body { tag, bytes: body };
    let mut e = PgError::default();
    loop {
        let kind = b.u8("an error field type")?;
        if kind == 0 {
            break;
        }
        let value = String::from_utf8_lossy(b.cstr("error field")?).into_owned();
        match kind {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    Ok(e)
}

/// A 'D' DataRow: each column as text (`None`: SQL NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtoError> {
    let mut b = Body { tag: b'D', bytes: body };
    let n = b.i16("the column count")?;
    if !(0..=64).contains(&n) {
        return Err(malformed(b'D', format!("0..=64 columns, found {n}")));
    }
    let mut row = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = b.i32("a column length")?;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(String::from_utf8_lossy(b.take(len as usize, "the column value")?).into_owned()));
        }
    }
    Ok(row)
}

/// What a 'd' CopyData carries from a walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplMessage<'a> {
    /// 'w': WAL bytes starting at `start`; `wal_end` is the server's end of WAL.
    XLogData { start: Lsn, wal_end: Lsn, send_time_us: i64, data: &'a [u8] },
    /// 'k': the server's end of WAL; a reply is due at once when `reply_requested`.
    Keepalive { wal_end: Lsn, send_time_us: i64, reply_requested: bool },
}

pub fn parse_copy_data(body: &[u8]) -> Result<ReplMessage<'_>, ProtoError> {
    let mut b = Body { tag: b'd', bytes: body };
    match b.u8("a replication message kind ('w' or 'k')")? {
        b'w' => {
            let start = Lsn(b.u64("XLogData dataStart")?);
            let wal_end = Lsn(b.u64("XLogData walEnd")?);
            let send_time_us = b.u64("XLogData sendTime")? as i64;
            if start.0.checked_add(b.bytes.len() as u64).is_none() {
                return Err(malformed(b'd', format!("XLogData at {start} whose end fits in 64 bits")));
            }
            Ok(ReplMessage::XLogData { start, wal_end, send_time_us, data: b.bytes })
        }
        b'k' => {
            let wal_end = Lsn(b.u64("keepalive walEnd")?);
            let send_time_us = b.u64("keepalive sendTime")? as i64;
            let reply_requested = match b.u8("keepalive replyRequested")? {
                0 => false,
                1 => true,
                n => return Err(malformed(b'd', format!("keepalive replyRequested 0 or 1, found {n}"))),
            };
            Ok(ReplMessage::Keepalive { wal_end, send_time_us, reply_requested })
        }
        other => Err(malformed(b'd', format!("replication message 'w' or 'k', found {:?}", other as char))),
    }
}

/// A whole 'd' CopyData frontend message holding an 'r' standby status update: written and
/// flushed (each "last byte + 1"), apply invalid (0: walship never replays), `now_us` Unix time.
pub fn status_update(write: Lsn, flush: Lsn, now_unix_us: u64, reply_requested: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 + 34);
    out.push(b'd');
    out.extend_from_slice(&(4u32 + 34).to_be_bytes());
    out.push(b'r');
    out.extend_from_slice(&write.0.to_be_bytes());
    out.extend_from_slice(&flush.0.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&pg_time_us(now_unix_us).to_be_bytes());
    out.push(u8::from(reply_requested));
    out
}

/// Where the zero pages after an `XLOG_SWITCH` start in `piece` (WAL at `at`, inside one
/// segment): the first page boundary from which every byte of `piece` is zero, if there is one
/// inside it. A real page starts with a nonzero magic, so only a zero page header qualifies.
pub fn switch_padding_start(at: Lsn, piece: &[u8], block_size: u64) -> Option<usize> {
    let data_end = piece.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let page = (at.0 + data_end as u64).div_ceil(block_size) * block_size;
    let off = (page - at.0) as usize;
    (off < piece.len()).then_some(off)
}

/// Unix microseconds as PostgreSQL's TimestampTz (microseconds since 2000-01-01).
pub fn pg_time_us(unix_us: u64) -> i64 {
    unix_us as i64 - PG_EPOCH_OFFSET_US as i64
}

/// A replication slot name PostgreSQL accepts (`ReplicationSlotValidateName`): 1..=63 of
/// `[a-z0-9_]`. Checked before it goes into a command, so nothing else can.
pub fn check_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(format!("replication slot name {name:?}: expected 1 to 63 of lower-case letters, digits and '_'"));
    }
    Ok(())
}

/// `START_REPLICATION SLOT s PHYSICAL X/X TIMELINE t` (the slot name checked by the caller).
pub fn start_replication(slot: &str, start: Lsn, tli: u32) -> String {
    format!("START_REPLICATION SLOT {slot} PHYSICAL {:X}/{:X} TIMELINE {tli}", start.0 >> 32, start.0 & 0xFFFF_FFFF)
}

/// A `SHOW wal_segment_size` answer ("16MB", "1GB", "1024kB") in bytes.
pub fn parse_size_setting(text: &str) -> Option<u64> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let n: u64 = text[..digits_end].parse().ok()?;
    let unit = match text[digits_end..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn framing_waits_for_whole_messages_and_bounds_their_length() {
        let m = msg(b'Z', b"I");
        for cut in 0..m.len() {
            assert_eq!(split_message(&m[..cut], 1024).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(split_message(&m, 1024).unwrap(), Some((b'Z', &b"I"[..], 6)));
        let huge = [b'd', 0x7F, 0xFF, 0xFF, 0xFF];
        assert!(matches!(split_message(&huge, 1 << 20), Err(ProtoError::TooLong { .. })));
        assert!(matches!(split_message(&[b'd', 0, 0, 0, 3], 1 << 20), Err(ProtoError::ShortLength { .. })));
    }

    #[test]
    fn xlogdata_and_keepalives_parse_as_walsender_sends_them() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x1_0000_0028u64.to_be_bytes());
        w.extend_from_slice(&0x1_0000_1000u64.to_be_bytes());
        w.extend_from_slice(&7u64.to_be_bytes());
        w.extend_from_slice(b"wal bytes");
        assert_eq!(
            parse_copy_data(&w).unwrap(),
            ReplMessage::XLogData { start: Lsn(0x1_0000_0028), wal_end: Lsn(0x1_0000_1000), send_time_us: 7, data: b"wal bytes" }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x42u64.to_be_bytes());
        k.extend_from_slice(&9u64.to_be_bytes());
        k.push(1);
        assert_eq!(parse_copy_data(&k).unwrap(), ReplMessage::Keepalive { wal_end: Lsn(0x42), send_time_us: 9, reply_requested: true });
        k[17] = 2;
        assert!(parse_copy_data(&k).is_err());
        assert!(parse_copy_data(&k[..10]).is_err());
        assert!(parse_copy_data(b"x").is_err());
    }

    #[test]
    fn a_status_update_is_a_34_byte_r_in_copydata() {
        let m = status_update(Lsn(0x10), Lsn(0x8), PG_EPOCH_OFFSET_US + 5, true);
        assert_eq!(m.len(), 1 + 4 + 34);
        assert_eq!(&m[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(u64::from_be_bytes(m[6..14].try_into().unwrap()), 0x10);
        assert_eq!(u64::from_be_bytes(m[14..22].try_into().unwrap()), 0x8);
        assert_eq!(u64::from_be_bytes(m[22..30].try_into().unwrap()), 0, "apply: invalid");
        assert_eq!(i64::from_be_bytes(m[30..38].try_into().unwrap()), 5);
        assert_eq!(m[38], 1);
    }

    #[test]
    fn errors_rows_and_auth_requests_parse() {
        let e = parse_error(b'E', b"SERROR\0VERROR\0C58P01\0Mrequested WAL segment has already been removed\0\0").unwrap();
        assert_eq!((e.code.as_str(), e.severity.as_str()), ("58P01", "ERROR"));
        assert!(e.to_string().contains("already been removed"));
        let mut row = 2i16.to_be_bytes().to_vec();
        row.extend_from_slice(&2i32.to_be_bytes());
        row.extend_from_slice(b"42");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(parse_data_row(&row).unwrap(), vec![Some("42".to_string()), None]);
        let mut sasl = 10i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(parse_auth(&sasl).unwrap(), AuthRequest::Sasl { mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()] });
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_auth(&md5).unwrap(), AuthRequest::Md5 { salt: [1, 2, 3, 4] });
        assert_eq!(parse_auth(&7i32.to_be_bytes()).unwrap(), AuthRequest::Unsupported(7));
    }

    #[test]
    fn commands_slot_names_and_sizes() {
        assert_eq!(start_replication("walship", Lsn(0x1_0000_0000), 3), "START_REPLICATION SLOT walship PHYSICAL 1/0 TIMELINE 3");
        assert!(check_slot_name("walship_1").is_ok());
        for bad in ["", "Walship", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_size_setting("16MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_size_setting("1024kB"), Some(1 << 20));
        assert_eq!(parse_size_setting("16 parsecs"), None);
    }

    #[test]
    fn switch_padding_starts_at_the_first_zero_page_after_the_last_wal_byte() {
        const B: u64 = 8192;
        // WAL up to the middle of the second page, then zero pages: padding from the third page.
        let mut piece = vec![0u8; 4 * B as usize];
        piece[..B as usize + 100].fill(0xAB);
        assert_eq!(switch_padding_start(Lsn(0x100_0000), &piece, B), Some(2 * B as usize));
        // A piece that starts mid-page (at + 0x1000) is measured in LSN pages, not piece offsets.
        assert_eq!(switch_padding_start(Lsn(0x100_1000), &piece, B), Some((2 * B - 0x1000) as usize));
        // Nonzero bytes in the last page: no padding in this piece.
        let mut full = vec![0xABu8; 2 * B as usize];
        assert_eq!(switch_padding_start(Lsn(0), &full, B), None);
        // Zeros only inside a page (a record of zeros), not from a page boundary on: none either.
        full[B as usize + 10..].fill(0);
        assert_eq!(switch_padding_start(Lsn(0), &full, B), None);
        // All zeros from a page boundary: the whole piece.
        assert_eq!(switch_padding_start(Lsn(3 * B), &vec![0u8; B as usize], B), Some(0));
    }

    proptest! {
        /// Untrusted bytes from the server never panic any parser, and framing never reads past
        /// the bytes it has.
        #[test]
        fn no_input_panics_a_parser(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, body, used))) = split_message(&bytes, 128) {
                prop_assert!(used <= bytes.len() && body.len() + 5 == used);
            }
            let _ = parse_auth(&bytes);
            let _ = parse_error(b'E', &bytes);
            let _ = parse_data_row(&bytes);
            let _ = parse_copy_data(&bytes);
        }

        /// A stream of messages splits into the same messages however it is cut.
        #[test]
        fn framing_is_independent_of_how_the_stream_is_cut(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8), cut in 0usize..600) {
            let stream: Vec<u8> = bodies.iter().flat_map(|b| msg(b'd', b)).collect();
            let cut = cut.min(stream.len());
            let mut buf = stream[..cut].to_vec();
            let mut got = Vec::new();
            let mut rest = &stream[cut..];
            loop {
                while let Some((_, body, used)) = split_message(&buf, 1024).unwrap() {
                    got.push(body.to_vec());
                    buf.drain(..used);
                }
                if rest.is_empty() { break; }
                let n = rest.len().min(7);
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            prop_assert_eq!(got, bodies);
        }
    }
}
