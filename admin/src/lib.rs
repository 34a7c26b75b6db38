//! sluice-admin: the HTTP endpoint — Prometheus `/metrics`, `/healthz`, `/readyz`, the JSON
//! admin API (`/api/v1/…`, described in `docs/openapi.yaml`), the live message view (Server-Sent
//! Events) and the dashboard (static files embedded in the binary).
//!
//! # Layout
//! - [`spawn`]: binds the listener (so a taken port fails the start) and runs the server on a
//!   thread of its own, `sluice-http`, with a current-thread tokio runtime: nothing here runs on
//!   a shard's reactor, so a slow scraper or a stuck browser never stalls a shard.
//! - `server`: connections (hyper, HTTP/1.1), authentication, routing, the bounds.
//! - `metrics`: the Prometheus text format from the shards' snapshots and the Kafka health.
//! - `api`: the admin API's handlers; each asks every shard (`sluice_net::control`) and merges.
//! - `live`: the live view's event stream.
//! - `assets`: the dashboard's files (uPlot vendored, see `assets/uPlot.LICENSE`).
//!
//! Figures come from the shards' own plain counters, asked for when needed ([`AdminQuery`]
//! over each shard's control channel) and summed here: no counter is shared between cores.
//!
//! Bounds: [`HTTP_CONNECTIONS_MAX`] connections (more are closed at accept), a TLS handshake
//! and then the request headers each within 10 s, request bodies ignored past [`REQUEST_BODY_MAX`] (413), a page of at most
//! [`sluice_core::shard::PAGE_MAX`] items, [`LIVE_STREAMS_MAX`] live views at once, each shard's
//! answer within [`SHARD_ANSWER_TIMEOUT`] (else 503).
//!
//! [`AdminQuery`]: sluice_core::shard::AdminQuery

mod api;
mod assets;
mod live;
mod metrics;
mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_core::bridge::MappingConfig;
use sluice_core::inbound::InboundMappingConfig;
use sluice_kafka::health::KafkaHealth;
use sluice_net::control::ControlRequest;
use tokio::sync::mpsc;

/// Open HTTP connections at most; more are closed at accept.
pub const HTTP_CONNECTIONS_MAX: usize = 64;
/// Largest request body read (the API takes none; this bounds what a client may send).
pub const REQUEST_BODY_MAX: u64 = 64 << 10;
/// Live views (event streams) open at once.
pub const LIVE_STREAMS_MAX: usize = 4;
/// The longest the endpoint waits for one shard's answer.
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// `[http]`, as the binary validated it.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// HTTPS with this configuration ([`tls_config`]); plain HTTP without.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The HTTPS configuration from `[http] cert_file` and `key_file` (PEM), TLS 1.2 and 1.3,
/// ALPN `http/1.1`.
pub fn tls_config(cert_file: &str, key_file: &str) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let chain = sluice_pem::read_certs("http.cert_file", cert_file).map_err(StartError::Pem)?;
    let key = sluice_pem::read_key("http.key_file", key_file).map_err(StartError::Pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|error| StartError::Tls { cert_file: cert_file.to_string(), error })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether every listener of every shard is bound: the binary counts them as the shards report.
#[derive(Debug, Default)]
pub struct Listeners {
    bound: AtomicUsize,
    expected: usize,
}

impl Listeners {
    pub fn new(expected: usize) -> Arc<Listeners> {
        Arc::new(Listeners { bound: AtomicUsize::new(0), expected })
    }

    /// One more listener socket is bound.
    pub fn bound(&self) {
        self.bound.fetch_add(1, Ordering::Relaxed);
    }

    pub fn up(&self) -> bool {
        self.bound.load(Ordering::Relaxed) >= self.expected
    }

    fn counts(&self) -> (usize, usize) {
        (self.bound.load(Ordering::Relaxed), self.expected)
    }
}

/// What the endpoint reads: the shards (by their control channels), the Kafka side, the
/// configuration it reports on.
pub struct Sources {
    /// Index = shard.
    pub shards: Vec<mpsc::Sender<ControlRequest>>,
    pub listeners: Arc<Listeners>,
    pub kafka: Option<Arc<KafkaHealth>>,
    pub mqtt_to_kafka: Vec<MappingConfig>,
    pub kafka_to_mqtt: Vec<InboundMappingConfig>,
    /// `kafka.spill_max_bytes_per_shard`: a shard spilling below it counts as ready.
    pub spill_max_bytes: u64,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot listen on {addr} (http.listen)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the HTTP thread")]
    Thread { source: std::io::Error },
    #[error(transparent)]
    Pem(sluice_pem::PemError),
    #[error("http.cert_file {cert_file}: {error}")]
    Tls { cert_file: String, error: rustls::Error },
}

/// Binds `settings.listen` and serves it on the `sluice-http` thread until the process ends.
/// Returns the bound address (port 0 picks one).
pub fn spawn(settings: HttpSettings, sources: Sources) -> Result<SocketAddr, StartError> {
    let addr = settings.listen;
    let listener = std::net::TcpListener::bind(addr).map_err(|source| StartError::Listen { addr, source })?;
    listener.set_nonblocking(true).map_err(|source| StartError::Listen { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Thread { source })?;
    std::thread::Builder::new()
        .name("sluice-http".into())
        .spawn(move || runtime.block_on(server::serve(listener, settings, sources)))
        .map_err(|source| StartError::Thread { source })?;
    Ok(bound)
}
