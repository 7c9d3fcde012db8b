//! Signed images: what is signed, the `.sig` file, the keys a device trusts.
//!
//! A vendor signs, with an Ed25519 key, a short versioned text that names
//! the image's file name, size and SHA-256 ([`statement`]):
//!
//! ```text
//! fwagent-signature-v1
//! name=<firmwareName>
//! size=<bytes>
//! sha256=<64 lowercase hex digits>
//! ```
//!
//! The signature (64 bytes) is the whole `<firmwareName>.sig` file, as
//! `fwagent sign` writes it (and as `openssl pkeyutl -sign -rawin` does for
//! the same text); a `.sig` that holds those 64 bytes in base64 text is read
//! too. The request field `info.fileInfo.signature` is the `.sig` file in
//! base64. The device rebuilds the text from the request's name and size and
//! the SHA-256 it computed while the image streamed in, so a signature is
//! good for one name, one size and one content only. Trusted keys are
//! Ed25519 public keys in PEM (SubjectPublicKeyInfo, `openssl pkey
//! -pubout`); private keys PKCS#8 PEM (`openssl genpkey -algorithm
//! ed25519`). docs/SECURITY.md, "Signed images".

use base64::Engine;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// An Ed25519 signature's length.
pub const SIG_LEN: usize = 64;
/// What is appended to the image's name (and URL) for its signature file.
pub const SIG_SUFFIX: &str = ".sig";
/// The first line of the signed text: its version.
pub const STATEMENT_VERSION: &str = "fwagent-signature-v1";
/// The longest `.sig` file read (from a server or a disk).
pub const MAX_SIG_FILE: usize = 4096;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the
/// 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a key or a signature could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read {what} {}: {why}", path.display())]
    Key {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Malformed(String),
}

/// The text a signature covers.
pub fn statement(name: &str, size: u64, sha256: &[u8]) -> String {
    format!(
        "{STATEMENT_VERSION}\nname={name}\nsize={size}\nsha256={}\n",
        hex::encode(sha256)
    )
}

/// A signature from the bytes of a `.sig` file: 64 bytes, or their base64
/// (standard alphabet, padding optional) with white space around.
pub fn parse_sig(bytes: &[u8]) -> Result<[u8; SIG_LEN], String> {
    if let Ok(raw) = <[u8; SIG_LEN]>::try_from(bytes) {
        return Ok(raw);
    }
    let text = std::str::from_utf8(bytes)
        .map(str::trim)
        .map_err(|_| format!("not a signature: {} bytes, expected {SIG_LEN}", bytes.len()))?;
    let decoded = decode_base64(text)
        .map_err(|_| format!("not a signature: {} bytes, expected {SIG_LEN}", bytes.len()))?;
    <[u8; SIG_LEN]>::try_from(decoded.as_slice()).map_err(|_| {
        format!(
            "not a signature: base64 of {} bytes, expected {SIG_LEN}",
            decoded.len()
        )
    })
}

/// The request field `info.fileInfo.signature`: the `.sig` file in base64.
pub fn parse_field(text: &str) -> Result<[u8; SIG_LEN], String> {
    let bytes = decode_base64(text.trim()).map_err(|_| "not base64".to_string())?;
    parse_sig(&bytes).map_err(|_| {
        format!(
            "not an Ed25519 signature: {} bytes, expected {SIG_LEN}",
            bytes.len()
        )
    })
}

/// Standard base64, padding optional.
fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    const ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ANY_PADDING.decode(text)
}

/// The canonical base64 of a signature (what the store keeps of the field).
pub fn encode_sig(sig: &[u8; SIG_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sig)
}

/// One public key the device trusts.
#[derive(Clone)]
pub struct TrustedKey {
    /// The file it came from.
    pub path: PathBuf,
    key: [u8; 32],
}

impl TrustedKey {
    /// A short id of the key: the first 8 bytes of its SHA-256, in hex.
    pub fn id(&self) -> String {
        hex::encode(&ring::digest::digest(&ring::digest::SHA256, &self.key).as_ref()[..8])
    }

    /// Does `sig` sign `message` with this key?
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({}, {})", self.path.display(), self.id())
    }
}

/// A PEM reading error in a few words.
fn pem_why(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(e) => e.to_string(),
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        pem::Error::NoItemsFound => "no PEM section of the expected kind".into(),
        other => other.to_string(),
    }
}

/// Read an Ed25519 public key (PEM `PUBLIC KEY`, as `openssl pkey -pubout`
/// writes it).
pub fn load_public_key(path: &Path) -> Result<TrustedKey, SignatureError> {
    let bad = |why: String| SignatureError::Key {
        what: "the trusted key",
        path: path.to_path_buf(),
        why,
    };
    let der = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            bad("no `-----BEGIN PUBLIC KEY-----` section (an Ed25519 public key in PEM, as `openssl pkey -pubout` writes it)".into())
        }
        e => bad(pem_why(&e)),
    })?;
    let bytes: &[u8] = der.as_ref();
    let key = bytes
        .strip_prefix(&SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| bad("not an Ed25519 public key".into()))?;
    Ok(TrustedKey {
        path: path.to_path_buf(),
        key,
    })
}

/// Read an Ed25519 private key (PEM `PRIVATE KEY`, PKCS#8 v1 as `openssl
/// genpkey -algorithm ed25519` writes it, or v2).
pub fn load_private_key(path: &Path) -> Result<Ed25519KeyPair, SignatureError> {
    let bad = |why: String| SignatureError::Key {
        what: "the private key",
        path: path.to_path_buf(),
        why,
    };
    let der = PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => bad(
            "no `-----BEGIN PRIVATE KEY-----` section (an Ed25519 key in PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes it)".into(),
        ),
        e => bad(pem_why(&e)),
    })?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
        .map_err(|e| bad(format!("not an Ed25519 private key ({e})")))
}

/// The keys the device trusts (`--trust-key`, repeatable), and whether an
/// image must be signed (`--require-signature`).
#[derive(Clone, Debug, Default)]
pub struct SignaturePolicy {
    pub keys: Vec<TrustedKey>,
    pub required: bool,
}

impl SignaturePolicy {
    /// Load every key; the first that cannot be read is the error.
    pub fn load(paths: &[PathBuf], required: bool) -> Result<Self, SignatureError> {
        let keys = paths
            .iter()
            .map(|p| load_public_key(p))
            .collect::<Result<_, _>>()?;
        Ok(SignaturePolicy { keys, required })
    }

    /// Are signatures checked at all (is there a key to check them with)?
    pub fn checks(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The trusted key that made `sig` over `message`, if any.
    pub fn signer(&self, message: &[u8], sig: &[u8]) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.verifies(message, sig))
    }
}

/// SHA-256 and size of a file, read once.
pub fn sha256_file(path: &Path) -> Result<(Vec<u8>, u64), SignatureError> {
    let io = |source| SignatureError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; crate::runtime::verify::IO_BUF];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        len += n as u64;
    }
    Ok((sha.finish().as_ref().to_vec(), len))
}

/// The `.sig` file beside `image`.
pub fn sig_path_of(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(SIG_SUFFIX);
    PathBuf::from(name)
}

/// The file name an image is signed under: its own, or `name`.
pub fn name_of(image: &Path, name: Option<&str>) -> Result<String, SignatureError> {
    match name {
        Some(n) => Ok(n.to_string()),
        None => image
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                SignatureError::Malformed(format!(
                    "{} has no file name in UTF-8: give --name",
                    image.display()
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn key_pair(dir: &Path, name: &str) -> (Ed25519KeyPair, PathBuf) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let path = dir.join(name);
        std::fs::write(&path, pem("PUBLIC KEY", &spki)).expect("write");
        let private = dir.join(format!("{name}.key"));
        std::fs::write(&private, pem("PRIVATE KEY", pkcs8.as_ref())).expect("write");
        (pair, path)
    }

    #[test]
    fn a_signature_holds_for_its_name_size_and_content_only() {
        let dir = tempfile::tempdir().expect("dir");
        let (pair, public) = key_pair(dir.path(), "a.pem");
        let (_, other) = key_pair(dir.path(), "b.pem");
        let sha = ring::digest::digest(&ring::digest::SHA256, b"image");
        let text = statement("X.bin", 5, sha.as_ref());
        let sig = pair.sign(text.as_bytes());
        let policy = SignaturePolicy::load(&[other.clone(), public.clone()], true).expect("keys");
        let signer = policy
            .signer(text.as_bytes(), sig.as_ref())
            .expect("signed");
        assert_eq!(signer.path, public, "the second key (rotation)");
        for (name, size, content) in [
            ("Y.bin", 5, &b"image"[..]),
            ("X.bin", 6, b"image"),
            ("X.bin", 5, b"imagf"),
        ] {
            let sha = ring::digest::digest(&ring::digest::SHA256, content);
            let forged = statement(name, size, sha.as_ref());
            assert!(policy.signer(forged.as_bytes(), sig.as_ref()).is_none());
        }
        let untrusted = SignaturePolicy::load(&[other], true).expect("keys");
        assert!(untrusted.signer(text.as_bytes(), sig.as_ref()).is_none());
        // The private key reads back.
        let again = load_private_key(&dir.path().join("a.pem.key")).expect("private");
        assert_eq!(again.public_key().as_ref(), pair.public_key().as_ref());
    }

    #[test]
    fn sig_files_and_fields_parse_and_malformed_ones_do_not() {
        let raw = [7u8; SIG_LEN];
        let b64 = encode_sig(&raw);
        assert_eq!(parse_sig(&raw), Ok(raw));
        assert_eq!(parse_sig(format!("{b64}\n").as_bytes()), Ok(raw));
        assert_eq!(parse_sig(b64.trim_end_matches('=').as_bytes()), Ok(raw));
        assert!(parse_sig(&raw[..63]).is_err());
        assert_eq!(parse_field(&b64), Ok(raw));
        // The field as base64 of a base64 .sig (both readings of "the .sig in base64").
        let double = base64::engine::general_purpose::STANDARD.encode(b64.as_bytes());
        assert_eq!(parse_field(&double), Ok(raw));
        assert_eq!(parse_field("not base64!").unwrap_err(), "not base64");
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(parse_field(&short).unwrap_err().contains("32 bytes"));
    }

    #[test]
    fn malformed_keys_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").expect("write");
        let e = load_public_key(&garbage).unwrap_err().to_string();
        assert!(e.contains("garbage.pem") && e.contains("PUBLIC KEY"), "{e}");
        let rsa = dir.path().join("not-ed25519.pem");
        std::fs::write(&rsa, pem("PUBLIC KEY", &[0x30, 0x03, 0x02, 0x01, 0x00])).expect("write");
        let e = load_public_key(&rsa).unwrap_err().to_string();
        assert!(e.contains("not an Ed25519 public key"), "{e}");
        let missing = load_public_key(Path::new("/nonexistent/k.pem")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/k.pem"));
    }
}
