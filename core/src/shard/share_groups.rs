//! Shared subscriptions (`$share/GROUP/FILTER`): the member lists of the groups this shard owns
//! (the owner of `hash(group/filter)`), and the pick of one member per message, round-robin,
//! wherever the member's shard is.
//!
//! Invariants: a client id is at most once in a group; a group without members is gone.

use super::{ClientId, ShardId, SubOptions, Trie};

#[derive(Clone, Debug, PartialEq)]
pub struct ShareMember {
    pub client_id: ClientId,
    pub shard: ShardId,
    pub opts: SubOptions,
    pub sub_id: Option<u32>,
}

#[derive(Default)]
struct ShareGroup {
    members: Vec<ShareMember>,
    next: usize,
}

/// The groups of this shard, in a trie keyed by their filter.
#[derive(Default)]
pub(super) struct ShareGroups {
    groups: Trie<String, ShareGroup>,
}

/// `group/filter` → (group, filter); `None` for a malformed key (another shard's bug, not a
/// client's input: keys are built by [`share_key`]).
fn split(key: &str) -> Option<(String, &str)> {
    key.split_once('/').map(|(g, f)| (g.to_string(), f))
}

/// The key naming a group's filter, which also says which shard owns the group.
pub(super) fn share_key(group: &str, filter: &str) -> String {
    format!("{group}/{filter}")
}

impl ShareGroups {
    /// `member` joins the group `key` (again: its options are replaced).
    pub(super) fn join(&mut self, key: &str, member: ShareMember) {
        let Some((group, filter)) = split(key) else { return };
        let mut g = self.groups.remove(filter, &group).unwrap_or_default();
        match g.members.iter_mut().find(|m| m.client_id == member.client_id) {
            Some(m) => *m = member,
            None => g.members.push(member),
        }
        self.groups.insert(filter, group, g);
    }

    pub(super) fn leave(&mut self, key: &str, client_id: &ClientId) {
        let Some((group, filter)) = split(key) else { return };
        if let Some(mut g) = self.groups.remove(filter, &group) {
            g.members.retain(|m| m.client_id != *client_id);
            if !g.members.is_empty() {
                self.groups.insert(filter, group, g);
            }
        }
    }

    /// One member of every group whose filter matches `topic`, each group in turn.
    pub(super) fn pick(&mut self, topic: &str, picks: &mut Vec<ShareMember>) {
        self.groups.for_each_match_mut(topic, |_, g| {
            if !g.members.is_empty() {
                picks.push(g.members[g.next % g.members.len()].clone());
                g.next = g.next.wrapping_add(1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, shard: ShardId) -> ShareMember {
        ShareMember { client_id: id.into(), shard, opts: SubOptions::default(), sub_id: None }
    }

    #[test]
    fn members_are_picked_in_turn_and_a_group_without_members_is_gone() {
        let mut g = ShareGroups::default();
        g.join(&share_key("g", "a/+"), member("x", 0));
        g.join(&share_key("g", "a/+"), member("y", 1));
        g.join(&share_key("g", "a/+"), member("x", 1));
        let mut picks = Vec::new();
        for _ in 0..4 {
            g.pick("a/b", &mut picks);
        }
        let ids: Vec<&str> = picks.iter().map(|m| &*m.client_id).collect();
        assert_eq!(ids, ["x", "y", "x", "y"], "a client joins once; joining again replaces it");
        assert_eq!(picks[0].shard, 1);
        g.leave(&share_key("g", "a/+"), &"x".into());
        g.leave(&share_key("g", "a/+"), &"y".into());
        picks.clear();
        g.pick("a/b", &mut picks);
        assert!(picks.is_empty());
        g.leave("malformed", &"x".into());
    }
}
