//! A shard's retained messages, indexed by topic level, and lookups by filter in bounded slices.
//!
//! [`RetainedTree`] is a trie over topic levels with at most one message per node (the node
//! of its topic). Children are kept in a `BTreeMap`, so a walk visits nodes in one stable
//! pre-order: the lexicographic order of their level paths, a node before its subtree.
//!
//! A lookup by filter walks only what can match — a literal level follows one child, `+` every
//! child, `#` the node itself (MQTT: `a/#` matches `a`) and its whole subtree — and a leading
//! `+` or `#` does not enter levels beginning with `$` (MQTT 4.7.2). It visits at most a
//! `budget` of nodes and then returns a [`Cursor`]: the level path of the last node it handled.
//! Resuming skips every node at or before the cursor in pre-order, so it stays correct when
//! topics were inserted or removed in between: a message present during the whole lookup is
//! found exactly once; one inserted meanwhile may or may not be (it is new: subscribers get it
//! live).
//!
//! Invariants: `len` counts nodes holding a message; a node without a message has children
//! (removal prunes empty nodes up to the root). This module knows nothing of sessions or shards.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::message::Msg;

#[derive(Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    msg: Option<Msg>,
}

/// Retained messages by topic: insert/replace, remove, and lookups by filter in slices.
#[derive(Default)]
pub struct RetainedTree {
    root: Node,
    len: usize,
}

/// Where a lookup stopped: the level path of the last node it handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor(Vec<Box<str>>);

/// What one slice of a lookup did.
#[derive(Debug)]
pub struct Slice {
    /// Nodes visited (what the budget counts).
    pub visited: usize,
    /// `Some` when the budget ran out: pass it back to go on. `None`: the lookup is complete.
    pub resume: Option<Cursor>,
}

impl RetainedTree {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, topic: &str) -> Option<&Msg> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.msg.as_ref()
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.get(topic).is_some()
    }

    /// Stores `msg` as the retained message of `topic`; returns the one it replaces.
    pub fn insert(&mut self, topic: &str, msg: Msg) -> Option<Msg> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let old = node.msg.replace(msg);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Clears the retained message of `topic`, pruning the nodes that are left empty.
    pub fn remove(&mut self, topic: &str) -> Option<Msg> {
        let levels: Vec<&str> = topic.split('/').collect();
        let old = remove_at(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Calls `found` for every message whose topic `filter` (a valid filter) matches, in
    /// pre-order, visiting at most `budget` nodes (at least one); `after` resumes a lookup of
    /// the same filter where a previous slice stopped.
    pub fn lookup(&self, filter: &str, after: Option<&Cursor>, budget: usize, found: impl FnMut(&Msg)) -> Slice {
        let mut w = Walk {
            filter: filter.split('/').collect(),
            budget: budget.max(1),
            visited: 0,
            path: Vec::new(),
            stopped: false,
            found,
        };
        let pos = after.map(|c| c.0.as_slice());
        w.visit(&self.root, 0, false, pos);
        let resume = w.stopped.then(|| Cursor(w.path.iter().map(|l| Box::from(*l)).collect()));
        Slice { visited: w.visited, resume }
    }
}

fn remove_at(node: &mut Node, levels: &[&str]) -> Option<Msg> {
    let Some((first, rest)) = levels.split_first() else { return node.msg.take() };
    let child = node.children.get_mut(*first)?;
    let old = remove_at(child, rest);
    if old.is_some() && child.msg.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    old
}

/// `node`'s children from the level `from` on (`""` is the least level), in order; without the
/// levels beginning with `$` when `skip_dollar`. Those are one contiguous range, `"$"` up to
/// `"%"`, skipped by a seek rather than stepped over one by one: a lookup's cost stays bounded
/// by the nodes it visits, however many `$` topics there are.
fn children_from<'t>(
    node: &'t Node,
    from: &str,
    skip_dollar: bool,
) -> impl Iterator<Item = (&'t Box<str>, &'t Node)> + 't {
    let range = |lo: &str, hi: Bound<&str>| node.children.range::<str, _>((Bound::Included(lo), hi));
    let (before, after) = if !skip_dollar {
        (Some(range(from, Bound::Unbounded)), None)
    } else {
        let before = (from < "$").then(|| range(from, Bound::Excluded("$")));
        (before, Some(range(from.max("%"), Bound::Unbounded)))
    };
    before.into_iter().flatten().chain(after.into_iter().flatten())
}

struct Walk<'t, 'f, F> {
    filter: Vec<&'f str>,
    budget: usize,
    visited: usize,
    /// Levels from the root to the node being visited.
    path: Vec<&'t str>,
    stopped: bool,
    found: F,
}

impl<'t, F: FnMut(&Msg)> Walk<'t, '_, F> {
    /// Visits `node` (at `self.path`) with `fi` filter levels consumed; `in_hash`: below a `#`.
    /// `pos`: `Some(rest)` when the node lies on the resume cursor's path (`rest` being the
    /// cursor's levels below it): it was handled before, and only children from `rest[0]` on
    /// are still to do. `None`: the node comes after the cursor (or there is none).
    fn visit(&mut self, node: &'t Node, fi: usize, in_hash: bool, pos: Option<&[Box<str>]>) {
        let wildcard = in_hash || self.filter.get(fi).is_some_and(|l| *l == "#" || *l == "+");
        if pos.is_none() {
            let matches = in_hash || fi == self.filter.len() || self.filter[fi] == "#";
            if matches {
                if let Some(m) = &node.msg {
                    (self.found)(m);
                }
            }
            self.visited += 1;
            if self.visited >= self.budget {
                self.stopped = true;
                return;
            }
        }
        if !in_hash && fi == self.filter.len() {
            return;
        }
        // Children still to do: all of them, or those from the cursor's next level on.
        let (from, below) = match pos {
            Some([next, rest @ ..]) => (Some(&**next), Some(rest)),
            _ => (None, None),
        };
        let (child_fi, child_hash) = if in_hash || self.filter[fi] == "#" { (fi, true) } else { (fi + 1, false) };
        let skip_dollar = self.path.is_empty() && wildcard;
        if !wildcard {
            let level = self.filter[fi];
            if from.is_some_and(|f| level < f) {
                return;
            }
            let Some((key, child)) = node.children.get_key_value(level) else { return };
            let child_pos = if from == Some(level) { below } else { None };
            self.descend(key, child, child_fi, child_hash, child_pos);
            return;
        }
        for (key, child) in children_from(node, from.unwrap_or(""), skip_dollar) {
            let child_pos = if from == Some(&**key) { below } else { None };
            self.descend(key, child, child_fi, child_hash, child_pos);
            if self.stopped {
                return;
            }
        }
    }

    fn descend(&mut self, key: &'t str, child: &'t Node, fi: usize, in_hash: bool, pos: Option<&[Box<str>]>) {
        self.path.push(key);
        self.visit(child, fi, in_hash, pos);
        if !self.stopped {
            self.path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::topic;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn msg(topic: &str) -> Msg {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 0,
            retain: true,
            properties: None,
            expiry_at_ms: None,
            origin: Arc::from("t"),
        })
    }

    fn tree(topics: &[&str]) -> RetainedTree {
        let mut t = RetainedTree::default();
        for x in topics {
            t.insert(x, msg(x));
        }
        t
    }

    /// Every match, in slices of `budget` nodes.
    fn all(t: &RetainedTree, filter: &str, budget: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = None;
        loop {
            let s = t.lookup(filter, at.as_ref(), budget, |m| out.push(m.topic.clone()));
            assert!(s.visited <= budget.max(1));
            match s.resume {
                Some(c) => at = Some(c),
                None => return out,
            }
        }
    }

    const TOPICS: &[&str] =
        &["a", "a/b", "a/b/c", "a/c", "a/", "/a", "b", "$SYS/x", "$SYS", "a/$x", "b/b/b", "a//c", "c/d/e/f"];

    #[test]
    fn lookups_match_the_mqtt_rules() {
        let t = tree(TOPICS);
        let cases: &[(&str, &[&str])] = &[
            ("a", &["a"]),
            ("a/b", &["a/b"]),
            ("a/#", &["a", "a/", "a//c", "a/$x", "a/b", "a/b/c", "a/c"]),
            ("a/+", &["a/", "a/$x", "a/b", "a/c"]),
            ("+", &["b", "a"]),
            ("#", &["/a", "a", "a/", "a//c", "a/$x", "a/b", "a/b/c", "a/c", "b", "b/b/b", "c/d/e/f"]),
            ("+/+/c", &["a//c", "a/b/c"]),
            ("+/#", &["/a", "a", "a/", "a//c", "a/$x", "a/b", "a/b/c", "a/c", "b", "b/b/b", "c/d/e/f"]),
            ("$SYS/#", &["$SYS", "$SYS/x"]),
            ("$SYS/+", &["$SYS/x"]),
            ("+/x", &[]),
            ("nothing/#", &[]),
            ("a/b/c/d", &[]),
            ("/+", &["/a"]),
            ("c/d/e/f/#", &["c/d/e/f"]),
        ];
        for (filter, want) in cases {
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            want.sort();
            for budget in [1, 2, 3, 1000] {
                let mut got = all(&t, filter, budget);
                got.sort();
                assert_eq!(got, want, "filter {filter}, budget {budget}");
            }
        }
    }

    #[test]
    fn insert_replace_remove_and_len() {
        let mut t = tree(&["a/b", "a/b/c"]);
        assert_eq!(t.len(), 2);
        assert!(t.insert("a/b", msg("a/b")).is_some(), "replaces");
        assert_eq!(t.len(), 2);
        assert!(t.remove("a").is_none(), "a is only a level");
        assert!(t.remove("a/b/c").is_some());
        assert!(t.remove("a/b/c").is_none());
        assert_eq!(t.len(), 1);
        assert!(t.contains("a/b") && !t.contains("a/b/c"));
        assert!(t.remove("a/b").is_some());
        assert!(t.is_empty());
        assert!(t.root.children.is_empty(), "empty nodes are pruned");
    }

    #[test]
    fn a_lookup_visits_only_what_can_match() {
        let mut t = RetainedTree::default();
        for i in 0..10_000 {
            let topic = format!("ret/{i}");
            t.insert(&topic, msg(&topic));
        }
        let s = t.lookup("other/#", None, usize::MAX, |_| panic!("no match"));
        assert_eq!((s.visited, s.resume), (1, None), "the root only");
        let s = t.lookup("ret/77", None, usize::MAX, |_| {});
        assert_eq!(s.visited, 3);
        let s = t.lookup("ret/#", None, 4096, |_| {});
        assert_eq!(s.visited, 4096);
        assert!(s.resume.is_some());
        assert_eq!(all(&t, "ret/+", 4096).len(), 10_000);
    }

    #[test]
    fn dollar_topics_cost_a_leading_wildcard_nothing() {
        let mut t = RetainedTree::default();
        for i in 0..10_000 {
            let topic = format!("${i}/x");
            t.insert(&topic, msg(&topic));
        }
        t.insert("#a", msg("#a")); // sorts before `$`
        t.insert("a", msg("a"));
        for filter in ["#", "+/x", "+/#"] {
            let mut got = Vec::new();
            let s = t.lookup(filter, None, usize::MAX, |m| got.push(m.topic.clone()));
            assert!(s.visited <= 3, "{filter}: {} nodes", s.visited);
            assert!(got.iter().all(|x| !x.starts_with('$')), "{got:?}");
        }
        assert_eq!(all(&t, "$5/#", 1), ["$5/x"]);
    }

    #[test]
    fn resuming_after_the_cursor_node_was_removed() {
        let mut t = tree(&["a/1", "a/2", "a/3", "a/4"]);
        let mut got = Vec::new();
        // Root, `a`, `a/1`: three nodes.
        let s = t.lookup("a/+", None, 3, |m| got.push(m.topic.clone()));
        assert_eq!(got, ["a/1"]);
        let c = s.resume.unwrap();
        t.remove("a/1"); // the cursor's own node
        t.remove("a/3");
        t.insert("a/0", msg("a/0")); // before the cursor: not found (it is new)
        t.insert("a/5", msg("a/5"));
        let s = t.lookup("a/+", Some(&c), 100, |m| got.push(m.topic.clone()));
        assert!(s.resume.is_none());
        assert_eq!(got, ["a/1", "a/2", "a/4", "a/5"]);
    }

    fn arb_topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$s", "$", "%", "#c", "c"]), 1..5)
            .prop_map(|v| v.join("/"))
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$s", "+"]), 0..4), any::<bool>()).prop_map(
            |(mut v, hash)| {
                if hash || v.is_empty() {
                    v.push("#");
                }
                v.join("/")
            },
        )
    }

    proptest! {
        /// Sliced lookups, with topics inserted and removed between slices, against a brute-force
        /// scan with `topic::matches`: everything present throughout is found once, nothing that
        /// was never present is found, nothing twice.
        #[test]
        fn sliced_lookups_agree_with_brute_force(
            topics in prop::collection::btree_set(arb_topic(), 0..40),
            filter in arb_filter(),
            budget in 1usize..8,
            churn in prop::collection::vec((arb_topic(), any::<bool>()), 0..20),
        ) {
            let mut t = RetainedTree::default();
            for x in &topics {
                t.insert(x, msg(x));
            }
            prop_assert_eq!(t.len(), topics.len());
            let mut present_throughout: std::collections::BTreeSet<String> = topics.clone();
            let mut ever: std::collections::BTreeSet<String> = topics.clone();
            let mut got = Vec::new();
            let mut at = None;
            let mut churn = churn.into_iter();
            loop {
                let s = t.lookup(&filter, at.as_ref(), budget, |m| got.push(m.topic.clone()));
                prop_assert!(s.visited <= budget);
                let Some(c) = s.resume else { break };
                at = Some(c);
                if let Some((x, insert)) = churn.next() {
                    if insert {
                        t.insert(&x, msg(&x));
                        ever.insert(x);
                    } else {
                        t.remove(&x);
                        present_throughout.remove(&x);
                    }
                }
            }
            let mut sorted = got.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), got.len(), "found twice: {:?}", got);
            for x in &present_throughout {
                prop_assert_eq!(got.contains(x), topic::matches(&filter, x), "{} vs {}", filter, x);
            }
            for x in &got {
                prop_assert!(ever.contains(x) && topic::matches(&filter, x), "{} found by {}", x, filter);
            }
        }
    }
}
