//! Frame layout of protocol v1: header encode/validate, message bodies, typed errors.
//!
//! Header (32 bytes, little-endian):
//! ```text
//! 0..4   magic b"WSHP"        4 kind u8     5 flags u8        6..8 reserved u16 (0)
//! 8..12  body_len u32         12..16 body_crc u32 = crc32c(body)
//! 16..24 lsn u64 (Data: LSN of the first payload byte; other kinds: 0)
//! 24..28 reserved u32 (0)     28..32 header_crc u32 = crc32c(header[0..28])
//! ```
//! Validation order in [`FrameHeader::decode`]: magic, header CRC (so a torn header is reported as such rather
//! than as a nonsense field), kind, flags, reserved fields, LSN, body length.
//!
//! Flags: Data frames may carry [`DATA_FLAG_SWITCH_PADDING`] (the frame reaches into the padding after an
//! `XLOG_SWITCH`, pages PostgreSQL never wrote); every other kind has flags 0.

use std::fmt;

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of every frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 32;
/// Maximum body length of every non-Data frame.
pub const CONTROL_BODY_BYTES_MAX: u32 = 4096;
/// Hard ceiling for [`Limits::data_body_bytes_max`]; larger configured values are clamped to it.
pub const DATA_BODY_BYTES_MAX_LIMIT: u32 = 64 << 20;
/// Default for [`Limits::data_body_bytes_max`].
pub const DATA_BODY_BYTES_MAX_DEFAULT: u32 = 8 << 20;
/// Maximum length of [`Hello::history`] in bytes (a timeline history file).
pub const HISTORY_BYTES_MAX: usize = 3072;
/// Maximum length of [`BackupFile::content`] in bytes (PostgreSQL's are below 2 KiB).
pub const BACKUP_FILE_BYTES_MAX: usize = 3072;
/// Maximum length of [`BackupFile::name`] in bytes.
pub const BACKUP_NAME_BYTES_MAX: usize = 64;
/// Maximum length of [`Hello::sender_name`] in UTF-8 bytes.
pub const SENDER_NAME_BYTES_MAX: usize = 255;
/// Maximum length of [`ErrorFrame::message`] in UTF-8 bytes.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Data frame flag: the payload reaches into the padding after an `XLOG_SWITCH` record, where
/// pages are not written by PostgreSQL (zeros or a recycled file's old pages) and so do not pass
/// the receiver's page checks. The sender sets it only after walking that segment's records.
pub const DATA_FLAG_SWITCH_PADDING: u8 = 0x01;

/// Frame magic, the first four bytes of every header.
pub const FRAME_MAGIC: [u8; 4] = *b"WSHP";

const HELLO_FIXED_LEN: usize = 2 + 2 + 4 + 8 + 4 + 4 + 8 + 8 + 2;
const WELCOME_LEN: usize = 2 + 2 + 4 + 8 + 8;
const ACK_LEN: usize = 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 8 + 1;
const ERROR_FIXED_LEN: usize = 2 + 2;
const AUTH_LEN: usize = 1 + AUTH_NONCE_LEN + AUTH_MAC_LEN;
/// Bytes of an authentication nonce.
pub const AUTH_NONCE_LEN: usize = 32;
/// Bytes of an authentication MAC (HMAC-SHA256).
pub const AUTH_MAC_LEN: usize = 32;

/// Kind of a frame, byte 4 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Sender -> receiver: identity, geometry and the range of WAL the sender holds.
    Hello = 1,
    /// Receiver -> sender: identity and how far the receiver is durable.
    Welcome = 2,
    /// Sender -> receiver: WAL payload starting at the header's LSN.
    Data = 3,
    /// Receiver -> sender: written and flushed progress.
    Ack = 4,
    /// Either way: liveness, optionally asking for a reply.
    Keepalive = 5,
    /// Either way: the peer is giving up, with a code and a message.
    Error = 6,
    /// Handshake authentication: challenge, response, proof (see [`Auth`]).
    Auth = 7,
    /// Sender -> receiver: a backup history file (`pg_backup_stop()`'s `.backup`), name and content.
    BackupFile = 8,
}

impl FrameKind {
    /// The kind for a header byte, `None` when the byte names no kind.
    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Welcome),
            3 => Some(FrameKind::Data),
            4 => Some(FrameKind::Ack),
            5 => Some(FrameKind::Keepalive),
            6 => Some(FrameKind::Error),
            7 => Some(FrameKind::Auth),
            8 => Some(FrameKind::BackupFile),
            _ => None,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FrameKind::Hello => "Hello",
            FrameKind::Welcome => "Welcome",
            FrameKind::Data => "Data",
            FrameKind::Ack => "Ack",
            FrameKind::Keepalive => "Keepalive",
            FrameKind::Error => "Error",
            FrameKind::Auth => "Auth",
            FrameKind::BackupFile => "BackupFile",
        };
        f.write_str(name)
    }
}

/// Limits applied while decoding. Every body length is checked against these before any byte is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest Data body accepted, in bytes. Values above [`DATA_BODY_BYTES_MAX_LIMIT`] act as that ceiling;
    /// 0 rejects every Data frame.
    pub data_body_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            data_body_bytes_max: DATA_BODY_BYTES_MAX_DEFAULT,
        }
    }
}

impl Limits {
    /// Limits with a Data body maximum, rejecting values outside `1..=DATA_BODY_BYTES_MAX_LIMIT`.
    pub fn new(data_body_bytes_max: u32) -> Result<Limits, WireError> {
        if data_body_bytes_max == 0 || data_body_bytes_max > DATA_BODY_BYTES_MAX_LIMIT {
            return Err(WireError::LimitOutOfRange {
                name: "data_body_bytes_max",
                value: u64::from(data_body_bytes_max),
                min: 1,
                max: u64::from(DATA_BODY_BYTES_MAX_LIMIT),
            });
        }
        Ok(Limits {
            data_body_bytes_max,
        })
    }

    /// The Data body maximum actually enforced: the configured value clamped to the hard ceiling.
    pub fn data_body_bytes_max_effective(&self) -> u32 {
        self.data_body_bytes_max.min(DATA_BODY_BYTES_MAX_LIMIT)
    }

    /// Largest body of any kind under these limits.
    pub fn body_bytes_max(&self) -> u32 {
        self.data_body_bytes_max_effective()
            .max(CONTROL_BODY_BYTES_MAX)
    }

    /// Largest body accepted for `kind`.
    pub fn body_bytes_max_for(&self, kind: FrameKind) -> u32 {
        match kind {
            FrameKind::Data => self.data_body_bytes_max_effective(),
            _ => CONTROL_BODY_BYTES_MAX,
        }
    }
}

/// Everything that can be wrong with bytes on the wire. Each Display says what was expected and what was found.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Header bytes 0..4 are not `WSHP`: the peer is not walship, or the stream lost sync.
    #[error("frame header: expected magic \"WSHP\", found \"{}\" ({found:02x?})", .found.escape_ascii())]
    BadMagic { found: [u8; 4] },
    /// Header byte 4 names no frame kind.
    #[error("frame header: expected kind 1..=6, found {0}")]
    UnknownKind(u8),
    /// Header byte 5 holds a flag this frame kind does not define.
    #[error("frame header: found flags {0:#04x}, expected only the flags defined for this frame kind (Data: switch padding; others: none)")]
    BadFlags(u8),
    /// A reserved header field is nonzero. `offset` is its byte offset in the header (6 or 24).
    #[error("frame header: expected reserved field at byte {offset} to be 0, found {found:#x}")]
    BadReserved { offset: usize, found: u32 },
    /// The header CRC does not match header bytes 0..28.
    #[error("frame header: expected crc32c {expected:#010x} (stored in header), found {found:#010x} (computed)")]
    HeaderCrc { expected: u32, found: u32 },
    /// A non-Data header carries a nonzero LSN.
    #[error("frame header: expected lsn 0 for a {kind} frame, found {found:#x}")]
    UnexpectedLsn { kind: FrameKind, found: u64 },
    /// A Data header whose LSN plus body length does not fit in u64.
    #[error("frame header: expected Data lsn + body_len <= u64::MAX, found lsn {lsn:#x} + {len}")]
    LsnOverflow { lsn: u64, len: u32 },
    /// The header's body length exceeds the limit for its kind.
    #[error("frame header: expected {kind} body_len <= {max} bytes, found {len}")]
    BodyTooLong { kind: FrameKind, len: u32, max: u32 },
    /// A Data header with body_len 0.
    #[error("frame header: expected Data body_len >= 1, found 0")]
    EmptyData,
    /// The body handed in is not as long as the header says.
    #[error("{kind} frame: expected body of {expected} bytes (header body_len), found {found}")]
    BodyLen {
        kind: FrameKind,
        expected: u32,
        found: usize,
    },
    /// The body CRC does not match the body bytes.
    #[error("frame body at lsn {lsn:#x}: expected crc32c {expected:#010x} (from header), found {found:#010x} (computed)")]
    BodyCrc { lsn: u64, expected: u32, found: u32 },
    /// A control body whose layout or field values are invalid; `why` says what was expected and found.
    #[error("{kind} body: {why}")]
    BadBody { kind: FrameKind, why: String },
    /// The peer speaks another protocol version.
    #[error("protocol version: expected {ours}, found {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    /// More bytes were fed to a decoder than its bounded buffer holds (callers must drain after every feed).
    #[error("decoder buffer: expected at most {max} buffered bytes, found {buffered} (drain with next_message after every feed)")]
    BufferOverflow { buffered: usize, max: usize },
    /// A message cannot be encoded because a field exceeds what the protocol allows.
    #[error("encode {kind}: {why}")]
    Unencodable { kind: FrameKind, why: String },
    /// A configured limit is outside its allowed range.
    #[error("limit {name}: expected {min}..={max}, found {value}")]
    LimitOutOfRange {
        name: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Data frames only: [`DATA_FLAG_SWITCH_PADDING`]. Zero for every other kind.
    pub flags: u8,
    pub body_len: u32,
    pub body_crc: u32,
    /// Data: LSN of the first payload byte. Other kinds: 0.
    pub lsn: u64,
}

impl FrameHeader {
    /// Header for a control body (lsn 0), computing its CRC.
    ///
    /// # Panics
    /// If `body` is longer than `u32::MAX` bytes (a caller bug: control bodies are at most 4 KiB).
    pub fn control(kind: FrameKind, body: &[u8]) -> FrameHeader {
        let body_len = u32::try_from(body.len()).expect("frame body longer than u32::MAX");
        FrameHeader {
            kind,
            flags: 0,
            body_len,
            body_crc: crc32c::crc32c(body),
            lsn: 0,
        }
    }

    /// Header for a Data frame carrying `payload` starting at `lsn`, computing its CRC.
    ///
    /// # Panics
    /// If `payload` is longer than `u32::MAX` bytes (a caller bug: payloads are capped by [`Limits`]).
    pub fn data(lsn: u64, payload: &[u8]) -> FrameHeader {
        let body_len = u32::try_from(payload.len()).expect("Data payload longer than u32::MAX");
        FrameHeader {
            kind: FrameKind::Data,
            flags: 0,
            body_len,
            body_crc: crc32c::crc32c(payload),
            lsn,
        }
    }

    /// The 32 header bytes, header CRC included.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC);
        h[4] = self.kind as u8;
        h[5] = self.flags;
        // 6..8: reserved 0.
        h[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.body_crc.to_le_bytes());
        h[16..24].copy_from_slice(&self.lsn.to_le_bytes());
        // 24..28: reserved 0.
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Validates magic, header CRC, kind, flags, reserved fields, LSN (0 unless Data; Data must not overflow)
    /// and body_len against `limits` (Data: `1..=data_body_bytes_max`; others `<= CONTROL_BODY_BYTES_MAX`).
    pub fn decode(
        bytes: &[u8; FRAME_HEADER_LEN],
        limits: &Limits,
    ) -> Result<FrameHeader, WireError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let stored_crc = le_u32(bytes, 28);
        let computed_crc = crc32c::crc32c(&bytes[0..28]);
        if stored_crc != computed_crc {
            return Err(WireError::HeaderCrc {
                expected: stored_crc,
                found: computed_crc,
            });
        }
        let kind = FrameKind::from_u8(bytes[4]).ok_or(WireError::UnknownKind(bytes[4]))?;
        let flags = bytes[5];
        let allowed = if kind == FrameKind::Data { DATA_FLAG_SWITCH_PADDING } else { 0 };
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags(flags));
        }
        let reserved_a = u32::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        if reserved_a != 0 {
            return Err(WireError::BadReserved {
                offset: 6,
                found: reserved_a,
            });
        }
        let reserved_b = le_u32(bytes, 24);
        if reserved_b != 0 {
            return Err(WireError::BadReserved {
                offset: 24,
                found: reserved_b,
            });
        }
        let body_len = le_u32(bytes, 8);
        let body_crc = le_u32(bytes, 12);
        let lsn = le_u64(bytes, 16);
        if kind == FrameKind::Data {
            if body_len == 0 {
                return Err(WireError::EmptyData);
            }
            if lsn.checked_add(u64::from(body_len)).is_none() {
                return Err(WireError::LsnOverflow { lsn, len: body_len });
            }
        } else if lsn != 0 {
            return Err(WireError::UnexpectedLsn { kind, found: lsn });
        }
        let max = limits.body_bytes_max_for(kind);
        if body_len > max {
            return Err(WireError::BodyTooLong {
                kind,
                len: body_len,
                max,
            });
        }
        Ok(FrameHeader {
            kind,
            flags,
            body_len,
            body_crc,
            lsn,
        })
    }

    /// Checks that `body` has the header's length and CRC.
    pub fn verify_body(&self, body: &[u8]) -> Result<(), WireError> {
        if body.len() != self.body_len as usize {
            return Err(WireError::BodyLen {
                kind: self.kind,
                expected: self.body_len,
                found: body.len(),
            });
        }
        let found = crc32c::crc32c(body);
        if found != self.body_crc {
            return Err(WireError::BodyCrc {
                lsn: self.lsn,
                expected: self.body_crc,
                found,
            });
        }
        Ok(())
    }
}

fn le_u32(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks the peer's protocol version against [`PROTOCOL_VERSION`].
pub fn check_version(theirs: u16) -> Result<(), WireError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

/// Why a peer is giving up. Unknown codes from a newer peer decode to [`ErrorCode::Unknown`], keeping the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer broke the protocol (bad frame, unexpected message).
    Protocol,
    /// System id, timeline or geometry mismatch.
    Identity,
    /// The receiver needs bytes the sender does not have.
    Gap,
    /// A CRC or page check failed.
    Corrupt,
    /// An I/O error on the peer.
    Io,
    /// The peer is shutting down.
    Shutdown,
    /// Authentication failed or is required.
    Auth,
    /// Anything else (code 255).
    Other,
    /// A code this version does not name. Never holds a named code when produced by [`ErrorCode::from_code`].
    Unknown(u16),
}

impl ErrorCode {
    /// Whether retrying cannot help: the peer refused who we are (identity, authentication), what
    /// we hold (a gap) or how we speak (protocol). The other codes are the peer's trouble
    /// (I/O, shutdown, damage it found) and are worth a reconnect.
    pub fn is_fatal(self) -> bool {
        matches!(self, ErrorCode::Protocol | ErrorCode::Identity | ErrorCode::Gap | ErrorCode::Auth)
    }

    /// The code on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::Identity => 2,
            ErrorCode::Gap => 3,
            ErrorCode::Corrupt => 4,
            ErrorCode::Io => 5,
            ErrorCode::Shutdown => 6,
            ErrorCode::Auth => 7,
            ErrorCode::Other => 255,
            ErrorCode::Unknown(n) => n,
        }
    }

    /// The code for a wire value; never fails.
    pub fn from_code(code: u16) -> ErrorCode {
        match code {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Identity,
            3 => ErrorCode::Gap,
            4 => ErrorCode::Corrupt,
            5 => ErrorCode::Io,
            6 => ErrorCode::Shutdown,
            7 => ErrorCode::Auth,
            255 => ErrorCode::Other,
            n => ErrorCode::Unknown(n),
        }
    }
}

/// Sender -> receiver handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    /// `xlp_magic` of the sender's WAL pages (identifies the PostgreSQL major version).
    pub page_magic: u16,
    pub timeline: u32,
    pub system_id: u64,
    pub seg_size: u32,
    pub block_size: u32,
    /// First WAL byte the sender has.
    pub first_lsn: u64,
    /// The sender's current end (flush horizon); `first_lsn <= horizon_lsn`.
    pub horizon_lsn: u64,
    /// At most [`SENDER_NAME_BYTES_MAX`] UTF-8 bytes.
    pub sender_name: String,
    /// The `TLI.history` file of `timeline` (empty on timeline 1): how this timeline branched
    /// off, so a receiver holding an older timeline can follow the switch.
    pub history: String,
}

/// Receiver -> sender handshake reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u16,
    pub timeline: u32,
    /// 0 if the receiver's directory is empty.
    pub system_id: u64,
    /// The receiver holds every byte below this durably; 0 if none.
    pub durable_lsn: u64,
}

/// Receiver progress, each LSN "last byte + 1". `flushed_lsn <= written_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub written_lsn: u64,
    pub flushed_lsn: u64,
    /// Receiver's unix time in microseconds.
    pub time_us: u64,
}

/// Liveness message, either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Sender of the keepalive's unix time in microseconds.
    pub time_us: u64,
    pub reply_requested: bool,
}

/// A peer giving up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// At most [`ERROR_MESSAGE_BYTES_MAX`] UTF-8 bytes.
    pub message: String,
}

/// Which step of the mutual challenge-response an [`Auth`] frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStep {
    /// Receiver -> sender: `nonce` is the receiver's fresh nonce; `mac` is zero.
    Challenge = 1,
    /// Sender -> receiver: `nonce` is the sender's fresh nonce, `mac` proves the sender knows the key.
    Response = 2,
    /// Receiver -> sender: `mac` proves the receiver knows the key; `nonce` is zero.
    Proof = 3,
}

/// Handshake authentication frame: `step u8 | nonce [32] | mac [32]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    pub step: AuthStep,
    pub nonce: [u8; AUTH_NONCE_LEN],
    pub mac: [u8; AUTH_MAC_LEN],
}

/// A backup history file the sender found in `pg_wal` (`TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`);
/// the receiver checks the name's shape and stores it beside the segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFile {
    pub name: String,
    pub content: String,
}

/// One whole protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Data { lsn: u64, payload: Vec<u8> },
    Ack(Ack),
    Keepalive(Keepalive),
    Error(ErrorFrame),
    Auth(Auth),
    BackupFile(BackupFile),
}

impl Message {
    /// Kind of the frame this message encodes to.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::Welcome(_) => FrameKind::Welcome,
            Message::Data { .. } => FrameKind::Data,
            Message::Ack(_) => FrameKind::Ack,
            Message::Keepalive(_) => FrameKind::Keepalive,
            Message::Error(_) => FrameKind::Error,
            Message::Auth(_) => FrameKind::Auth,
            Message::BackupFile(_) => FrameKind::BackupFile,
        }
    }

    /// Checks that the message is representable in protocol v1 and that a peer using `limits` would accept
    /// it: name/message lengths, Data payload `1..=limits` and `lsn + len` without overflow,
    /// `flushed <= written`, `first <= horizon`.
    pub fn validate(&self, limits: &Limits) -> Result<(), WireError> {
        let kind = self.kind();
        let bad = |why: String| Err(WireError::Unencodable { kind, why });
        match self {
            Message::Hello(h) => {
                if h.sender_name.len() > SENDER_NAME_BYTES_MAX {
                    return bad(format!(
                        "expected sender_name <= {SENDER_NAME_BYTES_MAX} bytes, found {}",
                        h.sender_name.len()
                    ));
                }
                if h.history.len() > HISTORY_BYTES_MAX {
                    return bad(format!("expected history <= {HISTORY_BYTES_MAX} bytes, found {}", h.history.len()));
                }
                if h.first_lsn > h.horizon_lsn {
                    return bad(format!(
                        "expected first_lsn <= horizon_lsn, found {:#x} > {:#x}",
                        h.first_lsn, h.horizon_lsn
                    ));
                }
            }
            Message::Data { lsn, payload } => {
                let max = limits.data_body_bytes_max_effective() as usize;
                if payload.is_empty() || payload.len() > max {
                    return bad(format!(
                        "expected payload of 1..={max} bytes, found {}",
                        payload.len()
                    ));
                }
                if lsn.checked_add(payload.len() as u64).is_none() {
                    return bad(format!(
                        "expected lsn + len <= u64::MAX, found {lsn:#x} + {}",
                        payload.len()
                    ));
                }
            }
            Message::Ack(a) => {
                if a.flushed_lsn > a.written_lsn {
                    return bad(format!(
                        "expected flushed_lsn <= written_lsn, found {:#x} > {:#x}",
                        a.flushed_lsn, a.written_lsn
                    ));
                }
            }
            Message::Error(e) => {
                if e.message.len() > ERROR_MESSAGE_BYTES_MAX {
                    return bad(format!(
                        "expected message <= {ERROR_MESSAGE_BYTES_MAX} bytes, found {}",
                        e.message.len()
                    ));
                }
            }
            Message::BackupFile(b) => {
                if b.name.len() > BACKUP_NAME_BYTES_MAX {
                    return bad(format!("expected name <= {BACKUP_NAME_BYTES_MAX} bytes, found {}", b.name.len()));
                }
                if b.content.len() > BACKUP_FILE_BYTES_MAX {
                    return bad(format!("expected content <= {BACKUP_FILE_BYTES_MAX} bytes, found {}", b.content.len()));
                }
            }
            Message::Welcome(_) | Message::Keepalive(_) | Message::Auth(_) => {}
        }
        Ok(())
    }

    /// Validates against `limits` (see [`Message::validate`]), then appends header and body to `out`.
    /// On error `out` is unchanged.
    pub fn try_encode(&self, out: &mut Vec<u8>, limits: &Limits) -> Result<(), WireError> {
        self.validate(limits)?;
        self.encode_unchecked(out);
        Ok(())
    }

    /// Appends header and body to `out`.
    ///
    /// # Panics
    /// If the message is not representable in v1 (checked with [`Limits`] at the hard ceiling): a sender name
    /// over 255 bytes, an error message over 1024 bytes, an empty or over-64-MiB Data payload, an Ack with
    /// flushed > written, a Hello with first > horizon. These are caller bugs; use [`Message::try_encode`] for
    /// values that come from outside (config, peer).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let ceiling = Limits {
            data_body_bytes_max: DATA_BODY_BYTES_MAX_LIMIT,
        };
        if let Err(e) = self.validate(&ceiling) {
            panic!("Message::encode: {e}");
        }
        self.encode_unchecked(out);
    }

    fn encode_unchecked(&self, out: &mut Vec<u8>) {
        if let Message::Data { lsn, payload } = self {
            out.reserve(FRAME_HEADER_LEN + payload.len());
            out.extend_from_slice(&FrameHeader::data(*lsn, payload).encode());
            out.extend_from_slice(payload);
            return;
        }
        let mut body: Vec<u8> = Vec::with_capacity(64);
        match self {
            Message::Hello(h) => {
                body.extend_from_slice(&h.protocol_version.to_le_bytes());
                body.extend_from_slice(&h.page_magic.to_le_bytes());
                body.extend_from_slice(&h.timeline.to_le_bytes());
                body.extend_from_slice(&h.system_id.to_le_bytes());
                body.extend_from_slice(&h.seg_size.to_le_bytes());
                body.extend_from_slice(&h.block_size.to_le_bytes());
                body.extend_from_slice(&h.first_lsn.to_le_bytes());
                body.extend_from_slice(&h.horizon_lsn.to_le_bytes());
                body.extend_from_slice(&(h.sender_name.len() as u16).to_le_bytes());
                body.extend_from_slice(h.sender_name.as_bytes());
                body.extend_from_slice(&(h.history.len() as u16).to_le_bytes());
                body.extend_from_slice(h.history.as_bytes());
            }
            Message::Welcome(w) => {
                body.extend_from_slice(&w.protocol_version.to_le_bytes());
                body.extend_from_slice(&0u16.to_le_bytes());
                body.extend_from_slice(&w.timeline.to_le_bytes());
                body.extend_from_slice(&w.system_id.to_le_bytes());
                body.extend_from_slice(&w.durable_lsn.to_le_bytes());
            }
            Message::Ack(a) => {
                body.extend_from_slice(&a.written_lsn.to_le_bytes());
                body.extend_from_slice(&a.flushed_lsn.to_le_bytes());
                body.extend_from_slice(&a.time_us.to_le_bytes());
            }
            Message::Keepalive(k) => {
                body.extend_from_slice(&k.time_us.to_le_bytes());
                body.push(u8::from(k.reply_requested));
            }
            Message::Error(e) => {
                body.extend_from_slice(&e.code.code().to_le_bytes());
                body.extend_from_slice(&(e.message.len() as u16).to_le_bytes());
                body.extend_from_slice(e.message.as_bytes());
            }
            Message::Auth(a) => {
                body.push(a.step as u8);
                body.extend_from_slice(&a.nonce);
                body.extend_from_slice(&a.mac);
            }
            Message::BackupFile(b) => {
                body.extend_from_slice(&(b.name.len() as u16).to_le_bytes());
                body.extend_from_slice(b.name.as_bytes());
                body.extend_from_slice(&(b.content.len() as u16).to_le_bytes());
                body.extend_from_slice(b.content.as_bytes());
            }
            Message::Data { .. } => unreachable!("Data handled above"),
        }
        debug_assert!(body.len() <= CONTROL_BODY_BYTES_MAX as usize);
        out.extend_from_slice(&FrameHeader::control(self.kind(), &body).encode());
        out.extend_from_slice(&body);
    }
}

/// Decodes the body of a frame whose header was validated by [`FrameHeader::decode`]. Checks the body's
/// length and CRC first. Meant for control frames; a Data header yields [`Message::Data`] (copying the body).
///
/// Hello and Welcome check the protocol version before anything else, so a peer speaking another version gets
/// [`WireError::VersionMismatch`] rather than a layout error.
pub fn decode_control(header: &FrameHeader, body: &[u8]) -> Result<Message, WireError> {
    header.verify_body(body)?;
    let kind = header.kind;
    let mut r = BodyReader { kind, body, at: 0 };
    let msg = match kind {
        FrameKind::Data => {
            return Ok(Message::Data {
                lsn: header.lsn,
                payload: body.to_vec(),
            });
        }
        FrameKind::Hello => {
            let protocol_version = r.u16("protocol_version")?;
            check_version(protocol_version)?;
            r.need_total(HELLO_FIXED_LEN)?;
            let page_magic = r.u16("page_magic")?;
            let timeline = r.u32("timeline")?;
            let system_id = r.u64("system_id")?;
            let seg_size = r.u32("seg_size")?;
            let block_size = r.u32("block_size")?;
            let first_lsn = r.u64("first_lsn")?;
            let horizon_lsn = r.u64("horizon_lsn")?;
            if first_lsn > horizon_lsn {
                return Err(r.bad(format!(
                    "expected first_lsn <= horizon_lsn, found {first_lsn:#x} > {horizon_lsn:#x}"
                )));
            }
            let sender_name = r.string("sender_name", SENDER_NAME_BYTES_MAX)?;
            let history = r.string("history", HISTORY_BYTES_MAX)?;
            Message::Hello(Hello {
                protocol_version,
                page_magic,
                timeline,
                system_id,
                seg_size,
                block_size,
                first_lsn,
                horizon_lsn,
                sender_name,
                history,
            })
        }
        FrameKind::Welcome => {
            let protocol_version = r.u16("protocol_version")?;
            check_version(protocol_version)?;
            r.need_total(WELCOME_LEN)?;
            let reserved = r.u16("reserved")?;
            if reserved != 0 {
                return Err(r.bad(format!(
                    "expected reserved u16 at offset 2 to be 0, found {reserved:#x}"
                )));
            }
            let timeline = r.u32("timeline")?;
            let system_id = r.u64("system_id")?;
            let durable_lsn = r.u64("durable_lsn")?;
            Message::Welcome(Welcome {
                protocol_version,
                timeline,
                system_id,
                durable_lsn,
            })
        }
        FrameKind::Ack => {
            r.need_total(ACK_LEN)?;
            let written_lsn = r.u64("written_lsn")?;
            let flushed_lsn = r.u64("flushed_lsn")?;
            let time_us = r.u64("time_us")?;
            if flushed_lsn > written_lsn {
                return Err(r.bad(format!(
                    "expected flushed_lsn <= written_lsn, found {flushed_lsn:#x} > {written_lsn:#x}"
                )));
            }
            Message::Ack(Ack {
                written_lsn,
                flushed_lsn,
                time_us,
            })
        }
        FrameKind::Keepalive => {
            r.need_total(KEEPALIVE_LEN)?;
            let time_us = r.u64("time_us")?;
            let reply = r.u8("reply_requested")?;
            let reply_requested = match reply {
                0 => false,
                1 => true,
                n => return Err(r.bad(format!("expected reply_requested 0 or 1, found {n}"))),
            };
            Message::Keepalive(Keepalive {
                time_us,
                reply_requested,
            })
        }
        FrameKind::Error => {
            r.need_total(ERROR_FIXED_LEN)?;
            let code = ErrorCode::from_code(r.u16("code")?);
            let message = r.string("message", ERROR_MESSAGE_BYTES_MAX)?;
            Message::Error(ErrorFrame { code, message })
        }
        FrameKind::Auth => {
            r.need_total(AUTH_LEN)?;
            let step = match r.u8("step")? {
                1 => AuthStep::Challenge,
                2 => AuthStep::Response,
                3 => AuthStep::Proof,
                n => return Err(r.bad(format!("expected auth step 1..=3, found {n}"))),
            };
            let mut nonce = [0u8; AUTH_NONCE_LEN];
            nonce.copy_from_slice(r.take(AUTH_NONCE_LEN, "nonce")?);
            let mut mac = [0u8; AUTH_MAC_LEN];
            mac.copy_from_slice(r.take(AUTH_MAC_LEN, "mac")?);
            Message::Auth(Auth { step, nonce, mac })
        }
        FrameKind::BackupFile => {
            let name = r.string("name", BACKUP_NAME_BYTES_MAX)?;
            let content = r.string("content", BACKUP_FILE_BYTES_MAX)?;
            Message::BackupFile(BackupFile { name, content })
        }
    };
    r.finish()?;
    Ok(msg)
}

/// Bounds-checked little-endian reader over a control body; every failure is a [`WireError::BadBody`].
struct BodyReader<'a> {
    kind: FrameKind,
    body: &'a [u8],
    at: usize,
}

impl<'a> BodyReader<'a> {
    fn bad(&self, why: String) -> WireError {
        WireError::BadBody {
            kind: self.kind,
            why,
        }
    }

    /// Fails unless the body holds at least `len` bytes (the fixed part of the layout).
    fn need_total(&self, len: usize) -> Result<(), WireError> {
        if self.body.len() < len {
            return Err(self.bad(format!(
                "truncated: expected at least {len} bytes of fixed fields, found {}",
                self.body.len()
            )));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], WireError> {
        let rest = self.body.len() - self.at;
        if n > rest {
            return Err(self.bad(format!(
                "truncated: expected {n} bytes for {field} at offset {}, found {rest}",
                self.at
            )));
        }
        let s = &self.body[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self, field: &str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, WireError> {
        let s = self.take(2, field)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32, WireError> {
        let s = self.take(4, field)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64, WireError> {
        let s = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    /// A `len u16 | utf8 bytes` string of at most `max` bytes.
    fn string(&mut self, field: &str, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(self.bad(format!(
                "expected {field} length <= {max} bytes, found {len}"
            )));
        }
        let at = self.at;
        let bytes = self.take(len, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.bad(format!(
                "expected {field} to be UTF-8, found invalid byte at offset {}",
                at + e.valid_up_to()
            ))),
        }
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.at != self.body.len() {
            return Err(self.bad(format!(
                "trailing bytes: expected body of {} bytes, found {}",
                self.at,
                self.body.len()
            )));
        }
        Ok(())
    }
}
