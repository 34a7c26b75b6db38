//! Shared subscriptions (`$share/GROUP/FILTER`): the member lists of the groups this shard owns
//! (the owner of `hash(group/filter)`), and the pick of one member per message, wherever the
//! member's shard is.
//!
//! The pick is round-robin over the members that have room: starting at the group's cursor it
//! looks at up to [`PICK_SCAN_MAX`] members and takes the first one the caller does not report
//! busy (a member whose in-flight window is full or that has a queue); when every member looked
//! at is busy, the one with the smallest backlog. Plain round-robin gave a member that stopped
//! acknowledging its share of every message, queued behind its full window, while the others
//! were idle. The caller sees the members hosted on this shard directly; for one on another
//! shard, that shard reports when it turns busy and when it has room again
//! ([`ShardMsg::ShareBusy`](super::ShardMsg::ShareBusy), on changes only, with hysteresis), and
//! until the report arrives the member counts as having room (its shard queues the rest).
//!
//! Invariants: a client id is at most once in a group; a group without members is gone; a pick
//! looks at no more than [`PICK_SCAN_MAX`] members.

use super::{ClientId, ShardId, SubOptions, Trie};

#[derive(Clone, Debug, PartialEq)]
pub struct ShareMember {
    pub client_id: ClientId,
    pub shard: ShardId,
    pub opts: SubOptions,
    pub sub_id: Option<u32>,
}

/// Members a pick looks at before it settles for the least busy of them: bounds the cost of a
/// message to a group whose members are all busy.
pub(super) const PICK_SCAN_MAX: usize = 16;

#[derive(Default)]
struct ShareGroup {
    /// Its share key (`group/filter`).
    key: String,
    members: Vec<ShareMember>,
    /// Per member (same index): its shard said it is busy ([`ShareGroups::set_busy`]).
    busy: Vec<bool>,
    next: usize,
    /// In a cluster: the member count this node last said it has (a [`ClaimKind::Share`]
    /// record), its weight in the pick of the node that delivers; 0 before the first.
    ///
    /// [`ClaimKind::Share`]: crate::cluster::ClaimKind::Share
    announced: u32,
    /// The count announced before `announced`, and until when the others may still weigh
    /// this node by it (`ClusterClaims::share_mine`).
    announced_before: Option<(u32, u64)>,
}

/// The backlog a pick assumes for a member another shard reported busy: more than any
/// member here that still takes messages is likely to have.
pub(super) const REMOTE_BUSY_BACKLOG: usize = 1 << 20;

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
        if g.key.is_empty() {
            g.key = key.to_string();
        }
        match g.members.iter().position(|m| m.client_id == member.client_id) {
            Some(i) => {
                g.members[i] = member;
                g.busy[i] = false;
            }
            None => {
                g.members.push(member);
                g.busy.push(false);
            }
        }
        self.groups.insert(filter, group, g);
    }

    pub(super) fn leave(&mut self, key: &str, client_id: &ClientId) {
        let Some((group, filter)) = split(key) else { return };
        if let Some(mut g) = self.groups.remove(filter, &group) {
            if let Some(i) = g.members.iter().position(|m| m.client_id == *client_id) {
                g.members.remove(i);
                g.busy.remove(i);
            }
            if !g.members.is_empty() {
                self.groups.insert(filter, group, g);
            }
        }
    }

    /// The shard of member `client_id` of group `key` says whether it is busy (window full or
    /// messages queued; [`ShardMsg::ShareBusy`](super::ShardMsg::ShareBusy)).
    pub(super) fn set_busy(&mut self, key: &str, client_id: &ClientId, busy: bool) {
        let Some((group, filter)) = split(key) else { return };
        let Some(g) = self.groups.get_mut(filter, &group) else { return };
        if let Some(i) = g.members.iter().position(|m| m.client_id == *client_id) {
            g.busy[i] = busy;
        }
    }

    /// Whether group `key` has members here.
    pub(super) fn has_members(&self, key: &str) -> bool {
        self.members(key) > 0
    }

    /// How many members group `key` has here (on every shard of this node).
    pub(super) fn members(&self, key: &str) -> usize {
        let Some((group, filter)) = split(key) else { return 0 };
        self.groups.get(filter, &group).map_or(0, |g| g.members.len())
    }

    /// The groups here whose last announced member count is not 0, with their member count now.
    pub(super) fn announced_groups(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        self.groups.for_each(|_, g| {
            if g.announced > 0 {
                out.push((g.key.clone(), g.members.len()));
            }
        });
        out
    }

    /// The member count of group `key` this node last announced (0: none, or no such group).
    pub(super) fn announced(&self, key: &str) -> u32 {
        let Some((group, filter)) = split(key) else { return 0 };
        self.groups.get(filter, &group).map_or(0, |g| g.announced)
    }

    /// This node said it has `n` members of group `key` (a group that exists here); the count
    /// it said before counts beside it until `before_until_ms`.
    pub(super) fn set_announced(&mut self, key: &str, n: u32, before_until_ms: u64) {
        let Some((group, filter)) = split(key) else { return };
        if let Some(g) = self.groups.get_mut(filter, &group) {
            g.announced_before = Some((g.announced, before_until_ms));
            g.announced = n;
        }
    }

    /// One member of every group whose filter matches `topic` and that `mine(key, announced,
    /// announced_before)` lets this node deliver to (a cluster: another node may deliver the
    /// message to the group; `announced`: see [`ShareGroups::announced`]; `announced_before`:
    /// the count before it, with until when it counts).
    /// `busy(member)` is `Some(backlog)` for a member that cannot take a message now (window
    /// full, messages queued, offline), `None` for one that can or whose state is not known here.
    pub(super) fn pick(
        &mut self,
        topic: &str,
        mut mine: impl FnMut(&str, u32, Option<(u32, u64)>) -> bool,
        mut busy: impl FnMut(&ShareMember) -> Option<usize>,
        picks: &mut Vec<ShareMember>,
    ) {
        self.groups.for_each_match_mut(topic, |_, g| {
            let n = g.members.len();
            if n == 0 || !mine(&g.key, g.announced, g.announced_before) {
                return;
            }
            let start = g.next % n;
            let mut best = (usize::MAX, start);
            for k in 0..n.min(PICK_SCAN_MAX) {
                let i = (start + k) % n;
                let reported = g.busy[i].then_some(REMOTE_BUSY_BACKLOG);
                match reported.or_else(|| busy(&g.members[i])) {
                    None => {
                        best = (0, i);
                        break;
                    }
                    Some(backlog) if backlog < best.0 => best = (backlog, i),
                    Some(_) => {}
                }
            }
            picks.push(g.members[best.1].clone());
            // The next pick starts after this one: members with room still take turns.
            g.next = best.1 + 1;
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
            g.pick("a/b", |_, _, _| true, |_| None, &mut picks);
        }
        let ids: Vec<&str> = picks.iter().map(|m| &*m.client_id).collect();
        assert_eq!(ids, ["x", "y", "x", "y"], "a client joins once; joining again replaces it");
        assert_eq!(picks[0].shard, 1);
        g.leave(&share_key("g", "a/+"), &"x".into());
        g.leave(&share_key("g", "a/+"), &"y".into());
        picks.clear();
        g.pick("a/b", |_, _, _| true, |_| None, &mut picks);
        assert!(picks.is_empty());
        g.leave("malformed", &"x".into());
    }

    #[test]
    fn a_busy_member_is_passed_over_and_all_busy_picks_the_smallest_backlog() {
        let mut g = ShareGroups::default();
        for id in ["x", "y", "z"] {
            g.join(&share_key("g", "t"), member(id, 0));
        }
        let ids = |g: &mut ShareGroups, busy: &dyn Fn(&str) -> Option<usize>, n: usize| {
            let mut picks = Vec::new();
            for _ in 0..n {
                g.pick("t", |_, _, _| true, |m| busy(&m.client_id), &mut picks);
            }
            picks.into_iter().map(|m| m.client_id.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&mut g, &|id| (id == "y").then_some(5), 4), ["x", "z", "x", "z"]);
        let backlog = |id: &str| {
            Some(match id {
                "x" => 7,
                "y" => 3,
                _ => 9,
            })
        };
        assert_eq!(ids(&mut g, &backlog, 2), ["y", "y"], "all busy: the smallest backlog");
    }
}
