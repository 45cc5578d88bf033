//! The cluster CA and node identities, and the rustls configurations built from them.
//!
//! * `keel cluster init` makes a CA (ECDSA P-256, 20 years). Its private key is replicated
//!   in the state machine so whichever node leads can sign a joining node's certificate.
//! * Every node has one key pair and one certificate, used both as the peer-port server
//!   and client identity (mTLS) and as the HTTPS API server certificate. The SANs are
//!   chosen by the signer, never copied from the request: `node-<id>.keel`, `keel`, and
//!   the IP addresses of the node's peer and API endpoints.
//! * A joining node knows only the CA fingerprint from its token: [`pinned_client_config`]
//!   accepts a server only if the chain it presents contains a CA certificate with that
//!   fingerprint and the server's certificate verifies against it.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::token::sha256_hex;
use crate::types::NodeId;

/// DNS name every node certificate carries; clients that reach a node by an address not in
/// its certificate verify against this name instead.
pub const CLUSTER_DNS_NAME: &str = "keel";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not generate or sign a certificate ({what})")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid PEM for {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no {what} found in the PEM text")]
    Missing { what: &'static str },
    #[error("could not build the TLS configuration ({what})")]
    Config {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("could not build the client-certificate verifier")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |source| TlsError::Rcgen { what, source }
}

/// The CA's certificate and key, PEM encoded.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node's certificate (leaf first, then the CA) and private key, PEM encoded.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

pub fn generate_ca(cluster_name: &str) -> Result<CaMaterial, TlsError> {
    let key = KeyPair::generate().map_err(rc("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA params"))?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Keel cluster CA {cluster_name}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Keel");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.self_signed(&key).map_err(rc("CA certificate"))?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A fresh node key and a certificate signing request for it, PEM encoded.
pub fn generate_node_key() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(rc("node key"))?;
    let params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CSR params"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(rc("certificate signing request"))?;
    let csr_pem = csr.pem().map_err(rc("CSR encoding"))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// SHA-256 of the public key in a CSR: identifies a joining node across retries.
pub fn csr_key_fingerprint(csr_pem: &str) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc("parse CSR"))?;
    Ok(sha256_hex(rcgen::PublicKeyData::der_bytes(&csr.public_key)))
}

/// Signs a node certificate for the public key in `csr_pem`. Everything but the key is
/// decided here.
pub fn sign_node_cert(
    ca: &CaMaterial,
    csr_pem: &str,
    node_id: NodeId,
    ips: &[IpAddr],
) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc("parse CSR"))?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rc("CA key"))?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca.cert_pem)
        .map_err(rc("CA certificate"))?
        .self_signed(&ca_key)
        .map_err(rc("CA issuer"))?;
    let mut params = CertificateParams::new(vec![
        format!("node-{node_id}.keel"),
        CLUSTER_DNS_NAME.to_string(),
    ])
    .map_err(rc("node params"))?;
    for ip in ips {
        if !ip.is_unspecified() {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
    }
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node-{node_id}"));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params
        .signed_by(&csr.public_key, &ca_cert, &ca_key)
        .map_err(rc("sign node certificate"))?;
    Ok(cert.pem())
}

/// SHA-256 of the first certificate in `pem`, lowercase hex.
pub fn cert_fingerprint(pem: &str) -> Result<String, TlsError> {
    let certs = parse_certs(pem, "certificate")?;
    Ok(sha256_hex(certs[0].as_ref()))
}

pub fn parse_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { what });
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?
        .ok_or(TlsError::Missing {
            what: "private key",
        })
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions_error(source: rustls::Error) -> TlsError {
    TlsError::Config {
        what: "protocol versions",
        source,
    }
}

/// A client config builder with the ring provider and the safe protocol versions.
fn client_builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError>
{
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(versions_error)
}

/// A server config builder with the ring provider and the safe protocol versions.
pub fn server_builder(
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(versions_error)
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(|source| TlsError::Config {
            what: "CA root",
            source,
        })?;
    }
    Ok(roots)
}

/// Server side of the peer port: only clients with a certificate from the cluster CA.
pub fn peer_server_config(id: &NodeIdentity) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&id.ca_pem)?), provider())
            .build()
            .map_err(|source| TlsError::Verifier { source })?;
    let mut config = server_builder()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&id.cert_chain_pem, "node certificate")?,
            parse_key(&id.key_pem)?,
        )
        .map_err(|source| TlsError::Config {
            what: "node certificate",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Client side of the peer port: trusts only the cluster CA, presents the node certificate.
pub fn peer_client_config(id: &NodeIdentity) -> Result<ClientConfig, TlsError> {
    let mut config = client_builder()?
        .with_root_certificates(roots(&id.ca_pem)?)
        .with_client_auth_cert(
            parse_certs(&id.cert_chain_pem, "node certificate")?,
            parse_key(&id.key_pem)?,
        )
        .map_err(|source| TlsError::Config {
            what: "client certificate",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client that trusts only the given CA (PEM): the CLI and tests talking to the API.
pub fn ca_client_config(ca_pem: &str) -> Result<ClientConfig, TlsError> {
    Ok(client_builder()?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth())
}

/// A client for joining: trusts a server whose presented chain contains a CA certificate
/// with the given SHA-256 fingerprint and whose leaf verifies against that CA.
pub fn pinned_client_config(ca_fingerprint: &str) -> Result<ClientConfig, TlsError> {
    let verifier = PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    };
    Ok(client_builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the fingerprint in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_node_cert_chains_to_the_ca_and_ignores_requested_names() {
        let ca = generate_ca("lab").expect("ca");
        let (key_pem, csr_pem) = generate_node_key().expect("key");
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let cert = sign_node_cert(&ca, &csr_pem, 7, &[ip]).expect("sign");
        let der = parse_certs(&cert, "c").expect("parse");
        let (_, parsed) = x509_parser::parse_x509_certificate(der[0].as_ref()).expect("x509");
        let sans = parsed
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(sans.contains("node-7.keel"), "{sans}");
        assert!(
            sans.contains("10.1.2.3") || sans.contains("[10, 1, 2, 3]"),
            "{sans}"
        );
        let id = NodeIdentity {
            cert_chain_pem: format!("{cert}{}", ca.cert_pem),
            key_pem,
            ca_pem: ca.cert_pem.clone(),
        };
        peer_server_config(&id).expect("server config");
        peer_client_config(&id).expect("client config");
        assert_eq!(cert_fingerprint(&ca.cert_pem).expect("fp").len(), 64);
        assert_eq!(csr_key_fingerprint(&csr_pem).expect("kfp").len(), 64);
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        assert!(matches!(
            parse_certs("nope", "CA certificate"),
            Err(TlsError::Missing { .. })
        ));
        assert!(parse_key("nope").is_err());
    }
}
