//! TLS towards PostgreSQL for `--from-postgres`, as libpq's `sslmode` and `sslrootcert`: the
//! SSLRequest (8 bytes; the server answers one byte, 'S' or 'N'), then a rustls handshake on the
//! same TCP stream, then the crate's TLS pump so the replication conversation reads and writes
//! plaintext on a Unix socket as before.
//!
//! What is checked, as libpq does: verify-full checks the chain against sslrootcert and the host
//! name; verify-ca checks the chain only; require, prefer and allow check the chain when a root
//! certificate file exists (sslrootcert, PGSSLROOTCERT or ~/.postgresql/root.crt) and nothing
//! otherwise. TLS 1.3 only (the crate's rustls provider); SCRAM channel binding is not offered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::conninfo::{ConnInfo, SslMode};

/// The SSLRequest code: 1234 << 16 | 5679.
const SSL_REQUEST_CODE: u32 = 80_877_103;

/// The 8-byte SSLRequest: length 8, then the request code.
pub fn ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8u32.to_be_bytes());
    b[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    b
}

/// Why TLS towards the server could not be set up or was refused.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("sslrootcert {path}: {why}")]
    RootCert { path: PathBuf, why: String },
    #[error(
        "sslmode={mode} needs a root certificate to check the server's against, and {path} does not exist; give sslrootcert=FILE \
         (PEM), or a weaker sslmode"
    )]
    NoRootCert { mode: &'static str, path: String },
    #[error("host {host:?} cannot be checked against a certificate: {why}")]
    ServerName { host: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// How a connection's TLS is to be done, built from the conninfo.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// What the server's certificate is checked against, for messages.
    pub checks: String,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("server_name", &self.server_name).field("checks", &self.checks).finish()
    }
}

/// What the chain and name checks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

pub fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

impl PgTls {
    /// The TLS set-up for `ci`, or `None` when no TLS is ever tried (sslmode=disable, or a Unix
    /// socket, over which libpq never uses TLS either).
    pub fn from_conninfo(ci: &ConnInfo) -> Result<Option<PgTls>, PgTlsError> {
        if ci.sslmode == SslMode::Disable || ci.unix_socket().is_some() {
            return Ok(None);
        }
        let roots = match &ci.sslrootcert {
            Some(path) if path.exists() || ci.sslrootcert_given => Some(load_roots(path)?),
            _ => None,
        };
        let check = match (ci.sslmode, roots.is_some()) {
            (SslMode::VerifyFull, true) => Check::ChainAndName,
            (SslMode::VerifyCa, true) => Check::Chain,
            (SslMode::VerifyFull | SslMode::VerifyCa, false) => {
                let path = ci.sslrootcert.as_ref().map_or("~/.postgresql/root.crt".to_string(), |p| p.display().to_string());
                return Err(PgTlsError::NoRootCert { mode: mode_name(ci.sslmode), path });
            }
            (_, true) => Check::Chain,
            (_, false) => Check::Nothing,
        };
        let provider = crate::tls::crypto_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            Some(roots) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| PgTlsError::Config(e.to_string()))?;
                Arc::new(Verifier { webpki: Some(webpki), check_name: check == Check::ChainAndName, provider: Arc::clone(&provider) })
            }
            None => Arc::new(Verifier { webpki: None, check_name: false, provider: Arc::clone(&provider) }),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PgTlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let server_name =
            ServerName::try_from(ci.host.clone()).map_err(|e| PgTlsError::ServerName { host: ci.host.clone(), why: e.to_string() })?;
        let root = ci.sslrootcert.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let checks = match check {
            Check::Nothing => "nothing (no root certificate: the server's certificate is not checked)".to_string(),
            Check::Chain => format!("the chain against sslrootcert={root}"),
            Check::ChainAndName => format!("the chain against sslrootcert={root} and the host name {:?}", ci.host),
        };
        Ok(Some(PgTls { config: Arc::new(config), server_name, checks }))
    }

    /// The handshake on `tcp` (after the server's 'S'), bounded by `timeout`; then the pump.
    /// Returns the plaintext end, or why the handshake failed and whether that is the server's
    /// certificate (not worth retrying) or the connection.
    pub fn handshake(&self, tcp: TcpStream, peer: SocketAddr, timeout: Duration) -> Result<UnixStream, (bool, String)> {
        let mut conn = ClientConnection::new(Arc::clone(&self.config), self.server_name.clone()).map_err(|e| (true, e.to_string()))?;
        let _ = tcp.set_read_timeout(Some(timeout));
        let _ = tcp.set_write_timeout(Some(timeout));
        let mut io = &tcp;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut io) {
                // Tell the server why (the alert rustls queued, e.g. an unknown CA).
                while conn.wants_write() && conn.write_tls(&mut io).is_ok_and(|n| n > 0) {}
                let certificate = e.kind() == std::io::ErrorKind::InvalidData;
                let why = if certificate { format!("{e} (sslmode checks {})", self.checks) } else { e.to_string() };
                return Err((certificate, why));
            }
        }
        crate::tls::pump_client(tcp, peer, conn).map_err(|e| (false, format!("cannot start the TLS pump: {e}")))
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, PgTlsError> {
    let err = |why: String| PgTlsError::RootCert { path: path.into(), why };
    let text = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&text).collect::<Result<Vec<_>, _>>().map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no certificate (expected PEM \"-----BEGIN CERTIFICATE-----\")".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| err(format!("holds a certificate rustls cannot use: {e}")))?;
    }
    Ok(roots)
}

/// libpq's checks: the chain (when there are roots), the name (verify-full only). The handshake
/// signature is always checked, so the server holds the certificate's key.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends the SSLRequest and reads the server's one-byte answer: `true` for 'S' (go on with TLS),
/// `false` for 'N'. Reads exactly one byte, so nothing the server sent in plaintext can be taken
/// as coming through TLS.
pub fn request_ssl(tcp: &TcpStream) -> std::io::Result<Result<bool, String>> {
    let mut s = tcp;
    s.write_all(&ssl_request())?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer)?;
    Ok(match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        // A server too old for SSLRequest answers with an ErrorResponse.
        b'E' => Err("an error instead of an answer to the SSLRequest (a server that does not know TLS?)".into()),
        other => Err(format!("{:?} in answer to the SSLRequest (expected 'S' or 'N')", other as char)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssl_request_is_postgres_own() {
        // 00 00 00 08 04 d2 16 2f, as in PostgreSQL's pqcomm.h (NEGOTIATE_SSL_CODE = 1234 << 16 | 5679).
        assert_eq!(ssl_request(), [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    }

    fn ci(s: &str) -> ConnInfo {
        let env = super::super::conninfo::Env { var: |_| None, os_user: Some("u".into()), home: None };
        ConnInfo::parse(s, &env).unwrap()
    }

    #[test]
    fn modes_map_to_checks() {
        assert!(PgTls::from_conninfo(&ci("host=db sslmode=disable")).unwrap().is_none());
        assert!(PgTls::from_conninfo(&ci("host=/run/pg sslmode=verify-full")).unwrap().is_none(), "no TLS over a Unix socket, as libpq");
        let t = PgTls::from_conninfo(&ci("host=db sslmode=require")).unwrap().unwrap();
        assert!(t.checks.starts_with("nothing"), "{}", t.checks);
        let e = PgTls::from_conninfo(&ci("host=db sslmode=verify-full")).unwrap_err().to_string();
        assert!(e.contains("verify-full") && e.contains("root.crt"), "{e}");
        let e = PgTls::from_conninfo(&ci("host=db sslmode=verify-ca sslrootcert=/nonexistent/ca.pem")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let ck = rcgen::generate_simple_self_signed(vec!["db".to_string()]).unwrap();
        std::fs::write(&ca, ck.cert.pem()).unwrap();
        let t = PgTls::from_conninfo(&ci(&format!("host=db sslmode=verify-full sslrootcert={}", ca.display()))).unwrap().unwrap();
        assert!(t.checks.contains("host name"), "{}", t.checks);
        let t = PgTls::from_conninfo(&ci(&format!("host=db sslmode=require sslrootcert={}", ca.display()))).unwrap().unwrap();
        assert!(t.checks.starts_with("the chain"), "require with a root certificate checks the chain, as libpq: {}", t.checks);
        std::fs::write(&ca, "not pem").unwrap();
        assert!(PgTls::from_conninfo(&ci(&format!("host=db sslmode=verify-ca sslrootcert={}", ca.display()))).is_err());
    }
}
