//! Fuzz target: the replication client's parsers of what a PostgreSQL server sends (backend
//! framing with its length bound, authentication requests, ErrorResponse, DataRow, CopyData 'w'/'k')
//! must never panic on any bytes, and framing never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::recv::from_pg::proto;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((tag, body, used))) = proto::split_message(rest, 1 << 16) {
        assert!(used <= rest.len() && used == body.len() + 5);
        match tag {
            b'R' => drop(proto::parse_auth(body)),
            b'E' | b'N' => drop(proto::parse_error(tag, body)),
            b'D' => drop(proto::parse_data_row(body)),
            _ => drop(proto::parse_copy_data(body)),
        }
        rest = &rest[used..];
    }
    let _ = proto::parse_auth(data);
    let _ = proto::parse_error(b'E', data);
    let _ = proto::parse_data_row(data);
    if let Ok(proto::ReplMessage::XLogData { start, data: wal, .. }) = proto::parse_copy_data(data) {
        assert!(start.0.checked_add(wal.len() as u64).is_some());
    }
});
