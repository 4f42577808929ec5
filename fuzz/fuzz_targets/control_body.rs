//! Fuzz target: `FrameHeader::decode` + `decode_control` on arbitrary bytes must never panic, and whatever
//! decodes must re-encode to exactly the input frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wire::{decode_control, FrameHeader, FrameKind, Limits, FRAME_HEADER_LEN};

fuzz_target!(|input: &[u8]| {
    if input.len() < FRAME_HEADER_LEN {
        return;
    }
    let (head, body) = input.split_at(FRAME_HEADER_LEN);
    let mut raw = [0u8; FRAME_HEADER_LEN];
    raw.copy_from_slice(head);
    let limits = Limits::default();
    // Raw path: header exactly as given (the fuzzer must forge both CRCs to get further).
    if let Ok(header) = FrameHeader::decode(&raw, &limits) {
        if let Ok(msg) = decode_control(&header, body) {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out, input, "decoded frame must re-encode to the same bytes");
        }
    }
    // Assisted path: byte 4 picks the kind, CRCs computed, so the body parsers get arbitrary bodies.
    let Some(kind) = FrameKind::from_u8(raw[4] % 8 + 1) else {
        return;
    };
    let header = if kind == FrameKind::Data {
        FrameHeader::data(u64::from(raw[5]), body)
    } else {
        FrameHeader::control(kind, body)
    };
    if let Ok(checked) = FrameHeader::decode(&header.encode(), &limits) {
        assert_eq!(checked, header);
        if let Ok(msg) = decode_control(&checked, body) {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(
                &out[FRAME_HEADER_LEN..],
                body,
                "decoded body must re-encode to the same bytes"
            );
        }
    }
});
