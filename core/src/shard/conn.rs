//! One connection's state on its shard, from accept to close.
//!
//! The states follow the protocol: `AwaitConnect` until a CONNECT, `Pending` while the
//! directory and the previous host hand the session over, `Active` while it holds its session,
//! `Closing` while the last bytes are flushed. The client id lives in the states that have one,
//! so no code can ask an active connection for a client id it might not have.
//!
//! Invariants: an `Active` connection's session is hosted on this shard and names this
//! connection (checked per packet, and a miss closes the connection); input is held, in order,
//! while the connection is blocked (pending CONNECT or SUBSCRIBE, full 3.1.1 deferral queue).

use crate::HashMap;
use std::collections::VecDeque;

use bytes::BytesMut;

use super::{AckQueue, ClientId, ConnAuth, Connect, Packet, SessionKey, SubAck, SubOptions, Version, Will};
#[cfg(doc)]
use super::{DEFERRED_BYTES_MAX, HELD_INPUT_MAX};

/// Why a connection leaves its session.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Detach {
    /// Closed or lost: the session goes offline here (or ends, with expiry 0).
    Lost,
    /// Taken over by a new connection: the session moves to it.
    Moves,
}

pub(super) enum ConnState {
    /// Accepted; the first packet must be CONNECT.
    AwaitConnect,
    /// CONNECT waiting for its password check, run off the shard (see `access`); `addr` is the
    /// address it counts under, for the back-off should the check fail.
    Authenticating { connect: Box<Connect>, addr: Option<std::net::IpAddr> },
    /// CONNECT for `client_id` accepted, waiting for the directory and the previous host.
    Pending { client_id: ClientId, connect: Box<Connect> },
    /// Holding the session of `client_id`, hosted on this shard (checked per packet: see
    /// [`Shard::holder`](super::Shard::holder)).
    Active { client_id: ClientId },
    /// Closing: the last bytes are being flushed; input is ignored.
    Closing,
}

/// Most a fresh output buffer reserves from the last turn's size.
pub(super) const OUT_HINT_MAX: usize = 64 << 10;

pub(super) struct Conn {
    pub(super) state: ConnState,
    /// The protocol version CONNECT asked for; 3.1.1 (the form every client understands)
    /// until then.
    pub(super) version: Version,
    pub(super) out: BytesMut,
    pub(super) keep_alive_ms: u64,
    pub(super) last_rx_ms: u64,
    pub(super) client_max_packet: usize,
    pub(super) client_receive_max: u16,
    pub(super) client_alias_max: u16,
    /// Topic aliases, both ways (MQTT 5 clients that use them only).
    pub(super) aliases: Option<Box<Aliases>>,
    pub(super) will: Option<Box<Will>>,
    pub(super) assigned_id: bool,
    /// Session expiry asked for in CONNECT (MQTT 5); DISCONNECT may not raise it from 0.
    pub(super) connect_expiry: u32,
    /// Input that arrived while the connection was blocked (pending CONNECT or SUBSCRIBE),
    /// decoded once it unblocks, so packets are handled strictly in order.
    pub(super) held: BytesMut,
    /// A SUBSCRIBE waiting for shared-group owners to confirm.
    pub(super) pending_sub: Option<Box<PendingSub>>,
    /// 3.1.1 has no Receive Maximum: packets that arrived while `max_inflight` QoS 2 messages of
    /// this client await PUBREL wait here, in order, until a PUBREL makes room (acknowledgements
    /// and pings behind them are handled at once). Bounded by [`DEFERRED_BYTES_MAX`]; past it
    /// only acknowledgements and pings are decoded, and once the held input passes
    /// [`HELD_INPUT_MAX`] the connection is no longer read (TCP flow control).
    pub(super) deferred: VecDeque<Packet>,
    pub(super) deferred_bytes: usize,
    pub(super) deferred_full: bool,
    /// The network layer was asked to stop reading this connection.
    pub(super) reading_paused: bool,
    /// The socket went away while the CONNECT was pending.
    pub(super) lost: bool,
    /// MQTT 5 Request Problem Information: reason strings allowed on DISCONNECT.
    pub(super) problem_information: bool,
    /// PUBACK/PUBREC not yet sent, in PUBLISH order.
    pub(super) acks: AckQueue,
    /// Queued QoS 1/2 messages wait because `out` reached `max_outbound_buffer_bytes`: they move
    /// on when the output has gone out ([`Shard::on_output_drained`]).
    pub(super) out_full: bool,
    /// Bytes taken from `out` the last time ([`Shard::take_output`]), at most
    /// [`OUT_HINT_MAX`]: a fresh output buffer starts at that capacity, so a connection that
    /// gets about as much each turn is not grown (and copied) from nothing every turn.
    pub(super) out_hint: u32,
    /// This connection's session told the owners of its shared groups on other shards that it
    /// is busy ([`ShardMsg::ShareBusy`](super::ShardMsg::ShareBusy)); it tells them again
    /// once it has room.
    pub(super) share_busy: bool,
    /// Who the client is and what it may do, when authentication is configured.
    pub(super) auth: Option<Box<ConnAuth>>,
    /// Which of the broker's listeners accepted it (index into the configured listeners), for
    /// per-listener authentication settings.
    pub(super) listener: u16,
    /// The identity its transport proved (the client certificate's subject CN or DNS name on a
    /// TLS listener with `use_identity_as_username`), set before any packet is read.
    pub(super) identity: Option<Box<str>>,
    /// Where its session was last found ([`Sessions::find`](super::Sessions::find)): a hint,
    /// checked against the client id at each use, so a stale one costs a lookup, never a
    /// wrong session.
    pub(super) session_hint: SessionKey,
}

#[derive(Default)]
pub(super) struct Aliases {
    pub(super) inbound: HashMap<u16, String>,
    pub(super) outbound: HashMap<String, u16>,
}

pub(super) struct PendingSub {
    pub(super) acks_left: usize,
    pub(super) suback: SubAck,
    pub(super) retained_queries: Vec<(String, SubOptions, Option<u32>)>,
    /// Filters this SUBSCRIBE added (not replaced): taken back if the store cannot commit them.
    pub(super) added: Vec<String>,
    /// The session store could not commit the subscriptions: the SUBACK refuses them.
    pub(super) failed: bool,
}

impl Conn {
    pub(super) fn new(now_ms: u64) -> Self {
        Conn {
            state: ConnState::AwaitConnect,
            version: Version::V311,
            out: BytesMut::new(),
            keep_alive_ms: 0,
            last_rx_ms: now_ms,
            client_max_packet: usize::MAX,
            client_receive_max: u16::MAX,
            client_alias_max: 0,
            aliases: None,
            will: None,
            assigned_id: false,
            connect_expiry: 0,
            held: BytesMut::new(),
            pending_sub: None,
            deferred: VecDeque::new(),
            deferred_bytes: 0,
            deferred_full: false,
            reading_paused: false,
            lost: false,
            problem_information: true,
            acks: AckQueue::default(),
            out_full: false,
            out_hint: 0,
            share_busy: false,
            auth: None,
            listener: 0,
            identity: None,
            session_hint: SessionKey::default(),
        }
    }

    /// The client id of an active connection (pending ones have one too, not a session yet).
    pub(super) fn active_id(&self) -> Option<&ClientId> {
        match &self.state {
            ConnState::Active { client_id } => Some(client_id),
            _ => None,
        }
    }

    pub(super) fn is_active(&self) -> bool {
        matches!(self.state, ConnState::Active { .. })
    }

    pub(super) fn is_v5(&self) -> bool {
        self.version == Version::V5
    }

    pub(super) fn blocked(&self) -> bool {
        matches!(self.state, ConnState::Pending { .. } | ConnState::Authenticating { .. })
            || self.pending_sub.is_some()
            || self.deferred_full
    }

    /// Blocked only by a full deferral queue, and the next packet in `input` is an
    /// acknowledgement or a ping: it may be handled ahead (a PUBREL there is what makes room).
    pub(super) fn acks_may_pass(&self, input: &[u8]) -> bool {
        let only_deferral = self.deferred_full && self.pending_sub.is_none() && self.is_active();
        only_deferral && input.first().is_some_and(|b| matches!(b >> 4, 4..=7 | 12))
    }
}
