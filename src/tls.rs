//! The TLS client set-up shared by MQTT over TLS (`--mqtt-ca`, `--mqtt-cert`,
//! `--mqtt-key`) and https downloads (`--https-ca`): rustls with ring (the
//! crate's one provider), the CA file's certificates as the only roots when
//! one is given, else the web PKI roots (Mozilla's, built in), and a client
//! certificate when given.
//!
//! Errors name the file and what it is ("CA file", "client certificate",
//! "client key"), never its content: a malformed key's bytes never reach a
//! message.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can be wrong with the TLS files. No variant carries a file's content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {error}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// A client certificate chain and its private key (PEM files).
#[derive(Clone, Copy, Debug)]
pub struct ClientCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A rustls client configuration: trusts the certificates in `ca` (PEM) and
/// nothing else when given, else the web PKI roots; presents `client` when
/// given.
pub fn client_config(
    ca: Option<&Path>,
    client: Option<ClientCert<'_>>,
) -> Result<rustls::ClientConfig, TlsError> {
    use hyper_rustls::ConfigBuilderExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Tls(e.to_string()))?;
    let builder = match ca {
        Some(path) => builder.with_root_certificates(root_store("CA file", path)?),
        None => builder.with_webpki_roots(),
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some(ClientCert { cert, key }) => {
            let chain = read_certs("client certificate", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                what: "client key",
                path: key.to_path_buf(),
                error: describe(&e, "no private key"),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Tls(e.to_string()))
        }
    }
}

/// The certificates in `path` as the only trust anchors; at least one must
/// be usable as one.
fn root_store(what: &'static str, path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certs(what, path)?);
    if added == 0 {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// Every `CERTIFICATE` block of a PEM file; none is an error.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |e: pem::Error| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        error: describe(&e, "no certificate"),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A PEM error in words, without the file's content (pki-types' own
/// `Display` quotes lines and base64 details, which for a key are secret).
fn describe(e: &pem::Error, none_found: &str) -> String {
    match e {
        pem::Error::Io(e) => e.to_string(),
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        pem::Error::NoItemsFound => none_found.into(),
        pem::Error::SectionTooLarge => "a PEM section is larger than 256 MB".into(),
        _ => "not a valid PEM file".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A self-signed CA certificate (P-256, valid until 2126) whose key was
    /// thrown away: a valid trust anchor nobody can sign with.
    const CA_PEM: &str = include_str!("../tests/data/unrelated-ca.pem");

    fn file(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(content))
            .unwrap();
        path
    }

    #[test]
    fn a_ca_file_is_the_only_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca = file(&dir, "ca.pem", CA_PEM.as_bytes());
        assert_eq!(read_certs("CA file", &ca).unwrap().len(), 1);
        assert_eq!(root_store("CA file", &ca).unwrap().len(), 1);
        client_config(Some(&ca), None).unwrap();
        // Two certificates, and text around them, as in a bundle.
        let bundle = file(
            &dir,
            "bundle.pem",
            format!("a comment\n{CA_PEM}\n{CA_PEM}").as_bytes(),
        );
        assert_eq!(read_certs("CA file", &bundle).unwrap().len(), 2);
        // The web PKI roots without one.
        client_config(None, None).unwrap();
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = client_config(Some(Path::new("/nonexistent/ca.pem")), None).unwrap_err();
        assert!(
            matches!(&e, TlsError::Pem { what: "CA file", path, .. } if path == Path::new("/nonexistent/ca.pem")),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("cannot read CA file /nonexistent/ca.pem: ")
                && text.contains("No such file"),
            "{text}"
        );
    }

    #[test]
    fn files_without_a_certificate_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key_only = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n";
        for (name, content) in [
            ("empty.pem", &b""[..]),
            ("text.pem", b"not a certificate\n"),
            ("key.pem", key_only.as_bytes()),
        ] {
            let path = file(&dir, name, content);
            let e = client_config(Some(&path), None).unwrap_err();
            assert!(
                matches!(&e, TlsError::NoCertificate { what: "CA file", path: p } if *p == path),
                "{name}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("CA file {} holds no certificate", path.display())
            );
        }
        // A PEM block that is not DER of a certificate: read, but no root.
        let junk = file(
            &dir,
            "junk.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        assert!(matches!(
            client_config(Some(&junk), None),
            Err(TlsError::NoCertificate { .. })
        ));
    }

    #[test]
    fn malformed_pem_is_described_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let cut = file(
            &dir,
            "cut.pem",
            &CA_PEM.as_bytes()[..CA_PEM.len() - "-----END CERTIFICATE-----\n".len()],
        );
        let e = client_config(Some(&cut), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot read CA file {}: a PEM section has no END line",
                cut.display()
            )
        );
        // A client key with a secret-looking body: named, its bytes not shown.
        let ca = file(&dir, "ca.pem", CA_PEM.as_bytes());
        let key = file(
            &dir,
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nSECRET!!*\n-----END PRIVATE KEY-----\n",
        );
        let e = client_config(
            None,
            Some(ClientCert {
                cert: &ca,
                key: &key,
            }),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot read client key {}: ", key.display())),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
    }
}
