//! Who may connect: a shared key and a mutual HMAC-SHA256 challenge-response in the handshake.
//!
//! Receiver -> sender `Challenge(nonce_r)`; sender -> receiver `Response(nonce_s, mac_s)` with
//! `mac_s = HMAC(key, "walship auth v1 sender" | nonce_r | nonce_s | Hello body)`; receiver ->
//! sender `Proof(mac_r)` with `mac_r = HMAC(key, "walship auth v1 receiver" | nonce_s | nonce_r)`.
//! Both nonces are fresh (32 bytes from the OS), so no answer can be replayed; MACs are compared in
//! constant time. The receiver writes nothing before the sender proved itself, and the sender sends
//! no WAL before the receiver proved itself. This authenticates the peers, it does not encrypt:
//! on untrusted networks run walship inside a VPN or SSH/TLS tunnel.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{AUTH_MAC_LEN, AUTH_NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const KEY_BYTES_MIN: usize = 16;
const SENDER_LABEL: &[u8] = b"walship auth v1 sender\0";
const RECEIVER_LABEL: &[u8] = b"walship auth v1 receiver\0";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading auth key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("auth key file {path} holds {len} bytes; at least {KEY_BYTES_MIN} are required (e.g. `head -c 32 /dev/urandom | base64 > {path}`)")]
    TooShort { path: PathBuf, len: usize },
    #[error("no random bytes from the OS for a nonce: {0}")]
    Random(String),
}

/// The shared secret, read from a file (surrounding whitespace ignored).
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    pub fn load(path: &Path) -> Result<AuthKey, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
        let key = bytes.trim_ascii().to_vec();
        if key.len() < KEY_BYTES_MIN {
            return Err(AuthError::TooShort { path: path.to_path_buf(), len: key.len() });
        }
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "auth key file is readable by group or others; chmod 600 it");
            }
        }
        Ok(AuthKey(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> AuthKey {
        AuthKey(bytes.to_vec())
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(p);
        }
        mac
    }

    pub fn sender_mac(&self, nonce_r: &[u8; AUTH_NONCE_LEN], nonce_s: &[u8; AUTH_NONCE_LEN], hello_body: &[u8]) -> [u8; AUTH_MAC_LEN] {
        self.mac(&[SENDER_LABEL, nonce_r, nonce_s, hello_body]).finalize().into_bytes().into()
    }

    pub fn verify_sender(&self, nonce_r: &[u8; AUTH_NONCE_LEN], nonce_s: &[u8; AUTH_NONCE_LEN], hello_body: &[u8], mac: &[u8]) -> bool {
        self.mac(&[SENDER_LABEL, nonce_r, nonce_s, hello_body]).verify_slice(mac).is_ok()
    }

    pub fn receiver_mac(&self, nonce_s: &[u8; AUTH_NONCE_LEN], nonce_r: &[u8; AUTH_NONCE_LEN]) -> [u8; AUTH_MAC_LEN] {
        self.mac(&[RECEIVER_LABEL, nonce_s, nonce_r]).finalize().into_bytes().into()
    }

    pub fn verify_receiver(&self, nonce_s: &[u8; AUTH_NONCE_LEN], nonce_r: &[u8; AUTH_NONCE_LEN], mac: &[u8]) -> bool {
        self.mac(&[RECEIVER_LABEL, nonce_s, nonce_r]).verify_slice(mac).is_ok()
    }
}

/// A fresh nonce from the OS.
pub fn nonce() -> Result<[u8; AUTH_NONCE_LEN], AuthError> {
    let mut n = [0u8; AUTH_NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_key_nonces_and_hello() {
        let k = AuthKey::from_bytes(b"0123456789abcdef0123");
        let other = AuthKey::from_bytes(b"0123456789abcdef0124");
        let (nr, ns) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(nr, ns);
        let mac = k.sender_mac(&nr, &ns, b"hello");
        assert!(k.verify_sender(&nr, &ns, b"hello", &mac));
        assert!(!other.verify_sender(&nr, &ns, b"hello", &mac), "wrong key");
        assert!(!k.verify_sender(&ns, &nr, b"hello", &mac), "swapped nonces");
        assert!(!k.verify_sender(&nr, &ns, b"hellp", &mac), "other hello");
        assert!(!k.verify_sender(&nr, &ns, b"hello", &mac[..31]), "truncated mac");
        let proof = k.receiver_mac(&ns, &nr);
        assert!(k.verify_receiver(&ns, &nr, &proof));
        assert!(!k.verify_receiver(&ns, &nr, &mac), "a sender MAC is no receiver proof");
    }

    #[test]
    fn short_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(AuthKey::load(&p), Err(AuthError::TooShort { len: 5, .. })));
        std::fs::write(&p, "  0123456789abcdef0123\n").unwrap();
        assert!(AuthKey::load(&p).is_ok());
    }
}
