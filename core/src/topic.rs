//! Topic names, topic filters and the subscription trie.
//!
//! The trie maps filters to entries keyed by `K` (a session's client id, a shared group…). A
//! filter without wildcards is kept by its whole text (one lookup of the whole topic finds it);
//! a filter with `+` or `#` goes into a tree by level, and matching walks one path per topic
//! level plus the `+` and `#` branches, so its cost follows the depth of the topic and the
//! number of wildcard branches on the way, not the number of subscriptions. A trie holding no
//! wildcard filter (point-to-point subscriptions, most devices' command topics) never splits a
//! topic. Topics that start with `$` are not matched by a leading `+` or `#` (MQTT 4.7.2).

use crate::HashMap;
use std::hash::Hash;

/// Limits on names and filters, from the config.
#[derive(Clone, Copy, Debug)]
pub struct TopicLimits {
    pub max_levels: usize,
    pub max_len: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits { max_levels: 64, max_len: 65_535 }
    }
}

/// A topic name a client may publish to: no wildcards, within limits.
pub fn valid_topic_name(t: &str, lim: &TopicLimits) -> bool {
    if t.is_empty() || t.len() > lim.max_len {
        return false;
    }
    // One pass over the bytes (every PUBLISH comes here): levels are separators + 1.
    let mut separators = 0usize;
    for b in t.bytes() {
        match b {
            b'+' | b'#' => return false,
            b'/' => separators += 1,
            _ => {}
        }
    }
    separators < lim.max_levels
}

/// A topic filter: `+` only as a whole level, `#` only as the whole last level.
pub fn valid_filter(f: &str, lim: &TopicLimits) -> bool {
    if f.is_empty() || f.len() > lim.max_len {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    if levels.len() > lim.max_levels {
        return false;
    }
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// `$share/{group}/{filter}` split into group and filter; `None` for an ordinary filter.
/// `Some(Err(()))` when it starts with `$share/` but is not a valid shared subscription.
pub fn parse_shared(f: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = f.strip_prefix("$share/")?;
    let Some((group, filter)) = rest.split_once('/') else { return Some(Err(())) };
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return Some(Err(()));
    }
    Some(Ok((group, filter)))
}

/// Whether `filter` matches `topic` (both already valid). The reference the trie is tested against.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    entries: HashMap<K, V>,
    /// Which wildcard children (`#`: [`HASH`], `+`: [`PLUS`]) `children` has, so that a match
    /// looks them up only where they exist: most levels of most tries have neither.
    wild: u8,
}

const HASH: u8 = 1;
const PLUS: u8 = 2;

/// The [`Node::wild`] bit of a filter level.
fn wild_bit(level: &str) -> u8 {
    match level {
        "#" => HASH,
        "+" => PLUS,
        _ => 0,
    }
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: HashMap::default(), entries: HashMap::default(), wild: 0 }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entries.is_empty()
    }
}

/// Filters → entries keyed by `K`; one entry per key per filter.
///
/// Invariant: a filter with no `+` or `#` character is in `exact` only, any other in the tree
/// (`root`) only; neither keeps an empty entry map; `len` counts the entries of both and
/// `wild_len` those of the tree.
pub struct Trie<K, V> {
    /// Wildcard-free filters by their whole text: equal text is equal levels, so a topic finds
    /// them with one hash of the topic instead of one per level.
    exact: HashMap<Box<str>, HashMap<K, V>>,
    root: Node<K, V>,
    len: usize,
    wild_len: usize,
}

impl<K: Eq + Hash, V> Default for Trie<K, V> {
    fn default() -> Self {
        Trie { exact: HashMap::default(), root: Node::default(), len: 0, wild_len: 0 }
    }
}

/// Whether `filter` goes to [`Trie::exact`]: no wildcard character anywhere (a character that
/// is not a whole level, in a filter that was not validated, keeps the tree's literal match).
fn is_exact(filter: &str) -> bool {
    !filter.bytes().any(|b| b == b'+' || b == b'#')
}

impl<K: Eq + Hash, V> Trie<K, V> {
    /// Number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts or replaces the entry of `key` under `filter`; returns the old value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        if is_exact(filter) {
            let entries = match self.exact.get_mut(filter) {
                Some(e) => e,
                None => self.exact.entry(filter.into()).or_default(),
            };
            let old = entries.insert(key, value);
            if old.is_none() {
                self.len += 1;
            }
            return old;
        }
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node.wild |= wild_bit(level);
            node = node.children.entry(level.into()).or_default();
        }
        let old = node.entries.insert(key, value);
        if old.is_none() {
            self.len += 1;
            self.wild_len += 1;
        }
        old
    }

    /// Removes the entry of `key` under `filter`, pruning empty branches.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        if is_exact(filter) {
            let entries = self.exact.get_mut(filter)?;
            let v = entries.remove(key);
            if entries.is_empty() {
                self.exact.remove(filter);
            }
            if v.is_some() {
                self.len -= 1;
            }
            return v;
        }
        fn walk<K: Eq + Hash, V>(node: &mut Node<K, V>, levels: &[&str], key: &K) -> Option<V> {
            match levels.split_first() {
                None => node.entries.remove(key),
                Some((first, rest)) => {
                    let child = node.children.get_mut(*first)?;
                    let v = walk(child, rest, key);
                    if child.is_empty() {
                        node.children.remove(*first);
                        node.wild &= !wild_bit(first);
                    }
                    v
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let v = walk(&mut self.root, &levels, key);
        if v.is_some() {
            self.len -= 1;
            self.wild_len -= 1;
        }
        v
    }

    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        if is_exact(filter) {
            return self.exact.get_mut(filter)?.get_mut(key);
        }
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.get_mut(level)?;
        }
        node.entries.get_mut(key)
    }

    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        if is_exact(filter) {
            return self.exact.get(filter)?.get(key);
        }
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        node.entries.get(key)
    }

    /// Calls `f` for every entry whose filter matches `topic`. A key subscribed through several
    /// matching filters is reported once per filter; the caller merges.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        fn walk<K, V>(
            node: &Node<K, V>,
            mut levels: Levels<'_>,
            first: bool,
            dollar: bool,
            f: &mut impl FnMut(&K, &V),
        ) {
            let wild = if first && dollar { 0 } else { node.wild };
            if wild & HASH != 0 {
                if let Some(h) = node.children.get("#") {
                    h.entries.iter().for_each(|(k, v)| f(k, v));
                }
            }
            let Some(level) = levels.next() else {
                node.entries.iter().for_each(|(k, v)| f(k, v));
                return;
            };
            if wild & PLUS != 0 {
                if let Some(p) = node.children.get("+") {
                    walk(p, levels.clone(), false, dollar, f);
                }
            }
            if let Some(c) = node.children.get(level) {
                walk(c, levels, false, dollar, f);
            }
        }
        if !self.exact.is_empty() {
            if let Some(entries) = self.exact.get(topic) {
                entries.iter().for_each(|(k, v)| f(k, v));
            }
        }
        // No wildcard filter (a shard's shared groups, point-to-point subscribers): the topic is
        // not even split.
        if self.wild_len == 0 {
            return;
        }
        walk(&self.root, topic.split('/'), true, topic.starts_with('$'), &mut f);
    }
}

impl<K: Eq + Hash, V> Trie<K, V> {
    /// Calls `f` for every entry, in no order (a walk of the whole trie: for rare work, not per
    /// message).
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        fn walk<K, V>(node: &Node<K, V>, f: &mut impl FnMut(&K, &V)) {
            node.entries.iter().for_each(|(k, v)| f(k, v));
            node.children.values().for_each(|c| walk(c, f));
        }
        self.exact.values().flat_map(|e| e.iter()).for_each(|(k, v)| f(k, v));
        walk(&self.root, &mut f);
    }

    /// Like [`Trie::for_each_match`], with mutable entries (round-robin counters of shared groups).
    pub fn for_each_match_mut(&mut self, topic: &str, mut f: impl FnMut(&K, &mut V)) {
        fn walk<K, V>(
            node: &mut Node<K, V>,
            mut levels: Levels<'_>,
            first: bool,
            dollar: bool,
            f: &mut impl FnMut(&K, &mut V),
        ) {
            let wild = if first && dollar { 0 } else { node.wild };
            if wild & HASH != 0 {
                if let Some(h) = node.children.get_mut("#") {
                    h.entries.iter_mut().for_each(|(k, v)| f(k, v));
                }
            }
            let Some(level) = levels.next() else {
                node.entries.iter_mut().for_each(|(k, v)| f(k, v));
                return;
            };
            if wild & PLUS != 0 {
                if let Some(p) = node.children.get_mut("+") {
                    walk(p, levels.clone(), false, dollar, f);
                }
            }
            if level != "+" && level != "#" {
                if let Some(c) = node.children.get_mut(level) {
                    walk(c, levels, false, dollar, f);
                }
            }
        }
        if !self.exact.is_empty() {
            if let Some(entries) = self.exact.get_mut(topic) {
                entries.iter_mut().for_each(|(k, v)| f(k, v));
            }
        }
        if self.wild_len == 0 {
            return;
        }
        walk(&mut self.root, topic.split('/'), true, topic.starts_with('$'), &mut f);
    }
}

/// A topic's levels still to match: the split itself, copied where the walk branches (no
/// vector per message).
type Levels<'a> = std::str::Split<'a, char>;

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[(&str, &str, bool)] = &[
        ("a/b/c", "a/b/c", true),
        ("a/+/c", "a/b/c", true),
        ("a/+", "a/b/c", false),
        ("a/#", "a/b/c", true),
        ("a/#", "a", true),
        ("#", "a/b", true),
        ("+", "a", true),
        ("+", "a/b", false),
        ("+/+", "/a", true),
        ("/+", "/a", true),
        ("+", "", true),
        ("a/b", "a/b/", false),
        ("a/b/+", "a/b/", true),
        ("#", "$SYS/uptime", false),
        ("+/uptime", "$SYS/uptime", false),
        ("$SYS/#", "$SYS/uptime", true),
        ("$SYS/+", "$SYS/uptime", true),
        ("sport/tennis/#", "sport/tennis", true),
        ("sport/+/player1", "sport/tennis/player1", true),
        ("fleet/+/+/+/speed", "fleet/eu/group-3/car-1045107/speed", true),
        ("fleet/#", "fleet/eu/group-3/car-1045107/speed", true),
        ("fleet/+/speed", "fleet/eu/group-3/car-1045107/speed", false),
    ];

    #[test]
    fn reference_matcher_table() {
        for &(f, t, want) in TABLE {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn wildcard_levels_are_found_after_removals_and_reinserts() {
        let mut trie: Trie<u32, ()> = Trie::default();
        let found = |t: &Trie<u32, ()>, topic: &str| {
            let mut keys = Vec::new();
            t.for_each_match(topic, |k, _| keys.push(*k));
            keys.sort_unstable();
            keys
        };
        trie.insert("+/b", 1, ());
        trie.insert("a/#", 2, ());
        trie.insert("a/b", 3, ());
        assert_eq!(found(&trie, "a/b"), [1, 2, 3]);
        trie.remove("+/b", &1);
        trie.remove("a/#", &2);
        assert_eq!(found(&trie, "a/b"), [3]);
        assert_eq!(trie.root.wild, 0, "the wildcard children are gone, and so are their bits");
        trie.insert("+/b", 4, ());
        trie.insert("a/+", 5, ());
        assert_eq!(found(&trie, "a/b"), [3, 4, 5]);
        let mut none: Trie<u32, ()> = Trie::default();
        none.for_each_match_mut("a/b", |_, _| unreachable!());
    }

    #[test]
    fn for_each_visits_every_entry_exact_and_wildcard() {
        let mut t: Trie<&str, u32> = Trie::default();
        t.insert("a/b", "x", 1);
        t.insert("a/+", "y", 2);
        t.insert("#", "z", 3);
        t.insert("a/b/c", "w", 4);
        t.remove("a/b/c", &"w");
        let mut seen = Vec::new();
        t.for_each(|k, v| seen.push((*k, *v)));
        seen.sort();
        assert_eq!(seen, [("x", 1), ("y", 2), ("z", 3)]);
    }

    #[test]
    fn trie_agrees_with_table() {
        let mut trie = Trie::default();
        for (i, &(f, _, _)) in TABLE.iter().enumerate() {
            trie.insert(f, i, ());
        }
        for &(_, t, _) in TABLE {
            let mut got = Vec::new();
            trie.for_each_match(t, |k, _| got.push(*k));
            got.sort();
            let want: Vec<usize> =
                TABLE.iter().enumerate().filter(|(_, (f, _, _))| matches(f, t)).map(|(i, _)| i).collect();
            assert_eq!(got, want, "topic {t}");
        }
    }

    #[test]
    fn remove_prunes() {
        let mut trie = Trie::default();
        trie.insert("a/b/c", 1, ());
        trie.insert("a/+", 2, ());
        assert_eq!(trie.len(), 2);
        assert!(trie.remove("a/b/c", &1).is_some());
        assert!(trie.remove("a/b/c", &1).is_none());
        assert!(trie.remove("a/+", &2).is_some());
        assert!(trie.is_empty());
        assert!(trie.root.children.is_empty());
        assert!(trie.exact.is_empty());
    }

    #[test]
    fn exact_filters_are_found_without_the_tree_and_beside_it() {
        let mut trie: Trie<u32, u8> = Trie::default();
        trie.insert("a/b", 1, 10);
        trie.insert("a/b", 2, 20);
        assert_eq!(trie.insert("a/b", 1, 11), Some(10));
        assert_eq!((trie.len(), trie.wild_len), (2, 0));
        assert!(trie.root.children.is_empty(), "a wildcard-free filter is not split into levels");
        assert_eq!(trie.get("a/b", &1), Some(&11));
        *trie.get_mut("a/b", &2).unwrap() = 21;
        trie.insert("a/+", 3, 30);
        trie.insert("$SYS/x", 4, 40);
        let found = |t: &mut Trie<u32, u8>, topic: &str| {
            let mut a = Vec::new();
            t.for_each_match(topic, |k, v| a.push((*k, *v)));
            let mut b = Vec::new();
            t.for_each_match_mut(topic, |k, v| b.push((*k, *v)));
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
            a
        };
        assert_eq!(found(&mut trie, "a/b"), [(1, 11), (2, 21), (3, 30)]);
        assert_eq!(found(&mut trie, "$SYS/x"), [(4, 40)]);
        assert_eq!(found(&mut trie, "a/b/c"), []);
        assert_eq!(trie.remove("a/b", &1), Some(11));
        assert_eq!(trie.remove("a/b", &2), Some(21));
        assert_eq!(trie.remove("a/b", &2), None);
        assert!(!trie.exact.contains_key("a/b"), "an empty filter's entry map is gone");
        assert_eq!(found(&mut trie, "a/b"), [(3, 30)]);
        assert_eq!((trie.len(), trie.wild_len), (2, 1));
    }

    #[test]
    fn validation() {
        let l = TopicLimits::default();
        for f in ["a", "a/+", "+/+/#", "#", "/", "$share/g/a/#"] {
            assert!(valid_filter(f, &l), "{f}");
        }
        for f in ["", "a/#/b", "a+", "a/b#", "##"] {
            assert!(!valid_filter(f, &l), "{f}");
        }
        assert!(valid_topic_name("a/b", &l));
        assert!(!valid_topic_name("a/+", &l));
        assert!(!valid_topic_name("", &l));
        let short = TopicLimits { max_levels: 2, max_len: 5 };
        assert!(!valid_topic_name("a/b/c", &short));
        assert!(!valid_topic_name("abcdef", &short));
        assert_eq!(parse_shared("$share/g/a/b"), Some(Ok(("g", "a/b"))));
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("$share//a"), Some(Err(())));
        assert_eq!(parse_shared("a/b"), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn level() -> impl Strategy<Value = String> {
            prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("".to_string()), Just("$x".to_string())]
        }
        fn filter_level() -> impl Strategy<Value = String> {
            prop_oneof![level(), Just("+".to_string())]
        }

        proptest! {
            #[test]
            fn trie_matches_reference(
                filters in proptest::collection::vec((proptest::collection::vec(filter_level(), 1..4), any::<bool>()), 1..20),
                topic in proptest::collection::vec(level(), 1..5),
            ) {
                let filters: Vec<String> = filters.into_iter().map(|(ls, hash)| {
                    let mut f = ls.join("/");
                    if hash { f.push_str("/#"); }
                    f
                }).collect();
                let topic = topic.join("/");
                let mut trie = Trie::default();
                for (i, f) in filters.iter().enumerate() { trie.insert(f, i, ()); }
                let mut got = Vec::new();
                trie.for_each_match(&topic, |k, _| got.push(*k));
                got.sort();
                let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| matches(f, &topic)).map(|(i, _)| i).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
