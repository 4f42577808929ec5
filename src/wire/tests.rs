//! Tests for the wire protocol: round-trips, every validation error, split-invariance, arbitrary input.

use super::*;
use proptest::prelude::*;

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        page_magic: 0xD110,
        timeline: 1,
        system_id: 0x1234_5678_9abc_def0,
        seg_size: 16 << 20,
        block_size: 8192,
        first_lsn: 0x1_0000_0000,
        horizon_lsn: 0x1_0200_0000,
        sender_name: "primary-ü".to_owned(),
        history: String::new(),
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(hello()),
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            timeline: 3,
            system_id: 0,
            durable_lsn: 0,
        }),
        Message::Data {
            lsn: 0x1_0000_0028,
            payload: (0..=255u8).collect(),
        },
        Message::Ack(Ack {
            written_lsn: 100,
            flushed_lsn: 100,
            time_us: 1_700_000_000_000_000,
        }),
        Message::Keepalive(Keepalive {
            time_us: 42,
            reply_requested: true,
        }),
        Message::Keepalive(Keepalive {
            time_us: 0,
            reply_requested: false,
        }),
        Message::Error(ErrorFrame {
            code: ErrorCode::Gap,
            message: "need 0/1000000".to_owned(),
        }),
        Message::Error(ErrorFrame {
            code: ErrorCode::Unknown(77),
            message: String::new(),
        }),
    ]
}

fn encode(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

/// Decodes exactly one message from `bytes` with default limits, requiring no leftovers.
fn decode_one(bytes: &[u8]) -> Result<Message, WireError> {
    let mut d = Decoder::new(Limits::default());
    d.feed(bytes);
    let m = d.next_message()?.expect("a whole frame");
    assert_eq!(d.buffered_len(), 0);
    assert_eq!(d.next_message(), Ok(None));
    Ok(m)
}

/// A header with arbitrary field values and a correct header CRC.
fn raw_header(
    kind: u8,
    flags: u8,
    res_a: u16,
    body_len: u32,
    body_crc: u32,
    lsn: u64,
    res_b: u32,
) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(b"WSHP");
    h[4] = kind;
    h[5] = flags;
    h[6..8].copy_from_slice(&res_a.to_le_bytes());
    h[8..12].copy_from_slice(&body_len.to_le_bytes());
    h[12..16].copy_from_slice(&body_crc.to_le_bytes());
    h[16..24].copy_from_slice(&lsn.to_le_bytes());
    h[24..28].copy_from_slice(&res_b.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A whole frame of `kind` with `body`, correct CRCs, lsn 0.
fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut v = FrameHeader::control(kind, body).encode().to_vec();
    v.extend_from_slice(body);
    v
}

fn bad_body(r: Result<Message, WireError>, kind: FrameKind, needle: &str) {
    match r {
        Err(WireError::BadBody { kind: k, why }) => {
            assert_eq!(k, kind);
            assert!(why.contains(needle), "{why:?} should contain {needle:?}");
        }
        other => panic!("expected BadBody({kind}, ..{needle}..), got {other:?}"),
    }
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        let bytes = encode(&m);
        assert_eq!(decode_one(&bytes), Ok(m.clone()), "{m:?}");
        let h = FrameHeader::decode(bytes[..32].try_into().unwrap(), &Limits::default()).unwrap();
        assert_eq!(h.kind, m.kind());
        assert_eq!(h.body_len as usize, bytes.len() - 32);
    }
}

#[test]
fn header_layout_is_as_specified() {
    let payload = b"abc";
    let h = FrameHeader::data(0x0102_0304_0506_0708, payload);
    let b = h.encode();
    assert_eq!(&b[0..4], b"WSHP");
    assert_eq!(b[4], 3);
    assert_eq!(&b[5..8], &[0, 0, 0]);
    assert_eq!(&b[8..12], &3u32.to_le_bytes());
    assert_eq!(&b[12..16], &crc32c::crc32c(payload).to_le_bytes());
    assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[24..28], &[0, 0, 0, 0]);
    assert_eq!(&b[28..32], &crc32c::crc32c(&b[0..28]).to_le_bytes());
    // Ack body layout: written, flushed, time.
    let ack = encode(&Message::Ack(Ack {
        written_lsn: 9,
        flushed_lsn: 8,
        time_us: 7,
    }));
    assert_eq!(&ack[32..40], &9u64.to_le_bytes());
    assert_eq!(&ack[40..48], &8u64.to_le_bytes());
    assert_eq!(&ack[48..56], &7u64.to_le_bytes());
    // Empty body: crc32c of nothing.
    assert_eq!(
        FrameHeader::control(FrameKind::Ack, &[]).body_crc,
        crc32c::crc32c(&[])
    );
}

#[test]
fn header_bad_magic() {
    let mut h = FrameHeader::control(FrameKind::Ack, &[]).encode();
    h[0..4].copy_from_slice(b"GET ");
    let e = FrameHeader::decode(&h, &Limits::default()).unwrap_err();
    assert_eq!(e, WireError::BadMagic { found: *b"GET " });
    let s = e.to_string();
    assert!(s.contains("WSHP") && s.contains("GET "), "{s}");
}

#[test]
fn header_bad_crc() {
    let mut h = FrameHeader::data(5, b"x").encode();
    h[16] ^= 1; // lsn changed, crc not updated
    match FrameHeader::decode(&h, &Limits::default()) {
        Err(WireError::HeaderCrc { expected, found }) => {
            assert_eq!(expected, u32::from_le_bytes(h[28..32].try_into().unwrap()));
            assert_eq!(found, crc32c::crc32c(&h[0..28]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_field_errors() {
    let l = Limits::default();
    let d = |h: [u8; 32]| FrameHeader::decode(&h, &l);
    assert_eq!(
        d(raw_header(0, 0, 0, 0, 0, 0, 0)),
        Err(WireError::UnknownKind(0))
    );
    assert_eq!(
        d(raw_header(9, 0, 0, 0, 0, 0, 0)),
        Err(WireError::UnknownKind(9))
    );
    assert_eq!(
        d(raw_header(4, 1, 0, 0, 0, 0, 0)),
        Err(WireError::BadFlags(1))
    );
    assert_eq!(
        d(raw_header(4, 0, 2, 0, 0, 0, 0)),
        Err(WireError::BadReserved {
            offset: 6,
            found: 2
        })
    );
    assert_eq!(
        d(raw_header(4, 0, 0, 0, 0, 0, 9)),
        Err(WireError::BadReserved {
            offset: 24,
            found: 9
        })
    );
    assert_eq!(
        d(raw_header(4, 0, 0, 0, 0, 5, 0)),
        Err(WireError::UnexpectedLsn {
            kind: FrameKind::Ack,
            found: 5
        })
    );
    assert_eq!(
        d(raw_header(3, 0, 0, 0, 0, 5, 0)),
        Err(WireError::EmptyData)
    );
    assert_eq!(
        d(raw_header(3, 0, 0, 2, 0, u64::MAX - 1, 0)),
        Err(WireError::LsnOverflow {
            lsn: u64::MAX - 1,
            len: 2
        })
    );
    // Exactly at the end of the LSN space is fine.
    assert!(d(raw_header(3, 0, 0, 1, 0, u64::MAX - 1, 0)).is_ok());
}

#[test]
fn header_body_too_long() {
    let l = Limits::new(1000).unwrap();
    let d = |h: [u8; 32]| FrameHeader::decode(&h, &l);
    assert!(d(raw_header(3, 0, 0, 1000, 0, 0, 0)).is_ok());
    assert_eq!(
        d(raw_header(3, 0, 0, 1001, 0, 0, 0)),
        Err(WireError::BodyTooLong {
            kind: FrameKind::Data,
            len: 1001,
            max: 1000
        })
    );
    assert!(d(raw_header(1, 0, 0, 4096, 0, 0, 0)).is_ok());
    assert_eq!(
        d(raw_header(1, 0, 0, 4097, 0, 0, 0)),
        Err(WireError::BodyTooLong {
            kind: FrameKind::Hello,
            len: 4097,
            max: 4096
        })
    );
    // A configured limit above the ceiling is clamped to it.
    let huge = Limits {
        data_body_bytes_max: u32::MAX,
    };
    assert_eq!(
        FrameHeader::decode(&raw_header(3, 0, 0, (64 << 20) + 1, 0, 0, 0), &huge),
        Err(WireError::BodyTooLong {
            kind: FrameKind::Data,
            len: (64 << 20) + 1,
            max: 64 << 20
        })
    );
    // The decoder rejects on the header alone, without waiting for the body.
    let mut dec = Decoder::new(l);
    dec.feed(&raw_header(3, 0, 0, 1001, 0, 0, 0));
    assert!(matches!(
        dec.next_message(),
        Err(WireError::BodyTooLong { .. })
    ));
}

#[test]
fn limits_new_checks_range() {
    assert!(Limits::new(0).is_err());
    assert!(Limits::new(DATA_BODY_BYTES_MAX_LIMIT + 1).is_err());
    assert_eq!(
        Limits::new(DATA_BODY_BYTES_MAX_LIMIT)
            .unwrap()
            .data_body_bytes_max,
        64 << 20
    );
    assert_eq!(Limits::default().data_body_bytes_max, 8 << 20);
}

#[test]
fn body_crc_and_len_errors() {
    let h = FrameHeader::data(0x500, b"hello");
    assert_eq!(h.verify_body(b"hello"), Ok(()));
    assert_eq!(
        h.verify_body(b"hellO"),
        Err(WireError::BodyCrc {
            lsn: 0x500,
            expected: crc32c::crc32c(b"hello"),
            found: crc32c::crc32c(b"hellO")
        })
    );
    assert_eq!(
        h.verify_body(b"hell"),
        Err(WireError::BodyLen {
            kind: FrameKind::Data,
            expected: 5,
            found: 4
        })
    );
    let mut bytes = encode(&Message::Data {
        lsn: 0x500,
        payload: b"hello".to_vec(),
    });
    bytes[32] ^= 0x20;
    assert!(matches!(
        decode_one(&bytes),
        Err(WireError::BodyCrc { lsn: 0x500, .. })
    ));
    let s = decode_one(&bytes).unwrap_err().to_string();
    assert!(s.contains("0x500") && s.contains("expected crc32c"), "{s}");
}

#[test]
fn ack_flushed_above_written_is_rejected() {
    let mut body = Vec::new();
    body.extend_from_slice(&10u64.to_le_bytes());
    body.extend_from_slice(&11u64.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    bad_body(
        decode_one(&frame(FrameKind::Ack, &body)),
        FrameKind::Ack,
        "flushed_lsn <= written_lsn",
    );
    // And encode refuses to produce one.
    let ack = Message::Ack(Ack {
        written_lsn: 10,
        flushed_lsn: 11,
        time_us: 0,
    });
    let mut out = Vec::new();
    assert!(matches!(
        ack.try_encode(&mut out, &Limits::default()),
        Err(WireError::Unencodable { .. })
    ));
    assert!(out.is_empty());
}

#[test]
fn hello_first_above_horizon_is_rejected() {
    let mut h = hello();
    h.first_lsn = h.horizon_lsn + 1;
    let mut bytes = Vec::new();
    Message::Hello(hello()).encode(&mut bytes);
    // Patch first_lsn (body offset 24) and fix both CRCs.
    let mut body = bytes[32..].to_vec();
    body[24..32].copy_from_slice(&h.first_lsn.to_le_bytes());
    bad_body(
        decode_one(&frame(FrameKind::Hello, &body)),
        FrameKind::Hello,
        "first_lsn <= horizon_lsn",
    );
}

fn hello_body(name: &[u8], name_len: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    Message::Hello(Hello {
        sender_name: String::new(),
        history: String::new(),
        ..hello()
    })
    .encode(&mut bytes);
    // Drop the empty name (len u16) and the empty history (len u16), then append ours.
    let mut body = bytes[32..bytes.len() - 4].to_vec();
    body.extend_from_slice(&name_len.to_le_bytes());
    body.extend_from_slice(name);
    body.extend_from_slice(&0u16.to_le_bytes());
    body
}

#[test]
fn non_utf8_strings_are_rejected() {
    let body = hello_body(&[b'a', 0xff, b'b'], 3);
    bad_body(
        decode_one(&frame(FrameKind::Hello, &body)),
        FrameKind::Hello,
        "UTF-8",
    );
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(&[0xc3, 0x28]);
    bad_body(
        decode_one(&frame(FrameKind::Error, &body)),
        FrameKind::Error,
        "UTF-8",
    );
}

#[test]
fn overlong_strings_are_rejected() {
    let name = vec![b'n'; 256];
    let body = hello_body(&name, 256);
    bad_body(
        decode_one(&frame(FrameKind::Hello, &body)),
        FrameKind::Hello,
        "length <= 255",
    );
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&1025u16.to_le_bytes());
    body.extend_from_slice(&[b'm'; 1025]);
    bad_body(
        decode_one(&frame(FrameKind::Error, &body)),
        FrameKind::Error,
        "length <= 1024",
    );
    // Maximum lengths are fine.
    let m = Message::Error(ErrorFrame {
        code: ErrorCode::Io,
        message: "x".repeat(1024),
    });
    assert_eq!(decode_one(&encode(&m)), Ok(m));
    let m = Message::Hello(Hello {
        sender_name: "y".repeat(255),
        history: String::new(),
        ..hello()
    });
    assert_eq!(decode_one(&encode(&m)), Ok(m));
    // Encoding too long a name is refused.
    let m = Message::Hello(Hello {
        sender_name: "y".repeat(256),
        history: String::new(),
        ..hello()
    });
    assert!(m.try_encode(&mut Vec::new(), &Limits::default()).is_err());
}

#[test]
#[should_panic(expected = "sender_name")]
fn encode_panics_on_unrepresentable_message() {
    Message::Hello(Hello {
        sender_name: "y".repeat(256),
        history: String::new(),
        ..hello()
    })
    .encode(&mut Vec::new());
}

#[test]
fn truncated_bodies_are_rejected() {
    for m in all_messages() {
        if m.kind() == FrameKind::Data {
            continue;
        }
        let bytes = encode(&m);
        let body = &bytes[32..];
        for cut in 0..body.len() {
            let r = decode_one(&frame(m.kind(), &body[..cut]));
            match r {
                Err(WireError::BadBody { kind, ref why }) => {
                    assert_eq!(kind, m.kind());
                    assert!(why.contains("truncated"), "{m:?} cut {cut}: {why}");
                }
                other => panic!("{m:?} cut at {cut}: expected truncated, got {other:?}"),
            }
        }
    }
}

#[test]
fn trailing_garbage_in_body_is_rejected() {
    for m in all_messages() {
        if m.kind() == FrameKind::Data {
            continue;
        }
        let mut body = encode(&m)[32..].to_vec();
        body.push(0);
        bad_body(
            decode_one(&frame(m.kind(), &body)),
            m.kind(),
            "trailing bytes",
        );
    }
}

#[test]
fn bad_field_values_in_bodies() {
    // Keepalive reply_requested must be 0 or 1.
    let mut body = 5u64.to_le_bytes().to_vec();
    body.push(2);
    bad_body(
        decode_one(&frame(FrameKind::Keepalive, &body)),
        FrameKind::Keepalive,
        "0 or 1",
    );
    // Welcome reserved must be 0.
    let w = Message::Welcome(Welcome {
        protocol_version: 1,
        timeline: 1,
        system_id: 1,
        durable_lsn: 1,
    });
    let mut body = encode(&w)[32..].to_vec();
    body[2] = 1;
    bad_body(
        decode_one(&frame(FrameKind::Welcome, &body)),
        FrameKind::Welcome,
        "reserved",
    );
}

#[test]
fn version_mismatch_is_reported_first() {
    assert_eq!(check_version(1), Ok(()));
    assert_eq!(
        check_version(2),
        Err(WireError::VersionMismatch { ours: 1, theirs: 2 })
    );
    // A v2 Hello with a different (here: longer) layout reports the version, not the layout.
    let mut body = 2u16.to_le_bytes().to_vec();
    body.extend_from_slice(&[0u8; 100]);
    assert_eq!(
        decode_one(&frame(FrameKind::Hello, &body)),
        Err(WireError::VersionMismatch { ours: 1, theirs: 2 })
    );
    let mut body = 9u16.to_le_bytes().to_vec();
    body.extend_from_slice(&[0u8; 3]);
    assert_eq!(
        decode_one(&frame(FrameKind::Welcome, &body)),
        Err(WireError::VersionMismatch { ours: 1, theirs: 9 })
    );
}

#[test]
fn error_codes_map_both_ways() {
    for (code, n) in [
        (ErrorCode::Protocol, 1),
        (ErrorCode::Identity, 2),
        (ErrorCode::Gap, 3),
        (ErrorCode::Corrupt, 4),
        (ErrorCode::Io, 5),
        (ErrorCode::Shutdown, 6),
        (ErrorCode::Auth, 7),
        (ErrorCode::Other, 255),
    ] {
        assert_eq!(code.code(), n);
        assert_eq!(ErrorCode::from_code(n), code);
    }
    assert_eq!(ErrorCode::from_code(0), ErrorCode::Unknown(0));
    assert_eq!(ErrorCode::from_code(8), ErrorCode::Unknown(8));
    assert_eq!(ErrorCode::from_code(u16::MAX).code(), u16::MAX);
}

#[test]
fn data_limits_on_encode() {
    let l = Limits::new(4).unwrap();
    let ok = Message::Data {
        lsn: 0,
        payload: vec![1; 4],
    };
    assert!(ok.try_encode(&mut Vec::new(), &l).is_ok());
    let big = Message::Data {
        lsn: 0,
        payload: vec![1; 5],
    };
    assert!(big.try_encode(&mut Vec::new(), &l).is_err());
    let empty = Message::Data {
        lsn: 0,
        payload: vec![],
    };
    assert!(empty.try_encode(&mut Vec::new(), &l).is_err());
    let wrap = Message::Data {
        lsn: u64::MAX,
        payload: vec![1],
    };
    assert!(wrap.try_encode(&mut Vec::new(), &l).is_err());
}

#[test]
fn decoder_yields_nothing_until_whole_and_stays_failed() {
    let bytes = encode(&Message::Data {
        lsn: 7,
        payload: vec![9; 100],
    });
    let mut d = Decoder::new(Limits::default());
    for b in &bytes[..bytes.len() - 1] {
        d.feed(std::slice::from_ref(b));
        assert_eq!(d.next_message(), Ok(None));
    }
    assert_eq!(d.buffered_len(), bytes.len() - 1);
    d.feed(&bytes[bytes.len() - 1..]);
    assert_eq!(
        d.next_message(),
        Ok(Some(Message::Data {
            lsn: 7,
            payload: vec![9; 100]
        }))
    );
    assert_eq!(d.buffered_len(), 0);
    // Garbage: fails, and stays failed with the same error even after more valid input.
    d.feed(b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX");
    let e = d.next_message().unwrap_err();
    assert_eq!(e, WireError::BadMagic { found: *b"XXXX" });
    d.feed(&bytes);
    assert_eq!(d.next_message(), Err(e.clone()));
    assert_eq!(d.error(), Some(&e));
    assert_eq!(d.buffered_len(), 0);
}

#[test]
fn decoder_buffer_is_bounded() {
    let l = Limits::new(100).unwrap();
    let mut d = Decoder::new(l);
    let max = d.buffered_max();
    assert_eq!(max, 2 * (32 + 4096));
    assert_eq!(d.room(), max);
    d.feed(&vec![0u8; max]); // exactly the cap is accepted
    assert_eq!(d.buffered_len(), max);
    let mut d = Decoder::new(l);
    d.feed(&vec![0u8; max - 10]);
    d.feed(&[0u8; 11]);
    assert_eq!(
        d.next_message(),
        Err(WireError::BufferOverflow {
            buffered: max + 1,
            max
        })
    );
    assert_eq!(d.buffered_len(), 0);
    // Draining after each feed keeps the buffer small however much is streamed.
    let mut d = Decoder::new(l);
    let frame = encode(&Message::Data {
        lsn: 0,
        payload: vec![1; 100],
    });
    for _ in 0..10_000 {
        d.feed(&frame);
        assert!(matches!(d.next_message(), Ok(Some(_))));
        assert_eq!(d.next_message(), Ok(None));
    }
}

#[test]
fn error_display_names_expected_and_found() {
    let cases: Vec<WireError> = vec![
        WireError::UnknownKind(9),
        WireError::BadFlags(2),
        WireError::BadReserved {
            offset: 6,
            found: 1,
        },
        WireError::HeaderCrc {
            expected: 1,
            found: 2,
        },
        WireError::BodyTooLong {
            kind: FrameKind::Data,
            len: 10,
            max: 5,
        },
        WireError::EmptyData,
        WireError::VersionMismatch { ours: 1, theirs: 2 },
        WireError::BufferOverflow {
            buffered: 10,
            max: 5,
        },
    ];
    for e in cases {
        let s = e.to_string();
        assert!(s.contains("expected") && s.contains("found"), "{s}");
    }
}

// ---- property tests ----

fn arb_message() -> impl Strategy<Value = Message> {
    let hello = (
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_flat_map(|t| {
            (
                "\\PC{0,60}".prop_filter("<= 255 bytes", |s| s.len() <= 255),
                Just(t),
            )
        })
        .prop_map(|(name, (pm, tl, sys, seg, blk, a, b))| {
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                page_magic: pm,
                timeline: tl,
                system_id: sys,
                seg_size: seg,
                block_size: blk,
                first_lsn: a.min(b),
                horizon_lsn: a.max(b),
                sender_name: name,
                history: String::new(),
            })
        });
    let welcome = (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(t, s, d)| {
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            timeline: t,
            system_id: s,
            durable_lsn: d,
        })
    });
    let data = (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..300)).prop_map(
        |(lsn, payload)| {
            let lsn = lsn.min(u64::MAX - payload.len() as u64);
            Message::Data { lsn, payload }
        },
    );
    let ack = (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, t)| {
        Message::Ack(Ack {
            written_lsn: a.max(b),
            flushed_lsn: a.min(b),
            time_us: t,
        })
    });
    let keepalive = (any::<u64>(), any::<bool>()).prop_map(|(t, r)| {
        Message::Keepalive(Keepalive {
            time_us: t,
            reply_requested: r,
        })
    });
    let error = (any::<u16>(), "\\PC{0,40}").prop_map(|(c, m)| {
        Message::Error(ErrorFrame {
            code: ErrorCode::from_code(c),
            message: m,
        })
    });
    let auth = (1u8..=3, any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(step, nonce, mac)| {
        let step = match step {
            1 => AuthStep::Challenge,
            2 => AuthStep::Response,
            _ => AuthStep::Proof,
        };
        Message::Auth(Auth { step, nonce, mac })
    });
    let backup = ("[0-9A-F]{24}\\.[0-9A-F]{8}\\.backup", "\\PC{0,200}")
        .prop_map(|(name, content)| Message::BackupFile(BackupFile { name, content }));
    prop_oneof![hello, welcome, data, ack, keepalive, error, auth, backup]
}

/// Feeds `bytes` in chunks of the given sizes (cycled), never more than `room()`, draining after each feed.
/// Returns the messages and the final outcome (None = ran out of input cleanly).
fn run_split(
    bytes: &[u8],
    chunks: &[usize],
    limits: Limits,
) -> (Vec<Message>, Option<WireError>, usize) {
    let mut d = Decoder::new(limits);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    let mut err = None;
    'outer: while at < bytes.len() {
        let n = chunks[i % chunks.len()]
            .max(1)
            .min(bytes.len() - at)
            .min(d.room());
        i += 1;
        d.feed(&bytes[at..at + n]);
        at += n;
        loop {
            match d.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => {
                    // Stable: asking again gives the same error, feeding more changes nothing.
                    assert_eq!(d.next_message(), Err(e.clone()));
                    d.feed(&bytes[at..]);
                    assert_eq!(d.next_message(), Err(e.clone()));
                    err = Some(e);
                    break 'outer;
                }
            }
        }
        assert!(d.buffered_len() <= d.buffered_max());
        // After draining, at least one more whole frame always fits.
        assert!(d.room() > d.buffered_max() / 2);
    }
    (out, err, d.buffered_len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn messages_survive_any_split(
        msgs in proptest::collection::vec(arb_message(), 0..12),
        chunks in proptest::collection::vec(1usize..64, 1..20),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode(&mut bytes);
        }
        let (got, err, left) = run_split(&bytes, &chunks, Limits::default());
        prop_assert_eq!(err, None);
        prop_assert_eq!(left, 0);
        prop_assert_eq!(got, msgs.clone());
        // One byte at a time, too.
        let (got1, err1, _) = run_split(&bytes, &[1], Limits::default());
        prop_assert_eq!(err1, None);
        prop_assert_eq!(got1, msgs);
    }

    #[test]
    fn long_streams_fed_by_room_survive_small_limits(
        msgs in proptest::collection::vec(arb_message(), 50..100),
        chunks in proptest::collection::vec(1usize..5000, 1..5),
    ) {
        // Streams longer than the buffer cap (2 x (32 + 4096) here), fed as much as fits each time.
        let limits = Limits::new(300).unwrap();
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode(&mut bytes);
        }
        let (got, err, left) = run_split(&bytes, &[usize::MAX], limits);
        prop_assert_eq!((err, left), (None, 0));
        prop_assert_eq!(&got, &msgs);
        let (got, err, _) = run_split(&bytes, &chunks, limits);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_split_does_not_matter(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunks in proptest::collection::vec(1usize..80, 1..10),
    ) {
        let whole = run_split(&bytes, &[bytes.len().max(1)], Limits::default());
        let split = run_split(&bytes, &chunks, Limits::default());
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn corrupted_streams_fail_the_same_way_in_any_split(
        msgs in proptest::collection::vec(arb_message(), 1..6),
        flip_at in any::<prop::sample::Index>(),
        flip_bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        chunks in proptest::collection::vec(1usize..50, 1..10),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode(&mut bytes);
        }
        let i = flip_at.index(bytes.len());
        bytes[i] ^= 1 << flip_bit;
        bytes.truncate(cut.index(bytes.len() + 1));
        let whole = run_split(&bytes, &[bytes.len().max(1)], Limits::default());
        let split = run_split(&bytes, &chunks, Limits::default());
        // Every single-bit flip is caught by a CRC or a field check if the frame is whole: no message
        // differs from what was sent.
        for m in &whole.0 {
            prop_assert!(msgs.contains(m), "decoded a message that was never sent: {:?}", m);
        }
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn control_body_decode_never_panics(kind in 1u8..=6, lsn in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let kind = FrameKind::from_u8(kind).unwrap();
        let header = FrameHeader { kind, flags: 0, body_len: body.len() as u32, body_crc: crc32c::crc32c(&body), lsn };
        let r = decode_control(&header, &body);
        if let (Ok(m), false) = (r, kind == FrameKind::Data) {
            // Whatever decodes re-encodes to the same body.
            let mut out = Vec::new();
            m.encode(&mut out);
            prop_assert_eq!(&out[32..], &body[..]);
        }
    }
}

/// A refusal of who we are, what we hold or how we speak ends the sender, in the handshake and
/// while streaming alike; the peer's own trouble is worth a reconnect.
#[test]
fn only_refusals_are_fatal() {
    for code in [ErrorCode::Protocol, ErrorCode::Identity, ErrorCode::Gap, ErrorCode::Auth] {
        assert!(code.is_fatal(), "{code:?}");
    }
    for code in [ErrorCode::Corrupt, ErrorCode::Io, ErrorCode::Shutdown, ErrorCode::Other, ErrorCode::Unknown(99)] {
        assert!(!code.is_fatal(), "{code:?}");
    }
}
