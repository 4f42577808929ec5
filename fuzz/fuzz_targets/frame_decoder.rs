//! Fuzz target: arbitrary bytes fed to `wire::Decoder` in arbitrary splits must never panic, must keep the
//! buffer within its bound, and must give the same messages and error as feeding everything at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wire::{Decoder, FrameHeader, FrameKind, Limits, Message, WireError};

/// Feeds `bytes` in chunks whose sizes come from `splits` (cycled; empty = as much as fits), never more than
/// `room()`, draining after every feed.
fn run(bytes: &[u8], splits: &[u8], limits: Limits) -> (Vec<Message>, Option<WireError>) {
    let mut d = Decoder::new(limits);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let want = if splits.is_empty() {
            bytes.len()
        } else {
            usize::from(splits[i % splits.len()]) + 1
        };
        // Callers must not feed more than room(): overflow is split-dependent by design.
        let n = want.min(bytes.len() - at).min(d.room());
        i += 1;
        d.feed(&bytes[at..at + n]);
        at += n;
        loop {
            match d.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(d.next_message(), Err(e.clone()), "error must be stable");
                    d.feed(&bytes[at..]);
                    assert_eq!(
                        d.next_message(),
                        Err(e.clone()),
                        "error must survive more input"
                    );
                    return (out, Some(e));
                }
            }
        }
        assert!(d.buffered_len() <= d.buffered_max());
        // After draining, at least one more whole frame always fits.
        assert!(d.room() > d.buffered_max() / 2);
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many split-size bytes follow (0..=15); then the split sizes; then the stream.
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let n = usize::from(n & 15).min(rest.len());
    let (splits, bytes) = rest.split_at(n);
    // A small Data limit so the fuzzer reaches BodyTooLong and whole Data frames cheaply.
    let limits = Limits {
        data_body_bytes_max: 512,
    };
    let whole = run(bytes, &[], limits);
    let split = run(bytes, splits, limits);
    assert_eq!(
        whole, split,
        "result must not depend on how the input is split"
    );

    // Second stream: the same bytes read as `kind u8 | len u8 | body` pieces, framed with correct CRCs, so
    // the fuzzer reaches the body parsers through the decoder without forging CRCs.
    let framed = frame_pieces(bytes);
    let whole = run(&framed, &[], limits);
    let split = run(&framed, splits, limits);
    assert_eq!(
        whole, split,
        "result must not depend on how the input is split"
    );
    for m in &whole.0 {
        let mut out = Vec::new();
        m.encode(&mut out);
        assert!(
            framed.windows(out.len()).any(|w| w == out),
            "decoded message must re-encode to its frame"
        );
    }
});

fn frame_pieces(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [k, len, rest @ ..] = bytes {
        let n = usize::from(*len).min(rest.len());
        let (body, tail) = rest.split_at(n);
        bytes = tail;
        let Some(kind) = FrameKind::from_u8(k % 8 + 1) else {
            return out;
        };
        let header = match kind {
            FrameKind::Data => FrameHeader::data(u64::from(*k) << 8, body),
            _ => FrameHeader::control(kind, body),
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(body);
    }
    out
}
