//! What routing one message did, as a value the caller owns.
//!
//! Routing a message (`Shard::route`, `Shard::route_here`, `Shard::deliver`) does more than put
//! it in queues: its sender may have to wait. A PUBLISH's acknowledgement waits for sessions
//! its message pushed past half full (back-pressure), for the shards that must answer its
//! receipt, and for the session store when it changed something stored. [`Routing`] carries
//! what the caller needs for that into routing and back out, so a PUBLISH reads top to bottom:
//! make a `Routing`, route, queue the acknowledgement with what the `Routing` says.
//!
//! Invariant: a `Routing` lives for one message; nothing of it stays on the shard.

use super::{ClientId, ConnId, Receipt};

#[derive(Debug, Default)]
pub(super) struct Routing {
    /// The connection whose PUBLISH this is: its own session never holds it back.
    pub(super) publisher: Option<ConnId>,
    /// The receipt the message travels under: copies forwarded to other shards carry it, and
    /// every shard that handled a copy answers it.
    pub(super) receipt: Option<Receipt>,
    /// Shards a shared-subscription pick forwarded the message to: each answers the receipt too.
    pub(super) forwards: u32,
    /// The message changed something here that the session store keeps (queued for a
    /// persistent session at QoS > 0, or a retained message): its receipt waits for the commit.
    pub(super) stored: bool,
    /// Connected sessions here whose queues the message pushed past half full: whoever waits
    /// on this routing (a publisher, a receipt) waits for them to drain.
    pub(super) congested: Vec<ClientId>,
}

impl Routing {
    /// A PUBLISH from `conn`, under `receipt` when its acknowledgement waits for the store.
    pub(super) fn publisher(conn: ConnId, receipt: Option<Receipt>) -> Self {
        Routing { publisher: Some(conn), receipt, ..Routing::default() }
    }

    /// A copy routed on behalf of another shard's (or the Kafka feed's) receipt.
    pub(super) fn under(receipt: Receipt) -> Self {
        Routing { receipt: Some(receipt), ..Routing::default() }
    }

    /// Whether anybody waits on this routing, so congestion must be noted.
    pub(super) fn holds_back(&self) -> bool {
        self.publisher.is_some() || self.receipt.is_some()
    }

    /// `id`'s queue passed half full while routing: the waiters wait for it, once.
    pub(super) fn note_congested(&mut self, id: &ClientId) {
        if self.holds_back() && !self.congested.contains(id) {
            self.congested.push(id.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_routing_somebody_waits_on_notes_congestion_and_each_session_once() {
        let id: ClientId = "a".into();
        let mut nobody = Routing::default();
        nobody.note_congested(&id);
        assert!(nobody.congested.is_empty());
        let mut publisher = Routing::publisher(7, None);
        publisher.note_congested(&id);
        publisher.note_congested(&id);
        assert_eq!(publisher.congested, vec![id.clone()]);
        let mut receipt = Routing::under(Receipt { from: 1, token: 9 });
        receipt.note_congested(&id);
        assert_eq!(receipt.congested.len(), 1);
    }
}
