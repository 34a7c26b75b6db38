//! The `sluice` binary: flags and config file in, shards running, clean shutdown on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice_core::bridge::{Delivery, Destination, KeySource, MappingConfig, TopicTemplate};
use sluice_core::config::{parse_cpuset, Config, QueueFullPolicy, DEFAULT_CONFIG_TOML};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sluice: a thread-per-core MQTT 3.1.1/5.0 broker with a native Kafka bridge.
///
/// Flags override the config file; the file overrides the defaults (`sluice generate-config`).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Plain TCP MQTT listener, e.g. 127.0.0.1:1883 (port 0 picks a free port); served in front of
    /// any `[[listeners]]` of the config file. Default: 127.0.0.1:1883 when no listener is
    /// configured.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Serve --listen on a non-loopback address to clients without credentials (needed there unless [auth] authenticates every client).
    #[arg(long)]
    allow_anonymous: bool,
    /// Number of shards, one pinned thread each, on the first N CPUs this process may use.
    #[arg(long, value_name = "N")]
    cores: Option<usize>,
    /// Exact CPUs to pin shards to, e.g. 0,2-5 (overrides --cores).
    #[arg(long, value_name = "LIST")]
    cpuset: Option<String>,
    /// Directory for persistent state.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Largest MQTT packet accepted, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_packet_size: Option<u32>,
    /// Connections accepted in total.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Unacknowledged QoS 1/2 messages per session in each direction (Receive Maximum).
    #[arg(long, value_name = "N")]
    max_inflight: Option<u16>,
    /// Messages queued per offline or busy session.
    #[arg(long, value_name = "N")]
    max_queued_messages: Option<usize>,
    /// What to drop when a session queue is full.
    #[arg(long, value_name = "POLICY", value_enum)]
    queue_full_policy: Option<QueueFullPolicy>,
    /// Subscriptions one session may hold.
    #[arg(long, value_name = "N")]
    max_subscriptions_per_session: Option<usize>,
    /// Keep-alive the broker imposes (Server Keep Alive) when a client asks for more or for none;
    /// 0 accepts the client's value.
    #[arg(long, value_name = "SECS")]
    max_keep_alive: Option<u16>,
    /// Seconds between $SYS/ statistics messages (0 turns them off).
    #[arg(long, value_name = "SECS")]
    sys_interval: Option<u64>,
    /// What drives the connections' sockets (io-uring falls back to epoll where refused).
    #[arg(long, value_name = "DRIVER", value_enum)]
    io_driver: Option<sluice_core::config::IoDriver>,
    /// An extra listener for one shard, given once per shard in shard order: clients connecting
    /// there are served by that shard (deterministic placement for tests and debugging).
    #[arg(long, value_name = "ADDR")]
    shard_listen: Vec<SocketAddr>,
    /// Kafka bootstrap broker(s), comma-separated, for the cluster named `default` (quick start
    /// without a config file; `[kafka.clusters.NAME]` tables in the file do the full job).
    #[arg(long, value_name = "HOST:PORT")]
    kafka: Option<String>,
    /// MQTT → Kafka mapping FILTER=TOPIC onto the `default` cluster, keyed by MQTT topic, e.g.
    /// 'devices/#=iot-telemetry'. Repeatable.
    #[arg(long = "map", value_name = "FILTER=TOPIC")]
    maps: Vec<String>,
    /// When QoS 1/2 publishes to bridged topics are acknowledged.
    #[arg(long, value_name = "MODE", value_enum)]
    delivery: Option<Delivery>,
    /// Let the `default` cluster create missing Kafka topics.
    #[arg(long)]
    kafka_auto_create: bool,
    /// Print the address each shard listens on (for scripts using port 0).
    #[arg(long)]
    print_listen: bool,
    /// HTTP endpoint (metrics, health checks, admin API, dashboard), e.g. 127.0.0.1:8080; sets
    /// `[http] listen` (port 0 picks a free port; --print-listen prints `http ADDR`).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a commented default config file.
    GenerateConfig,
    /// Add or update USER in a Mosquitto-format password file (argon2id), reading the password
    /// from stdin (one line; at a terminal, prompted and not echoed); the file is created if missing.
    Passwd { file: PathBuf, user: String },
}

fn main() {
    // mimalloc asks for transparent huge pages on its arenas; a broker's heap is mostly many small
    // idle connections, and 2 MiB pages filled a few hundred bytes at a time showed up as resident
    // memory: 10,000 idle connections measured 1.26 KiB each with them, 0.75 KiB without, with
    // throughput unchanged (BENCHMARKS.md). Best effort: an old kernel without the flag is fine.
    let _ = nix::sys::prctl::set_thp_disable(true);
    if let Err(e) = real_main() {
        eprintln!("sluice: error: {e:#}");
        std::process::exit(2);
    }
}

/// `sluice passwd FILE USER`: the password from stdin, hashed with argon2id, written into FILE
/// (the other lines kept; temp file and rename, so a crash never leaves half a file).
fn passwd(file: &std::path::Path, user: &str) -> anyhow::Result<()> {
    use sluice_core::auth::password::{hash_argon2id, upsert_entry};
    let line = read_password().context("reading the password")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        bail!("empty password");
    }
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let hash = hash_argon2id(password.as_bytes())?;
    let text = upsert_entry(&old, user, &hash)?;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    Ok(())
}

/// One line from stdin; at a terminal, after a prompt and without echo.
fn read_password() -> std::io::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let mut line = String::new();
    if !stdin.is_terminal() {
        stdin.read_line(&mut line)?;
        return Ok(line);
    }
    eprint!("Password: ");
    let old = tcgetattr(&stdin)?;
    let mut quiet = old.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
    let read = stdin.read_line(&mut line);
    tcsetattr(&stdin, SetArg::TCSANOW, &old)?;
    eprintln!();
    read.map(|_| line)
}

/// Runs `reload` on a thread of its own (`sluice-reload-WHAT`) at every SIGHUP. Each part that
/// reloads (auth files, schemas, TLS certificates) has its own, so one slow reload does not
/// hold the others.
fn on_sighup(what: &str, mut reload: impl FnMut() + Send + 'static) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .with_context(|| format!("installing the SIGHUP handler for {what}"))?;
    std::thread::Builder::new()
        .name(format!("sluice-reload-{what}"))
        .spawn(move || {
            for _ in signals.forever() {
                reload();
            }
        })
        .context("starting the reload thread")?;
    Ok(())
}

/// SIGHUP reloads the `[auth]` files; a reload that fails keeps the rules in force.
fn watch_reload(access: Arc<sluice_net::access::SharedAccess>) -> anyhow::Result<()> {
    on_sighup("auth", move || {
        let reloaded = access.reload();
        for e in &reloaded.failed {
            tracing::error!("auth reload failed, the previous rules stay in force for this section: {e}");
        }
        tracing::info!(generation = reloaded.generation, failed = reloaded.failed.len(), "auth files reloaded");
    })
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::GenerateConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            return Ok(());
        }
        Some(Command::Passwd { file, user }) => return passwd(file, user),
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    exit_on_panic();
    let mut cfg = match &cli.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
            Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    apply_flags(&cli, &mut cfg)?;
    if let Some(c) = cfg.cluster.as_mut() {
        // This run of the node: its claims and heartbeats say which run made them.
        c.incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64);
    }
    cfg.add_cluster_mappings();
    let cpus = choose_cpus(&cfg)?;
    let listener_configs = listener_configs(&cli, &cfg);
    let listeners = listeners(&listener_configs)?;
    std::fs::create_dir_all(&cfg.server.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.server.data_dir))?;

    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, shutdown.clone()).context("installing signal handler")?;
    }
    // The global [auth], and each listener's own [listeners.auth] (by listener index, as the
    // shards number them); a listener's `allow_anonymous` lets clients without credentials in
    // on that listener.
    let anonymous = listener_configs.iter().map(|l| l.allow_anonymous).collect();
    let per_listener = listener_configs.iter().map(|l| l.auth.clone()).collect();
    let access = sluice_net::access::SharedAccess::new(cfg.auth.clone(), per_listener, anonymous)
        .context("loading the auth files")?
        .map(Arc::new);
    if let Some(shared) = &access {
        watch_reload(shared.clone())?;
    }
    reload_on_sighup(&listeners)?;
    tracing::info!(listeners = listeners.len(), shards = cpus.len(), ?cpus, auth = access.is_some(), "sluice starting");
    let (kafka, bridge) = if cfg.mqtt_to_kafka.is_empty() && cfg.kafka_to_mqtt.is_empty() {
        (None, None)
    } else {
        // Kafka → MQTT consumer positions stored by every shard of the last run.
        let mut positions = sluice_core::inbound::Positions::new();
        let pos_dir = std::path::Path::new(&cfg.server.data_dir).join("positions");
        if let Ok(entries) = std::fs::read_dir(&pos_dir) {
            for e in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    sluice_core::inbound::decode_positions(&text, &mut positions);
                }
            }
        }
        let schemas = sluice_kafka::schemas::SchemaSetup::build(
            &cfg.schemas,
            &cfg.schema_registries,
            &cfg.mqtt_to_kafka,
            &cfg.kafka_to_mqtt,
        )?;
        if let Some(s) = &schemas {
            reload_schemas_on_sighup(s.clone())?;
        }
        let (kafka, links) = sluice_kafka::start(
            &cfg.kafka.clusters,
            &cfg.mqtt_to_kafka,
            &cfg.kafka_to_mqtt,
            positions,
            &cpus,
            schemas,
            cfg.cluster.clone().map(|c| {
                let addresses = listener_configs.iter().map(|l| format!("{}://{}", l.kind.name(), l.address)).collect();
                let topics = c.message_topics(&cfg.mqtt_to_kafka);
                sluice_kafka::membership::NodeIdentity::new(c, addresses, &topics)
            }),
        )?;
        let links = links
            .into_iter()
            .map(|l| sluice_net::KafkaLink {
                requests: l.requests,
                results: l.results,
                inbound: l.inbound,
                claims: l.claims,
            })
            .collect();
        for m in &cfg.kafka_to_mqtt {
            tracing::info!(mapping = %m.name, kafka_topics = ?m.kafka_topics, mqtt_topics = ?m.mqtt_topics, "Kafka → MQTT mapping");
        }
        for m in &cfg.mqtt_to_kafka {
            tracing::info!(mapping = %m.name, filters = ?m.filters, destinations = m.destinations.len(), "MQTT → Kafka mapping");
        }
        let bridge = sluice_net::BridgeSetup {
            mappings: cfg.mqtt_to_kafka.clone(),
            inbound: cfg.kafka_to_mqtt.clone(),
            clusters: cfg.kafka.clusters.keys().cloned().collect(),
            max_pending_records_per_shard: cfg.kafka.max_pending_records_per_shard,
            kafka_to_mqtt_max_wait_ms: cfg.kafka.kafka_to_mqtt_max_wait_ms,
            delivery: cfg.kafka.delivery,
            spill_on_timeout: cfg.kafka.spill_on_timeout,
            qos0_when_backlogged: cfg.kafka.qos0_when_backlogged,
            spill_dir: std::path::Path::new(&cfg.server.data_dir).join("spill"),
            spill: sluice_storage::LogOptions {
                segment_bytes: cfg.kafka.spill_segment_bytes,
                max_bytes: cfg.kafka.spill_max_bytes_per_shard,
            },
            links,
        };
        (Some(kafka), Some(bridge))
    };
    if !cli.shard_listen.is_empty() && cli.shard_listen.len() != cpus.len() {
        bail!(
            "--shard-listen: given {} times for {} shards; give it once per shard",
            cli.shard_listen.len(),
            cpus.len()
        );
    }
    let print = cli.print_listen;
    // Every shard binds every listener, plus its own with --shard-listen.
    let listeners_up =
        sluice_admin::Listeners::new(cpus.len() * (listeners.len() + usize::from(!cli.shard_listen.is_empty())));
    let control = match &cfg.http {
        Some(h) => start_http(h, &cfg, cpus.len(), listeners_up.clone(), kafka.as_ref(), print)?,
        None => Vec::new(),
    };
    let bound = listeners_up.clone();
    sluice_net::run(
        sluice_net::RuntimeConfig {
            listeners,
            shard_listen: cli.shard_listen.clone(),
            cpus,
            limits: cfg.limits.clone(),
            sys_interval_ms: cfg.server.sys_interval_secs * 1000,
            io_driver: cfg.server.io_driver,
            data_dir: cfg.server.data_dir.clone().into(),
            release_memory,
            access,
            control,
        },
        bridge,
        shutdown,
        move |shard, what| {
            use sluice_net::Listening;
            bound.bound();
            match what {
                Listening::Listener { index, kind, addr } if shard == 0 => {
                    tracing::info!(listener = index, kind = kind.name(), %addr, "listening")
                }
                Listening::Dedicated(addr) => tracing::info!(shard, %addr, "listening (this shard only)"),
                _ => {}
            }
            if print {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = match (what, shard) {
                    (Listening::Dedicated(addr), _) => writeln!(out, "shard {shard} listening {addr}"),
                    (Listening::Listener { index, kind, addr }, 0) => {
                        // `listening ADDR` (the first listener) is what scripts have read so far.
                        let first = if index == 0 { writeln!(out, "listening {addr}") } else { Ok(()) };
                        first.and_then(|()| writeln!(out, "listener {index} {} {addr}", kind.name()))
                    }
                    _ => Ok(()),
                };
                let _ = out.flush();
            }
        },
    )?;
    if let Some(k) = kafka {
        k.shutdown(std::time::Duration::from_secs(2));
    }
    tracing::info!("sluice stopped");
    Ok(())
}

/// Starts the HTTP endpoint (`[http]`) on its own thread; returns the shards' ends of its
/// control channels.
fn start_http(
    h: &sluice_core::config::HttpConfig,
    cfg: &Config,
    n_shards: usize,
    listeners: Arc<sluice_admin::Listeners>,
    kafka: Option<&sluice_kafka::KafkaBridge>,
    print: bool,
) -> anyhow::Result<Vec<tokio::sync::mpsc::Receiver<sluice_net::control::ControlRequest>>> {
    let (senders, receivers) = sluice_net::control::channels(n_shards);
    let listen = h.listen.parse().context("http.listen")?;
    let tls = match (&h.cert_file, &h.key_file) {
        (Some(cert), Some(key)) => Some(sluice_admin::tls_config(cert, key)?),
        _ => None,
    };
    let https = tls.is_some();
    let addr = sluice_admin::spawn(
        sluice_admin::HttpSettings {
            listen,
            token: h.token.clone(),
            username: h.username.clone(),
            password: h.password.clone(),
            tls,
        },
        sluice_admin::Sources {
            shards: senders,
            listeners,
            kafka: kafka.map(|k| k.health()),
            mqtt_to_kafka: cfg.mqtt_to_kafka.clone(),
            kafka_to_mqtt: cfg.kafka_to_mqtt.clone(),
            spill_max_bytes: cfg.kafka.spill_max_bytes_per_shard,
        },
    )?;
    tracing::info!(%addr, https, auth = h.token.is_some() || h.username.is_some(), "HTTP endpoint listening (/metrics, /healthz, /readyz, /api/v1, dashboard at /)");
    if print {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "http {addr}");
        let _ = out.flush();
    }
    Ok(receivers)
}

/// The listeners every shard serves, by index: `--listen` (or, with no `[[listeners]]`,
/// `server.listen`) first, then the config file's `[[listeners]]`.
fn listener_configs(cli: &Cli, cfg: &Config) -> Vec<sluice_core::config::ListenerConfig> {
    let mut configs = Vec::new();
    if cli.listen.is_some() || cfg.listeners.is_empty() {
        let quick = cfg.quick_listener();
        if cli.listen.is_none() && cfg.server.listen == Config::default().server.listen {
            tracing::info!(
                "no listener configured: listening on {} only; to serve other hosts configure [auth] \
                 and [[listeners]] (or allow_anonymous = true, or --listen ADDR --allow-anonymous)",
                quick.address
            );
        }
        configs.push(quick);
    }
    configs.extend(cfg.listeners.iter().cloned());
    configs
}

/// [`listener_configs`] with each listener's TLS files loaded.
fn listeners(configs: &[sluice_core::config::ListenerConfig]) -> anyhow::Result<Vec<sluice_net::ListenerSpec>> {
    let mut specs = Vec::with_capacity(configs.len());
    for (i, l) in configs.iter().enumerate() {
        let spec = sluice_net::ListenerSpec::from_config(l)
            .with_context(|| format!("listener {i} ({} on {})", l.kind.name(), l.address))?;
        specs.push(spec);
    }
    Ok(specs)
}

/// SIGHUP compiles the `[schemas.NAME]` files again; a schema that fails keeps its previous
/// version, and the error names the file and the problem.
fn reload_schemas_on_sighup(schemas: Arc<sluice_kafka::schemas::SchemaSetup>) -> anyhow::Result<()> {
    on_sighup("schemas", move || {
        let failed = schemas.reload();
        for e in &failed {
            tracing::error!("schema reload failed, the previous version stays in force: {e}");
        }
        tracing::info!(failed = failed.len(), "schema files reloaded");
    })
}

/// SIGHUP reloads every TLS listener's certificate and key: new handshakes use the new files,
/// open connections keep theirs. A listener whose files do not load keeps its old ones.
fn reload_on_sighup(listeners: &[sluice_net::ListenerSpec]) -> anyhow::Result<()> {
    let tls: Vec<_> = listeners.iter().enumerate().filter_map(|(i, l)| Some((i, l.tls.clone()?))).collect();
    on_sighup("tls", move || {
        for (i, acceptor) in &tls {
            let (cert, key) = acceptor.files();
            match acceptor.reload() {
                Ok(()) => tracing::info!(listener = i, cert_file = cert, key_file = key, "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(listener = i, "TLS reload failed, keeping the previous certificate and key: {e}")
                }
            }
        }
    })
}

/// Hands the calling thread's freed memory back to the operating system: mimalloc frees pages
/// lazily, after `purge_delay` and only on later allocator work, so memory a flood of
/// unauthenticated connections held stayed resident after they closed (60 MiB measured).
/// `force` purges at once; it walks this thread's pages, so it is for rare events only.
#[allow(unsafe_code)]
fn release_memory() {
    extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: `mi_collect` is part of the mimalloc library linked as the global allocator; it
    // takes no pointers and only walks the calling thread's own heap and the arenas' free lists.
    unsafe { mi_collect(true) }
}

fn apply_flags(cli: &Cli, cfg: &mut Config) -> anyhow::Result<()> {
    if let Some(v) = &cli.listen {
        cfg.server.listen = v.clone();
        cfg.server.allow_anonymous |= cli.allow_anonymous;
        let quick = cfg.quick_listener();
        if let Ok(addr) = v.parse::<SocketAddr>() {
            if !addr.ip().is_loopback() && !quick.allow_anonymous && !cfg.authenticates() {
                bail!(
                    "--listen {addr}: not a loopback address, and no [auth] section authenticates clients: \
                     configure [auth], add --allow-anonymous to serve anyone who can reach it, or listen \
                     on 127.0.0.1"
                );
            }
        }
    } else if cli.allow_anonymous {
        cfg.server.allow_anonymous = true;
    }
    if let Some(v) = cli.cores {
        cfg.server.cores = v;
    }
    if let Some(v) = &cli.cpuset {
        cfg.server.cpuset = Some(v.clone());
    }
    if let Some(v) = &cli.data_dir {
        cfg.server.data_dir = v.display().to_string();
    }
    if let Some(v) = cli.io_driver {
        cfg.server.io_driver = v;
    }
    if let Some(v) = cli.sys_interval {
        cfg.server.sys_interval_secs = v;
    }
    let l = &mut cfg.limits;
    if let Some(v) = cli.max_packet_size {
        l.max_packet_size = v;
    }
    if let Some(v) = cli.max_connections {
        l.max_connections = v;
    }
    if let Some(v) = cli.max_inflight {
        l.max_inflight = v;
    }
    if let Some(v) = cli.max_queued_messages {
        l.max_queued_messages = v;
    }
    if let Some(v) = cli.max_keep_alive {
        l.max_keep_alive_secs = v;
    }
    if let Some(v) = cli.max_subscriptions_per_session {
        l.max_subscriptions_per_session = v;
    }
    if let Some(v) = cli.queue_full_policy {
        l.queue_full_policy = v;
    }
    if let Some(k) = &cli.kafka {
        let c = cfg.kafka.clusters.entry("default".into()).or_default();
        c.bootstrap = k.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if cli.kafka_auto_create {
            c.auto_create_topics = true;
        }
    }
    if let Some(d) = cli.delivery {
        cfg.kafka.delivery = d;
    }
    if let Some(a) = &cli.http {
        cfg.http.get_or_insert_with(Default::default).listen = a.clone();
    }
    for (i, m) in cli.maps.iter().enumerate() {
        let Some((filter, topic)) = m.rsplit_once('=') else {
            bail!("--map `{m}`: expected FILTER=TOPIC, e.g. 'devices/#=iot-telemetry'");
        };
        if !cfg.kafka.clusters.contains_key("default") {
            bail!("--map needs --kafka HOST:PORT (or a [kafka.clusters.default] table)");
        }
        let topic = TopicTemplate::parse(topic).map_err(|e| anyhow::anyhow!("--map `{m}`: {e}"))?;
        cfg.mqtt_to_kafka.push(MappingConfig::new(
            format!("map-{}", i + 1),
            vec![filter.to_string()],
            vec![Destination { cluster: "default".into(), topic, partition: None }],
            KeySource::Topic,
        ));
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e} (from flags or file)"))
}

/// CPUs this process may run on, from the kernel's view of our affinity.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    parse_cpuset(list.trim()).map_err(|e| anyhow::anyhow!("Cpus_allowed_list: {e}"))
}

fn choose_cpus(cfg: &Config) -> anyhow::Result<Vec<usize>> {
    let allowed = allowed_cpus()?;
    if let Some(set) = &cfg.server.cpuset {
        let cpus = parse_cpuset(set).map_err(|e| anyhow::anyhow!("--cpuset / server.cpuset: {e}"))?;
        if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
            bail!("--cpuset / server.cpuset: CPU {c} is not in this process's allowed set {allowed:?}");
        }
        return Ok(cpus);
    }
    let n = if cfg.server.cores == 0 { allowed.len() } else { cfg.server.cores };
    if n > allowed.len() {
        bail!(
            "--cores / server.cores: {n} shards asked for, but only {} CPUs are allowed ({allowed:?})",
            allowed.len()
        );
    }
    Ok(allowed[..n].to_vec())
}

/// Any panic — on a shard, a Kafka thread, anywhere — ends the whole process.
///
/// A shard that died would leave a half-working broker: its connections unserved, the session
/// directory and retained topics it owns unreachable, other shards waiting forever for its
/// receipts. Restarting one shard in place cannot rebuild what the others expect of it, so the
/// process aborts (SIGABRT; no unwinding, no destructors racing the other threads) for its
/// supervisor (systemd, Kubernetes) to restart it; what was acknowledged is on disk and comes back.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        tracing::error!(%thread, "panic: {info}; exiting so that a supervisor restarts sluice");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    /// Every name a flag takes loads from the config file as the same value: the flags and the
    /// file speak one vocabulary.
    #[test]
    fn flag_names_are_the_config_file_names() {
        for v in QueueFullPolicy::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_string();
            let cfg = Config::from_toml(&format!("[limits]\nqueue_full_policy = \"{name}\"\n")).unwrap();
            assert_eq!(cfg.limits.queue_full_policy, *v, "{name}");
            let cli = Cli::try_parse_from(["sluice", "--queue-full-policy", &name]).unwrap();
            assert_eq!(cli.queue_full_policy, Some(*v));
        }
        for v in Delivery::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_string();
            let cfg = Config::from_toml(&format!("[kafka]\ndelivery = \"{name}\"\n")).unwrap();
            assert_eq!(cfg.kafka.delivery, *v, "{name}");
            let cli = Cli::try_parse_from(["sluice", "--delivery", &name]).unwrap();
            assert_eq!(cli.delivery, Some(*v));
        }
    }

    #[test]
    fn a_bad_value_names_the_flag_and_the_accepted_values() {
        for (flag, good) in
            [("--delivery", &["kafka-ack", "local-durable"]), ("--queue-full-policy", &["drop-newest", "drop-oldest"])]
        {
            let e = Cli::try_parse_from(["sluice", flag, "drop-random"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
            let text = e.to_string();
            assert!(text.contains(flag) && text.contains("drop-random"), "{text}");
            for g in good {
                assert!(text.contains(g), "{flag}: `{g}` not listed: {text}");
            }
        }
    }
}
