//! TLS towards Kafka (Confluent Cloud, MSK): trusted CAs from a PEM file or the bundled Mozilla
//! roots, and an optional client certificate for mutual TLS.

use std::sync::Arc;

use sluice_core::config::TlsConfig;

pub(crate) fn client_config(t: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(path) => {
            let certs = read_certs(path)?;
            if certs.is_empty() {
                return Err(format!("ca_file {path}: no certificate in it"));
            }
            for c in certs {
                roots.add(c).map_err(|e| format!("ca_file {path}: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let mut r = std::io::BufReader::new(std::fs::File::open(key).map_err(|e| format!("key_file {key}: {e}"))?);
            let key_der = rustls_pemfile::private_key(&mut r)
                .map_err(|e| format!("key_file {key}: {e}"))?
                .ok_or_else(|| format!("key_file {key}: no private key in it"))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| format!("cert_file/key_file: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("cert_file and key_file go together".into()),
    };
    Ok(Arc::new(cfg))
}

fn read_certs(path: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: {e}"))
}
