//! PEM files named by the configuration — certificate chains, CA bundles, private keys — read
//! into the DER types rustls takes, for both TLS users of the workspace: the listeners
//! (`sluice-net`) and the Kafka clients (`sluice-kafka`).
//!
//! Its own crate because neither of those may depend on the other (`net` never sees Kafka) and
//! `sluice-core` does no I/O. Invariant: every error names the config key and the file, so a
//! caller can show it as it is (`cert_file /etc/sluice/server.pem: no certificate in it`). Reads
//! block: callers read at start and on reload, never on a shard's reactor.

use std::io::BufReader;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a PEM file named by config key `key` gave nothing usable.
///
/// The wrapped I/O error's text is part of this one's (no `source()`), so that a chain printer
/// does not repeat it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// The file cannot be opened or is not PEM.
    #[error("{key} {path}: {error}")]
    Read { key: &'static str, path: String, error: std::io::Error },
    /// The file is PEM but holds no certificate or no private key.
    #[error("{key} {path}: no {what} in it")]
    Empty { key: &'static str, path: String, what: &'static str },
}

/// The certificates in the PEM file at `path` (config key `key`), in file order; at least one.
pub fn read_certs(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let read = |error| PemError::Read { key, path: path.to_string(), error };
    let f = std::fs::File::open(path).map_err(read)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(f)).collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(PemError::Empty { key, path: path.to_string(), what: "certificate" });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path` (config key `key`).
pub fn read_key(key: &'static str, path: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    let read = |error| PemError::Read { key, path: path.to_string(), error };
    let mut r = BufReader::new(std::fs::File::open(path).map_err(read)?);
    rustls_pemfile::private_key(&mut r).map_err(read)?.ok_or_else(|| PemError::Empty {
        key,
        path: path.to_string(),
        what: "private key",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let e = read_certs("ca_file", "/nonexistent/ca.pem").unwrap_err().to_string();
        assert!(e.starts_with("ca_file /nonexistent/ca.pem: No such file"), "{e}");
        let dir = std::env::temp_dir().join(format!("sluice-pem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "not pem\n").unwrap();
        let p = not_pem.to_str().unwrap();
        assert_eq!(read_certs("cert_file", p).unwrap_err().to_string(), format!("cert_file {p}: no certificate in it"));
        assert_eq!(read_key("key_file", p).unwrap_err().to_string(), format!("key_file {p}: no private key in it"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
