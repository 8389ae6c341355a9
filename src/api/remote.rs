//! Remote admin: the Admin service on a TCP listener with mutual TLS.
//!
//! rustls (through tonic) refuses at the handshake any client without a
//! certificate issued by `[admin] client_ca`. A client that gets through
//! is an admin only if its certificate's subject is listed in
//! `[admin] subjects`; anyone else gets PERMISSION_DENIED, audited.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use x509_cert::der::Decode;

use crate::config::{RemoteAdmin, Subject};

/// The server's TLS settings, read from the configured files, for the
/// broker's own TLS acceptor (it runs each handshake with a timeout, see
/// [`crate::api::listen`]): the server's certificate, client certificates
/// required and verified against `client_ca`, ALPN `h2`.
pub fn rustls_config(cfg: &RemoteAdmin) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("[admin] {what} {}: cannot read it", p.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&read(&cfg.tls_cert, "tls_cert")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("[admin] tls_cert {}: {e}", cfg.tls_cert.display()))?;
    // Not shown: a key's parse error could quote it.
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.tls_key, "tls_key")?)
        .map_err(|_| anyhow::anyhow!("[admin] tls_key {}: no readable private key", cfg.tls_key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_slice_iter(&read(&cfg.client_ca, "client_ca")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("[admin] client_ca {}: {e}", cfg.client_ca.display()))?;
    roots.add_parsable_certificates(cas);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
        .build()
        .with_context(|| format!("[admin] client_ca {}", cfg.client_ca.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("[admin] tls_cert and tls_key")?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(std::sync::Arc::new(config))
}

/// The subject of a DER certificate, as [`crate::config::parse_subject`]
/// reads a configured one.
pub fn subject_of(der: &[u8]) -> Result<Subject, String> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("unreadable client certificate: {e}"))?;
    let mut set = Subject::new();
    for atv in cert.tbs_certificate().subject().iter() {
        set.insert(atv.to_string());
    }
    Ok(set)
}

/// A client that came through mutual TLS, as the broker knows it: the
/// subject of its certificate (the first of its chain) and its address.
/// Whether it is an admin is policy's call ([`crate::policy::admin`]).
pub fn caller(
    certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    address: Option<std::net::SocketAddr>,
) -> crate::identity::Identity {
    let subject =
        certs.and_then(|c| c.first()).ok_or_else(|| "no client certificate".to_owned()).and_then(|c| subject_of(c));
    crate::identity::Identity::remote(subject, address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_subject;

    #[test]
    fn a_certificate_subject_matches_its_configured_spelling() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, "ops-laptop");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Example");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let got = subject_of(cert.der()).unwrap();
        assert_eq!(got, parse_subject("o=Example, CN=ops-laptop").unwrap());
        assert_ne!(got, parse_subject("CN=ops-laptop").unwrap(), "every attribute must match");
        let id = caller(Some(&[cert.der().clone()]), Some("192.0.2.9:50123".parse().unwrap()));
        let r = id.remote.as_ref().unwrap();
        assert_eq!(r.subject.as_ref(), Ok(&got));
        assert_eq!(r.to_string(), "CN=ops-laptop,O=Example from 192.0.2.9:50123");
        assert_eq!(caller(None, None).remote.unwrap().to_string(), "no client certificate from an unknown address");
        assert!(subject_of(b"not a certificate").is_err());
        assert!(parse_subject("CN").is_err());
    }
}
