//! Fuzz target: `decode_control` on arbitrary Hello and Welcome bodies (with correct frame CRCs, so the body
//! parsers see every input) must never panic; whatever decodes re-encodes to the same frame; another protocol
//! version is always reported as `VersionMismatch`; Hellos and Welcomes built from arbitrary field values
//! survive an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wire::{
    decode_control, FrameHeader, FrameKind, Hello, Limits, Message, Welcome, WireError, FRAME_HEADER_LEN,
    PROTOCOL_VERSION, SENDER_NAME_BYTES_MAX,
};

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn check_raw(kind: FrameKind, body: &[u8]) {
    let header = FrameHeader::control(kind, body);
    let checked = match FrameHeader::decode(&header.encode(), &Limits::default()) {
        Ok(h) => h,
        Err(WireError::BodyTooLong { .. }) => return,
        Err(e) => panic!("a correct control header must decode: {e}"),
    };
    match decode_control(&checked, body) {
        Ok(msg) => {
            assert_eq!(msg.kind(), kind);
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(&out[..FRAME_HEADER_LEN], &header.encode()[..]);
            assert_eq!(&out[FRAME_HEADER_LEN..], body, "decoded body must re-encode to the same bytes");
        }
        Err(e) => {
            if body.len() >= 2 && u16_at(body, 0) != PROTOCOL_VERSION {
                assert!(matches!(e, WireError::VersionMismatch { .. }), "other version gave {e:?}");
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, body)) = input.split_first() else {
        return;
    };
    // 1. The body bytes as is, as a Hello and as a Welcome; with the version patched to ours half the time so
    //    the layout checks after the version are reached.
    let mut patched = body.to_vec();
    if sel & 1 == 1 && patched.len() >= 2 {
        patched[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    }
    check_raw(FrameKind::Hello, &patched);
    check_raw(FrameKind::Welcome, &patched);

    // 2. Structured: arbitrary field values, encode, decode, compare.
    if body.len() >= 48 {
        let first = u64_at(body, 24);
        let horizon = u64_at(body, 32);
        let name_len = usize::from(body[40]).min(SENDER_NAME_BYTES_MAX).min(body.len() - 41);
        let name = String::from_utf8_lossy(&body[41..41 + name_len]).into_owned();
        let mut name = name;
        while name.len() > SENDER_NAME_BYTES_MAX {
            name.pop();
        }
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            page_magic: u16_at(body, 0),
            timeline: u32_at(body, 2),
            system_id: u64_at(body, 6),
            seg_size: u32_at(body, 14),
            block_size: u32_at(body, 18),
            first_lsn: first.min(horizon),
            horizon_lsn: first.max(horizon),
            sender_name: name,
            history: String::new(),
        };
        let msg = Message::Hello(hello);
        let mut out = Vec::new();
        msg.encode(&mut out);
        let mut raw = [0u8; FRAME_HEADER_LEN];
        raw.copy_from_slice(&out[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&raw, &Limits::default()).expect("own Hello header decodes");
        assert_eq!(decode_control(&h, &out[FRAME_HEADER_LEN..]).expect("own Hello decodes"), msg);

        let welcome = Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            timeline: u32_at(body, 2),
            system_id: u64_at(body, 6),
            durable_lsn: u64_at(body, 24),
        });
        let mut out = Vec::new();
        welcome.encode(&mut out);
        raw.copy_from_slice(&out[..FRAME_HEADER_LEN]);
        let h = FrameHeader::decode(&raw, &Limits::default()).expect("own Welcome header decodes");
        assert_eq!(decode_control(&h, &out[FRAME_HEADER_LEN..]).expect("own Welcome decodes"), welcome);
    }
});
