//! One core's wiring: binds its listeners, opens its stores and spill log, builds the
//! [`ShardRuntime`] around one [`Shard`] state machine, starts the core's tasks (connection
//! driver, mesh, Kafka link, store commits, ticker) and runs the clean shutdown.
//!
//! Nothing here decides anything about MQTT or moves bytes itself: each job lives in its module
//! (`runtime`, `conns`, `mesh`, `kafka_link`, `spill`, `store`). A failure to start is a
//! [`ShardError`] that names what could not be opened or bound.

use sluice_core::config::IoDriver;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use sluice_core::bridge::{Delivery, MappingConfig, Router};
use sluice_core::config::{Limits, ListenerKind, Qos0Policy};
use sluice_core::inbound::{Inbound, InboundMappingConfig};
use sluice_core::shard::{BridgeOptions, Shard, ShardMsg};

use crate::conns::{self, Bound, Conns};
use crate::kafka_link::{self, KafkaLink};
use crate::mesh;
use crate::notify::Notify;
use crate::runtime::{self, Parts, ShardRuntime};
use crate::spill::{Spill, SpillError};
use crate::store::{RetainedStore, SessionStore, StoreError};
use crate::transport::Wrapping;

const TICK: Duration = Duration::from_millis(100);

/// Why a shard could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot join the shard mesh: {message}")]
    Mesh { message: String },
    #[error("cannot watch its sockets")]
    Watch { source: io::Error },
    /// The MQTT → Kafka mappings or the Kafka → MQTT mappings were refused by `sluice-core`.
    #[error("{0}")]
    Mapping(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Spill(#[from] SpillError),
}

pub(crate) struct ShardConfig {
    pub(crate) id: usize,
    pub(crate) n_shards: usize,
    pub(crate) listeners: Vec<crate::ListenerSpec>,
    pub(crate) own_listen: Option<SocketAddr>,
    pub(crate) limits: Limits,
    pub(crate) sys_interval_ms: u64,
    pub(crate) io_driver: sluice_core::config::IoDriver,
    pub(crate) data_dir: PathBuf,
    pub(crate) release_memory: fn(),
    pub(crate) epoch: Instant,
    pub(crate) bridge: Option<ShardBridge>,
    pub(crate) access: Option<Arc<crate::access::SharedAccess>>,
    pub(crate) control: Option<tokio::sync::mpsc::Receiver<crate::control::ControlRequest>>,
}

/// This shard's end of the MQTT → Kafka bridge.
pub(crate) struct ShardBridge {
    pub(crate) mappings: Vec<MappingConfig>,
    pub(crate) inbound: Vec<InboundMappingConfig>,
    /// Where this shard stores its Kafka → MQTT consumer positions.
    pub(crate) positions_file: PathBuf,
    pub(crate) clusters: Vec<String>,
    pub(crate) max_pending: usize,
    pub(crate) inbound_max_wait_ms: u64,
    pub(crate) delivery: Delivery,
    pub(crate) spill_on_timeout: bool,
    pub(crate) qos0_when_backlogged: Qos0Policy,
    /// The spill log's directory and options (local-durable records, and kafka-ack records that timed out).
    pub(crate) spill: Option<(PathBuf, sluice_storage::LogOptions)>,
    pub(crate) link: KafkaLink,
}

fn unix_offset_ms(epoch: Instant) -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
        - epoch.elapsed().as_millis() as i64
}

/// How the state machine feeds Kafka. The QoS 0 policy and outage spilling need the spill log.
fn bridge_options(b: &ShardBridge, router: Router) -> BridgeOptions {
    let spill = b.spill.is_some();
    BridgeOptions {
        router,
        delivery: b.delivery,
        max_pending_records: b.max_pending,
        qos0_policy: if spill { b.qos0_when_backlogged } else { Default::default() },
        spill_on_timeout: spill && b.spill_on_timeout,
    }
}

pub(crate) async fn run_shard(
    cfg: ShardConfig,
    mesh: MeshBuilder<Vec<ShardMsg>, Full>,
    shutdown: Arc<AtomicBool>,
    on_listening: impl Fn(crate::Listening),
) -> Result<(), ShardError> {
    let bind = |addr: SocketAddr| {
        let l = conns::listen(addr).map_err(|source| ShardError::Listen { addr, source })?;
        let bound = l.local_addr().map_err(|source| ShardError::Listen { addr, source })?;
        Ok::<_, ShardError>((l, bound))
    };
    let mut bound = Vec::with_capacity(cfg.listeners.len() + 1);
    for (index, spec) in cfg.listeners.iter().enumerate() {
        let (socket, addr) = bind(spec.addr)?;
        on_listening(crate::Listening::Listener { index, kind: spec.kind, addr });
        let wrapping = (spec.kind != ListenerKind::Tcp).then(|| {
            Rc::new(Wrapping {
                index: index as u16,
                tls: spec.tls.clone(),
                ws_path: spec.ws_path.as_deref().map(Into::into),
                identity_as_username: spec.identity_as_username,
                max_frame: cfg.limits.max_packet_size as usize,
            })
        });
        bound.push(Bound { socket, index: index as u16, wrapping });
    }
    if let Some(a) = cfg.own_listen {
        let (socket, addr) = bind(a)?;
        on_listening(crate::Listening::Dedicated(addr));
        bound.push(Bound { socket, index: 0, wrapping: None });
    }
    let (senders, receivers) = mesh.join().await.map_err(|e| ShardError::Mesh { message: e.to_string() })?;
    let now0 = cfg.epoch.elapsed().as_millis() as u64;
    let mut shard = Shard::new(cfg.id, cfg.n_shards, cfg.limits, now0).with_session_store();
    let wall_offset_ms = unix_offset_ms(cfg.epoch);
    shard.set_wall_offset(wall_offset_ms);
    if let Some(access) = &cfg.access {
        access.install(&mut shard);
    }
    let (retained, restored) = RetainedStore::open(&cfg.data_dir.join("retained").join(format!("shard-{}", cfg.id)))?;
    let mut link = None;
    let mut spill = None;
    let mut positions_file = None;
    if let Some(b) = cfg.bridge {
        let router = Router::new(&b.mappings, &b.clusters).map_err(|e| ShardError::Mapping(e.to_string()))?;
        shard = shard.with_bridge(bridge_options(&b, router));
        if let Some((dir, opts)) = &b.spill {
            spill = Some(Spill::open(dir, *opts, &b.clusters, b.max_pending, cfg.id)?);
        }
        let inbound = Inbound::new(&b.inbound, &b.clusters).map_err(|e| ShardError::Mapping(e.to_string()))?;
        shard = shard.with_inbound(inbound, b.inbound.len(), b.inbound_max_wait_ms);
        positions_file = Some(b.positions_file);
        link = Some(b.link);
    }
    let sessions = SessionStore::open(
        &cfg.data_dir.join("sessions").join(format!("shard-{}", cfg.id)),
        &mut shard,
        cfg.epoch.elapsed().as_millis() as u64,
    )?;
    let ring = match cfg.io_driver {
        IoDriver::Epoll => None,
        IoDriver::IoUring => match crate::uring::Uring::new() {
            Ok(r) => Some(r),
            Err(e) => {
                if cfg.id == 0 {
                    tracing::warn!(error = %e, "io_uring is not available; driving connections with epoll");
                }
                None
            }
        },
    };
    let conns = Conns::new(bound, ring).map_err(|source| ShardError::Watch { source })?;
    if cfg.id == 0 {
        tracing::info!(driver = conns.driver(), "connection driver");
    }
    let rt = Rc::new(ShardRuntime::new(Parts {
        shard,
        conns,
        n_shards: cfg.n_shards,
        spill,
        positions_file,
        retained,
        sessions,
        access: cfg.access.clone(),
        wall_offset_ms,
        epoch: cfg.epoch,
    }));
    // Retained messages from the last run (before any client can subscribe: the listener is
    // bound but nothing is accepted until the driver runs).
    if !restored.is_empty() {
        let count = restored.len();
        let moved = rt.shard.borrow_mut().restore_retained(restored, false, rt.now_ms());
        rt.retained.forget(&moved);
        tracing::info!(shard = cfg.id, count, "retained messages restored");
    }
    // Restored sessions joined their shared groups on other shards.
    rt.dispatch();
    let adopted_dirs = if cfg.id == 0 { adopt_orphan_retained(&rt, &cfg.data_dir, cfg.n_shards)? } else { Vec::new() };
    glommio::spawn_local(runtime::session_commits(rt.clone())).detach();
    glommio::spawn_local(runtime::retained_scans(rt.clone())).detach();
    glommio::spawn_local(runtime::password_checks(rt.clone())).detach();
    if let Some(spill) = &rt.spill {
        glommio::spawn_local(runtime::spill_commits(rt.clone())).detach();
        rt.to_kafka(spill.refill());
    }
    if let Some(link) = link {
        kafka_link::spawn(link, &rt);
    }
    if let Some(rx) = cfg.control {
        glommio::spawn_local(crate::control::serve(rt.clone(), rx)).detach();
    }
    let c = rt.clone();
    mesh::spawn_receivers(receivers, move |batch| {
        let now = c.now_ms();
        c.shard.borrow_mut().on_shard_msgs(batch, now);
        c.dispatch();
    });
    let sender_tasks = mesh::spawn_senders(senders, rt.mesh.clone(), cfg.id);

    // Ticker: keep-alive, delayed wills, session expiry, $SYS; also watches for shutdown.
    // `SLUICE_FAILPOINT=shard-panic:N` makes shard N panic on its first tick (tests only).
    let panic_here = std::env::var("SLUICE_FAILPOINT").is_ok_and(|v| v == format!("shard-panic:{}", cfg.id));
    let stop_accept = Rc::new(Notify::default());
    {
        let rt = rt.clone();
        let stop_accept = stop_accept.clone();
        let (sys, release_memory) = (cfg.sys_interval_ms, cfg.release_memory);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(TICK).await;
                if panic_here {
                    // Fault injection for the test of what a panicking shard does to the process.
                    panic!("SLUICE_FAILPOINT: shard {} panics", rt.shard.borrow().id());
                }
                if shutdown.load(Ordering::Relaxed) {
                    stop_accept.notify();
                    break;
                }
                rt.tick(sys, release_memory);
            }
        })
        .detach();
    }

    if !adopted_dirs.is_empty() {
        // Removed once the new owners' stores synced (their group commits run each tick; two
        // rounds of ours cover the messages shard 0 itself received).
        let rt = rt.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(2)).await;
            rt.retained.sync().await;
            for d in adopted_dirs {
                if let Err(e) = std::fs::remove_dir_all(&d) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot remove an adopted retained store");
                }
            }
        })
        .detach();
    }

    // Every connection on this core, in one task (conns.rs); runs until shutdown below.
    let driver = glommio::spawn_local(conns::drive(rt.clone()));
    stop_accept.notified().await;
    rt.conns.stop_accepting();

    // Clean shutdown: every connection gets its last bytes (DISCONNECT 0x8B on MQTT 5), no wills.
    rt.store_positions();
    rt.retained.sync().await;
    let now = rt.now_ms();
    rt.shard.borrow_mut().shutdown(now);
    rt.dispatch();
    rt.sessions.commit(&rt.shard, &rt.retained, || rt.now_ms()).await;
    // Lingering connections count: their peers are reading the DISCONNECT.
    let deadline = Instant::now() + Duration::from_secs(2);
    while rt.conns.len() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(driver);
    drop(sender_tasks);
    Ok(())
}

/// Retained stores of shards that no longer exist (the process runs with fewer cores now):
/// shard 0 hands their messages to their new owners and returns the directories, to be removed
/// once the group commits made the messages durable there.
fn adopt_orphan_retained(rt: &ShardRuntime, data_dir: &std::path::Path, n: usize) -> Result<Vec<PathBuf>, ShardError> {
    let mut adopted = Vec::new();
    for dir in crate::store::orphan_retained_dirs(&data_dir.join("retained"), n) {
        let (orphan, msgs) = RetainedStore::open(&dir)?;
        drop(orphan);
        let count = msgs.len();
        rt.shard.borrow_mut().restore_retained(msgs, true, rt.now_ms());
        rt.dispatch();
        tracing::info!(from = %dir.display(), count, "retained messages adopted from a former shard");
        adopted.push(dir);
    }
    Ok(adopted)
}
