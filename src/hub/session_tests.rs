//! The hub over a real socket with a protocol client written from PostgreSQL's documentation
//! (and `postgres-protocol`'s SCRAM client): authentication, commands, live streaming woken by
//! `publish_flushed`, the end of a historic timeline, and PostgreSQL's errors. The walreceiver of a
//! real PostgreSQL is exercised by tests/pg_hub.rs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::proto::MessageBuffer;
use super::*;
use crate::wal::gen::{generate, GenOptions};
use crate::wal::WalFileName;

const SEG: u64 = 16 << 20;

struct Client {
    s: TcpStream,
    buf: MessageBuffer,
}

/// Fields of an ErrorResponse: (code letter, value).
fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let nul = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((code, String::from_utf8_lossy(&tail[..nul]).to_string()));
        rest = &tail[(nul + 1).min(tail.len())..];
    }
    out
}

fn field(body: &[u8], code: u8) -> String {
    error_fields(body).into_iter().find(|(c, _)| *c == code).map(|(_, v)| v).unwrap_or_default()
}

impl Client {
    fn send(&mut self, kind: u8, body: &[u8]) {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        self.s.write_all(&m).unwrap();
    }

    fn recv(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(m) = self.buf.next_message(64 << 20).unwrap() {
                return (m.kind, m.body);
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from the hub");
            assert!(n > 0, "the hub closed the connection");
            self.buf.extend(&chunk[..n]);
        }
    }

    /// Start-up and SCRAM; Err(message) when the hub refuses.
    fn connect(addr: SocketAddr, params: &[(&str, &str)], password: &str) -> Result<Client, (String, String)> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s, buf: MessageBuffer::default() };
        c.s.write_all(&super::proto::startup_bytes(3 << 16, params)).unwrap();
        let refused = |body: &[u8]| (field(body, b'C'), field(body, b'M'));
        let (k, b) = c.recv();
        if k == b'E' {
            return Err(refused(&b));
        }
        assert_eq!((k, &b[..4]), (b'R', &10u32.to_be_bytes()[..]), "AuthenticationSASL");
        assert_eq!(&b[4..], b"SCRAM-SHA-256\0\0");
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut first = b"SCRAM-SHA-256\0".to_vec();
        first.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
        first.extend_from_slice(scram.message());
        c.send(b'p', &first);
        let (k, b) = c.recv();
        if k == b'E' {
            return Err(refused(&b));
        }
        assert_eq!((k, &b[..4]), (b'R', &11u32.to_be_bytes()[..]));
        scram.update(&b[4..]).unwrap();
        let msg = scram.message().to_vec();
        c.send(b'p', &msg);
        let (k, b) = c.recv();
        if k == b'E' {
            return Err(refused(&b));
        }
        assert_eq!((k, &b[..4]), (b'R', &12u32.to_be_bytes()[..]));
        scram.finish(&b[4..]).expect("the hub proves it knows the password too");
        let mut seen = Vec::new();
        loop {
            let (k, b) = c.recv();
            seen.push(k);
            if k == b'S' && b.starts_with(b"server_version\0") {
                assert!(b.ends_with(b")\0") && b[15..].starts_with(b"15.0 (walship"), "{:?}", String::from_utf8_lossy(&b));
            }
            if k == b'Z' {
                break;
            }
        }
        assert_eq!(&seen[..1], b"R", "AuthenticationOk first");
        assert!(seen.contains(&b'K') && seen.contains(&b'S'));
        Ok(c)
    }

    /// A simple query's messages up to ReadyForQuery or CopyBothResponse.
    fn query(&mut self, text: &str) -> Vec<(u8, Vec<u8>)> {
        let mut q = text.as_bytes().to_vec();
        q.push(0);
        self.send(b'Q', &q);
        self.until(|k| k == b'Z' || k == b'W')
    }

    fn until(&mut self, last: impl Fn(u8) -> bool) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let m = self.recv();
            let done = last(m.0);
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Collects XLogData until `end`; returns the bytes and checks they are contiguous from `start`.
    fn wal_until(&mut self, start: u64, end: u64) -> Vec<u8> {
        let mut wal = Vec::new();
        while start + (wal.len() as u64) < end {
            let (k, b) = self.recv();
            assert_eq!(k, b'd', "CopyData, got {}", k as char);
            if b[0] == b'k' {
                continue;
            }
            assert_eq!(b[0], b'w');
            let data_start = u64::from_be_bytes(b[1..9].try_into().unwrap());
            let wal_end = u64::from_be_bytes(b[9..17].try_into().unwrap());
            assert_eq!(data_start, start + wal.len() as u64, "contiguous");
            assert!(data_start + (b.len() as u64 - 25) <= wal_end, "walEnd covers the data");
            assert!(b.len() - 25 <= 128 << 10, "bounded by the message limit");
            wal.extend_from_slice(&b[25..]);
        }
        assert_eq!(start + wal.len() as u64, end, "nothing past the limit");
        wal
    }

    /// Text cells of the one DataRow among `msgs`.
    fn row(msgs: &[(u8, Vec<u8>)]) -> Vec<Option<String>> {
        let (_, b) = msgs.iter().find(|(k, _)| *k == b'D').expect("a DataRow");
        let n = u16::from_be_bytes(b[..2].try_into().unwrap());
        let mut at = 2;
        (0..n)
            .map(|_| {
                let len = i32::from_be_bytes(b[at..at + 4].try_into().unwrap());
                at += 4;
                if len < 0 {
                    return None;
                }
                let v = String::from_utf8_lossy(&b[at..at + len as usize]).to_string();
                at += len as usize;
                Some(v)
            })
            .collect()
    }

    fn error(msgs: &[(u8, Vec<u8>)]) -> (String, String) {
        let (_, b) = msgs.iter().find(|(k, _)| *k == b'E').unwrap_or_else(|| panic!("an ErrorResponse in {:?}", msgs.iter().map(|m| m.0 as char).collect::<String>()));
        (field(b, b'C'), field(b, b'M'))
    }
}

fn config() -> HubConfig {
    HubConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        users: scram::Users::parse("rep:right-password\n", Path::new("pw")).unwrap(),
        tls: None,
        require_tls: false,
        keepalive_interval: Duration::from_millis(300),
        standby_timeout: Duration::from_secs(20),
        message_bytes_max: 128 << 10,
        standbys_max: 4,
        metrics: HubMetrics::default(),
    }
}

const PARAMS: &[(&str, &str)] = &[("user", "rep"), ("database", "replication"), ("replication", "true"), ("application_name", "t1")];

/// Timeline 1 from segment 1 to 0x2400000; timeline 2 forks at 0x2100000 and holds segment 2.
fn two_timelines(dir: &Path) -> (WalIdentity, Lsn) {
    let one = GenOptions { dir: dir.to_path_buf(), wal_bytes: 20 << 20, ..GenOptions::default() };
    generate(&one).unwrap();
    let two = GenOptions { dir: dir.to_path_buf(), tli: 2, start_segno: 2, wal_bytes: 4 << 20, seed: 2, ..GenOptions::default() };
    generate(&two).unwrap();
    let switch = Lsn(0x210_0000);
    std::fs::write(dir.join("00000002.history"), format!("1\t{switch}\tno recovery target specified\n")).unwrap();
    (two.identity(), switch)
}

fn segment_bytes(dir: &Path, tli: u32, segno: u64) -> Vec<u8> {
    std::fs::read(dir.join(WalFileName::Segment { tli, segno }.file_name(SEG))).unwrap()
}

#[test]
fn a_client_authenticates_streams_live_and_crosses_a_timeline_end() {
    let dir = tempfile::tempdir().unwrap();
    let (id, switch) = two_timelines(dir.path());
    let handle = start(&config(), dir.path()).unwrap();
    let hub = Arc::clone(&handle.hub);
    let flushed = Lsn(0x218_0000);
    hub.publish_identity(id, flushed);

    let mut c = Client::connect(handle.addr, PARAMS, "right-password").unwrap();
    let msgs = c.query("IDENTIFY_SYSTEM");
    assert_eq!(Client::row(&msgs), vec![Some(id.system_id.to_string()), Some("2".into()), Some(flushed.to_string()), None]);
    let msgs = c.query("TIMELINE_HISTORY 2");
    assert_eq!(Client::row(&msgs)[1].as_deref(), Some(format!("1\t{switch}\tno recovery target specified\n").as_str()));
    assert_eq!(Client::error(&c.query("TIMELINE_HISTORY 3")).0, "58P01");
    assert_eq!(Client::row(&c.query("SHOW wal_segment_size"))[0].as_deref(), Some("16MB"));

    // Timeline 1 is history: streamed to its switch point, then CopyDone and the next timeline.
    let msgs = c.query("START_REPLICATION 0/1000000 TIMELINE 1");
    assert_eq!(msgs.last().unwrap().0, b'W');
    let wal = c.wal_until(SEG, switch.0);
    let mut want = segment_bytes(dir.path(), 1, 1);
    want.extend_from_slice(&segment_bytes(dir.path(), 1, 2)[..(switch.0 - 2 * SEG) as usize]);
    assert!(wal == want, "the bytes of timeline 1's files");
    let (k, _) = c.until(|k| k == b'c').pop().unwrap();
    assert_eq!(k, b'c', "CopyDone at the end of the historic timeline");
    c.send(b'c', &[]);
    let msgs = c.until(|k| k == b'Z');
    assert_eq!(Client::row(&msgs), vec![Some("2".into()), Some(switch.to_string())]);
    assert!(msgs.iter().any(|(k, b)| *k == b'C' && b == b"START_STREAMING\0"));
    assert_eq!(Client::error(&c.query("START_REPLICATION 0/2200000 TIMELINE 1")).0, "55000", "past the fork");
    assert_eq!(Client::error(&c.query("START_REPLICATION 0/0 TIMELINE 2")).1, "requested WAL segment 000000020000000000000000 has already been removed");
    assert_eq!(Client::error(&c.query("START_REPLICATION SLOT s 0/2000000 TIMELINE 2")).0, "42704");

    // The live timeline: up to flushed, then woken by publish_flushed (not the keepalive timer).
    assert_eq!(c.query("START_REPLICATION 0/2000000 TIMELINE 2").last().unwrap().0, b'W');
    let wal = c.wal_until(2 * SEG, flushed.0);
    assert!(wal[..] == segment_bytes(dir.path(), 2, 2)[..(flushed.0 - 2 * SEG) as usize]);
    let t0 = Instant::now();
    hub.publish_flushed(Lsn(0x220_0000));
    let more = c.wal_until(flushed.0, 0x220_0000);
    assert_eq!(more.len(), 0x8_0000);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Keepalives come on their own, and at once when asked for.
    let (k, b) = c.recv();
    assert_eq!((k, b[0]), (b'd', b'k'));
    let mut status = vec![b'r'];
    for v in [0x220_0000u64, 0x21F_0000, 0x21E_0000, 0] {
        status.extend_from_slice(&v.to_be_bytes());
    }
    status.push(1);
    c.send(b'd', &status);
    let (k, b) = c.recv();
    assert_eq!((k, b[0]), (b'd', b'k'));
    let deadline = Instant::now() + Duration::from_secs(5);
    while hub.standbys()[0].replay != Lsn(0x21E_0000) {
        assert!(Instant::now() < deadline, "the standby's reply is recorded: {:?}", hub.standbys());
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = &hub.standbys()[0];
    assert_eq!((st.write, st.flush, st.sent, st.state, st.application_name.as_str()), (Lsn(0x220_0000), Lsn(0x21F_0000), Lsn(0x220_0000), "streaming", "t1"));
    // The standby ends the stream: CopyDone back, CommandComplete, ready for the next command.
    c.send(b'c', &[]);
    let msgs = c.until(|k| k == b'Z');
    assert!(msgs.iter().any(|(k, _)| *k == b'c') && msgs.iter().any(|(k, b)| *k == b'C' && b == b"START_STREAMING\0"));
    assert!(!msgs.iter().any(|(k, _)| *k == b'D'), "no next timeline on the live one");
    assert_eq!(Client::error(&c.query("BASE_BACKUP")).0, "0A000");
    c.send(b'X', &[]);
    drop(handle);
}

#[test]
fn a_live_stream_ends_at_the_switch_point_when_the_upstream_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let (id, switch) = two_timelines(dir.path());
    let history = std::fs::read(dir.path().join("00000002.history")).unwrap();
    std::fs::remove_file(dir.path().join("00000002.history")).unwrap();
    let handle = start(&config(), dir.path()).unwrap();
    let hub = Arc::clone(&handle.hub);
    hub.publish_identity(WalIdentity { tli: 1, ..id }, Lsn(0x200_0000));
    let mut c = Client::connect(handle.addr, PARAMS, "right-password").unwrap();
    assert_eq!(c.query("START_REPLICATION 0/1000000 TIMELINE 1").last().unwrap().0, b'W');
    c.wal_until(SEG, 0x200_0000);
    // The receiver moves on to timeline 2 (history file first, as the receive loop does).
    std::fs::write(dir.path().join("00000002.history"), history).unwrap();
    hub.publish_identity(id, Lsn(0x200_0000));
    c.wal_until(0x200_0000, switch.0);
    let (k, _) = c.until(|k| k == b'c').pop().unwrap();
    assert_eq!(k, b'c');
    c.send(b'c', &[]);
    assert_eq!(Client::row(&c.until(|k| k == b'Z')), vec![Some("2".into()), Some(switch.to_string())]);
}

#[test]
fn refusals_are_postgresql_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (id, _) = two_timelines(dir.path());
    let handle = start(&config(), dir.path()).unwrap();
    handle.hub.publish_identity(id, Lsn(0x218_0000));
    let e = Client::connect(handle.addr, PARAMS, "wrong").err().unwrap();
    assert_eq!(e, ("28P01".into(), "password authentication failed for user \"rep\"".into()));
    let nobody = [("user", "nobody"), ("replication", "true")];
    let e = Client::connect(handle.addr, &nobody, "right-password").err().unwrap();
    assert_eq!(e, ("28P01".into(), "password authentication failed for user \"nobody\"".into()));
    let e = Client::connect(handle.addr, &[("user", "rep"), ("database", "postgres")], "right-password").err().unwrap();
    assert_eq!(e.0, "0A000");
    let e = Client::connect(handle.addr, &[("user", "rep"), ("replication", "database")], "right-password").err().unwrap();
    assert!(e.1.contains("logical replication is not supported"), "{e:?}");
    // SSLRequest without TLS configured: 'N', then a plain start-up works.
    let mut s = TcpStream::connect(handle.addr).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    // Garbage instead of a startup packet: a FATAL protocol violation, the hub stays up.
    let mut s = TcpStream::connect(handle.addr).unwrap();
    s.write_all(&[0xff; 16]).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'));
    assert_eq!(field(&reply[5..], b'C'), "08P01");
    Client::connect(handle.addr, PARAMS, "right-password").unwrap();
}
