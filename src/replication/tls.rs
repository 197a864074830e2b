//! TLS for Postgres connections, with libpq's `sslmode` semantics on rustls.
//!
//! `require` encrypts without checking the certificate; `verify-ca` checks the chain against the
//! root certificate but not the host name; `verify-full` checks both. The root certificate comes
//! from `sslrootcert` (a PEM file, or `system` for the platform trust store) and defaults to
//! `~/.postgresql/root.crt`, as in libpq.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::conninfo::{ConnInfo, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read root certificate {path}")]
    ReadRootCert {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("root certificate file {path} holds no PEM certificate")]
    NoRootCert { path: String },
    #[error(
        "sslmode={mode} needs a root certificate: set sslrootcert=<file.pem> (or sslrootcert=system), \
         or put it at ~/.postgresql/root.crt"
    )]
    MissingRootCert { mode: &'static str },
    #[error("invalid root certificate")]
    InvalidRootCert(#[source] rustls::Error),
    #[error("cannot build the certificate verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    #[error("cannot set up TLS")]
    Rustls(#[source] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `info.sslmode`; `None` for `disable`.
pub fn client_config(info: &ConnInfo) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?;
    let config = match info.sslmode {
        SslMode::Disable => return Ok(None),
        // `prefer`/`require`: encryption without authentication, as in libpq without a root cert.
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { provider }))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let mode = if info.sslmode == SslMode::VerifyCa {
                "verify-ca"
            } else {
                "verify-full"
            };
            let roots = Arc::new(root_store(info.sslrootcert.as_deref(), mode)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(TlsConfigError::Verifier)?;
            let verifier: Arc<dyn ServerCertVerifier> = if info.sslmode == SslMode::VerifyCa {
                Arc::new(ChainOnly { inner: webpki })
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

fn root_store(
    sslrootcert: Option<&str>,
    mode: &'static str,
) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    if sslrootcert == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // Skip the odd unparsable system certificate rather than fail.
            let _ = store.add(cert);
        }
        return Ok(store);
    }
    let path = match sslrootcert {
        Some(p) => PathBuf::from(p),
        None => {
            let default =
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"));
            match default.filter(|p| p.exists()) {
                Some(p) => p,
                None => return Err(TlsConfigError::MissingRootCert { mode }),
            }
        }
    };
    let shown = path.display().to_string();
    let pem = std::fs::read(&path).map_err(|source| TlsConfigError::ReadRootCert {
        path: shown.clone(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(pem.as_slice());
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|source| TlsConfigError::ReadRootCert {
            path: shown.clone(),
            source,
        })?;
        store.add(cert).map_err(TlsConfigError::InvalidRootCert)?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsConfigError::NoRootCert { path: shown });
    }
    Ok(store)
}

/// The TLS server name for a host: an IP address or a DNS name.
pub fn server_name(
    host: &str,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(host.to_string())
}

/// `sslmode=require`: encrypt, trust any certificate (signatures of the handshake still checked).
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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

/// `sslmode=verify-ca`: the chain must verify; a host-name mismatch is accepted.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
