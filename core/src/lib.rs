//! sluice-core: everything the broker decides, nothing it does.
//!
//! # Layout
//! - [`packet`]: the MQTT 3.1.1 and 5.0 codec over `BytesMut` (decode is "not yet" on an incomplete
//!   frame, an error with a reason code on a malformed one). Performs no I/O.
//! - [`bytes_reader`]: the one cursor every binary decoder here uses (MQTT packets, stored
//!   sessions, spill-log records).
//! - [`topic`]: topic name and filter validation, and the subscription [`topic::Trie`].
//! - [`retained`]: a shard's retained messages as a trie by topic level, looked up by filter in
//!   bounded, resumable slices; `retained_feed` (crate-internal): those slices carried to new
//!   subscribers with credit, through their sessions' flow control.
//! - [`bridge`]: MQTT → Kafka mappings — which messages become which Kafka records, keys,
//!   headers, and Kafka's murmur2 partitioner.
//! - [`inbound`]: Kafka → MQTT mappings — MQTT topics and payloads rendered from Kafka records.
//! - [`cluster`]: nodes that share routing, retained messages, client ids and sessions through
//!   Kafka — the internal mappings and topics, claims, heartbeats and membership.
//! - [`config`]: limits and listener settings, parsed from TOML with errors that name the key.
//! - `preconnect`: connections that have not completed CONNECT — their deadline, buffer budget
//!   and per-address cap (used by [`shard`]).
//! - [`session`]: sessions and retained messages as data, and their on-disk forms.
//! - [`auth`]: password files (Mosquitto's formats), ACLs (Mosquitto's file or TOML) and JWTs,
//!   as pure functions the shard and the network layer call; an error never grants access.
//! - [`shard`]: the state one core owns — connections, sessions, its trie, its share of retained
//!   messages — as a state machine. It takes bytes, ticks (`now_ms`) and messages from other shards,
//!   and returns bytes to write, connections to close and messages for other shards.
//!
//! Nothing here knows glommio, tokio, sockets, files or Kafka: `sluice-net` moves the bytes.
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, unreachable_pub)]
// No input may panic a shard: fallible paths return errors or close one connection.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::unreachable, clippy::panic))]

/// The hash tables on the hot path (connections, sessions, the trie, in-flight ids): foldhash is
/// several times faster than std's SipHash on short keys, and its per-process random seed keeps
/// client-chosen keys (client ids, topic levels) from being aimed at one bucket.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub mod adoption;
pub mod auth;
pub mod bridge;
pub mod bytes_reader;
pub mod cluster;
pub mod config;
pub mod inbound;
pub mod message;
pub mod packet;
mod preconnect;
pub mod retained;
pub(crate) mod retained_feed;
pub mod schemas;
pub mod session;
pub mod shard;
pub mod topic;
