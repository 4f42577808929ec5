//! WAL page headers (`XLogPageHeaderData` / `XLogLongPageHeaderData`): parse, encode, validate.
//!
//! Validation mirrors PostgreSQL's `XLogReaderValidatePageHeader`, except that the timeline must equal the
//! identity's timeline exactly (no timeline switches inside one walk).

use super::lsn::Lsn;
use super::segment::{is_valid_block_size, is_valid_seg_size};

/// The first record on the page is a continuation of the previous page's last record.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x1;
/// The page carries the long header (first page of a segment).
pub const XLP_LONG_HEADER: u16 = 0x2;
/// Full-page images on this page may be removed (archive compression hint).
pub const XLP_BKP_REMOVABLE: u16 = 0x4;
/// A partial record that should have continued here was replaced by an `OVERWRITE_CONTRECORD` record (PG 15+).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x8;
/// Every flag PostgreSQL defines; any other bit is corruption.
pub const XLP_ALL_FLAGS: u16 = 0xF;

/// `SizeOfXLogShortPHD` (20 bytes, MAXALIGN'd to 24).
pub const SHORT_PAGE_HEADER_LEN: usize = 24;
/// `SizeOfXLogLongPHD` (36 bytes, MAXALIGN'd to 40).
pub const LONG_PAGE_HEADER_LEN: usize = 40;

/// A decoded page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: u32,
    pub pageaddr: Lsn,
    /// Bytes of the record continued from the previous page still to come (0 if none).
    pub rem_len: u32,
    /// Present iff `info & XLP_LONG_HEADER`.
    pub long: Option<LongPageHeader>,
}

/// The extra fields of a segment's first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    pub system_id: u64,
    pub seg_size: u32,
    pub block_size: u32,
}

/// What every page of one WAL stream must match; taken from the first segment's long header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalIdentity {
    pub system_id: u64,
    pub seg_size: u64,
    pub block_size: u64,
    pub magic: u16,
    pub tli: u32,
}

/// A page header that is unreadable or does not belong to the expected position/stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PageError {
    #[error("page header truncated: have {found_bytes} bytes, need {needed_bytes}")]
    Truncated {
        needed_bytes: usize,
        found_bytes: usize,
    },
    #[error("page at {page_lsn} is not block aligned (block size {block_size})")]
    Misaligned { page_lsn: Lsn, block_size: u64 },
    #[error("page at {page_lsn}: xlp_magic is {found:#06X}, expected {expected:#06X}")]
    BadMagic {
        page_lsn: Lsn,
        found: u16,
        expected: u16,
    },
    #[error("page at {page_lsn}: xlp_info {found:#06X} has unknown flag bits {unknown:#06X}")]
    UnknownFlags {
        page_lsn: Lsn,
        found: u16,
        unknown: u16,
    },
    #[error(
        "page at {page_lsn}: xlp_pageaddr is {found}, expected {expected} (recycled segment?)"
    )]
    BadPageAddr {
        page_lsn: Lsn,
        found: Lsn,
        expected: Lsn,
    },
    #[error("page at {page_lsn}: xlp_tli is {found}, expected 1..={expected}")]
    BadTimeline {
        page_lsn: Lsn,
        found: u32,
        expected: u32,
    },
    #[error("page at {page_lsn}: long header present is {found}, expected {expected} (segment start: {expected})")]
    LongHeaderMismatch {
        page_lsn: Lsn,
        found: bool,
        expected: bool,
    },
    #[error("page at {page_lsn}: xlp_sysid is {found}, expected {expected}")]
    BadSystemId {
        page_lsn: Lsn,
        found: u64,
        expected: u64,
    },
    #[error("page at {page_lsn}: xlp_seg_size is {found}, expected {expected}")]
    BadSegSize {
        page_lsn: Lsn,
        found: u64,
        expected: u64,
    },
    #[error("page at {page_lsn}: xlp_xlog_blcksz is {found}, expected {expected}")]
    BadBlockSize {
        page_lsn: Lsn,
        found: u64,
        expected: u64,
    },
    #[error("page at {page_lsn}: long header declares seg_size {seg_size} / block_size {block_size}, expected powers of two in 1 MiB..1 GiB / 1 KiB..64 KiB")]
    InvalidSizes {
        page_lsn: Lsn,
        seg_size: u64,
        block_size: u64,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl PageHeader {
    /// Decode a header from the start of `bytes` (>= 24 bytes, >= 40 if the long flag is set).
    pub fn parse(bytes: &[u8]) -> Result<PageHeader, PageError> {
        let truncated = |needed_bytes| PageError::Truncated {
            needed_bytes,
            found_bytes: bytes.len(),
        };
        if bytes.len() < SHORT_PAGE_HEADER_LEN {
            return Err(truncated(SHORT_PAGE_HEADER_LEN));
        }
        let info = u16_at(bytes, 2);
        let long = if info & XLP_LONG_HEADER != 0 {
            if bytes.len() < LONG_PAGE_HEADER_LEN {
                return Err(truncated(LONG_PAGE_HEADER_LEN));
            }
            Some(LongPageHeader {
                system_id: u64_at(bytes, 24),
                seg_size: u32_at(bytes, 32),
                block_size: u32_at(bytes, 36),
            })
        } else {
            None
        };
        Ok(PageHeader {
            magic: u16_at(bytes, 0),
            info,
            tli: u32_at(bytes, 4),
            pageaddr: Lsn(u64_at(bytes, 8)),
            rem_len: u32_at(bytes, 16),
            long,
        })
    }

    /// 40 with a long header, else 24.
    pub fn header_len(&self) -> usize {
        if self.long.is_some() {
            LONG_PAGE_HEADER_LEN
        } else {
            SHORT_PAGE_HEADER_LEN
        }
    }

    /// Write the header (padding zeroed) into `out[..self.header_len()]`. `info`'s long flag is set iff
    /// `long` is present. Panics if `out` is shorter than `header_len()` (a caller bug, not input data).
    pub fn encode(&self, out: &mut [u8]) {
        let len = self.header_len();
        assert!(
            out.len() >= len,
            "page header buffer too short: {} < {len}",
            out.len()
        );
        let info = match self.long {
            Some(_) => self.info | XLP_LONG_HEADER,
            None => self.info & !XLP_LONG_HEADER,
        };
        out[0..2].copy_from_slice(&self.magic.to_le_bytes());
        out[2..4].copy_from_slice(&info.to_le_bytes());
        out[4..8].copy_from_slice(&self.tli.to_le_bytes());
        out[8..16].copy_from_slice(&self.pageaddr.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.rem_len.to_le_bytes());
        out[20..24].fill(0);
        if let Some(long) = self.long {
            out[24..32].copy_from_slice(&long.system_id.to_le_bytes());
            out[32..36].copy_from_slice(&long.seg_size.to_le_bytes());
            out[36..40].copy_from_slice(&long.block_size.to_le_bytes());
        }
    }
}

impl WalIdentity {
    /// Take the identity from a segment's first page: it must carry a long header with valid sizes.
    pub fn from_first_page(bytes: &[u8]) -> Result<WalIdentity, PageError> {
        let hdr = PageHeader::parse(bytes)?;
        let page_lsn = hdr.pageaddr;
        let Some(long) = hdr.long else {
            return Err(PageError::LongHeaderMismatch {
                page_lsn,
                found: false,
                expected: true,
            });
        };
        let seg_size = u64::from(long.seg_size);
        let block_size = u64::from(long.block_size);
        if !is_valid_seg_size(seg_size) || !is_valid_block_size(block_size) {
            return Err(PageError::InvalidSizes {
                page_lsn,
                seg_size,
                block_size,
            });
        }
        if hdr.info & !XLP_ALL_FLAGS != 0 {
            let unknown = hdr.info & !XLP_ALL_FLAGS;
            return Err(PageError::UnknownFlags {
                page_lsn,
                found: hdr.info,
                unknown,
            });
        }
        Ok(WalIdentity {
            system_id: long.system_id,
            seg_size,
            block_size,
            magic: hdr.magic,
            tli: hdr.tli,
        })
    }
}

fn check_long_header(hdr: &PageHeader, page_lsn: Lsn, id: &WalIdentity) -> Result<(), PageError> {
    let is_seg_start = page_lsn.segment_offset(id.seg_size) == 0;
    if hdr.long.is_some() != is_seg_start {
        return Err(PageError::LongHeaderMismatch {
            page_lsn,
            found: hdr.long.is_some(),
            expected: is_seg_start,
        });
    }
    let Some(long) = hdr.long else { return Ok(()) };
    if long.system_id != id.system_id {
        return Err(PageError::BadSystemId {
            page_lsn,
            found: long.system_id,
            expected: id.system_id,
        });
    }
    if u64::from(long.seg_size) != id.seg_size {
        return Err(PageError::BadSegSize {
            page_lsn,
            found: long.seg_size.into(),
            expected: id.seg_size,
        });
    }
    if u64::from(long.block_size) != id.block_size {
        return Err(PageError::BadBlockSize {
            page_lsn,
            found: long.block_size.into(),
            expected: id.block_size,
        });
    }
    Ok(())
}

/// Validate the page that starts at `page_lsn` (block aligned): magic, no unknown flags,
/// `pageaddr == page_lsn`, `tli == id.tli`, long header present iff `page_lsn` is a segment start and its
/// sysid/seg_size/block_size match. Mirrors `XLogReaderValidatePageHeader`.
pub fn validate_page(
    page: &[u8],
    page_lsn: Lsn,
    id: &WalIdentity,
) -> Result<PageHeader, PageError> {
    debug_assert!(is_valid_block_size(id.block_size) && is_valid_seg_size(id.seg_size));
    if page_lsn.page_offset(id.block_size) != 0 {
        return Err(PageError::Misaligned {
            page_lsn,
            block_size: id.block_size,
        });
    }
    let hdr = PageHeader::parse(page)?;
    if hdr.magic != id.magic {
        return Err(PageError::BadMagic {
            page_lsn,
            found: hdr.magic,
            expected: id.magic,
        });
    }
    let unknown = hdr.info & !XLP_ALL_FLAGS;
    if unknown != 0 {
        return Err(PageError::UnknownFlags {
            page_lsn,
            found: hdr.info,
            unknown,
        });
    }
    check_long_header(&hdr, page_lsn, id)?;
    if hdr.pageaddr != page_lsn {
        return Err(PageError::BadPageAddr {
            page_lsn,
            found: hdr.pageaddr,
            expected: page_lsn,
        });
    }
    // A segment that begins a new timeline starts with a copy of its parent timeline's pages up
    // to the switch point, which keep their older xlp_tli; a newer one never belongs here.
    if hdr.tli > id.tli || hdr.tli == 0 {
        return Err(PageError::BadTimeline {
            page_lsn,
            found: hdr.tli,
            expected: id.tli,
        });
    }
    Ok(hdr)
}

/// Cheap check used to tell "end of WAL" from corruption: does this page's header look like one PostgreSQL
/// wrote for exactly this position (magic matches, `pageaddr == page_lsn`)?
pub fn page_belongs_here(page: &[u8], page_lsn: Lsn, id: &WalIdentity) -> bool {
    page.len() >= SHORT_PAGE_HEADER_LEN
        && u16_at(page, 0) == id.magic
        && u64_at(page, 8) == page_lsn.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEG: u64 = 16 << 20;

    fn id() -> WalIdentity {
        WalIdentity {
            system_id: 77,
            seg_size: SEG,
            block_size: 8192,
            magic: 0xD110,
            tli: 1,
        }
    }

    fn header_at(page_lsn: Lsn) -> PageHeader {
        let long = (page_lsn.segment_offset(SEG) == 0).then_some(LongPageHeader {
            system_id: 77,
            seg_size: SEG as u32,
            block_size: 8192,
        });
        PageHeader {
            magic: 0xD110,
            info: if long.is_some() { XLP_LONG_HEADER } else { 0 },
            tli: 1,
            pageaddr: page_lsn,
            rem_len: 0,
            long,
        }
    }

    fn page(hdr: &PageHeader) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        hdr.encode(&mut p);
        p
    }

    #[test]
    fn round_trip_short_and_long() {
        for lsn in [Lsn(SEG), Lsn(SEG + 8192)] {
            let mut hdr = header_at(lsn);
            hdr.info |= XLP_FIRST_IS_CONTRECORD;
            hdr.rem_len = 1234;
            let p = page(&hdr);
            let back = PageHeader::parse(&p).unwrap();
            assert_eq!(back, hdr);
            assert_eq!(back.header_len(), if lsn == Lsn(SEG) { 40 } else { 24 });
            assert_eq!(validate_page(&p, lsn, &id()), Ok(hdr));
            assert!(page_belongs_here(&p, lsn, &id()));
        }
        assert_eq!(
            WalIdentity::from_first_page(&page(&header_at(Lsn(SEG)))),
            Ok(id())
        );
    }

    #[test]
    fn parse_needs_enough_bytes() {
        assert!(matches!(
            PageHeader::parse(&[0u8; 23]),
            Err(PageError::Truncated {
                needed_bytes: 24,
                ..
            })
        ));
        let p = page(&header_at(Lsn(SEG)));
        assert!(matches!(
            PageHeader::parse(&p[..39]),
            Err(PageError::Truncated {
                needed_bytes: 40,
                ..
            })
        ));
        assert!(PageHeader::parse(&p[..40]).is_ok());
        assert!(WalIdentity::from_first_page(&page(&header_at(Lsn(SEG + 8192)))).is_err());
        let first = header_at(Lsn(SEG));
        for (seg_size, block_size) in [
            (3 << 20, 8192),
            (SEG as u32, 512),
            (SEG as u32, 0),
            (1 << 31, 8192),
        ] {
            let hdr = PageHeader {
                long: Some(LongPageHeader {
                    system_id: 77,
                    seg_size,
                    block_size,
                }),
                ..first
            };
            assert!(matches!(
                WalIdentity::from_first_page(&page(&hdr)),
                Err(PageError::InvalidSizes { .. })
            ));
        }
    }

    #[test]
    fn validate_each_check() {
        let lsn = Lsn(SEG + 3 * 8192);
        let good = header_at(lsn);
        let check = |hdr: PageHeader, at: Lsn| validate_page(&page(&hdr), at, &id()).unwrap_err();

        assert!(matches!(
            validate_page(&page(&good), Lsn(lsn.0 + 8), &id()),
            Err(PageError::Misaligned { .. })
        ));
        assert!(matches!(
            check(
                PageHeader {
                    magic: 0xD113,
                    ..good
                },
                lsn
            ),
            PageError::BadMagic { found: 0xD113, .. }
        ));
        assert!(matches!(
            check(PageHeader { info: 0x10, ..good }, lsn),
            PageError::UnknownFlags { unknown: 0x10, .. }
        ));
        let stale = PageHeader {
            pageaddr: Lsn(0xA2000),
            ..header_at(Lsn(0x1A2000))
        };
        let e = check(stale, Lsn(0x1A2000));
        assert_eq!(e.to_string(), "page at 0/001A2000: xlp_pageaddr is 0/000A2000, expected 0/001A2000 (recycled segment?)");
        assert!(matches!(
            check(PageHeader { tli: 2, ..good }, lsn),
            PageError::BadTimeline {
                found: 2,
                expected: 1,
                ..
            }
        ));
        // Long header on a non-first page, short header on a first page.
        let long = header_at(Lsn(SEG)).long;
        assert!(matches!(
            check(PageHeader { long, ..good }, lsn),
            PageError::LongHeaderMismatch { found: true, .. }
        ));
        let first = header_at(Lsn(SEG));
        assert!(matches!(
            check(
                PageHeader {
                    long: None,
                    ..first
                },
                Lsn(SEG)
            ),
            PageError::LongHeaderMismatch { found: false, .. }
        ));
        let l = first.long.unwrap();
        let with = |l: LongPageHeader| PageHeader {
            long: Some(l),
            ..first
        };
        assert!(matches!(
            check(with(LongPageHeader { system_id: 5, ..l }), Lsn(SEG)),
            PageError::BadSystemId { .. }
        ));
        assert!(matches!(
            check(
                with(LongPageHeader {
                    seg_size: 1 << 20,
                    ..l
                }),
                Lsn(SEG)
            ),
            PageError::BadSegSize { .. }
        ));
        assert!(matches!(
            check(
                with(LongPageHeader {
                    block_size: 4096,
                    ..l
                }),
                Lsn(SEG)
            ),
            PageError::BadBlockSize { .. }
        ));
        assert!(!page_belongs_here(&page(&stale), Lsn(0x1A2000), &id()));
        assert!(!page_belongs_here(&[0u8; 8192], Lsn(0x1A2000), &id()));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), page_no in 0u64..4096) {
            let lsn = Lsn(page_no * 8192);
            let _ = PageHeader::parse(&bytes);
            let _ = WalIdentity::from_first_page(&bytes);
            let _ = validate_page(&bytes, lsn, &id());
            let _ = page_belongs_here(&bytes, lsn, &id());
        }

        #[test]
        fn parse_encode_round_trip(magic in any::<u16>(), info in 0u16..16, tli in any::<u32>(), addr in any::<u64>(),
                                   rem in any::<u32>(), sysid in any::<u64>(), seg in any::<u32>(), blk in any::<u32>()) {
            let long = (info & XLP_LONG_HEADER != 0).then_some(LongPageHeader { system_id: sysid, seg_size: seg, block_size: blk });
            let hdr = PageHeader { magic, info, tli, pageaddr: Lsn(addr), rem_len: rem, long };
            let mut buf = [0u8; 40];
            hdr.encode(&mut buf);
            prop_assert_eq!(PageHeader::parse(&buf), Ok(hdr));
        }
    }
}
