//! Broker configuration: the TOML file, its defaults, and validation that names the key at fault.
//!
//! Every queue and table the broker keeps has its bound here. Command-line flags override these
//! values in the binary; this module only knows the file.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::bridge::{Delivery, MappingConfig, Router};

/// The commented default configuration printed by `sluice generate-config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../sluice.toml");

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub kafka: KafkaConfig,
    /// `[[mqtt_to_kafka]]` mappings.
    pub mqtt_to_kafka: Vec<MappingConfig>,
    /// `[[kafka_to_mqtt]]` mappings.
    pub kafka_to_mqtt: Vec<crate::inbound::InboundMappingConfig>,
    /// `[auth]`: password file, ACL, JWT. Absent: every client is accepted.
    pub auth: Option<crate::auth::AuthConfig>,
    /// `[[listeners]]`: when there are none, `server.listen` is the one (plain TCP) listener.
    pub listeners: Vec<ListenerConfig>,
    /// `[schemas.NAME]`: the local schema registry.
    pub schemas: BTreeMap<String, crate::schemas::SchemaConfig>,
    /// `[schema_registries.NAME]`: Confluent Schema Registries.
    pub schema_registries: BTreeMap<String, crate::schemas::RegistryConfig>,
    /// `[http]`: metrics, health checks, admin API and dashboard. Absent: no HTTP endpoint.
    pub http: Option<HttpConfig>,
    /// `[cluster]`: this node's cluster. Absent: a node of its own.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// `[http]`: the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/api/v1/...`, the dashboard).
/// Everything but the two health checks needs the bearer `token` or the basic-auth
/// `username`/`password` when either is set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port, e.g. `127.0.0.1:8080`.
    pub listen: String,
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// HTTPS: PEM certificate chain and key (both or neither).
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| Err(ConfigError { key: format!("http.{key}"), problem: problem.into() });
        let Ok(addr) = self.listen.parse::<std::net::SocketAddr>() else {
            return err("listen", "must be an IP address and port, e.g. 127.0.0.1:8080");
        };
        if self.username.is_some() != self.password.is_some() {
            return err("password", "username and password go together");
        }
        if self.token.as_deref().is_some_and(str::is_empty) {
            return err("token", "must not be empty");
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return err("key_file", "cert_file and key_file go together");
        }
        let open = self.token.is_none() && self.username.is_none();
        if open && !addr.ip().is_loopback() {
            return err(
                "listen",
                "not a loopback address, and neither token nor username/password protects the admin API: set one, or listen on 127.0.0.1",
            );
        }
        Ok(())
    }
}

/// What a listener speaks on top of TCP. A connection's kind is invisible to the shard: the
/// connection driver turns the transport's bytes into MQTT bytes and back.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    #[default]
    Tcp,
    Tls,
    /// WebSocket (subprotocol `mqtt`, binary frames).
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    pub fn is_ws(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }

    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }
}

/// One `[[listeners]]` table. Every shard serves every listener (SO_REUSEPORT).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// IP address and port, e.g. `0.0.0.0:8883`.
    pub address: String,
    pub kind: ListenerKind,
    /// tls/wss: PEM certificate chain (server certificate first) and its private key.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// tls/wss: PEM CA certificates that client certificates are verified against (mutual TLS).
    pub client_ca_file: Option<String>,
    /// With `client_ca_file`: refuse handshakes without a client certificate (otherwise one is
    /// optional, and verified when given).
    pub require_client_certificate: bool,
    /// The client certificate's subject CN (else its first DNS name) is the connection's
    /// identity, for authentication to use as the user name.
    pub use_identity_as_username: bool,
    /// ws/wss: the HTTP path of the upgrade request (default `/mqtt`).
    pub path: Option<String>,
    /// Clients without credentials are accepted on this listener, even when `[auth]`
    /// authenticates on the others; and a non-loopback address may be served without `[auth]`.
    pub allow_anonymous: bool,
    /// `[listeners.auth]`: this listener's own authentication and authorization (same keys as
    /// `[auth]`), replacing the global `[auth]` for its connections (Mosquitto's
    /// `per_listener_settings true`).
    pub auth: Option<crate::auth::AuthConfig>,
}

/// Default WebSocket path of ws/wss listeners.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

impl ListenerConfig {
    /// The quick path's listener: plain TCP on `address`.
    pub fn tcp(address: &str, allow_anonymous: bool) -> ListenerConfig {
        ListenerConfig { address: address.into(), allow_anonymous, ..Default::default() }
    }

    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_WS_PATH)
    }

    /// Checks one listener; `key` is its config key (`listeners[2]`, `server.listen`).
    /// `global_auth`: the global `[auth]`, which applies unless the listener has its own. When
    /// the auth in force authenticates every client (a password file or JWT, anonymous clients
    /// refused), a non-loopback address is safe without `allow_anonymous`.
    pub fn validate(&self, key: &str, global_auth: Option<&crate::auth::AuthConfig>) -> Result<(), ConfigError> {
        let err = |k: &str, problem: &str| Err(ConfigError { key: format!("{key}.{k}"), problem: problem.into() });
        if let Some(a) = &self.auth {
            a.validate_as(&format!("{key}.auth")).map_err(|e| ConfigError { key: e.key, problem: e.problem })?;
        }
        // Mutual TLS with the certificate as the user name authenticates every client too, once
        // some auth section is in force to apply rules to that name.
        let by_certificate = self.require_client_certificate && self.use_identity_as_username;
        let authenticated =
            self.auth.as_ref().or(global_auth).is_some_and(|a| by_certificate || a.authenticates_every_client());
        let Ok(addr) = self.address.parse::<std::net::SocketAddr>() else {
            return err("address", "must be an IP address and port, e.g. 0.0.0.0:8883");
        };
        let tls = self.kind.is_tls();
        if tls && self.cert_file.is_none() {
            return err("cert_file", "a tls/wss listener needs cert_file and key_file (PEM)");
        }
        if tls && self.key_file.is_none() {
            return err("key_file", "a tls/wss listener needs cert_file and key_file (PEM)");
        }
        for (k, set) in [
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("client_ca_file", self.client_ca_file.is_some()),
            ("require_client_certificate", self.require_client_certificate),
            ("use_identity_as_username", self.use_identity_as_username),
        ] {
            if set && !tls {
                return err(k, &format!("only for tls and wss listeners (this one is {})", self.kind.name()));
            }
        }
        if (self.require_client_certificate || self.use_identity_as_username) && self.client_ca_file.is_none() {
            let k =
                if self.require_client_certificate { "require_client_certificate" } else { "use_identity_as_username" };
            return err(k, "needs client_ca_file (the CA that client certificates are verified against)");
        }
        if let Some(p) = &self.path {
            if !self.kind.is_ws() {
                return err("path", &format!("only for ws and wss listeners (this one is {})", self.kind.name()));
            }
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                return err("path", "must start with / and hold no spaces, e.g. /mqtt");
            }
        }
        if !addr.ip().is_loopback() && !self.allow_anonymous && !authenticated {
            return err(
                "allow_anonymous",
                &format!(
                    "{addr} is not a loopback address and no [auth] section authenticates clients: \
                     configure [auth] or this listener's [listeners.auth] (password_file or jwt), or \
                     set allow_anonymous = true to serve \
                     anyone who can reach it (or listen on 127.0.0.1)"
                ),
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `[kafka.clusters.NAME]` tables.
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Records waiting for Kafka per shard beyond which the shard stops reading from publishing
    /// clients (MQTT flow control instead of unbounded memory).
    pub max_pending_records_per_shard: usize,
    /// `kafka-ack` or `local-durable`: when QoS 1/2 publishes to bridged topics are acknowledged.
    pub delivery: Delivery,
    /// `kafka-ack`: records that time out go to the spill log instead of failing.
    pub spill_on_timeout: bool,
    /// QoS 0 records beyond `max_pending_records_per_shard`: wait (back-pressure on every
    /// publisher of the shard) or be dropped, newest or oldest first, counted.
    pub qos0_when_backlogged: Qos0Policy,
    /// Spill log (local-durable): segment file size, and the most disk one shard may use.
    pub spill_segment_bytes: u64,
    pub spill_max_bytes_per_shard: u64,
    /// Kafka → MQTT: the longest a QoS 1/2 receiver that takes no messages (never acknowledges,
    /// offline) holds the consumed records back; after it, it is skipped until its queue
    /// drained, and its queue follows `queue_full_policy` meanwhile.
    pub kafka_to_mqtt_max_wait_ms: u64,
}

/// Default of `kafka.kafka_to_mqtt_max_wait_ms`.
pub const DEFAULT_KAFKA_TO_MQTT_MAX_WAIT_MS: u64 = 5000;

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            clusters: BTreeMap::new(),
            max_pending_records_per_shard: 100_000,
            delivery: Delivery::KafkaAck,
            spill_on_timeout: true,
            qos0_when_backlogged: Qos0Policy::BackPressure,
            spill_segment_bytes: 64 << 20,
            spill_max_bytes_per_shard: 4 << 30,
            kafka_to_mqtt_max_wait_ms: DEFAULT_KAFKA_TO_MQTT_MAX_WAIT_MS,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Lz4,
    Snappy,
    Zstd,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the CA certificates to trust; the system roots when absent.
    pub ca_file: Option<String>,
    /// PEM client certificate and key, for mutual TLS.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// host:port of one or more brokers.
    pub bootstrap: Vec<String>,
    /// How long a partition's records wait for more while a request to their broker is in
    /// flight (with nothing in flight QoS 1/2 records and claims go at once; QoS 0 records,
    /// which nobody waits for, always wait up to this long).
    pub linger_ms: u64,
    /// Uncompressed bytes that make a batch full.
    pub batch_bytes: usize,
    /// Largest record (key + value + headers) sent; larger ones fail at once as too large, like
    /// the Java client's `max.request.size`, instead of failing a whole batch at the broker.
    pub max_record_bytes: usize,
    pub compression: Compression,
    /// Time from a record's hand-over until it is acknowledged or failed, retries included.
    pub delivery_timeout_ms: u64,
    /// Time one produce or metadata request may take before it counts as failed.
    pub request_timeout_ms: u64,
    /// How long a topic's partition count is trusted before it is asked again, so partitions
    /// added to a topic are used.
    pub metadata_max_age_ms: u64,
    /// Produce requests each shard may have outstanding towards one broker. Each partition has at
    /// most one batch in flight whatever this is, so per-partition order holds.
    pub max_requests_in_flight: usize,
    /// Create missing topics with `partitions` and `replication_factor`.
    pub auto_create_topics: bool,
    pub partitions: i32,
    pub replication_factor: i16,
    pub tls: Option<TlsConfig>,
    pub sasl: Option<SaslConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            bootstrap: Vec::new(),
            linger_ms: 5,
            batch_bytes: 1 << 20,
            max_record_bytes: 1 << 20,
            compression: Compression::None,
            delivery_timeout_ms: 30_000,
            request_timeout_ms: 5_000,
            metadata_max_age_ms: 30_000,
            max_requests_in_flight: 5,
            auto_create_topics: false,
            partitions: 3,
            replication_factor: 1,
            tls: None,
            sasl: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the MQTT listener binds on every shard (SO_REUSEPORT) when no `[[listeners]]` are
    /// configured (and, given as `--listen`, in front of them).
    pub listen: String,
    /// Serve `listen` without authentication on a non-loopback address (`--allow-anonymous`).
    pub allow_anonymous: bool,
    /// Number of shards; 0 means one per CPU the process may run on.
    pub cores: usize,
    /// Exact CPUs, e.g. "0,2-5"; overrides `cores` when set.
    pub cpuset: Option<String>,
    pub data_dir: String,
    /// How often `$SYS/` statistics are published, in seconds; 0 turns them off.
    pub sys_interval_secs: u64,
    /// Which system interface drives the connections' sockets.
    pub io_driver: IoDriver,
}

/// The connection driver (`[server] io_driver`, `--io-driver`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum IoDriver {
    /// epoll: one readiness set per core, a system call per read and per write. The default:
    /// measured faster than `io-uring` under point-to-point and fan-out (BENCHMARKS.md).
    #[default]
    Epoll,
    /// io_uring: multishot receives into a shared buffer pool, a turn's sends in one system call
    /// (a thousandth of epoll's system calls). Falls back to epoll, with a warning, where the
    /// kernel refuses it.
    IoUring,
}

/// What happens to QoS 0 records for Kafka when the shard's Kafka backlog is full.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Qos0Policy {
    /// The shard stops reading from its publishers until Kafka catches up (nothing dropped).
    #[default]
    BackPressure,
    /// Up to as many again wait in memory; beyond that the arriving record is dropped.
    DropNewest,
    /// Up to as many again wait in memory; beyond that the oldest waiting record is dropped.
    DropOldest,
}

/// What to do with a message for an offline session whose queue is full.
///
/// `--queue-full-policy` takes the same names as the file (clap's `ValueEnum` and serde both
/// kebab-case the variants; a test in the binary checks they agree).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum QueueFullPolicy {
    /// Keep the queue, drop the arriving message (Mosquitto's behaviour).
    DropNewest,
    /// Drop the oldest queued message to make room.
    DropOldest,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_packet_size: u32,
    /// Receive Maximum we advertise: QoS 1/2 publishes a client may have unacknowledged towards us,
    /// and our own cap on what we keep in flight towards a client.
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub queue_full_policy: QueueFullPolicy,
    pub max_topic_levels: usize,
    pub max_topic_length: usize,
    pub max_subscriptions_per_session: usize,
    /// Topic aliases a client may use towards us.
    pub topic_alias_maximum: u16,
    /// Upper bound on the session expiry a client may ask for, in seconds.
    pub max_session_expiry_secs: u32,
    /// Keep-alive the broker imposes when a client asks for more (or for none); 0 = no cap.
    pub max_keep_alive_secs: u16,
    /// Bytes buffered towards one connection: past this, QoS 0 messages to it are dropped and QoS
    /// 1/2 messages wait in its session queue until the output has gone out.
    pub max_outbound_buffer_bytes: usize,
    /// Retained messages kept by each shard (each holds a hash-partition of the topics).
    pub max_retained_messages: usize,
    /// Longest a slow subscriber may hold back publishers' QoS 1/2 acknowledgements, in ms (about:
    /// checked every tick). Past it, publishers stop waiting for that subscriber until its queue
    /// has drained, and its queue follows `queue_full_policy` meanwhile. 0: never wait.
    pub max_backpressure_ms: u64,
    /// Time from accept within which a connection must complete CONNECT, however many bytes it
    /// sends meanwhile; then it is closed.
    pub connect_timeout_ms: u64,
    /// Largest CONNECT accepted (fixed header included): a larger one is refused from its fixed
    /// header, before anything is buffered. At most `max_packet_size` applies in any case.
    pub max_connect_packet_bytes: u32,
    /// Bytes all connections of one shard that have not completed CONNECT may buffer together;
    /// a connection whose partial CONNECT would go past it is closed.
    pub max_preconnect_buffer_bytes_per_shard: usize,
    /// Connections from one address (IPv6: one /64) that have not completed CONNECT, per shard;
    /// beyond it new ones from there are closed at accept. 0 = no cap.
    pub max_preconnect_per_address: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            // Loopback only unless told otherwise (Mosquitto 2.0 made the same change).
            listen: "127.0.0.1:1883".into(),
            allow_anonymous: false,
            cores: 0,
            cpuset: None,
            data_dir: "./data".into(),
            sys_interval_secs: 10,
            io_driver: IoDriver::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1_000_000,
            max_packet_size: 1 << 20,
            max_inflight: 64,
            max_queued_messages: 1000,
            queue_full_policy: QueueFullPolicy::DropNewest,
            max_topic_levels: 32,
            max_topic_length: 1024,
            max_subscriptions_per_session: 1000,
            topic_alias_maximum: 64,
            max_session_expiry_secs: u32::MAX,
            max_keep_alive_secs: 0,
            max_outbound_buffer_bytes: 4 << 20,
            max_retained_messages: 1_000_000,
            max_backpressure_ms: 1000,
            connect_timeout_ms: 10_000,
            max_connect_packet_bytes: 64 << 10,
            max_preconnect_buffer_bytes_per_shard: 64 << 20,
            max_preconnect_per_address: 64,
        }
    }
}

/// A configuration error that says which key is wrong and why.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl Config {
    /// Whether the global `[auth]` authenticates every client: a password file or JWT, no
    /// anonymous access. It applies to `server.listen` (`--listen`) and every listener without
    /// its own `[listeners.auth]`; see [`Config::authenticates_on`] for one listener.
    pub fn authenticates(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| a.authenticates_every_client())
    }

    /// Whether every client of `listener` must authenticate: its own `[listeners.auth]` when it
    /// has one (that replaces `[auth]`), else the global `[auth]`.
    pub fn authenticates_on(&self, listener: &ListenerConfig) -> bool {
        listener.auth.as_ref().or(self.auth.as_ref()).is_some_and(|a| a.authenticates_every_client())
    }

    /// Whether any listener has authentication settings (the global `[auth]` or its own).
    pub fn has_auth(&self) -> bool {
        self.auth.is_some() || self.listeners.iter().any(|l| l.auth.is_some())
    }

    /// `server.listen` as a listener (the quick path: plain TCP).
    pub fn quick_listener(&self) -> ListenerConfig {
        ListenerConfig::tcp(&self.server.listen, self.server.allow_anonymous)
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let key = e.span().map(|s| span_key(text, s.start)).unwrap_or_default();
            ConfigError { key, problem: e.message().to_string() }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| Err(ConfigError { key: key.into(), problem: problem.into() });
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return err("server.listen", "must be an IP address and port, e.g. 127.0.0.1:1883");
        }
        if self.listeners.is_empty() {
            self.quick_listener().validate("server", self.auth.as_ref()).map_err(|e| ConfigError {
                key: e.key.replace("server.address", "server.listen"),
                problem: e.problem.replace("allow_anonymous = true", "allow_anonymous = true (or --allow-anonymous)"),
            })?;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(&format!("listeners[{i}]"), self.auth.as_ref())?;
        }
        if let Some(a) = &self.auth {
            a.validate().map_err(|e| ConfigError { key: e.key, problem: e.problem })?;
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        if let Some(set) = &self.server.cpuset {
            if let Err(e) = parse_cpuset(set) {
                return err("server.cpuset", &e.to_string());
            }
        }
        let l = &self.limits;
        if l.max_packet_size < 64 {
            return err("limits.max_packet_size", "must be at least 64 bytes");
        }
        if l.max_packet_size > 268_435_455 {
            return err("limits.max_packet_size", "must be at most 268435455 bytes (the MQTT maximum)");
        }
        if l.max_inflight == 0 {
            return err("limits.max_inflight", "must be at least 1");
        }
        if l.max_connections == 0 {
            return err("limits.max_connections", "must be at least 1");
        }
        if l.max_topic_levels == 0 || l.max_topic_length == 0 {
            return err("limits.max_topic_levels", "topic limits must be at least 1");
        }
        if l.connect_timeout_ms == 0 {
            return err("limits.connect_timeout_ms", "must be at least 1");
        }
        if l.max_connect_packet_bytes < 64 {
            return err("limits.max_connect_packet_bytes", "must be at least 64 bytes");
        }
        // A partial CONNECT's buffer grows by doubling: room for one of the largest, grown.
        if l.max_preconnect_buffer_bytes_per_shard < 2 * l.max_connect_packet_bytes.min(l.max_packet_size) as usize {
            return err(
                "limits.max_preconnect_buffer_bytes_per_shard",
                "must be at least twice max_connect_packet_bytes (room for one CONNECT as it arrives)",
            );
        }
        if l.max_topic_length > 65_535 {
            return err("limits.max_topic_length", "must be at most 65535 (an MQTT string)");
        }
        for (name, c) in &self.kafka.clusters {
            let key = |k: &str| format!("kafka.clusters.{name}.{k}");
            if c.bootstrap.is_empty() {
                return err(&key("bootstrap"), "names no broker; give host:port entries");
            }
            if let Some(b) =
                c.bootstrap.iter().find(|b| b.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none())
            {
                return err(&key("bootstrap"), &format!("`{b}` is not host:port"));
            }
            if c.partitions < 1 {
                return err(&key("partitions"), "must be at least 1");
            }
            if c.delivery_timeout_ms == 0 || c.request_timeout_ms == 0 {
                return err(&key("delivery_timeout_ms"), "time-outs must be above 0");
            }
            if c.batch_bytes == 0 {
                return err(&key("batch_bytes"), "must be at least 1");
            }
        }
        if self.kafka.spill_segment_bytes < 4096
            || self.kafka.spill_max_bytes_per_shard < self.kafka.spill_segment_bytes
        {
            return err(
                "kafka.spill_max_bytes_per_shard",
                "segments must be at least 4096 bytes and the limit at least one segment",
            );
        }
        self.validate_schemas()?;
        let names: Vec<String> = self.kafka.clusters.keys().cloned().collect();
        if let Some(c) = &self.cluster {
            c.validate(&names).map_err(|e| ConfigError { key: format!("cluster.{}", e.key), problem: e.problem })?;
        }
        for (i, m) in self.mqtt_to_kafka.iter().enumerate() {
            if m.name.starts_with('$') && m.internal.is_none() {
                return err(&format!("mqtt_to_kafka[{i}].name"), "names starting with `$` are sluice's own");
            }
        }
        for (i, m) in self.kafka_to_mqtt.iter().enumerate() {
            if m.name.starts_with('$') && m.internal.is_none() {
                return err(&format!("kafka_to_mqtt[{i}].name"), "names starting with `$` are sluice's own");
            }
        }
        Router::new(&self.mqtt_to_kafka, &names)
            .map_err(|e| ConfigError { key: "mqtt_to_kafka".into(), problem: e.to_string() })?;
        Ok(())
    }
}

impl Config {
    /// Adds the cluster's internal mappings (see `crate::cluster`) to the configured ones, once
    /// the configuration is final: they are built from `[cluster]`, not read from the file.
    pub fn add_cluster_mappings(&mut self) {
        let Some(c) = &self.cluster else { return };
        if self.mqtt_to_kafka.iter().any(|m| m.internal.is_some()) {
            return;
        }
        // User mappings that carry the messages they take (`cluster::carrier_destination`):
        // the other nodes read those from there, not from `.messages` too.
        let topics = c.message_topics(&self.mqtt_to_kafka);
        self.mqtt_to_kafka.push(c.forward_mapping(&topics));
        self.mqtt_to_kafka.push(c.retained_mapping());
        self.mqtt_to_kafka.push(c.claims_mapping());
        self.kafka_to_mqtt.push(c.inbound_mapping(topics));
        self.kafka_to_mqtt.push(c.retained_inbound_mapping());
        self.kafka_to_mqtt.push(c.claims_inbound_mapping());
    }

    /// The schema keys of every mapping, the registries' URLs and bounds.
    fn validate_schemas(&self) -> Result<(), ConfigError> {
        use crate::schemas::{check_mapping, MappingSchemaKeys, OnInvalid};
        let err = |key: String, problem: String| Err(ConfigError { key, problem });
        for (name, r) in &self.schema_registries {
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                return err(
                    format!("schema_registries.{name}.url"),
                    format!("`{}` is not an http:// or https:// URL", r.url),
                );
            }
            if r.timeout_ms == 0 || r.refresh_ms == 0 {
                return err(
                    format!("schema_registries.{name}.timeout_ms"),
                    "time-outs and intervals must be above 0".into(),
                );
            }
            if r.password.is_some() && r.username.is_none() {
                return err(format!("schema_registries.{name}.password"), "needs a `username`".into());
            }
        }
        for (i, m) in self.mqtt_to_kafka.iter().enumerate() {
            let key = format!("mqtt_to_kafka[{i}]");
            let keys = MappingSchemaKeys {
                key: key.clone(),
                schema: m.schema.as_deref(),
                registry: m.registry.as_deref(),
                mode: m.mode,
                subject: m.subject.as_deref(),
                version: m.version,
                outbound: true,
            };
            check_mapping(&keys, &self.schemas, &self.schema_registries).or_else(|(key, problem)| err(key, problem))?;
            let checked = m.schema.is_some() || m.registry.is_some();
            if checked && m.on_invalid == OnInvalid::DeadLetter && m.dead_letter.is_none() {
                return err(
                    format!("{key}.on_invalid"),
                    "\"dead-letter\" needs the mapping's `dead_letter` table".into(),
                );
            }
            // Records that wait on disk are replayed from the spill log without their mapping,
            // so they could not be checked (nor encoded) on their way to Kafka.
            if checked && self.kafka.delivery == Delivery::LocalDurable {
                return err(format!("{key}.schema"), "schemas need kafka.delivery = \"kafka-ack\"".into());
            }
            // A record that timed out is spilled as it came from MQTT, and replayed unencoded.
            if m.mode == Some(crate::schemas::SchemaMode::Encode) && self.kafka.spill_on_timeout {
                return err(
                    format!("{key}.mode"),
                    "\"encode\" needs kafka.spill_on_timeout = false (spilled records are replayed unencoded)".into(),
                );
            }
        }
        for (i, m) in self.kafka_to_mqtt.iter().enumerate() {
            let keys = MappingSchemaKeys {
                key: format!("kafka_to_mqtt[{i}]"),
                schema: m.schema.as_deref(),
                registry: m.registry.as_deref(),
                mode: m.mode,
                subject: m.subject.as_deref(),
                version: None,
                outbound: false,
            };
            check_mapping(&keys, &self.schemas, &self.schema_registries).or_else(|(key, problem)| err(key, problem))?;
        }
        Ok(())
    }
}

/// The dotted key at byte `offset` of a TOML document: the table header above it plus the key
/// on its line (`limits.max_packet_size`).
fn span_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim().trim_matches(|c| c == '[' || c == ']');
    let above = &text[..line_start];
    let header = above.lines().rev().map(str::trim).find(|l| l.starts_with('[') && l.ends_with(']'));
    // An array of tables (`[[listeners]]`) is named with the entry's index: `listeners[1]`.
    let table = header.map(|h| match h.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
        Some(name) => {
            let index = above.lines().filter(|l| l.trim() == h).count().saturating_sub(1);
            format!("{}[{index}]", name.trim())
        }
        None => {
            let name = h.trim_matches(|c| c == '[' || c == ']').trim();
            // A table inside an array entry (`[listeners.auth]` under the second `[[listeners]]`)
            // belongs to the last entry: `listeners[1].auth`.
            let entry = above.lines().rev().map(str::trim).find_map(|l| {
                let array = l.strip_prefix("[[")?.strip_suffix("]]")?.trim();
                let rest = name.strip_prefix(array)?.strip_prefix('.')?;
                let index = above.lines().filter(|x| x.trim() == l).count().saturating_sub(1);
                Some(format!("{array}[{index}].{rest}"))
            });
            entry.unwrap_or_else(|| name.to_string())
        }
    });
    match table {
        Some(t) if !line.trim_start().starts_with('[') => format!("{t}.{key}"),
        _ => key.to_string(),
    }
}

/// Why a CPU list does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CpusetError {
    /// One comma-separated entry; `at` is its byte offset in the list.
    #[error("`{part}` (at byte {at}) is not a CPU number or range like 2-5")]
    Bad { part: String, at: usize },
    #[error("names no CPU")]
    Empty,
}

/// Parses "0,2-5" into [0, 2, 3, 4, 5].
pub fn parse_cpuset(s: &str) -> Result<Vec<usize>, CpusetError> {
    let mut cpus = Vec::new();
    let mut at = 0;
    for raw in s.split(',') {
        let start = at + (raw.len() - raw.trim_start().len());
        at += raw.len() + 1;
        let part = raw.trim();
        if part.is_empty() {
            continue;
        }
        let bad = || CpusetError::Bad { part: part.to_string(), at: start };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(CpusetError::Empty);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        assert_eq!(Config::from_toml(DEFAULT_CONFIG_TOML).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[limits]\nmax_packet_size = 3\n").unwrap_err();
        assert_eq!(e.key, "limits.max_packet_size");
        let e = Config::from_toml("[limits]\nmax_pakcet_size = 3\n").unwrap_err();
        assert_eq!(e.key, "limits.max_pakcet_size", "{e}");
        let e = Config::from_toml("[limits]\nqueue_full_policy = \"drop-random\"\n").unwrap_err();
        assert_eq!(e.key, "limits.queue_full_policy", "{e}");
        let e = Config::from_toml("[limits]\nmax_inflight = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = Config::from_toml("[limits]\nmax_preconnect_buffer_bytes_per_shard = 1000\n").unwrap_err();
        assert_eq!(e.key, "limits.max_preconnect_buffer_bytes_per_shard", "{e}");
        let e = Config::from_toml("[limits]\nconnect_timeout_ms = 0\n").unwrap_err();
        assert_eq!(e.key, "limits.connect_timeout_ms", "{e}");
        let e = Config::from_toml("[server]\ncpuset = \"1-x\"\n").unwrap_err();
        assert_eq!(e.key, "server.cpuset");
    }

    #[test]
    fn schema_keys_are_checked_and_errors_name_the_key() {
        let base = "[kafka.clusters.c]\nbootstrap = [\"k:9092\"]\n\
                    [schemas.t]\nkind = \"json-schema\"\nfile = \"t.json\"\n\
                    [schema_registries.r]\nurl = \"http://reg:8081\"\n";
        let mapping = |extra: &str| {
            format!("{base}[[mqtt_to_kafka]]\nname = \"m\"\nfilters = [\"a/#\"]\ndestinations = [{{ cluster = \"c\", topic = \"t\" }}]\n{extra}")
        };
        let cfg = Config::from_toml(&mapping("schema = \"t\"\non_invalid = \"disconnect\"\n")).unwrap();
        assert_eq!(cfg.mqtt_to_kafka[0].on_invalid, crate::schemas::OnInvalid::Disconnect);
        assert_eq!(cfg.schema_registries["r"].refresh_ms, 30_000);
        let key = |extra: &str| Config::from_toml(&mapping(extra)).unwrap_err().key;
        assert_eq!(key("schema = \"nope\"\n"), "mqtt_to_kafka[0].schema");
        assert_eq!(key("registry = \"r\"\n"), "mqtt_to_kafka[0].mode");
        assert_eq!(key("registry = \"r\"\nmode = \"decode\"\n"), "mqtt_to_kafka[0].mode");
        assert_eq!(key("schema = \"t\"\non_invalid = \"dead-letter\"\n"), "mqtt_to_kafka[0].on_invalid");
        assert_eq!(key("schema = \"t\"\non_invalid = \"shout\"\n"), "mqtt_to_kafka[0].on_invalid");
        assert_eq!(
            key("registry = \"r\"\nmode = \"encode\"\n"),
            "mqtt_to_kafka[0].mode",
            "encode needs spill_on_timeout = false"
        );
        let durable = format!("[kafka]\ndelivery = \"local-durable\"\n{}", mapping("schema = \"t\"\n"));
        assert_eq!(Config::from_toml(&durable).unwrap_err().key, "mqtt_to_kafka[0].schema");
        let e = Config::from_toml("[schema_registries.r]\nurl = \"reg:8081\"\n").unwrap_err();
        assert_eq!(e.key, "schema_registries.r.url", "{e}");
        let e = Config::from_toml("[schemas.t]\nkind = \"xml\"\nfile = \"f\"\n").unwrap_err();
        assert_eq!(e.key, "schemas.t.kind", "{e}");
    }

    #[test]
    fn listeners_parse_and_errors_name_the_listener_key() {
        let cfg = Config::from_toml(
            "[[listeners]]\naddress = \"127.0.0.1:8883\"\nkind = \"tls\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             [[listeners]]\naddress = \"0.0.0.0:8080\"\nkind = \"ws\"\nallow_anonymous = true\n",
        )
        .unwrap();
        assert_eq!(cfg.listeners.len(), 2);
        assert_eq!(cfg.listeners[0].kind, ListenerKind::Tls);
        assert_eq!(cfg.listeners[1].ws_path(), "/mqtt");
        let bad = |text: &str| Config::from_toml(text).unwrap_err();
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\nkind = \"quic\"\n");
        assert_eq!(e.key, "listeners[0].kind", "{e}");
        let e =
            bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[[listeners]]\naddress = \"127.0.0.1:2\"\ncert = \"x\"\n");
        assert_eq!(e.key, "listeners[1].cert", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[[listeners]]\naddress = \"nowhere\"\n");
        assert_eq!(e.key, "listeners[1].address", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\nkind = \"wss\"\ncert_file = \"c\"\n");
        assert_eq!(e.key, "listeners[0].key_file", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\ncert_file = \"c\"\n");
        assert_eq!(e.key, "listeners[0].cert_file", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\npath = \"/x\"\n");
        assert_eq!(e.key, "listeners[0].path", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\nkind = \"tls\"\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_certificate = true\n");
        assert_eq!(e.key, "listeners[0].require_client_certificate", "{e}");
    }

    /// Nothing authenticates yet: a listener anyone on the network can reach must say so.
    #[test]
    fn non_loopback_listeners_need_allow_anonymous() {
        assert_eq!(Config::default().server.listen, "127.0.0.1:1883");
        let e = Config::from_toml("[[listeners]]\naddress = \"0.0.0.0:1883\"\n").unwrap_err();
        assert_eq!(e.key, "listeners[0].allow_anonymous", "{e}");
        let e = Config::from_toml("[server]\nlisten = \"0.0.0.0:1883\"\n").unwrap_err();
        assert_eq!(e.key, "server.allow_anonymous", "{e}");
        assert!(e.problem.contains("--allow-anonymous"), "{e}");
        Config::from_toml("[server]\nlisten = \"0.0.0.0:1883\"\nallow_anonymous = true\n").unwrap();
        // An [auth] section that authenticates every client makes other addresses safe.
        Config::from_toml("[server]\nlisten = \"0.0.0.0:1883\"\n[auth]\npassword_file = \"/etc/sluice/passwd\"\n")
            .unwrap();
        let e = Config::from_toml(
            "[server]\nlisten = \"0.0.0.0:1883\"\n[auth]\npassword_file = \"/p\"\nallow_anonymous = true\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "server.allow_anonymous", "anonymous clients allowed: not authenticated; {e}");
        Config::from_toml("[server]\nlisten = \"[::1]:1883\"\n").unwrap();
        // With listeners configured, server.listen is not one of them.
        Config::from_toml("[server]\nlisten = \"0.0.0.0:1883\"\n[[listeners]]\naddress = \"127.0.0.1:1\"\n").unwrap();
    }

    /// `[listeners.auth]` replaces `[auth]` on its listener: validated the same way, its errors
    /// name the listener, and it decides whether that listener may face the network.
    #[test]
    fn listener_auth_is_validated_and_named() {
        let text = "[[listeners]]\naddress = \"127.0.0.1:1\"\n\
                    [[listeners]]\naddress = \"0.0.0.0:2\"\n[listeners.auth]\npassword_file = \"/p\"\n";
        let cfg = Config::from_toml(text).unwrap();
        assert!(cfg.listeners[0].auth.is_none());
        assert_eq!(cfg.listeners[1].auth.as_ref().unwrap().password_file.as_deref(), Some("/p".as_ref()));
        assert!(!cfg.authenticates() && cfg.has_auth());
        assert!(cfg.authenticates_on(&cfg.listeners[1]) && !cfg.authenticates_on(&cfg.listeners[0]));
        let bad = |text: &str| Config::from_toml(text).unwrap_err();
        // Its own auth does not cover the other listener, nor anonymous access.
        let e = bad("[[listeners]]\naddress = \"0.0.0.0:1\"\n[[listeners]]\naddress = \"127.0.0.1:2\"\n\
                     [listeners.auth]\npassword_file = \"/p\"\n");
        assert_eq!(e.key, "listeners[0].allow_anonymous", "{e}");
        let e = bad("[[listeners]]\naddress = \"0.0.0.0:1\"\n[listeners.auth]\npassword_file = \"/p\"\nallow_anonymous = true\n");
        assert_eq!(e.key, "listeners[0].allow_anonymous", "{e}");
        // Client certificates as the user names authenticate every client, given rules to apply.
        let mtls = "[[listeners]]\naddress = \"0.0.0.0:1\"\nkind = \"tls\"\ncert_file = \"c\"\nkey_file = \"k\"\n\
                    client_ca_file = \"ca\"\nrequire_client_certificate = true\nuse_identity_as_username = true\n";
        Config::from_toml(&format!("{mtls}[listeners.auth]\nacl_file = \"/a\"\n")).unwrap();
        assert_eq!(bad(mtls).key, "listeners[0].allow_anonymous");
        // A listener's auth that does not authenticate replaces a global one that does.
        let e = bad("[auth]\npassword_file = \"/p\"\n[[listeners]]\naddress = \"0.0.0.0:1\"\n\
                     [listeners.auth]\nacl_file = \"/a\"\n");
        assert_eq!(e.key, "listeners[0].allow_anonymous", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[[listeners]]\naddress = \"127.0.0.1:2\"\n\
                     [listeners.auth]\npassword_fil = \"/p\"\n");
        assert_eq!(e.key, "listeners[1].auth.password_fil", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[listeners.auth.jwt]\nalgorithm = \"HS256\"\n");
        assert_eq!(e.key, "listeners[0].auth.jwt", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[listeners.auth]\nverified_cache_entries = 9999999\n");
        assert_eq!(e.key, "listeners[0].auth.verified_cache_entries", "{e}");
        let e = bad("[[listeners]]\naddress = \"127.0.0.1:1\"\n[listeners.auth.jwt]\nalgorithm = \"RS256\"\n\
                     jwks_file = \"k\"\nleeway_secs = 3600\n");
        assert_eq!(e.key, "listeners[0].auth.jwt.leeway_secs", "{e}");
        // The global [auth] is validated with the rest of the file now, not only when loaded.
        let e = bad("[auth.jwt]\nalgorithm = \"HS256\"\npublic_key_file = \"k\"\n");
        assert_eq!(e.key, "auth.jwt.secret_file", "{e}");
    }

    #[test]
    fn sasl_mechanisms_parse_by_their_kafka_names() {
        for (name, want) in [
            ("PLAIN", SaslMechanism::Plain),
            ("SCRAM-SHA-256", SaslMechanism::ScramSha256),
            ("SCRAM-SHA-512", SaslMechanism::ScramSha512),
        ] {
            let text = format!(
                "[kafka.clusters.c]\nbootstrap = [\"h:1\"]\nsasl = {{ mechanism = \"{name}\", username = \"u\", password = \"p\" }}\n"
            );
            let cfg = Config::from_toml(&text).unwrap();
            assert_eq!(cfg.kafka.clusters["c"].sasl.as_ref().unwrap().mechanism, want);
        }
    }

    #[test]
    fn http_settings_are_validated_and_named() {
        let load = |t: &str| Config::from_toml(&format!("[http]\n{t}"));
        assert!(load("listen = \"127.0.0.1:8080\"").is_ok());
        for (text, key) in [
            ("listen = \"localhost\"", "http.listen"),
            ("listen = \"0.0.0.0:8080\"", "http.listen"),
            ("listen = \"127.0.0.1:8080\"\nusername = \"a\"", "http.password"),
            ("listen = \"127.0.0.1:8080\"\ntoken = \"\"", "http.token"),
            ("listen = \"127.0.0.1:8080\"\ncert_file = \"c.pem\"", "http.key_file"),
        ] {
            assert_eq!(load(text).unwrap_err().key, key, "{text}");
        }
        // Credentials make a non-loopback address acceptable.
        assert!(load("listen = \"0.0.0.0:8080\"\ntoken = \"t\"").is_ok());
        assert!(load("listen = \"0.0.0.0:8080\"\nusername = \"a\"\npassword = \"b\"").is_ok());
    }

    #[test]
    fn cpusets() {
        assert_eq!(parse_cpuset("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert_eq!(parse_cpuset(" 1 , 2-x").unwrap_err(), CpusetError::Bad { part: "2-x".into(), at: 5 });
        assert_eq!(
            parse_cpuset("0,4-2").unwrap_err().to_string(),
            "`4-2` (at byte 2) is not a CPU number or range like 2-5"
        );
        assert_eq!(parse_cpuset(", ").unwrap_err(), CpusetError::Empty);
    }
}
