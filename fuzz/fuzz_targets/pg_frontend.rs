//! Fuzz target: the WAL hub's parsers of what a standby sends (startup packet, framed frontend
//! messages, SASL, replication commands, CopyData status messages, SCRAM client messages) must
//! never panic on arbitrary bytes, however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::hub::proto::{parse_command, parse_sasl_initial, parse_standby_message, parse_startup, query_text, MessageBuffer};
use walship::hub::scram::{ScramServer, Verifier};

fuzz_target!(|input: &[u8]| {
    let cut = input.first().map_or(0, |&b| b as usize).min(input.len());
    let mut startup = MessageBuffer::default();
    startup.extend(&input[..cut]);
    let _ = startup.next_startup();
    startup.extend(&input[cut..]);
    if let Ok(Some(body)) = startup.next_startup() {
        let _ = parse_startup(&body);
    }
    let mut messages = MessageBuffer::default();
    messages.extend(&input[..cut]);
    messages.extend(&input[cut..]);
    while let Ok(Some(m)) = messages.next_message(1 << 16) {
        match m.kind {
            b'Q' => {
                if let Ok(text) = query_text(&m.body) {
                    let _ = parse_command(text);
                }
            }
            b'p' => {
                let _ = parse_sasl_initial(&m.body);
            }
            b'd' => {
                let _ = parse_standby_message(&m.body);
            }
            _ => {}
        }
    }
    let mut scram = ScramServer::new(Some(Verifier::derive("pw", b"salt", 2)), &[7u8; 48]);
    if scram.client_first(&input[..cut]).is_ok() {
        let _ = scram.client_final(&input[cut..]);
    }
});
