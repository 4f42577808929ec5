//! Fuzz target: `PageHeader::parse`, `WalIdentity::from_first_page` and `validate_page` on arbitrary bytes
//! must never panic; a header that validates must agree with what was asked (magic, pageaddr, timeline, long
//! header iff segment start), and every parsed header must survive an encode/parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wal::{validate_page, Lsn, PageHeader, WalIdentity, LONG_PAGE_HEADER_LEN, XLP_LONG_HEADER};

fuzz_target!(|input: &[u8]| {
    // Bytes 0..16 choose the identity and page position; the rest is the page.
    if input.len() < 16 {
        let _ = PageHeader::parse(input);
        let _ = WalIdentity::from_first_page(input);
        return;
    }
    let (ctl, page) = input.split_at(16);
    let seg_size = 1u64 << (20 + ctl[0] % 11); // 1 MiB..1 GiB
    let block_size = 1u64 << (10 + ctl[1] % 7); // 1 KiB..64 KiB
    let magic = u16::from_le_bytes([ctl[2], ctl[3]]);
    let tli = u32::from(ctl[4] % 4);
    let system_id = u64::from(u32::from_le_bytes([ctl[5], ctl[6], ctl[7], ctl[8]]));
    // Page LSN: sometimes a segment start, sometimes a page inside, sometimes misaligned.
    let raw = u64::from_le_bytes([ctl[8], ctl[9], ctl[10], ctl[11], ctl[12], ctl[13], ctl[14], ctl[15]]);
    let page_lsn = match ctl[9] % 3 {
        0 => Lsn((raw % 4096) * seg_size),
        1 => Lsn((raw % (1 << 40)) / block_size * block_size),
        _ => Lsn(raw),
    };
    let id = WalIdentity { system_id, seg_size, block_size, magic, tli };

    let parsed = PageHeader::parse(page);
    if let Ok(h) = parsed {
        assert_eq!(h.long.is_some(), h.info & XLP_LONG_HEADER != 0);
        let mut out = [0u8; LONG_PAGE_HEADER_LEN];
        h.encode(&mut out);
        let again = PageHeader::parse(&out[..h.header_len()]).expect("encoded header parses");
        assert_eq!(again, h, "encode/parse round trip");
    }
    if let Ok(first) = WalIdentity::from_first_page(page) {
        assert!(first.seg_size.is_power_of_two() && first.block_size.is_power_of_two());
    }
    match validate_page(page, page_lsn, &id) {
        Ok(h) => {
            assert_eq!(Ok(h), parsed, "validate_page must return what parse returns");
            assert_eq!(h.magic, magic);
            assert_eq!(h.pageaddr, page_lsn);
            // Pages of ancestor timelines are valid (a new timeline starts with a copy of them).
            assert!(h.tli >= 1 && h.tli <= tli, "tli {} accepted for identity tli {tli}", h.tli);
            assert_eq!(page_lsn.0 % block_size, 0);
            assert_eq!(h.long.is_some(), page_lsn.0 % seg_size == 0);
            if let Some(l) = h.long {
                assert_eq!(l.system_id, system_id);
                assert_eq!(u64::from(l.seg_size), seg_size);
                assert_eq!(u64::from(l.block_size), block_size);
            }
        }
        Err(_) => {}
    }
});
