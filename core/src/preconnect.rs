//! Connections that have not completed CONNECT: since when, from where, and how many bytes of an
//! unfinished CONNECT each one holds.
//!
//! Nobody has authenticated these peers yet, so none of them may pin a shard's memory or a
//! connection slot for long. [`Preconnect`] is the shard's bookkeeping for them:
//! - a **deadline counted from accept** (`connect_timeout_ms`): bytes arriving do not extend it,
//!   so a peer dripping one byte a second is closed like a silent one;
//! - a **per-shard budget** of buffered bytes (`max_preconnect_buffer_bytes_per_shard`): a
//!   connection whose partial CONNECT would take the sum past it is closed. A TLS or WebSocket
//!   connection also counts what its transport received before the CONNECT (TLS records, the
//!   HTTP upgrade request, frames): the network layer reports it ([`Preconnect::account_transport`]),
//!   as received — rustls does not say what it keeps of it, and what it received bounds that;
//! - a **cap per source address** (`max_preconnect_per_address`, 0 = off): beyond it the shard
//!   refuses new sockets from that address at accept. IPv6 peers count per /64, the block one
//!   host usually gets.
//!
//! Invariants: `buffered` is the sum of the entries' `buffered` and `transport`, and at most
//! `budget` once [`Preconnect::account`] or [`Preconnect::account_transport`] returned; `per_addr[a]` counts the entries from `a` and is never 0;
//! `refusing` holds only addresses at their cap. Every entry leaves through
//! [`Preconnect::leave`] (CONNECT decoded, connection closed or lost). Sans-I/O: the peer
//! address and the time come in as arguments.

use std::net::{IpAddr, Ipv6Addr};

use crate::message::ConnId;
use crate::{HashMap, HashSet};

struct Entry {
    opened_ms: u64,
    addr: Option<IpAddr>,
    /// Capacity of the partial CONNECT's buffer.
    buffered: usize,
    /// Socket bytes its transport (TLS, WebSocket) received so far.
    transport: usize,
}

/// What [`Preconnect::admit`] decided about a new socket.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Accept,
    /// Refused: its address is at the cap. `first` when this starts an episode for that address
    /// (worth one log line; the rest of the episode is only counted).
    Refuse {
        first: bool,
    },
}

/// The shard budget would be exceeded: the connection should be closed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OverBudget {
    /// First refusal since the budget was last below half used (worth one log line).
    pub first: bool,
}

pub(crate) struct Preconnect {
    timeout_ms: u64,
    budget: usize,
    per_addr_max: usize,
    conns: HashMap<ConnId, Entry>,
    per_addr: HashMap<IpAddr, u32>,
    refusing: HashSet<IpAddr>,
    buffered: usize,
    /// Most `buffered` has been since [`Preconnect::take_released`] last ran.
    peak: usize,
    /// In a budget episode (reported once); ends when less than half the budget is in use.
    over_budget: bool,
}

/// The key an address counts under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl Preconnect {
    pub(crate) fn new(timeout_ms: u64, budget: usize, per_addr_max: usize) -> Self {
        Preconnect {
            timeout_ms,
            budget,
            per_addr_max,
            conns: HashMap::default(),
            per_addr: HashMap::default(),
            refusing: HashSet::default(),
            buffered: 0,
            peak: 0,
            over_budget: false,
        }
    }

    /// Whether a new socket from `ip` may be accepted (it is not registered yet: [`Self::open`]).
    pub(crate) fn admit(&mut self, ip: IpAddr) -> Admission {
        if self.per_addr_max == 0 {
            return Admission::Accept;
        }
        let key = addr_key(ip);
        if (self.per_addr.get(&key).copied().unwrap_or(0) as usize) < self.per_addr_max {
            return Admission::Accept;
        }
        Admission::Refuse { first: self.refusing.insert(key) }
    }

    pub(crate) fn open(&mut self, conn: ConnId, ip: Option<IpAddr>, now_ms: u64) {
        let addr = ip.filter(|_| self.per_addr_max > 0).map(addr_key);
        if let Some(a) = addr {
            *self.per_addr.entry(a).or_insert(0) += 1;
        }
        if let Some(old) = self.conns.insert(conn, Entry { opened_ms: now_ms, addr, buffered: 0, transport: 0 }) {
            // A reused id (the caller's generation wrapped): forget the old entry's counts.
            self.forget(old);
        }
    }

    /// `conn` now buffers `bytes` of a partial CONNECT (0 when nothing is buffered). Over the
    /// shard budget: nothing changes, and the caller closes the connection (then [`Self::leave`]).
    pub(crate) fn account(&mut self, conn: ConnId, bytes: usize) -> Result<(), OverBudget> {
        self.set(conn, bytes, |e| &mut e.buffered).map(|_| ())
    }

    /// `conn`'s transport (TLS, WebSocket) has received `bytes` in all so far. `Ok(false)`:
    /// `conn` is not waiting for its CONNECT (any more), so nothing is counted for it. Over the
    /// shard budget: as [`Self::account`].
    pub(crate) fn account_transport(&mut self, conn: ConnId, bytes: usize) -> Result<bool, OverBudget> {
        self.set(conn, bytes, |e| &mut e.transport)
    }

    fn set(&mut self, conn: ConnId, bytes: usize, part: fn(&mut Entry) -> &mut usize) -> Result<bool, OverBudget> {
        let Some(e) = self.conns.get_mut(&conn) else { return Ok(false) };
        let part = part(e);
        let others = self.buffered - *part;
        if bytes > *part && others + bytes > self.budget {
            return Err(OverBudget { first: !std::mem::replace(&mut self.over_budget, true) });
        }
        *part = bytes;
        self.buffered = others + bytes;
        self.peak = self.peak.max(self.buffered);
        if self.buffered < self.budget / 2 {
            self.over_budget = false;
        }
        Ok(true)
    }

    /// The address `conn` counts under (its /64 for IPv6), while it has not completed CONNECT.
    pub(crate) fn addr_of(&self, conn: ConnId) -> Option<IpAddr> {
        self.conns.get(&conn).and_then(|e| e.addr)
    }

    /// `conn` completed CONNECT, or is closed or gone. Unknown ids are ignored.
    pub(crate) fn leave(&mut self, conn: ConnId) {
        if let Some(e) = self.conns.remove(&conn) {
            self.forget(e);
        }
    }

    fn forget(&mut self, e: Entry) {
        self.buffered -= e.buffered + e.transport;
        if self.buffered < self.budget / 2 {
            self.over_budget = false;
        }
        if let Some(a) = e.addr {
            if let Some(n) = self.per_addr.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.per_addr.remove(&a);
                }
                // Below the cap again: the next refusal starts a new episode.
                self.refusing.remove(&a);
            }
        }
    }

    /// Connections whose CONNECT deadline has passed (they stay registered until they leave).
    pub(crate) fn expired(&self, now_ms: u64) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.opened_ms) >= self.timeout_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Connections waiting for their CONNECT.
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Bytes the partial CONNECTs held at their peak since the last call, beyond what they hold
    /// now: freed since, and worth handing back to the operating system.
    pub(crate) fn take_released(&mut self) -> usize {
        std::mem::replace(&mut self.peak, self.buffered) - self.buffered
    }

    /// Bytes their partial CONNECTs hold.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deadline_counts_from_open() {
        let mut p = Preconnect::new(1000, 1 << 20, 0);
        p.open(1, None, 0);
        p.open(2, None, 400);
        p.account(1, 10).unwrap(); // bytes do not move the deadline
        assert!(p.expired(999).is_empty());
        assert_eq!(p.expired(1000), vec![1]);
        let mut both = p.expired(1400);
        both.sort_unstable();
        assert_eq!(both, vec![1, 2]);
        p.leave(1);
        assert_eq!(p.expired(5000), vec![2]);
    }

    #[test]
    fn budget_refuses_growth_past_it_and_frees_on_leave() {
        let mut p = Preconnect::new(1000, 100, 0);
        p.open(1, None, 0);
        p.open(2, None, 0);
        p.account(1, 60).unwrap();
        assert_eq!(p.account(2, 50), Err(OverBudget { first: true }));
        assert_eq!(p.account(2, 45), Err(OverBudget { first: false }), "one report per episode");
        p.account(2, 40).unwrap();
        assert_eq!(p.buffered(), 100);
        // Shrinking is always fine; a connection may keep what it has.
        p.account(1, 60).unwrap();
        p.account(1, 30).unwrap();
        assert_eq!(p.buffered(), 70);
        p.leave(2);
        assert_eq!(p.buffered(), 30);
        p.open(3, None, 0);
        p.account(3, 70).unwrap();
        assert_eq!(p.account(3, 71), Err(OverBudget { first: true }), "a new episode after the budget freed up");
        assert_eq!(p.take_released(), 0, "at its peak now");
        p.leave(1);
        p.leave(3);
        assert_eq!((p.buffered(), p.len()), (0, 0));
        assert_eq!(p.take_released(), 100);
        assert_eq!(p.take_released(), 0);
    }

    #[test]
    fn transport_bytes_share_the_budget_with_partial_connects() {
        let mut p = Preconnect::new(1000, 100, 0);
        p.open(1, None, 0);
        p.open(2, None, 0);
        assert_eq!(p.account_transport(1, 30), Ok(true));
        p.account(1, 40).unwrap();
        assert_eq!(p.buffered(), 70);
        assert_eq!(p.account_transport(2, 31), Err(OverBudget { first: true }));
        assert_eq!(p.account_transport(2, 30), Ok(true));
        assert_eq!(p.account(1, 41), Err(OverBudget { first: false }), "the buffer and the transport add up");
        p.leave(1);
        assert_eq!(p.buffered(), 30);
        assert_eq!(p.account_transport(1, 500), Ok(false), "past CONNECT nothing is counted");
        p.leave(2);
        assert_eq!((p.buffered(), p.take_released()), (0, 100));
    }

    #[test]
    fn per_address_cap_with_episodes_and_ipv6_blocks() {
        let mut p = Preconnect::new(1000, 1 << 20, 2);
        let a = ip("10.0.0.1");
        p.open(1, Some(a), 0);
        assert_eq!(p.admit(a), Admission::Accept);
        p.open(2, Some(a), 0);
        assert_eq!(p.admit(a), Admission::Refuse { first: true });
        assert_eq!(p.admit(a), Admission::Refuse { first: false });
        assert_eq!(p.admit(ip("10.0.0.2")), Admission::Accept);
        // IPv4-mapped IPv6 is the same address.
        assert_eq!(p.admit(ip("::ffff:10.0.0.1")), Admission::Refuse { first: false });
        p.leave(1);
        assert_eq!(p.admit(a), Admission::Accept);
        p.open(3, Some(a), 0);
        assert_eq!(p.admit(a), Admission::Refuse { first: true }, "a new episode");
        // One /64 is one host.
        p.open(4, Some(ip("2001:db8:0:1::1")), 0);
        p.open(5, Some(ip("2001:db8:0:1::2")), 0);
        assert_eq!(p.admit(ip("2001:db8:0:1:ffff::9")), Admission::Refuse { first: true });
        assert_eq!(p.admit(ip("2001:db8:0:2::1")), Admission::Accept);
        for c in [2, 3, 4, 5] {
            p.leave(c);
        }
        assert!(p.per_addr.is_empty() && p.refusing.is_empty());
        // 0 turns the cap off.
        let mut off = Preconnect::new(1000, 1 << 20, 0);
        for c in 0..100 {
            assert_eq!(off.admit(a), Admission::Accept);
            off.open(c, Some(a), 0);
        }
    }
}
