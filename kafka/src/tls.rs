//! TLS towards Kafka (Confluent Cloud, MSK): trusted CAs from a PEM file or the bundled Mozilla
//! roots, and an optional client certificate for mutual TLS.

use std::sync::Arc;

use sluice_core::config::TlsConfig;
use sluice_pem::{read_certs, read_key};

/// Why a cluster's `tls` table does not make a client configuration. Each names the key and,
/// for a file, its path.
///
/// The wrapped error's text is part of this one's (no `source()`): [`crate::StartError`] shows
/// it, and a chain printer would repeat it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// `ca_file`, `cert_file` or `key_file` cannot be opened, is not PEM, or holds no
    /// certificate (`ca_file`, `cert_file`) or no private key.
    #[error("{0}")]
    Pem(#[from] sluice_pem::PemError),
    /// rustls refused a CA certificate from `ca_file`.
    #[error("ca_file {path}: {error}")]
    BadCa { path: String, error: rustls::Error },
    /// rustls refused the client certificate chain or its key.
    #[error("cert_file/key_file: {error}")]
    ClientAuth { error: rustls::Error },
    /// The crypto provider supports none of the default protocol versions.
    #[error("TLS protocol versions: {error}")]
    Versions { error: rustls::Error },
    #[error("cert_file and key_file go together")]
    Unpaired,
}

pub(crate) fn client_config(t: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(path) => {
            for c in read_certs("ca_file", path)? {
                roots.add(c).map_err(|error| TlsError::BadCa { path: path.clone(), error })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Versions { error })?
        .with_root_certificates(roots);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("cert_file", cert)?;
            let key_der = read_key("key_file", key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|error| TlsError::ClientAuth { error })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::Unpaired),
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let missing = |ca: Option<&str>, cert: Option<&str>, key: Option<&str>| {
            let t = TlsConfig {
                ca_file: ca.map(String::from),
                cert_file: cert.map(String::from),
                key_file: key.map(String::from),
            };
            client_config(&t).unwrap_err().to_string()
        };
        let e = missing(Some("/nonexistent/ca.pem"), None, None);
        assert!(e.starts_with("ca_file /nonexistent/ca.pem: No such file"), "{e}");
        let e = missing(None, Some("/nonexistent/c.pem"), Some("/nonexistent/k.pem"));
        assert!(e.starts_with("cert_file /nonexistent/c.pem: No such file"), "{e}");
        assert_eq!(missing(None, Some("/nonexistent/c.pem"), None), "cert_file and key_file go together");
        let dir = std::env::temp_dir().join(format!("sluice-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let empty = empty.to_str().unwrap();
        assert_eq!(missing(Some(empty), None, None), format!("ca_file {empty}: no certificate in it"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
