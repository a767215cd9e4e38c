//! Secrets and the keys that protect them: the master key and its HKDF sub-keys, consumer-key
//! hashing (HMAC-SHA256), model-key encryption (AES-256-GCM), key generation, and the
//! redacting `Secret` type (defined in `domain`, re-exported here). Depends on `domain` only.

use std::fmt;
use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use crate::domain::Secret;

/// Prefix of keygate-generated consumer keys, so a leaked one is recognisable.
pub const CONSUMER_KEY_PREFIX: &str = "kg-";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "master key file {path} must hold 32 bytes (raw, 64 hex characters or base64), found {len} bytes"
    )]
    BadMasterKey { path: String, len: usize },
    #[error(
        "model key ciphertext does not decrypt under this master key (wrong key or moved record)"
    )]
    Decrypt,
}

/// The 32-byte master key from which every other key is derived.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        MasterKey(b)
    }

    /// Reads a master key: 32 raw bytes, or 64 hex characters, or base64 of 32 bytes
    /// (a trailing newline is ignored, as Kubernetes and editors add one).
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let raw = Zeroizing::new(std::fs::read(path).map_err(|source| CryptoError::Io {
            path: path.display().to_string(),
            source,
        })?);
        if raw.len() == 32 {
            let mut b = [0u8; 32];
            b.copy_from_slice(&raw);
            return Ok(MasterKey(b));
        }
        let text = String::from_utf8_lossy(&raw);
        let text = Zeroizing::new(text.trim().to_string());
        let decoded = Zeroizing::new(
            hex::decode(text.as_bytes())
                .ok()
                .or_else(|| STANDARD.decode(text.as_bytes()).ok())
                .unwrap_or_default(),
        );
        if decoded.len() == 32 {
            let mut b = [0u8; 32];
            b.copy_from_slice(&decoded);
            return Ok(MasterKey(b));
        }
        Err(CryptoError::BadMasterKey {
            path: path.display().to_string(),
            len: raw.len(),
        })
    }

    /// Loads `path`, creating it (32 random bytes, mode 0600) when it does not exist.
    /// Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), CryptoError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate();
        write_private_file(path, &key.0).map_err(|source| CryptoError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok((key, true))
    }

    fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(Some(b"keygate/v1"), &self.0);
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(info, out.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// A non-secret fingerprint that identifies this key (stored so that a replica with a
    /// different key refuses to start). Derived, so it reveals nothing about the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive(b"fingerprint")[..16])
    }

    /// The sub-keys keygate works with.
    pub fn keys(&self) -> Keys {
        Keys {
            hasher: KeyHasher::new(&self.derive(b"consumer-key-hmac")),
            cipher: ModelKeyCipher::new(&self.derive(b"model-key-aes-256-gcm")),
            cache: ModelKeyCipher::new(&self.derive(b"snapshot-cache-aes-256-gcm")),
            stream: KeyHasher::new(&self.derive(b"snapshot-stream-hmac")),
            digest: KeyHasher::new(&self.derive(b"snapshot-digest-hmac")),
        }
    }
}

/// Creates `dir` (and its parents) readable only by its owner, if it does not exist yet.
/// True when it was created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<bool> {
    if dir.exists() {
        return Ok(false);
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)?;
    Ok(true)
}

/// Writes `data` to a new file readable only by its owner.
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Every key derived from the master key.
#[derive(Clone)]
pub struct Keys {
    pub hasher: KeyHasher,
    pub cipher: ModelKeyCipher,
    /// Encrypts a data plane's on-disk snapshot cache.
    pub cache: ModelKeyCipher,
    /// Authenticates the snapshot stream, control plane → data plane (`distribution::seal`).
    pub stream: KeyHasher,
    /// Keys the services term of a snapshot's content digest (`snapshot::digest`).
    pub digest: KeyHasher,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

/// HMAC-SHA256 of consumer key values under the server's pepper. The keyed state is computed
/// once, so hashing a presented key costs two SHA-256 blocks.
#[derive(Clone)]
pub struct KeyHasher {
    keyed: Hmac<Sha256>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher([redacted])")
    }
}

/// The stored form of a consumer key: its HMAC.
pub type KeyHash = [u8; 32];

impl KeyHasher {
    pub fn new(key: &[u8; 32]) -> Self {
        KeyHasher {
            keyed: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"),
        }
    }

    pub fn hash(&self, value: &[u8]) -> KeyHash {
        let mut mac = self.keyed.clone();
        mac.update(value);
        mac.finalize().into_bytes().into()
    }

    /// The HMAC of `parts`, each prefixed with its length (so no two lists collide).
    pub fn hash_parts(&self, parts: &[&[u8]]) -> KeyHash {
        let mut mac = self.keyed.clone();
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

/// AES-256-GCM for model key values; the record id is the associated data, so a ciphertext
/// moved to another record does not decrypt.
#[derive(Clone)]
pub struct ModelKeyCipher {
    aead: Aes256Gcm,
}

impl fmt::Debug for ModelKeyCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModelKeyCipher([redacted])")
    }
}

impl ModelKeyCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        ModelKeyCipher {
            aead: Aes256Gcm::new_from_slice(key).expect("32-byte key"),
        }
    }

    /// `nonce (12 bytes) || ciphertext+tag`.
    pub fn encrypt(&self, record_id: &str, plaintext: &Secret) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose().as_bytes(),
                    aad: record_id.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Encrypts arbitrary bytes: `nonce (12 bytes) || ciphertext+tag`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], data: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: data, aad })
            .expect("AES-GCM encryption cannot fail for in-memory data");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts what `seal` produced with the same `aad`.
    pub fn open(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ct) = blob.split_at(12);
        self.aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }

    pub fn decrypt(&self, record_id: &str, blob: &[u8]) -> Result<Secret, CryptoError> {
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ct) = blob.split_at(12);
        let pt = Zeroizing::new(
            self.aead
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: record_id.as_bytes(),
                    },
                )
                .map_err(|_| CryptoError::Decrypt)?,
        );
        let s = std::str::from_utf8(&pt).map_err(|_| CryptoError::Decrypt)?;
        Ok(Secret::new(s.to_string()))
    }
}

/// A new consumer key: `kg-` + 256 bits from the OS RNG, base64url (46 characters).
pub fn generate_consumer_key() -> Secret {
    Secret::new(format!("{CONSUMER_KEY_PREFIX}{}", random_token()))
}

/// 256 random bits, base64url without padding.
pub fn random_token() -> String {
    let mut b = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(b.as_mut());
    URL_SAFE_NO_PAD.encode(b.as_ref())
}

/// Constant-time equality of two credentials (compares digests, so lengths leak nothing).
pub fn credentials_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let da = Sha256::digest(a);
    let db = Sha256::digest(b);
    da.ct_eq(&db).into()
}

/// A connection URL that may carry a password: in its user info (`postgres://user:pw@host/db`,
/// `redis://:pw@host`) or its query (`?password=…`). Connecting uses the whole string
/// ([`SecretUrl::expose`]); `Debug` and `Display` show it with the user info and the query
/// replaced by `…`, so a configuration printed or logged never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The whole URL, to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its user info and query (`…` for a string that is no URL). Everything
    /// up to the last `@` counts as user info, so a password holding `/` or `@` unencoded is
    /// hidden too; when a `?` comes before that `@` (a `?` in the password, or an `@` in the
    /// query) only the scheme is shown. Hiding more than needed is fine, less never.
    pub fn redacted(&self) -> String {
        let Some(scheme_end) = self.0.find("://") else {
            // Not a URL: nothing in it can be told apart from a password.
            return "…".to_string();
        };
        let (scheme, rest) = self.0.split_at(scheme_end + 3);
        let (user, rest) = match (rest.find('?'), rest.rfind('@')) {
            (Some(q), Some(at)) if q < at => return format!("{scheme}…"),
            (_, Some(at)) => ("…@", &rest[at + 1..]),
            (_, None) => ("", rest),
        };
        match rest.split_once('?') {
            Some((before, _)) => format!("{scheme}{user}{before}?…"),
            None => format!("{scheme}{user}{rest}"),
        }
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl::new(s))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_redact_in_debug_and_display() {
        let s = Secret::new("sk-live-very-secret-value".into());
        assert!(!format!("{s:?}").contains("very-secret"));
        assert!(!format!("{s}").contains("very-secret"));
        let mk = MasterKey::generate();
        assert!(format!("{mk:?}").contains("redacted"));
        assert!(format!("{:?}", mk.keys()).contains("redacted"));
    }

    #[test]
    fn encryption_binds_the_record_id() {
        let keys = MasterKey::generate().keys();
        let secret = Secret::new("sk-0123456789abcdef".into());
        let blob = keys.cipher.encrypt("rec-1", &secret);
        assert_eq!(keys.cipher.decrypt("rec-1", &blob).unwrap(), secret);
        assert!(keys.cipher.decrypt("rec-2", &blob).is_err());
        let other = MasterKey::generate().keys();
        assert!(other.cipher.decrypt("rec-1", &blob).is_err());
        assert!(!blob.windows(8).any(|w| w == b"sk-01234"));
    }

    #[test]
    fn hashing_is_keyed_and_stable() {
        let mk = MasterKey::generate();
        let a = mk.keys().hasher.hash(b"kg-abc");
        assert_eq!(a, mk.keys().hasher.hash(b"kg-abc"));
        assert_ne!(a, MasterKey::generate().keys().hasher.hash(b"kg-abc"));
    }

    #[test]
    fn generated_keys_are_long_visible_ascii() {
        let k = generate_consumer_key();
        assert!(k.expose().starts_with("kg-"));
        assert_eq!(k.expose().len(), 46);
        assert!(crate::domain::validate::key_value("value", k.expose()).is_ok());
        assert_ne!(k, generate_consumer_key());
    }

    #[test]
    fn master_key_file_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let (k, created) = MasterKey::load_or_create(&p).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (k2, created) = MasterKey::load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k.fingerprint(), k2.fingerprint());
        let hexp = dir.path().join("hex.key");
        std::fs::write(&hexp, format!("{}\n", hex::encode(k.0))).unwrap();
        assert_eq!(
            MasterKey::load(&hexp).unwrap().fingerprint(),
            k.fingerprint()
        );
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "too short").unwrap();
        assert!(MasterKey::load(&bad).is_err());
    }

    #[test]
    fn a_secret_url_prints_without_its_password() {
        let cases = [
            (
                "postgres://kg:s3cr3t-pw@db.internal:5432/keygate",
                "postgres://…@db.internal:5432/keygate",
            ),
            (
                "redis://:s3cr3t-pw@10.0.0.7:6379/2",
                "redis://…@10.0.0.7:6379/2",
            ),
            (
                "postgres://db/keygate?user=kg&password=s3cr3t-pw",
                "postgres://db/keygate?…",
            ),
            // Passwords with unencoded `/`, `?` or `@`: all up to the last `@` is hidden.
            (
                "postgres://kg:pa/s3cr3t-pw@db/keygate",
                "postgres://…@db/keygate",
            ),
            ("redis://:pa?s3cr3t-pw@10.0.0.7:6379", "redis://…"),
            // An unencoded @ in the query (from the review): only the scheme is shown.
            (
                "postgres://db.internal/keygate?user=kg&password=ab@s3cr3t-pw",
                "postgres://…",
            ),
            (
                "redis+unix:///run/redis.sock?db=0&pass=ab@s3cr3t-pw",
                "redis+unix://…",
            ),
            (
                "rediss://u:a@s3cr3t-pw@cache:6380/0",
                "rediss://…@cache:6380/0",
            ),
            // An @ in a socket path hides more than needed, never less.
            ("redis+unix:///run/redis@1.sock", "redis+unix://…@1.sock"),
            (
                "sqlite:///var/lib/keygate/keygate.db",
                "sqlite:///var/lib/keygate/keygate.db",
            ),
            ("host=db password=s3cr3t-pw", "…"),
        ];
        for (url, shown) in cases {
            let u: SecretUrl = url.parse().unwrap();
            assert_eq!(u.expose(), url);
            assert_eq!(u.to_string(), shown);
            assert_eq!(format!("{u:?}"), format!("SecretUrl({shown:?})"));
            assert!(!format!("{u:?}{u}").contains("s3cr3t-pw"), "{url}");
        }
    }
}
