//! The one place that builds the server's TLS configuration, and reads a client's identity
//! from its certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::settings::TlsSettings;

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// Reads every certificate in a PEM file.
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    gatehouse_protocol::pem::load_certs(path).map_err(|e| file_err(path, e))
}

/// TLS 1.3 and 1.2 (ring; rustls has no older versions at all), a client certificate signed by
/// `client_ca` required, not revoked by `client_crl` when one is set, ALPN h2 and http/1.1.
///
/// webpki checks the validity period, that the certificate is not a CA's, and its extended key
/// usage when it has one (a serverAuth-only certificate is refused). It does not require the
/// `digitalSignature` key usage of a client certificate; the handshake's signature proves the
/// key is used for signing anyway, so we accept that.
///
/// # Errors
/// When a file is missing or invalid, or the key does not match the certificate.
pub fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&s.client_ca)? {
        roots.add(ca).map_err(|e| file_err(&s.client_ca, e))?;
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(path) = &s.client_crl {
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| file_err(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(path, e))?;
        verifier = verifier.with_crls(crls).enforce_revocation_expiration();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
    let certs = load_certs(&s.cert)?;
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| file_err(&s.key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The authenticated client's identity: its certificate's subject common name — the one
/// source; SANs are not identities here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity(pub String);

/// Longest identity accepted (bytes).
pub const MAX_IDENTITY_LEN: usize = 128;

/// Reads the identity from the verified end-entity certificate: exactly one subject CN, a
/// readable string of 1 to [`MAX_IDENTITY_LEN`] bytes without control characters or
/// surrounding spaces. Anything else is ambiguous and refused (`None`): no CN (whatever SANs
/// it has, which would otherwise share one namespace with CNs), several CNs, or a CN that is
/// not a string (no silent fallback to something else).
pub fn client_identity(cert: &CertificateDer<'_>) -> Option<ClientIdentity> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let (Some(cn), None) = (cns.next(), cns.next()) else { return None };
    let cn = cn.as_str().ok()?;
    let readable = !cn.is_empty()
        && cn.len() <= MAX_IDENTITY_LEN
        && cn.trim() == cn
        && !cn.chars().any(char::is_control);
    readable.then(|| ClientIdentity(cn.to_owned()))
}
