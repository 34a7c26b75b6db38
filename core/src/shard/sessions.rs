//! The sessions hosted on a shard, by client id, with a slot number ([`SessionKey`]) that the
//! per-message paths carry instead of looking the client id up again.
//!
//! A PUBLISH, its delivery and the subscriber's PUBACK used to find a session by its client id
//! about eight times (hashing and comparing the id each time: a tenth of a shard's time under
//! point-to-point QoS 1). Here a session sits in a slot of a vector, and `by_id` maps client ids
//! to slots: a delivery looks its receiver up once and passes the key down, and a connection
//! keeps a hint of its session's slot ([`Sessions::find`]) for the packets it sends.
//!
//! Invariants: a slot is occupied exactly when its number is in `by_id`, under the occupant's
//! own client id; an occupied slot keeps its number until the session is removed (replacing a
//! session under the same id keeps the slot), so a key found for a session stays good while
//! that session is here. A key or hint held past a removal may name a free or reused slot:
//! [`Sessions::find`] checks the occupant's client id, and [`Sessions::at`] /
//! [`Sessions::at_mut`] are only used with a key found in the same handler, before anything
//! could remove a session. Freed slots are reused before the vector grows, so it is no longer
//! than the most sessions this shard hosted at once.

use std::borrow::Borrow;
use std::hash::Hash;

use crate::HashMap;

use super::{ClientId, Session};

/// A session's slot in [`Sessions`]: good while that session stays on the shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SessionKey(u32);

#[derive(Default)]
pub(super) struct Sessions {
    /// Boxed: a free slot or the vector's spare capacity costs 8 bytes, not a session.
    slots: Vec<Option<Box<Session>>>,
    free: Vec<u32>,
    by_id: HashMap<ClientId, u32>,
}

impl Sessions {
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn key_of<Q>(&self, id: &Q) -> Option<SessionKey>
    where
        ClientId: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_id.get(id).map(|&i| SessionKey(i))
    }

    /// The key of `id`'s session: `hint` when that slot holds it (no hashing), else looked up.
    pub(super) fn find(&self, hint: SessionKey, id: &ClientId) -> Option<SessionKey> {
        if let Some(Some(s)) = self.slots.get(hint.0 as usize) {
            let same = std::ptr::eq(s.client_id.as_ptr(), id.as_ptr()) && s.client_id.len() == id.len();
            if same || s.client_id == *id {
                return Some(hint);
            }
        }
        self.key_of(&**id)
    }

    pub(super) fn at(&self, key: SessionKey) -> Option<&Session> {
        self.slots.get(key.0 as usize)?.as_deref()
    }

    pub(super) fn at_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.slots.get_mut(key.0 as usize)?.as_deref_mut()
    }

    pub(super) fn get<Q>(&self, id: &Q) -> Option<&Session>
    where
        ClientId: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.at(self.key_of(id)?)
    }

    pub(super) fn get_mut<Q>(&mut self, id: &Q) -> Option<&mut Session>
    where
        ClientId: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.at_mut(self.key_of(id)?)
    }

    pub(super) fn contains_key<Q>(&self, id: &Q) -> bool
    where
        ClientId: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_id.contains_key(id)
    }

    /// Puts `s` under `id` (its client id); returns the session it replaced, whose slot it takes.
    pub(super) fn insert(&mut self, id: ClientId, s: Box<Session>) -> Option<Box<Session>> {
        if let Some(&i) = self.by_id.get(&id) {
            return self.slots[i as usize].replace(s);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[i as usize] = Some(s);
        self.by_id.insert(id, i);
        None
    }

    pub(super) fn remove<Q>(&mut self, id: &Q) -> Option<Box<Session>>
    where
        ClientId: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.by_id.remove(id)?;
        self.free.push(i);
        self.slots[i as usize].take()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Session> {
        self.slots.iter().filter_map(|s| s.as_deref())
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.slots.iter_mut().filter_map(|s| s.as_deref_mut())
    }
}

/// `sessions[id]` in tests, as with the map this replaced.
#[cfg(test)]
impl<Q> std::ops::Index<&Q> for Sessions
where
    ClientId: Borrow<Q>,
    Q: Hash + Eq + ?Sized,
{
    type Output = Session;
    fn index(&self, id: &Q) -> &Session {
        self.get(id).expect("no session of that client id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::from(s)
    }

    #[test]
    fn keys_stay_while_a_session_stays_and_a_stale_hint_finds_the_session_by_id() {
        let mut t = Sessions::default();
        assert!(t.insert(id("a"), Box::new(Session::new(id("a")))).is_none());
        assert!(t.insert(id("b"), Box::new(Session::new(id("b")))).is_none());
        let (a, b) = (t.key_of("a").unwrap(), t.key_of("b").unwrap());
        assert_ne!(a, b);
        // Replacing a session keeps its slot.
        let mut again = Session::new(id("a"));
        again.next_pid = 7;
        assert!(t.insert(id("a"), Box::new(again)).is_some());
        assert_eq!(t.key_of("a"), Some(a));
        assert_eq!(t.at(a).map(|s| s.next_pid), Some(7));
        assert_eq!(t.find(b, &id("b")), Some(b), "a good hint");
        assert_eq!(t.find(b, &id("a")), Some(a), "a hint naming another session");
        assert_eq!(t.find(SessionKey(99), &id("a")), Some(a), "a hint past the end");
        // A freed slot is reused; an old hint into it does not find the new occupant for the old id.
        assert!(t.remove("a").is_some());
        assert!(t.at(a).is_none());
        assert_eq!(t.find(a, &id("a")), None);
        t.insert(id("c"), Box::new(Session::new(id("c"))));
        assert_eq!(t.key_of("c"), Some(a), "the freed slot");
        assert_eq!(t.find(a, &id("a")), None);
        assert_eq!(t.len(), 2);
        let mut ids: Vec<String> = t.values().map(|s| s.client_id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["b", "c"]);
        assert!(t.contains_key("b") && !t.contains_key("a"));
        t.values_mut().for_each(|s| s.next_pid = 3);
        assert_eq!(t.get("c").map(|s| s.next_pid), Some(3));
        assert!(t.get_mut("a").is_none());
    }
}
