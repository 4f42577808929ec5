//! Log sequence numbers: the byte address of WAL, its text form and segment/page arithmetic.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

/// A position in the WAL byte stream (PostgreSQL's `XLogRecPtr`).
#[derive(Copy, Clone, Eq, PartialEq, Ord, PartialOrd, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// PostgreSQL's `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    /// Segment number of the segment holding this LSN (`XLByteToSeg`).
    pub fn segno(self, seg_size: u64) -> u64 {
        debug_assert!(seg_size.is_power_of_two());
        self.0 / seg_size
    }

    /// Byte offset of this LSN inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: u64) -> u64 {
        debug_assert!(seg_size.is_power_of_two());
        self.0 % seg_size
    }

    /// LSN of the first byte of the segment holding this LSN.
    pub fn segment_start(self, seg_size: u64) -> Lsn {
        Lsn(self.0 - self.segment_offset(seg_size))
    }

    /// Byte offset of this LSN inside its WAL page.
    pub fn page_offset(self, block_size: u64) -> u64 {
        debug_assert!(block_size.is_power_of_two());
        self.0 % block_size
    }

    /// LSN of the first byte of the page holding this LSN.
    pub(crate) fn page_start(self, block_size: u64) -> Lsn {
        Lsn(self.0 - self.page_offset(block_size))
    }

    /// Round up to a multiple of 8 (`MAXALIGN`); saturates instead of wrapping.
    pub(crate) fn maxalign(self) -> Lsn {
        Lsn(self.0.saturating_add(7) & !7)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:08X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not an LSN.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LsnParseError {
    #[error("LSN {input:?}: expected HIGH/LOW in hex, e.g. 16/B374D848")]
    MissingSlash { input: String },
    #[error("LSN {input:?}: {part} part {value:?} is not 1-8 hex digits")]
    BadHex {
        input: String,
        part: &'static str,
        value: String,
    },
}

fn parse_half(input: &str, part: &'static str, value: &str) -> Result<u64, LsnParseError> {
    let ok = !value.is_empty() && value.len() <= 8 && value.bytes().all(|b| b.is_ascii_hexdigit());
    let bad = || LsnParseError::BadHex {
        input: input.to_string(),
        part,
        value: value.to_string(),
    };
    if !ok {
        return Err(bad());
    }
    u64::from_str_radix(value, 16).map_err(|_| bad())
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Parses `%X/%X` and `%X/%08X` (hex digits of either case, as `pg_lsn_in` does).
    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let (high, low) = s
            .split_once('/')
            .ok_or_else(|| LsnParseError::MissingSlash {
                input: s.to_string(),
            })?;
        let high = parse_half(s, "high", high)?;
        let low = parse_half(s, "low", low)?;
        Ok(Lsn((high << 32) | low))
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, bytes: u64) -> Lsn {
        debug_assert!(
            self.0.checked_add(bytes).is_some(),
            "LSN overflow: {self} + {bytes}"
        );
        Lsn(self.0.wrapping_add(bytes))
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;
    fn sub(self, other: Lsn) -> u64 {
        debug_assert!(self >= other, "LSN underflow: {self} - {other}");
        self.0.wrapping_sub(other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_pads_low_part() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x16_0000_D848).to_string(), "16/0000D848");
        assert_eq!(Lsn(0x1A2000).to_string(), "0/001A2000");
        assert_eq!(format!("{:?}", Lsn(0x1A2000)), "0/001A2000");
    }

    #[test]
    fn parses_both_forms() {
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/0000D848".parse::<Lsn>(), Ok(Lsn(0x16_0000_D848)));
        assert_eq!("16/D848".parse::<Lsn>(), Ok(Lsn(0x16_0000_D848)));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::INVALID));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "/",
            "16",
            "16/",
            "/1",
            "1/2/3",
            "123456789/0",
            "0/123456789",
            "+1/0",
            "0/-1",
            "g/0",
            " 1/0",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn arithmetic() {
        let lsn = Lsn(0x0100_0000 + 0x2345);
        let seg = 16 << 20;
        assert_eq!(lsn.segno(seg), 1);
        assert_eq!(lsn.segment_offset(seg), 0x2345);
        assert_eq!(lsn.segment_start(seg), Lsn(0x0100_0000));
        assert_eq!(lsn.page_offset(8192), 0x345);
        assert_eq!(lsn + 3 - lsn, 3);
        assert_eq!(Lsn(9).maxalign(), Lsn(16));
        assert_eq!(Lsn(16).maxalign(), Lsn(16));
    }

    proptest! {
        #[test]
        fn round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
            let short = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
            prop_assert_eq!(short.parse::<Lsn>(), Ok(lsn));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
