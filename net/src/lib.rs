//! sluice-net: the thread-per-core runtime that moves bytes for `sluice-core`.
//!
//! # Layout
//! - [`run`]: starts one glommio executor per CPU, each pinned, and waits for them.
//! - `shard`: one core's wiring (`run_shard`): binds its listeners, opens its stores, builds
//!   the runtime, starts the core's tasks and runs the clean shutdown.
//! - `runtime`: the per-core state (`ShardRuntime`) around one [`sluice_core::shard::Shard`]
//!   state machine, and how its effects are carried out (`dispatch`). All broker decisions are
//!   the state machine's; this crate only reads, writes and forwards.
//! - `conns`: the core's connections as slots in one epoll instance, read and written by one
//!   task (no task or glommio socket per connection: that is an idle device's memory), and the
//!   lingering close that lets a peer read our last bytes. It sees the runtime only through its
//!   small `Host` trait.
//! - `transport`: what a tls/ws/wss connection puts between its socket and the state machine
//!   (rustls driven sans-I/O, then `ws`); plain TCP connections have none.
//! - [`TlsAcceptor`] (`tls`): a TLS listener's configuration from its PEM files, reloadable;
//!   a client certificate's identity.
//! - `ws`: WebSocket, sans-I/O (upgrade, frames).
//! - `mesh`: the per-peer outboxes and the tasks on the channel mesh to every other core.
//! - [`KafkaLink`] (`kafka_link`): the channels to the Kafka side and the tasks that move
//!   records out, results back and consumed records in.
//! - `spill`: the spill log's scheduling (straight to Kafka or wait on disk, group commit,
//!   read-back).
//! - `store`: the retained-message and session stores of a shard, and the start-up merge of
//!   session stores.
//! - [`control`]: the HTTP endpoint's questions to each shard (admin API, metrics, live view).
//! - [`notify`]: a single-waiter wake-up flag, the one synchronisation primitive a shard needs
//!   (everything a shard owns lives in `Rc`/`RefCell` on its own thread).
//!
//! This crate never sees Kafka types; the binary wires bridges in through `sluice-core` types.

pub mod access;
mod conns;
pub mod control;
mod kafka_link;
mod mesh;
pub mod notify;
mod runtime;
mod shard;
mod spill;
mod store;
mod tls;
mod transport;
mod uring;
mod ws;

pub use kafka_link::KafkaLink;
pub use shard::ShardError;
pub use spill::SpillError;
pub use store::StoreError;
pub use tls::{TlsAcceptor, TlsError};

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use sluice_core::bridge::{Delivery, MappingConfig};
use sluice_core::config::{Limits, ListenerConfig, ListenerKind};

/// One listener; every shard serves every listener (SO_REUSEPORT).
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    /// tls/wss: the certificate and key every shard's handshakes use (reloadable).
    pub tls: Option<Arc<TlsAcceptor>>,
    /// ws/wss: the upgrade request's path.
    pub ws_path: Option<String>,
    /// A verified client certificate's name is the connection's identity.
    pub identity_as_username: bool,
}

impl ListenerSpec {
    /// From a validated `[[listeners]]` entry; loads its TLS files.
    pub fn from_config(l: &ListenerConfig) -> Result<ListenerSpec, TlsError> {
        let addr = l.address.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        Ok(ListenerSpec {
            addr,
            kind: l.kind,
            tls: if l.kind.is_tls() { Some(Arc::new(TlsAcceptor::new(l)?)) } else { None },
            ws_path: l.kind.is_ws().then(|| l.ws_path().to_string()),
            identity_as_username: l.use_identity_as_username,
        })
    }

    /// A plain TCP listener.
    pub fn tcp(addr: SocketAddr) -> ListenerSpec {
        ListenerSpec { addr, kind: ListenerKind::Tcp, tls: None, ws_path: None, identity_as_username: false }
    }
}

/// A socket a shard bound, reported to `run`'s `on_listening`.
#[derive(Clone, Copy, Debug)]
pub enum Listening {
    /// Listener `index` of [`RuntimeConfig::listeners`].
    Listener { index: usize, kind: ListenerKind, addr: SocketAddr },
    /// The shard's own extra listener (`shard_listen`).
    Dedicated(SocketAddr),
}

/// The MQTT → Kafka bridge as the shards see it: the mappings, and one link per shard to the
/// producers (which the binary starts; this crate never sees them).
pub struct BridgeSetup {
    pub mappings: Vec<MappingConfig>,
    pub inbound: Vec<sluice_core::inbound::InboundMappingConfig>,
    /// Cluster names, in the order the records' `cluster` index uses.
    pub clusters: Vec<String>,
    pub max_pending_records_per_shard: usize,
    /// Kafka → MQTT: the longest a receiver that takes nothing holds consumed records back.
    pub kafka_to_mqtt_max_wait_ms: u64,
    pub delivery: Delivery,
    /// `kafka-ack`: records that time out go to the spill log instead of failing.
    pub spill_on_timeout: bool,
    pub qos0_when_backlogged: sluice_core::config::Qos0Policy,
    /// Spill logs (local-durable) live in `spill_dir/shard-N`.
    pub spill_dir: std::path::PathBuf,
    pub spill: sluice_storage::LogOptions,
    /// Index = shard.
    pub links: Vec<KafkaLink>,
}

/// What the runtime needs to know; the binary builds it from flags and the config file.
#[derive(Debug)]
pub struct RuntimeConfig {
    /// At least one. Index 0 is the connections' default origin (`Shard::set_origin`).
    pub listeners: Vec<ListenerSpec>,
    /// One shard per entry, pinned to that CPU.
    pub cpus: Vec<usize>,
    /// Optional extra listener per shard (index = shard): a client connecting there is served by
    /// that shard. Used to place clients deterministically in tests and to debug one shard.
    pub shard_listen: Vec<SocketAddr>,
    pub limits: Limits,
    pub sys_interval_ms: u64,
    /// What drives the connections' sockets on each core.
    pub io_driver: sluice_core::config::IoDriver,
    /// Persistent state: retained messages under `retained/shard-N`, persistent sessions under
    /// `sessions/shard-N`.
    pub data_dir: std::path::PathBuf,
    /// Hands memory this thread freed back to the operating system (the binary knows its
    /// allocator; mimalloc keeps freed pages otherwise). Called on a shard's thread after its
    /// connections that had not completed CONNECT freed at least `RELEASE_MIN_BYTES`.
    pub release_memory: fn(),
    /// Authentication and authorization rules (`[auth]`), shared by every shard and reloaded in
    /// place; `None`: every client is accepted.
    pub access: Option<std::sync::Arc<access::SharedAccess>>,
    /// The HTTP endpoint's questions, one receiver per shard (index = shard); empty without
    /// an HTTP endpoint.
    pub control: Vec<tokio::sync::mpsc::Receiver<control::ControlRequest>>,
}

/// Why the broker could not run. Each error names the shard and carries its cause as its
/// `source` (print it with `{:#}` in anyhow, or walk `Error::source`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("cannot start shard {shard} on CPU {cpu}: {message}")]
    Spawn { shard: usize, cpu: usize, message: String },
    #[error("shard {shard} failed")]
    Shard { shard: usize, source: ShardError },
    #[error("shard {shard} failed: {message}")]
    Join { shard: usize, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs the broker until `shutdown` becomes true. Blocks the calling thread.
///
/// `on_listening(shard, what)` is called for every bound listener (useful with port 0).
pub fn run(
    mut cfg: RuntimeConfig,
    bridge: Option<BridgeSetup>,
    shutdown: Arc<AtomicBool>,
    on_listening: impl Fn(usize, Listening) + Send + Sync + 'static,
) -> Result<(), RunError> {
    let n = cfg.cpus.len();
    store::prepare_sessions(&cfg.data_dir.join("sessions"), n)?;
    let mesh = MeshBuilder::full(n, mesh::MESH_CHANNEL_BATCHES);
    let epoch = Instant::now();
    let on_listening = Arc::new(on_listening);
    // With port 0 every shard must share the ports the first one got: bind shard 0 first.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<(usize, SocketAddr)>();
    let mut addr_tx = Some(addr_tx);
    let mut handles = Vec::with_capacity(n);
    let mut listeners = cfg.listeners.clone();
    let mut control: Vec<_> = std::mem::take(&mut cfg.control).into_iter().map(Some).collect();
    let (mut links, bridge_cfg) = match bridge {
        Some(mut b) => {
            store::adopt_orphan_spills(&b.spill_dir, n, b.spill)?;
            let links: Vec<_> = std::mem::take(&mut b.links).into_iter().map(Some).collect();
            (links, Some(b))
        }
        None => (Vec::new(), None),
    };
    for (shard_id, &cpu) in cfg.cpus.iter().enumerate() {
        let mesh = mesh.clone();
        let shutdown = shutdown.clone();
        let on_listening = on_listening.clone();
        let addr_tx = addr_tx.take();
        let shard_cfg = shard::ShardConfig {
            id: shard_id,
            n_shards: n,
            listeners: listeners.clone(),
            own_listen: cfg.shard_listen.get(shard_id).copied(),
            limits: cfg.limits.clone(),
            sys_interval_ms: cfg.sys_interval_ms,
            io_driver: cfg.io_driver,
            data_dir: cfg.data_dir.clone(),
            release_memory: cfg.release_memory,
            access: cfg.access.clone(),
            control: control.get_mut(shard_id).and_then(Option::take),
            epoch,
            bridge: match (&bridge_cfg, links.get_mut(shard_id).and_then(Option::take)) {
                (Some(b), Some(link)) => Some(shard::ShardBridge {
                    mappings: b.mappings.clone(),
                    inbound: b.inbound.clone(),
                    positions_file: b
                        .spill_dir
                        .parent()
                        .unwrap_or(&b.spill_dir)
                        .join("positions")
                        .join(format!("shard-{shard_id}")),
                    clusters: b.clusters.clone(),
                    max_pending: b.max_pending_records_per_shard,
                    inbound_max_wait_ms: b.kafka_to_mqtt_max_wait_ms,
                    delivery: b.delivery,
                    spill_on_timeout: b.spill_on_timeout,
                    qos0_when_backlogged: b.qos0_when_backlogged,
                    // kafka-ack uses it too, for records that time out during an outage.
                    spill: Some((b.spill_dir.join(format!("shard-{shard_id}")), b.spill)),
                    link,
                }),
                _ => None,
            },
        };
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("sluice-shard-{shard_id}"))
            .spawn(move || async move {
                shard::run_shard(shard_cfg, mesh, shutdown, move |what| {
                    if let (Some(tx), Listening::Listener { index, addr, .. }) = (&addr_tx, what) {
                        let _ = tx.send((index, addr));
                    }
                    on_listening(shard_id, what);
                })
                .await
            })
            .map_err(|e| RunError::Spawn { shard: shard_id, cpu, message: e.to_string() })?;
        handles.push(handle);
        if shard_id == 0 {
            for _ in 0..listeners.len() {
                match addr_rx.recv() {
                    Ok((index, addr)) => listeners[index].addr = addr,
                    Err(_) => break,
                }
            }
        }
    }
    let mut first_err = None;
    for (shard, h) in handles.into_iter().enumerate() {
        let res = match h.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(RunError::Shard { shard, source }),
            Err(e) => Err(RunError::Join { shard, message: e.to_string() }),
        };
        if let Err(e) = res {
            // One shard failing (say, the port is taken) stops the others too.
            shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
