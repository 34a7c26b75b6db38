//! The values every part of the broker passes around: an application [`Message`] as it travels
//! between sessions, shards and Kafka, and the ids that name shards, connections and clients.
//!
//! They live here, below everything else, so that the core's modules form a tree: the session,
//! retained store, bridge and shard all depend on this module and it depends on none of them.

use std::sync::Arc;

use bytes::Bytes;

use crate::packet::Properties;

pub type ShardId = usize;
/// A connection's id, unique within its shard.
pub type ConnId = u64;
pub type ClientId = Arc<str>;

/// An application message as it travels between shards: immutable, shared.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Publish properties to forward (no alias, no subscription ids, no expiry: see `expiry_at_ms`);
    /// `None` when there are none — see [`Message::properties`].
    pub properties: Option<Box<Properties>>,
    pub expiry_at_ms: Option<u64>,
    /// Client id of the publisher, for No Local.
    pub origin: ClientId,
}

impl Message {
    pub fn properties(&self) -> &Properties {
        static NONE: Properties = Properties::EMPTY;
        self.properties.as_deref().unwrap_or(&NONE)
    }
}

pub type Msg = Arc<Message>;

/// Seconds left before `msg` expires: `Some(None)` when it never does, `None` once it has.
pub fn expiry_left_secs(msg: &Message, now_ms: u64) -> Option<Option<u32>> {
    match msg.expiry_at_ms {
        None => Some(None),
        Some(at) if at > now_ms => Some(Some((at - now_ms).div_ceil(1000) as u32)),
        Some(_) => None,
    }
}
