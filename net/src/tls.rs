//! TLS for `tls` and `wss` listeners: the server configuration built from the listener's PEM
//! files, reloaded on SIGHUP, and the identity a verified client certificate carries.
//!
//! rustls with the ring provider (the one sluice-kafka uses), TLS 1.2 and 1.3. The connection
//! driver runs rustls sans-I/O (see `transport`); this module only makes configurations.
//!
//! Invariants: a handshake uses the configuration current at its accept, and a reload only
//! replaces the configuration when every file of the listener loaded (a failed reload keeps
//! the previous one, so a half-written key file never takes a listener down). Nothing here
//! blocks a shard: files are read at start and by the reload, on the binary's signal thread.

use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use sluice_core::config::{ListenerConfig, ListenerKind};
use sluice_pem::{read_certs, read_key};

/// Why a listener's TLS files do not make a server configuration. Each names the key and, for a
/// file, its path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file cannot be opened, is not PEM, or holds no certificate or no private key.
    #[error("{0}")]
    Pem(#[from] sluice_pem::PemError),
    /// rustls refused a CA certificate of `client_ca_file`, or the verifier built from them.
    #[error("client_ca_file {path}: {error}")]
    BadCa { path: String, error: String },
    /// rustls refused the certificate chain or the key (a key that does not match, say).
    #[error("cert_file {cert} / key_file {key}: {error}")]
    Certificate { cert: String, key: String, error: rustls::Error },
    #[error("a {0} listener has no TLS")]
    NotTls(&'static str),
}

/// A TLS listener's configuration, shared by every shard; replaced as a whole by [`TlsAcceptor::reload`].
#[derive(Debug)]
pub struct TlsAcceptor {
    listener: ListenerConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsAcceptor {
    /// Loads the listener's files. `listener.kind` must be tls or wss.
    pub fn new(listener: &ListenerConfig) -> Result<TlsAcceptor, TlsError> {
        let cfg = server_config(listener)?;
        Ok(TlsAcceptor { listener: listener.clone(), current: RwLock::new(cfg) })
    }

    /// Loads the files again; on success new handshakes use them (open connections keep the
    /// keys they agreed on). On failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = server_config(&self.listener)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        Ok(())
    }

    /// The configuration a handshake starting now uses.
    pub(crate) fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The files this acceptor loads, for the log.
    pub fn files(&self) -> (&str, &str) {
        (self.listener.cert_file.as_deref().unwrap_or(""), self.listener.key_file.as_deref().unwrap_or(""))
    }
}

fn server_config(l: &ListenerConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    if !l.kind.is_tls() {
        return Err(TlsError::NotTls(l.kind.name()));
    }
    let (cert, key) = (l.cert_file.clone().unwrap_or_default(), l.key_file.clone().unwrap_or_default());
    let chain = read_certs("cert_file", &cert)?;
    let key_der = read_key("key_file", &key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| TlsError::Certificate { cert: cert.clone(), key: key.clone(), error })?;
    let builder = match &l.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("client_ca_file", ca)? {
                roots.add(c).map_err(|e| TlsError::BadCa { path: ca.clone(), error: e.to_string() })?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if l.require_client_certificate { v } else { v.allow_unauthenticated() };
            let v = v.build().map_err(|e| TlsError::BadCa { path: ca.clone(), error: e.to_string() })?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key_der).map_err(|error| TlsError::Certificate {
        cert: cert.clone(),
        key: key.clone(),
        error,
    })?;
    // ALPN: `mqtt` on a TLS listener (clients that send no ALPN are accepted too); a browser's
    // wss handshake offers `http/1.1`.
    cfg.alpn_protocols = match l.kind {
        ListenerKind::Wss => vec![b"http/1.1".to_vec(), b"mqtt".to_vec()],
        _ => vec![b"mqtt".to_vec()],
    };
    Ok(Arc::new(cfg))
}

/// The name a (verified) client certificate gives its holder: the subject's common name, else
/// its first DNS subject alternative name. `None` when the DER has neither or does not parse.
pub(crate) fn certificate_identity(der: &[u8]) -> Option<Box<str>> {
    let cert = Der::new(der).next_tlv()?.1; // Certificate ::= SEQUENCE
    let mut tbs = Der::new(Der::new(cert).next_tlv()?.1); // TBSCertificate ::= SEQUENCE
    if tbs.peek() == Some(0xa0) {
        tbs.next_tlv()?; // [0] version
    }
    for _ in 0..4 {
        tbs.next_tlv()?; // serialNumber, signature, issuer, validity
    }
    let (_, subject) = tbs.next_tlv()?;
    if let Some(cn) = common_name(subject) {
        return Some(cn);
    }
    tbs.next_tlv()?; // subjectPublicKeyInfo
    while let Some((tag, body)) = tbs.next_tlv() {
        if tag == 0xa3 {
            return first_dns_name(Der::new(body).next_tlv()?.1);
        }
    }
    None
}

/// OID 2.5.4.3 (id-at-commonName).
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// OID 2.5.29.17 (id-ce-subjectAltName).
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// `Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue)`.
fn common_name(name: &[u8]) -> Option<Box<str>> {
    let mut rdns = Der::new(name);
    while let Some((_, rdn)) = rdns.next_tlv() {
        let mut atvs = Der::new(rdn);
        while let Some((_, atv)) = atvs.next_tlv() {
            let mut atv = Der::new(atv);
            let (_, oid) = atv.next_tlv()?;
            let (tag, value) = atv.next_tlv()?;
            // UTF8String, PrintableString, IA5String, T61String.
            if oid == OID_CN && matches!(tag, 0x0c | 0x13 | 0x16 | 0x14) {
                return std::str::from_utf8(value).ok().filter(|s| !s.is_empty()).map(Into::into);
            }
        }
    }
    None
}

/// `Extensions ::= SEQUENCE OF Extension { extnID, critical BOOLEAN OPTIONAL, extnValue }`.
fn first_dns_name(extensions: &[u8]) -> Option<Box<str>> {
    let mut exts = Der::new(extensions);
    while let Some((_, ext)) = exts.next_tlv() {
        let mut ext = Der::new(ext);
        let (_, oid) = ext.next_tlv()?;
        if oid != OID_SAN {
            continue;
        }
        let (mut tag, mut value) = ext.next_tlv()?;
        if tag == 0x01 {
            (tag, value) = ext.next_tlv()?;
        }
        if tag != 0x04 {
            return None;
        }
        let mut names = Der::new(Der::new(value).next_tlv()?.1);
        while let Some((tag, name)) = names.next_tlv() {
            if tag == 0x82 {
                return std::str::from_utf8(name).ok().filter(|s| !s.is_empty()).map(Into::into);
            }
        }
    }
    None
}

/// Just enough DER: tag, definite length, contents.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn new(b: &'a [u8]) -> Der<'a> {
        Der(b)
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn next_tlv(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (body, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap().to_vec()
    }

    /// Made by `openssl req -x509 -subj "/O=sluice/CN=device-1"`, and one with no CN and
    /// `subjectAltName=IP:10.0.0.1,DNS:dev-2.example` (an IP first: the first DNS name counts).
    #[test]
    fn identity_is_the_common_name_else_the_first_dns_name() {
        let cn = "-----BEGIN CERTIFICATE-----\nMIIBnjCCAUOgAwIBAgIUPKdSCHhQt+uyl9FWWwqnCUqfpDAwCgYIKoZIzj0EAwIw\nJDEPMA0GA1UECgwGc2x1aWNlMREwDwYDVQQDDAhkZXZpY2UtMTAeFw0yNjEyMDEx\nMzU0NDhaFw0zNjExMjgxMzU0NDhaMCQxDzANBgNVBAoMBnNsdWljZTERMA8GA1UE\nAwwIZGV2aWNlLTEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS/8XZRLq8TSXOd\nF4HAd3E1hUj05T0/6eon56OHr0tuJil49m25kylO58X4EwgLQYP3zNzUp4t6jVos\nTA/8JbFzo1MwUTAdBgNVHQ4EFgQUX73vdU1SxeSeaJmAk5LotyulnXwwHwYDVR0j\nBBgwFoAUX73vdU1SxeSeaJmAk5LotyulnXwwDwYDVR0TAQH/BAUwAwEB/zAKBggq\nhkjOPQQDAgNJADBGAiEA11PKzsyE2IdtyJUtIX8wyoxOIHW05AFuN4WGMmtJUKcC\nIQDstoT+gBiSD3UJRi5sTDvWZgfXKNl6j812hGeOHjAO1g==\n-----END CERTIFICATE-----\n";
        let san = "-----BEGIN CERTIFICATE-----\nMIIBmDCCAT2gAwIBAgIUD1MsaGWXZXhAj4njHZuRFwkp70UwCgYIKoZIzj0EAwIw\nETEPMA0GA1UECgwGc2x1aWNlMB4XDTI2MTIwMTEzNTQ0OFoXDTM2MTEyODEzNTQ0\nOFowETEPMA0GA1UECgwGc2x1aWNlMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\nMCYx4X1oKNBc1XOuaD0K5tWovfJExh9h0JeE4KhNdjulR6hBo7EjtWtzeYCH+CXu\nqVPhtB6MULrZCV5tzDtbv6NzMHEwHQYDVR0OBBYEFJTEUpCkWledGj3jEf4OY6mn\nifEWMB8GA1UdIwQYMBaAFJTEUpCkWledGj3jEf4OY6mnifEWMA8GA1UdEwEB/wQF\nMAMBAf8wHgYDVR0RBBcwFYcECgAAAYINZGV2LTIuZXhhbXBsZTAKBggqhkjOPQQD\nAgNJADBGAiEA+MR1W1z9ynBXcPN7BHpjDgd3bcRgyz2DSvumE5kDvGMCIQDJ9wYV\npHhZGq938zyMFph+EbjJ7/L4hwPmQE5mtJSZiA==\n-----END CERTIFICATE-----\n";
        assert_eq!(certificate_identity(&der(cn)).as_deref(), Some("device-1"));
        assert_eq!(certificate_identity(&der(san)).as_deref(), Some("dev-2.example"));
        let d = der(cn);
        for cut in [0, 1, 10, d.len() / 2, d.len() - 1] {
            // Truncated DER: no identity, no panic.
            let _ = certificate_identity(&d[..cut]);
        }
        assert_eq!(certificate_identity(b"\x30\x84\xff\xff\xff\xff"), None);
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let l = ListenerConfig {
            kind: ListenerKind::Tls,
            cert_file: Some("/nonexistent/c.pem".into()),
            key_file: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        let e = TlsAcceptor::new(&l).unwrap_err().to_string();
        assert!(e.starts_with("cert_file /nonexistent/c.pem: No such file"), "{e}");
    }
}
