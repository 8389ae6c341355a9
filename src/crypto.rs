//! Keys and sealing.
//!
//! One 32-byte master key (from a key file, or Argon2id over a passphrase)
//! derives two independent keys with HMAC-SHA256 under distinct labels:
//! the store key, which seals records with AES-256-GCM, the audit key,
//! which chains the audit log, and (since 0.2) the manifest key, which
//! binds every store record into the store's sealed manifest. A sealed record is
//! `0x01 || nonce (12 random bytes) || ciphertext || tag`, and its
//! associated data names what it is (kind, path, version), so a record
//! moved to another key, or edited, fails to open.
#![forbid(unsafe_code)]

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::SecretBytes;

pub type HmacSha256 = Hmac<Sha256>;

const SEAL_FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Authentication failed: wrong key, or the record was altered or moved.
    #[error("sealed record failed authentication")]
    Unauthentic,
    #[error("sealed record is malformed")]
    Malformed,
    #[error("no randomness from the OS: {0}")]
    Random(getrandom::Error),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// The 32-byte master key.
pub struct MasterKey(SecretBytes);

impl MasterKey {
    pub const LEN: usize = 32;

    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = zeroize::Zeroizing::new([0u8; Self::LEN]);
        getrandom::fill(&mut k[..]).map_err(CryptoError::Random)?;
        Ok(Self(SecretBytes::copy_from(&k[..])))
    }

    /// `None` unless `bytes` is exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == Self::LEN).then(|| Self(SecretBytes::copy_from(bytes)))
    }

    /// Argon2id (64 MiB, t=3, p=1) over a passphrase.
    pub fn from_passphrase(passphrase: &[u8], salt: &[u8]) -> Result<Self, CryptoError> {
        let params =
            argon2::Params::new(64 * 1024, 3, 1, Some(Self::LEN)).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = zeroize::Zeroizing::new([0u8; Self::LEN]);
        argon.hash_password_into(passphrase, salt, &mut out[..]).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(Self(SecretBytes::copy_from(&out[..])))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    fn derive(&self, label: &[u8]) -> SecretBytes {
        let mut mac =
            <HmacSha256 as hmac::KeyInit>::new_from_slice(self.expose()).expect("HMAC takes keys of any length");
        mac.update(label);
        let mut out = mac.finalize().into_bytes();
        let key = SecretBytes::copy_from(&out);
        zeroize::Zeroize::zeroize(out.as_mut_slice());
        key
    }

    pub fn sealer(&self) -> Sealer {
        Sealer { key: self.derive(b"keyhole/v1/store-key") }
    }

    pub fn audit_key(&self) -> SecretBytes {
        self.derive(b"keyhole/v1/audit-key")
    }

    /// The key of the store manifest's per-record HMACs.
    pub fn manifest_key(&self) -> SecretBytes {
        self.derive(b"keyhole/v2/manifest-key")
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Seals and opens records with AES-256-GCM under the store key.
pub struct Sealer {
    key: SecretBytes,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    fn cipher(&self) -> Aes256Gcm {
        // Invariant: the store key is a 32-byte HMAC-SHA256 output.
        Aes256Gcm::new_from_slice(self.key.expose()).expect("32-byte key")
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(CryptoError::Random)?;
        let ct = self
            .cipher()
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad })
            .map_err(|_| CryptoError::Malformed)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEAL_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, CryptoError> {
        let (&format, rest) = sealed.split_first().ok_or(CryptoError::Malformed)?;
        if format != SEAL_FORMAT || rest.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        let mut pt = self
            .cipher()
            .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
            .map_err(|_| CryptoError::Unauthentic)?;
        Ok(SecretBytes::take(&mut pt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_associated_data() {
        let key = MasterKey::generate().unwrap();
        let s = key.sealer();
        let sealed = s.seal(b"value", b"secret/a/1").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"value"));
        assert_eq!(s.open(&sealed, b"secret/a/1").unwrap().expose(), b"value");
        assert!(matches!(s.open(&sealed, b"secret/b/1"), Err(CryptoError::Unauthentic)));
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(s.open(&t, b"secret/a/1").is_err(), "flipped byte {i} opened");
        }
        assert!(matches!(s.open(&sealed[..10], b"secret/a/1"), Err(CryptoError::Malformed)));
        let other = MasterKey::generate().unwrap().sealer();
        assert!(matches!(other.open(&sealed, b"secret/a/1"), Err(CryptoError::Unauthentic)));
    }

    #[test]
    fn derived_keys_differ_and_passphrase_is_deterministic() {
        let a = MasterKey::from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        let b = MasterKey::from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        assert_eq!(a.expose(), b.expose());
        assert_ne!(a.audit_key().expose(), a.sealer().key.expose());
        assert!(MasterKey::from_bytes(&[0; 31]).is_none());
    }
}
