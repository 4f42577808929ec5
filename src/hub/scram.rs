//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL runs it
//! (`auth-scram.c`): the user name comes from the startup packet (the client sends `n=`), no
//! channel binding is offered (a client over TLS says `y`: "I could, the server cannot"), and the
//! replication password file holds plain `user:password` lines, from which a salted verifier is
//! derived once at start-up. Pure computation: no I/O.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The mechanism name, as offered in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PBKDF2 iterations of a derived verifier (PostgreSQL's default `scram_iterations`).
pub const ITERATIONS: u32 = 4096;
/// Bytes of salt and of the server's nonce (PostgreSQL: 16 and 18).
const SALT_BYTES: usize = 16;
const SERVER_NONCE_BYTES: usize = 18;
/// Longest password file accepted.
const PASSWORD_FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client's message does not follow RFC 5802: a protocol violation.
    #[error("malformed SCRAM message: {0}")]
    Malformed(String),
    /// The client asked for channel binding, which the hub does not offer.
    #[error("the client requires SCRAM channel binding (SCRAM-SHA-256-PLUS), which walship does not offer; use channel_binding=prefer or disable")]
    ChannelBindingRequired,
    /// The proof does not match: wrong password (or unknown user).
    #[error("the client's proof does not match")]
    WrongProof,
}

/// What the server keeps of a password: salt, iterations, StoredKey and ServerKey.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} iterations)", self.iterations)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (32 bytes), RFC 5802's `Hi()`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

impl Verifier {
    /// Derives the verifier of `password` (printable ASCII: SASLprep leaves it unchanged, so
    /// libpq's normalisation and ours agree).
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// Equal in constant time (for equal lengths).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One authentication exchange, server side.
#[derive(Debug)]
pub struct ScramServer {
    verifier: Verifier,
    /// False for an unknown user: the exchange runs to the end (as PostgreSQL's mock
    /// authentication does, so a client cannot tell a missing user from a wrong password) and fails.
    real: bool,
    server_nonce: String,
    state: State,
}

#[derive(Debug)]
enum State {
    AwaitClientFirst,
    AwaitClientFinal { gs2_header: String, client_first_bare: String, server_first: String, nonce: String },
    Done,
}

impl ScramServer {
    /// `verifier` None: an unknown user (a random verifier that nothing matches).
    pub fn new(verifier: Option<Verifier>, random: &[u8; 48]) -> ScramServer {
        let server_nonce = B64.encode(&random[..SERVER_NONCE_BYTES]);
        let real = verifier.is_some();
        let verifier = verifier.unwrap_or_else(|| Verifier {
            salt: random[SERVER_NONCE_BYTES..SERVER_NONCE_BYTES + SALT_BYTES].to_vec(),
            iterations: ITERATIONS,
            stored_key: random[16..48].try_into().expect("32 bytes"),
            server_key: [0; 32],
        });
        ScramServer { verifier, real, server_nonce, state: State::AwaitClientFirst }
    }

    /// A server with a fixed nonce (for the RFC test vector).
    #[cfg(test)]
    fn with_nonce(verifier: Verifier, server_nonce: &str) -> ScramServer {
        ScramServer { verifier, real: true, server_nonce: server_nonce.into(), state: State::AwaitClientFirst }
    }

    /// client-first-message -> server-first-message.
    pub fn client_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let malformed = |why: &str| ScramError::Malformed(why.into());
        if !matches!(self.state, State::AwaitClientFirst) {
            return Err(malformed("client-first-message out of order"));
        }
        let text = std::str::from_utf8(message).map_err(|_| malformed("client-first-message is not UTF-8"))?;
        // gs2-header = cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or_else(|| malformed("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingRequired),
            _ => return Err(malformed("unknown channel binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or_else(|| malformed("GS2 header not terminated"))?;
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(malformed("bad authorization identity"));
        }
        let gs2_header = format!("{flag},{authzid},");
        let mut attrs = bare.split(',');
        // The user name is ignored, as PostgreSQL does: the startup packet's user counts.
        let user = attrs.next().unwrap_or("");
        if !user.starts_with("n=") {
            return Err(malformed("expected n= (user name)"));
        }
        let client_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or_else(|| malformed("expected r= (client nonce)"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7E).contains(&b) && b != b',') {
            return Err(malformed("the client nonce must be printable ASCII without commas"));
        }
        if attrs.any(|a| a.starts_with("m=")) {
            return Err(malformed("mandatory extensions are not supported"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&self.verifier.salt), self.verifier.iterations);
        self.state = State::AwaitClientFinal { gs2_header, client_first_bare: bare.to_string(), server_first: server_first.clone(), nonce };
        Ok(server_first)
    }

    /// client-final-message -> server-final-message (`v=...`), or why the client failed.
    pub fn client_final(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let malformed = |why: &str| ScramError::Malformed(why.into());
        let State::AwaitClientFinal { gs2_header, client_first_bare, server_first, nonce } = std::mem::replace(&mut self.state, State::Done) else {
            return Err(malformed("client-final-message out of order"));
        };
        let text = std::str::from_utf8(message).map_err(|_| malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or_else(|| malformed("no proof (p=)"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or_else(|| malformed("expected c= (channel binding)"))?;
        let binding = B64.decode(binding).map_err(|_| malformed("c= is not base64"))?;
        if binding != gs2_header.as_bytes() {
            return Err(malformed("the channel binding does not repeat the GS2 header"));
        }
        let their_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or_else(|| malformed("expected r= (nonce)"))?;
        if their_nonce != nonce {
            return Err(malformed("the nonce does not match the one the server sent"));
        }
        let proof = B64.decode(proof).map_err(|_| malformed("p= is not base64"))?;
        if proof.len() != 32 {
            return Err(malformed("the proof is not 32 bytes"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_signature).map(|(p, s)| p ^ s).collect();
        let stored_key: [u8; 32] = Sha256::digest(&client_key).into();
        if !same(&stored_key, &self.verifier.stored_key) || !self.real {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read --replication-password-file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("--replication-password-file {path} line {line}: {why}")]
    Line { path: PathBuf, line: usize, why: String },
    #[error("--replication-password-file {path} holds no user (expected `user:password` lines)")]
    Empty { path: PathBuf },
    #[error("--replication-password-file {path} is larger than {PASSWORD_FILE_BYTES_MAX} bytes")]
    TooLarge { path: PathBuf },
    #[error("no random bytes from the OS for a salt: {0}")]
    Random(String),
}

/// The users allowed to stream from the hub, each with a verifier derived at load.
#[derive(Debug, Clone)]
pub struct Users {
    by_name: HashMap<String, Verifier>,
}

impl Users {
    /// Reads `user:password` lines (`#` comments and blank lines skipped; the password is the
    /// rest of the line after the first `:`, printable ASCII).
    pub fn load(path: &Path) -> Result<Users, PasswordFileError> {
        let read = |source| PasswordFileError::Read { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > PASSWORD_FILE_BYTES_MAX {
            return Err(PasswordFileError::TooLarge { path: path.to_path_buf() });
        }
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the replication password file is readable by group or others; chmod 600 it");
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Users::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Users, PasswordFileError> {
        let mut by_name = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let err = |why: &str| PasswordFileError::Line { path: path.to_path_buf(), line: i + 1, why: why.into() };
            let (user, password) = line.split_once(':').ok_or_else(|| err("expected `user:password`"))?;
            if user.is_empty() || password.is_empty() {
                return Err(err("the user and the password must not be empty"));
            }
            if !password.bytes().all(|b| (0x20..=0x7E).contains(&b)) {
                return Err(err("the password must be printable ASCII (SASLprep would change other characters)"));
            }
            if by_name.contains_key(user) {
                return Err(err("this user is listed twice"));
            }
            let mut salt = [0u8; SALT_BYTES];
            getrandom::fill(&mut salt).map_err(|e| PasswordFileError::Random(e.to_string()))?;
            by_name.insert(user.to_string(), Verifier::derive(password, &salt, ITERATIONS));
        }
        if by_name.is_empty() {
            return Err(PasswordFileError::Empty { path: path.to_path_buf() });
        }
        Ok(Users { by_name })
    }

    pub fn verifier(&self, user: &str) -> Option<Verifier> {
        self.by_name.get(user).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    #[test]
    fn rfc_7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = Verifier::derive("pencil", &salt, 4096);
        let mut s = ScramServer::with_nonce(v, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        let server_first = s.client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(server_first, "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        let server_final = s
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(server_final, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    /// Against an independent client (the `postgres-protocol` crate's, which tokio-postgres uses):
    /// the right password passes and the client accepts our server signature; a wrong one and an
    /// unknown user fail the same way.
    fn exchange(server_password: Option<&str>, client_password: &str, cbind: bool) -> Result<(), ScramError> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let verifier = server_password.map(|p| Verifier::derive(p, b"0123456789abcdef", ITERATIONS));
        let mut random = [0u8; 48];
        getrandom::fill(&mut random).unwrap();
        let mut server = ScramServer::new(verifier, &random);
        let binding = if cbind { ChannelBinding::unsupported() } else { ChannelBinding::unrequested() };
        let mut client = ScramSha256::new(client_password.as_bytes(), binding);
        let server_first = server.client_first(client.message())?;
        client.update(server_first.as_bytes()).expect("client takes server-first");
        let server_final = server.client_final(client.message())?;
        client.finish(server_final.as_bytes()).expect("the client verifies the server's signature");
        Ok(())
    }

    #[test]
    fn an_independent_client_authenticates_only_with_the_right_password() {
        exchange(Some("s3cret pass"), "s3cret pass", false).unwrap();
        exchange(Some("s3cret pass"), "s3cret pass", true).unwrap();
        assert_eq!(exchange(Some("s3cret pass"), "wrong", false), Err(ScramError::WrongProof));
        assert_eq!(exchange(None, "anything", false), Err(ScramError::WrongProof));
    }

    #[test]
    fn malformed_and_channel_binding_requests_are_refused() {
        let v = Verifier::derive("pw", b"salt", 16);
        let mut s = ScramServer::with_nonce(v.clone(), "N");
        assert_eq!(s.client_first(b"p=tls-server-end-point,,n=,r=abc"), Err(ScramError::ChannelBindingRequired));
        for bad in [&b"n,,r=abc"[..], b"x,,n=,r=abc", b"n,,n=,r=", b"n,,n=,r=a\x01", b"n,,n=,r=abc,m=ext", b"n", b"\xff"] {
            let mut s = ScramServer::with_nonce(v.clone(), "N");
            assert!(matches!(s.client_first(bad), Err(ScramError::Malformed(_))), "{bad:?}");
        }
        // The GS2 header must be repeated in c=, the nonce must be the combined one, the proof 32 bytes.
        for bad in [&b"c=eSws,r=abcN,p=AAAA"[..], b"c=biws,r=abcX,p=AAAA", b"c=biws,r=abcN,p=AAAA", b"c=biws,r=abcN"] {
            let mut s = ScramServer::with_nonce(v.clone(), "N");
            s.client_first(b"n,,n=,r=abc").unwrap();
            assert!(matches!(s.client_final(bad), Err(ScramError::Malformed(_))), "{bad:?}");
        }
        // Out of order.
        let mut s = ScramServer::with_nonce(v, "N");
        assert!(matches!(s.client_final(b"c=biws,r=abcN,p=AAAA"), Err(ScramError::Malformed(_))));
    }

    #[test]
    fn the_password_file_is_checked_line_by_line() {
        let p = Path::new("pw");
        let users = Users::parse("# standbys\nrep:a:b c\n\nother:x\n", p).unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verifier("rep").is_some() && users.verifier("nobody").is_none());
        for (bad, why) in [("rep\n", "user:password"), ("rep:\n", "empty"), ("rep:pässword\n", "ASCII"), ("a:1\na:2\n", "twice")] {
            let e = Users::parse(bad, p).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("line"), "{bad:?}: {e}");
        }
        assert!(matches!(Users::parse("# nothing\n", p), Err(PasswordFileError::Empty { .. })));
    }
}
