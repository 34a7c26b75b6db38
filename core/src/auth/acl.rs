//! Access control lists: which topics a client may publish to, subscribe to and receive.
//!
//! # Formats
//! **Mosquitto's `acl_file`**, one directive per line (`#` comments, blank lines ignored):
//! - `user NAME` — the `topic` lines after it apply to that user (until the next `user` line);
//!   `topic` lines before any `user` line apply to clients without a user name;
//! - `topic [read|write|readwrite|deny] FILTER` — access omitted means `readwrite`;
//! - `pattern [read|write|readwrite|deny] FILTER` — applies to every client wherever it stands,
//!   with `%c` replaced by the client id and `%u` by the user name.
//!
//! **TOML** (an `[[acl]]` array, or the same tables inline in `[auth]`), one table per subject:
//! ```toml
//! [[acl]]
//! user = "dashboard"                 # or `anonymous = true`, or `pattern = true` (everyone, %c/%u)
//! allow_publish = ["cmd/#"]          # = write
//! allow_subscribe = ["devices/#"]    # = read: subscribing and receiving
//! deny = ["devices/secret/#"]
//! ```
//! The subject is explicit: a table with no `user`, `anonymous` or `pattern` is an error rather
//! than silently meaning "anonymous clients".
//!
//! # Semantics
//! - A deny rule wins over any allow, in either direction (read and write).
//! - `may_publish(topic)`: some write rule matches the topic and no deny rule does.
//! - `may_read(topic)` (deliveries: live, retained, shared, from Kafka): likewise with read rules.
//! - `may_subscribe(filter)`: every topic the filter can match is readable — one read rule's
//!   filter covers it (`devices/c1/#` covers `devices/c1/+/x`, not `devices/#`) and no deny rule
//!   overlaps it. A filter covered only by the union of several rules is refused: the check
//!   under-approximates, never over-approximates. `$share/G/F` is checked as `F`.
//! - `$`-topics follow MQTT 4.7.2: a leading `+` or `#` does not match them, so `#` grants
//!   nothing under `$SYS`; only a rule that names `$SYS/…` does.
//! - A placeholder whose value contains `+`, `#` or `/`, or is empty, or `%u` for a client
//!   without a user name: that rule matches nothing for that client (Mosquitto refuses such
//!   substitutions too), so a client id like `+` or `a/b` can never widen `devices/%c/#`.
//!
//! # Invariants
//! - Fail closed: a line that does not parse rejects the whole file ([`AclError`] names the line);
//!   topics or filters that are not valid MQTT are denied, not matched loosely.
//! - Compiled once per CONNECT ([`Acl::for_client`]): rules that do not depend on the client are
//!   compiled once per file and shared (`Arc`); only filled-in patterns are built per client.
//! - Checks walk a trie by topic level, one path per level plus the `+`/`#` branches, pruned by
//!   the permissions below each node; they do not allocate.

use std::sync::Arc;

use serde::Deserialize;

use crate::HashMap;

const READ: u8 = 1;
const WRITE: u8 = 2;
const DENY: u8 = 4;

/// Why an ACL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AclError {
    /// `line` 0: the position is unknown (an inline `[[auth.acl]]` table without filters, whose
    /// span the config types do not keep).
    #[error("ACL line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("ACL TOML: {0}")]
    Toml(String),
    /// A filter in the ACL claim of a token, or given to [`ClientAcl::from_filters`].
    #[error("ACL filter {filter:?}: {problem}")]
    Filter { filter: String, problem: String },
}

/// A filter as an ACL may hold it: `+` only as a whole level, `#` only as the whole last level,
/// no empty filter. Does not allocate.
fn filter_problem(f: &str) -> Option<&'static str> {
    if f.is_empty() {
        return Some("empty filter");
    }
    if f.len() > 65_535 {
        return Some("longer than 65535 bytes");
    }
    if f.contains('\0') {
        return Some("contains U+0000");
    }
    let mut levels = f.split('/').peekable();
    while let Some(l) = levels.next() {
        let last = levels.peek().is_none();
        match l {
            "#" if !last => return Some("`#` must be the last level"),
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return Some("`+` and `#` must be whole levels"),
            _ => {}
        }
    }
    None
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#', '\0'])
}

#[derive(Clone, Debug, Default)]
struct Node {
    /// Permissions of the rule whose filter ends here.
    perm: u8,
    /// `perm` of this node and every node below it: a walk skips a branch with nothing to give.
    below: u8,
    children: HashMap<Box<str>, Node>,
}

/// Rules as a trie of filter levels.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleSet {
    root: Node,
    rules: usize,
}

impl RuleSet {
    /// Adds a rule (the filter already validated).
    fn add(&mut self, filter: &str, perm: u8) {
        let mut node = &mut self.root;
        node.below |= perm;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
            node.below |= perm;
        }
        node.perm |= perm;
        self.rules += 1;
    }

    fn is_empty(&self) -> bool {
        self.rules == 0
    }

    /// Some rule with `bit` matches `topic` (a valid topic name).
    fn grants(&self, topic: &str, bit: u8) -> bool {
        fn walk(node: &Node, mut levels: std::str::Split<'_, char>, wild_ok: bool, bit: u8) -> bool {
            if node.below & bit == 0 {
                return false;
            }
            // `x/#` matches `x` and everything below it.
            if wild_ok && node.children.get("#").is_some_and(|h| h.perm & bit != 0) {
                return true;
            }
            let Some(level) = levels.next() else { return node.perm & bit != 0 };
            if wild_ok && node.children.get("+").is_some_and(|p| walk(p, levels.clone(), true, bit)) {
                return true;
            }
            node.children.get(level).is_some_and(|c| walk(c, levels, true, bit))
        }
        walk(&self.root, topic.split('/'), !topic.starts_with('$'), bit)
    }

    /// Some rule with `bit` matches every topic `filter` (a valid filter) can match.
    fn covers(&self, filter: &str, bit: u8) -> bool {
        fn walk(node: &Node, mut levels: std::str::Split<'_, char>, first: bool, bit: u8) -> bool {
            if node.below & bit == 0 {
                return false;
            }
            let f = levels.next();
            // A `$` literal as the first level is not matched by a rule's leading wildcard.
            let dollar = first && f.is_some_and(|l| l.starts_with('$'));
            if !dollar && node.children.get("#").is_some_and(|h| h.perm & bit != 0) {
                return true;
            }
            match f {
                None => node.perm & bit != 0,
                // Only a rule's `#` covers a `#`: handled above.
                Some("#") => false,
                // A literal level cannot cover `+`.
                Some("+") => node.children.get("+").is_some_and(|p| walk(p, levels, false, bit)),
                Some(lit) => {
                    (!dollar && node.children.get("+").is_some_and(|p| walk(p, levels.clone(), false, bit)))
                        || node.children.get(lit).is_some_and(|c| walk(c, levels, false, bit))
                }
            }
        }
        walk(&self.root, filter.split('/'), true, bit)
    }

    /// Some rule with `bit` matches some topic that `filter` (a valid filter) also matches.
    fn overlaps(&self, filter: &str, bit: u8) -> bool {
        fn walk(node: &Node, mut levels: std::str::Split<'_, char>, first: bool, bit: u8) -> bool {
            if node.below & bit == 0 {
                return false;
            }
            let f = levels.next();
            let dollar = first && f.is_some_and(|l| l.starts_with('$'));
            if !dollar && node.children.get("#").is_some_and(|h| h.perm & bit != 0) {
                return true;
            }
            // A rule's first-level `$` literal shares no topic with the filter's leading wildcard.
            let skip = |name: &str| first && name.starts_with('$');
            match f {
                None => node.perm & bit != 0,
                // `x/#` matches `x` itself and everything below it.
                Some("#") => node.perm & bit != 0 || node.children.iter().any(|(n, c)| !skip(n) && c.below & bit != 0),
                Some("+") => node.children.iter().any(|(n, c)| !skip(n) && walk(c, levels.clone(), false, bit)),
                Some(lit) => {
                    (!dollar && node.children.get("+").is_some_and(|p| walk(p, levels.clone(), false, bit)))
                        || node.children.get(lit).is_some_and(|c| walk(c, levels, false, bit))
                }
            }
        }
        walk(&self.root, filter.split('/'), true, bit)
    }
}

/// A `pattern` rule that names `%c` or `%u`, filled in per client.
#[derive(Clone, Debug)]
struct Pattern {
    filter: Box<str>,
    perm: u8,
}

/// A parsed ACL, shared by every connection (`Send + Sync`; keep it in an `Arc` and swap it on
/// reload).
#[derive(Clone, Debug, Default)]
pub struct Acl {
    anonymous: Arc<RuleSet>,
    users: HashMap<Box<str>, Arc<RuleSet>>,
    /// `pattern` rules without placeholders: the same for every client.
    fixed_patterns: Arc<RuleSet>,
    patterns: Vec<Pattern>,
}

/// What one client may do: compiled at CONNECT by [`Acl::for_client`] (or from a token's ACL
/// claim), checked on every PUBLISH, SUBSCRIBE and delivery.
#[derive(Clone, Debug, Default)]
pub struct ClientAcl {
    /// At most three: the user's (or anonymous) rules, the fixed patterns, the filled patterns.
    sets: Vec<Arc<RuleSet>>,
}

#[derive(Default)]
struct Builder {
    anonymous: RuleSet,
    users: HashMap<Box<str>, RuleSet>,
    fixed_patterns: RuleSet,
    patterns: Vec<Pattern>,
}

impl Builder {
    fn topic(&mut self, user: Option<&str>, filter: &str, perm: u8) {
        match user {
            None => self.anonymous.add(filter, perm),
            Some(u) => self.users.entry(u.into()).or_default().add(filter, perm),
        }
    }

    fn pattern(&mut self, filter: &str, perm: u8) {
        if filter.contains("%c") || filter.contains("%u") {
            self.patterns.push(Pattern { filter: filter.into(), perm });
        } else {
            self.fixed_patterns.add(filter, perm);
        }
    }

    fn build(self) -> Acl {
        Acl {
            anonymous: Arc::new(self.anonymous),
            users: self.users.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            fixed_patterns: Arc::new(self.fixed_patterns),
            patterns: self.patterns,
        }
    }
}

fn access(word: &str) -> Option<u8> {
    match word {
        "read" => Some(READ),
        "write" => Some(WRITE),
        "readwrite" => Some(READ | WRITE),
        "deny" => Some(DENY),
        _ => None,
    }
}

/// One `[[acl]]` table of the TOML form.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AclRuleToml {
    /// The rules apply to this user.
    #[serde(default)]
    pub user: Option<String>,
    /// The rules apply to clients without a user name.
    #[serde(default)]
    pub anonymous: bool,
    /// The rules apply to every client, `%c` and `%u` filled in.
    #[serde(default)]
    pub pattern: bool,
    /// Filters the subject may publish to (write).
    #[serde(default)]
    pub allow_publish: Vec<toml::Spanned<String>>,
    /// Filters the subject may subscribe to and receive from (read).
    #[serde(default)]
    pub allow_subscribe: Vec<toml::Spanned<String>>,
    /// Filters denied in both directions, whatever else allows them.
    #[serde(default)]
    pub deny: Vec<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclTomlFile {
    #[serde(default)]
    acl: Vec<toml::Spanned<AclRuleToml>>,
}

fn line_of(source: &str, offset: usize) -> usize {
    source.as_bytes()[..offset.min(source.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Acl {
    /// Parses Mosquitto's `acl_file` format; the first bad line rejects the file.
    pub fn parse_mosquitto(text: &str) -> Result<Acl, AclError> {
        let mut b = Builder::default();
        let mut user: Option<&str> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |problem: String| AclError::Line { line, problem };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (word, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    user = Some(rest);
                }
                "topic" | "pattern" => {
                    let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                    let (perm, filter) = match access(first) {
                        Some(p) => (p, after.trim()),
                        None => (READ | WRITE, rest),
                    };
                    if filter.is_empty() {
                        return Err(err(format!("`{word}` needs a topic filter")));
                    }
                    if let Some(p) = filter_problem(filter) {
                        return Err(err(format!("invalid filter {filter:?}: {p}")));
                    }
                    if word == "topic" {
                        b.topic(user, filter, perm);
                    } else {
                        b.pattern(filter, perm);
                    }
                }
                other => {
                    return Err(err(format!("unknown directive `{other}` (expected `user`, `topic` or `pattern`)")));
                }
            }
        }
        Ok(b.build())
    }

    /// Parses a TOML document of `[[acl]]` tables.
    pub fn parse_toml(text: &str) -> Result<Acl, AclError> {
        let file: AclTomlFile = toml::from_str(text).map_err(|e| AclError::Toml(e.to_string()))?;
        let rules: Vec<(usize, &AclRuleToml)> =
            file.acl.iter().map(|r| (line_of(text, r.span().start), r.get_ref())).collect();
        Self::from_toml_rules_at(&rules, text)
    }

    /// Compiles `[[acl]]` tables deserialized from `source` (used for line numbers in errors).
    pub fn from_toml_rules(rules: &[AclRuleToml], source: &str) -> Result<Acl, AclError> {
        let rules: Vec<(usize, &AclRuleToml)> = rules
            .iter()
            .map(|r| {
                let first =
                    r.allow_publish.iter().chain(&r.allow_subscribe).chain(&r.deny).map(|f| f.span().start).min();
                (first.map_or(0, |o| line_of(source, o)), r)
            })
            .collect();
        Self::from_toml_rules_at(&rules, source)
    }

    fn from_toml_rules_at(rules: &[(usize, &AclRuleToml)], source: &str) -> Result<Acl, AclError> {
        let mut b = Builder::default();
        for &(table_line, r) in rules {
            let subjects = usize::from(r.user.is_some()) + usize::from(r.anonymous) + usize::from(r.pattern);
            if subjects != 1 {
                return Err(AclError::Line {
                    line: table_line,
                    problem:
                        "an [[acl]] table needs exactly one of `user = \"…\"`, `anonymous = true`, `pattern = true`"
                            .into(),
                });
            }
            if r.user.as_deref() == Some("") {
                return Err(AclError::Line { line: table_line, problem: "empty user name".into() });
            }
            for (list, perm) in [(&r.allow_publish, WRITE), (&r.allow_subscribe, READ), (&r.deny, DENY)] {
                for f in list {
                    if let Some(p) = filter_problem(f.get_ref()) {
                        return Err(AclError::Line {
                            line: line_of(source, f.span().start),
                            problem: format!("invalid filter {:?}: {p}", f.get_ref()),
                        });
                    }
                    if r.pattern {
                        b.pattern(f.get_ref(), perm);
                    } else {
                        b.topic(r.user.as_deref(), f.get_ref(), perm);
                    }
                }
            }
        }
        Ok(b.build())
    }

    /// The rules of one client, placeholders filled in. `user` is the authenticated user name
    /// (`None`: anonymous).
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let mut sets = Vec::with_capacity(3);
        let base = match user {
            None => Some(&self.anonymous),
            Some(u) => self.users.get(u),
        };
        if let Some(s) = base.filter(|s| !s.is_empty()) {
            sets.push(Arc::clone(s));
        }
        if !self.fixed_patterns.is_empty() {
            sets.push(Arc::clone(&self.fixed_patterns));
        }
        let safe = |v: &str| !v.is_empty() && !v.contains(['+', '#', '/', '\0']);
        let cid = Some(client_id).filter(|c| safe(c));
        let user = user.filter(|u| safe(u));
        let mut own = RuleSet::default();
        for p in &self.patterns {
            let mut filter = String::with_capacity(p.filter.len() + 32);
            let mut rest: &str = &p.filter;
            let mut ok = true;
            while let Some(at) = rest.find('%') {
                filter.push_str(&rest[..at]);
                let tail = &rest[at..];
                let value = if tail.starts_with("%c") {
                    Some(cid)
                } else if tail.starts_with("%u") {
                    Some(user)
                } else {
                    None
                };
                match value {
                    Some(Some(v)) => {
                        filter.push_str(v);
                        rest = &tail[2..];
                    }
                    // Unsafe or missing value: this rule matches nothing for this client.
                    Some(None) => {
                        ok = false;
                        break;
                    }
                    None => {
                        filter.push('%');
                        rest = &tail[1..];
                    }
                }
            }
            if ok {
                filter.push_str(rest);
                own.add(&filter, p.perm);
            }
        }
        if !own.is_empty() {
            sets.push(Arc::new(own));
        }
        ClientAcl { sets }
    }

    /// Number of `user` subjects (for the log line at load).
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

impl ClientAcl {
    /// Rules from lists of filters, as a token's ACL claim gives them.
    pub fn from_filters<'a>(
        read: impl IntoIterator<Item = &'a str>,
        write: impl IntoIterator<Item = &'a str>,
        deny: impl IntoIterator<Item = &'a str>,
    ) -> Result<ClientAcl, AclError> {
        let mut set = RuleSet::default();
        for (list, perm) in [
            (read.into_iter().collect::<Vec<_>>(), READ),
            (write.into_iter().collect(), WRITE),
            (deny.into_iter().collect(), DENY),
        ] {
            for f in list {
                if let Some(p) = filter_problem(f) {
                    return Err(AclError::Filter { filter: f.into(), problem: p.into() });
                }
                set.add(f, perm);
            }
        }
        Ok(ClientAcl { sets: vec![Arc::new(set)] })
    }

    fn any_grants(&self, topic: &str, bit: u8) -> bool {
        self.sets.iter().any(|s| s.grants(topic, bit))
    }

    /// May this client publish to `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        valid_topic(topic) && self.any_grants(topic, WRITE) && !self.any_grants(topic, DENY)
    }

    /// May a message on `topic` be delivered to this client (live, retained, shared, Kafka)?
    pub fn may_read(&self, topic: &str) -> bool {
        valid_topic(topic) && self.any_grants(topic, READ) && !self.any_grants(topic, DENY)
    }

    /// May this client subscribe to `filter` (every topic it can match readable)?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let filter = match crate::topic::parse_shared(filter) {
            None => filter,
            Some(Ok((_group, f))) => f,
            Some(Err(())) => return false,
        };
        filter_problem(filter).is_none()
            && self.sets.iter().any(|s| s.covers(filter, READ))
            && !self.sets.iter().any(|s| s.overlaps(filter, DENY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;

    const FLEET: &str = "\
# anonymous clients
topic read public/#

user dashboard
topic read devices/#
topic deny devices/secret/#
topic write cmd/#

user admin
topic readwrite #
topic read $SYS/#

# every client
pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern write   status
";

    #[test]
    fn auth_acl_mosquitto_file_fleet() {
        let acl = Acl::parse_mosquitto(FLEET).unwrap();
        let anon = acl.for_client(None, "c1");
        assert!(anon.may_read("public/x"));
        assert!(anon.may_subscribe("public/#"));
        assert!(!anon.may_publish("public/x"), "read only");
        assert!(anon.may_publish("devices/c1/up") && anon.may_read("devices/c1/cmd"));
        assert!(!anon.may_publish("devices/c2/up") && !anon.may_read("devices/c2/cmd"));
        assert!(anon.may_subscribe("devices/c1/+/x") && anon.may_subscribe("devices/c1/#"));
        assert!(!anon.may_subscribe("devices/#") && !anon.may_subscribe("devices/+/up"));
        assert!(!anon.may_read("users/c1/inbox"), "%u for an anonymous client matches nothing");
        assert!(anon.may_publish("status") && !anon.may_read("status"));
        assert!(!anon.may_subscribe("#") && !anon.may_read("$SYS/broker/load"));

        let dash = acl.for_client(Some("dashboard"), "dash-1");
        assert!(!dash.may_read("public/x"), "anonymous rules are not a named user's");
        assert!(dash.may_read("devices/c9/temp") && dash.may_subscribe("devices/c9/temp"));
        assert!(!dash.may_read("devices/secret/key"), "deny wins");
        assert!(!dash.may_subscribe("devices/#"), "overlaps the deny");
        assert!(!dash.may_subscribe("devices/+/key"), "can match devices/secret/key");
        assert!(!dash.may_subscribe("devices/secret/#"));
        assert!(dash.may_subscribe("devices/c9/#") && dash.may_subscribe("$share/g/devices/c9/#"));
        assert!(!dash.may_publish("devices/c9/temp") && dash.may_publish("cmd/reboot"));
        assert!(dash.may_read("users/dashboard/inbox") && !dash.may_read("users/other/inbox"));
        assert!(dash.may_publish("devices/dash-1/x"));

        let admin = acl.for_client(Some("admin"), "a");
        assert!(admin.may_subscribe("#") && admin.may_publish("anything/at/all") && admin.may_read("x"));
        assert!(admin.may_read("$SYS/broker/load") && admin.may_subscribe("$SYS/#"));
        assert!(!admin.may_publish("$SYS/broker/load"), "`#` does not reach $SYS");

        let stranger = acl.for_client(Some("nobody"), "n1");
        assert!(stranger.may_publish("devices/n1/x") && !stranger.may_read("public/x"));
    }

    #[test]
    fn auth_acl_sys_needs_an_explicit_rule() {
        let acl = Acl::parse_mosquitto("topic read #\ntopic read +/broker/#\n").unwrap();
        let c = acl.for_client(None, "c");
        assert!(c.may_subscribe("#") && c.may_read("a/b") && c.may_subscribe("+/broker/x"));
        for t in ["$SYS/broker/load", "$SYS", "$other/x"] {
            assert!(!c.may_read(t), "{t}");
        }
        for f in ["$SYS/#", "$SYS/+", "$SYS/broker/load", "$SYS"] {
            assert!(!c.may_subscribe(f), "{f}");
        }
        // A deny with a leading wildcard does not reach $SYS either.
        let acl = Acl::parse_mosquitto("topic read $SYS/#\ntopic deny #\ntopic deny +/x\n").unwrap();
        let c = acl.for_client(None, "c");
        assert!(c.may_read("$SYS/x") && c.may_subscribe("$SYS/#"));
        assert!(!c.may_read("a"));
    }

    #[test]
    fn auth_acl_placeholders_never_widen() {
        let acl = Acl::parse_mosquitto("pattern readwrite devices/%c/#\npattern read u/%u/%c\npattern read x/100%/y\n")
            .unwrap();
        for bad in ["+", "#", "a/b", "", "a+", "b#c", "a\0b"] {
            let c = acl.for_client(Some(bad), bad);
            assert!(!c.may_publish("devices/x/y"), "{bad:?}");
            assert!(!c.may_subscribe("devices/#"), "{bad:?}");
            assert!(!c.may_read("devices/a/b"), "{bad:?}");
            assert!(!c.may_read("u/a/b"), "{bad:?}");
            assert!(c.may_read("x/100%/y"), "a `%` that is no placeholder is literal");
        }
        let c = acl.for_client(Some("alice"), "dev-1");
        assert!(c.may_publish("devices/dev-1/t") && c.may_read("u/alice/dev-1"));
        assert!(!c.may_read("u/alice/dev-2"));
        // The user name is safe but the client id is not: only the %u-free part survives.
        let c = acl.for_client(Some("alice"), "+");
        assert!(!c.may_read("u/alice/+") && !c.may_read("u/alice/x"));
    }

    #[test]
    fn auth_acl_file_errors_name_the_line() {
        let cases: &[(&str, &str)] = &[
            ("topic", "needs a topic filter"),
            ("topic read", "needs a topic filter"),
            ("topic read a/#/b", "`#` must be the last level"),
            ("pattern write a+/b", "whole levels"),
            ("user", "needs a user name"),
            ("subscribe a/b", "unknown directive `subscribe`"),
        ];
        for (bad, want) in cases {
            let text = format!("# c\ntopic read a\n\n{bad}\n");
            match Acl::parse_mosquitto(&text) {
                Err(AclError::Line { line: 4, problem }) => assert!(problem.contains(want), "{bad}: {problem}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Access omitted: readwrite; the filter is the rest of the line, spaces and all.
        let acl = Acl::parse_mosquitto("topic a b/c\n  topic   write   x y\n").unwrap();
        let c = acl.for_client(None, "c");
        assert!(c.may_read("a b/c") && c.may_publish("a b/c") && c.may_publish("x y") && !c.may_read("x y"));
    }

    #[test]
    fn auth_acl_toml_form() {
        let text = r#"
[[acl]]
anonymous = true
allow_subscribe = ["public/#"]

[[acl]]
user = "dashboard"
allow_subscribe = ["devices/#"]
allow_publish = ["cmd/#"]
deny = ["devices/secret/#"]

[[acl]]
pattern = true
allow_publish = ["devices/%c/#"]
allow_subscribe = ["devices/%c/#"]
"#;
        let acl = Acl::parse_toml(text).unwrap();
        let anon = acl.for_client(None, "c1");
        assert!(anon.may_read("public/x") && !anon.may_publish("public/x"));
        assert!(anon.may_publish("devices/c1/x") && anon.may_subscribe("devices/c1/#"));
        let dash = acl.for_client(Some("dashboard"), "d");
        assert!(dash.may_read("devices/c1/x") && !dash.may_read("devices/secret/x") && dash.may_publish("cmd/x"));

        let err = |t: &str| Acl::parse_toml(t).unwrap_err();
        assert_eq!(
            err("[[acl]]\nuser = \"u\"\n\nallow_publish = [\"ok\", \"a/#/b\"]\n"),
            AclError::Line { line: 4, problem: "invalid filter \"a/#/b\": `#` must be the last level".into() }
        );
        match err("\n[[acl]]\nallow_publish = [\"x\"]\n") {
            AclError::Line { line: 2, problem } => assert!(problem.contains("exactly one"), "{problem}"),
            other => panic!("{other:?}"),
        }
        match err("[[acl]]\nuser = \"u\"\npattern = true\n") {
            AclError::Line { problem, .. } => assert!(problem.contains("exactly one")),
            other => panic!("{other:?}"),
        }
        match err("[[acl]]\nuser = \"u\"\nallow_read = [\"x\"]\n") {
            AclError::Toml(m) => assert!(m.contains("line 3") && m.contains("allow_read"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn auth_acl_from_filters_and_invalid_queries() {
        let c = ClientAcl::from_filters(["b/+"], ["a/#"], ["a/private"]).unwrap();
        assert!(c.may_publish("a/x") && !c.may_publish("a/private") && c.may_subscribe("b/x"));
        assert!(!c.may_subscribe("b/#") && c.may_read("b/y") && !c.may_read("b/y/z"));
        // Invalid topics and filters are denied, never matched loosely.
        for t in ["", "a/+", "a/#", "a/x\0"] {
            assert!(!c.may_publish(t), "{t:?}");
        }
        for f in ["", "b/+x", "b/#/c", "$share/g", "$share//b/x", "$share/g+/b/x"] {
            assert!(!c.may_subscribe(f), "{f:?}");
        }
        assert!(ClientAcl::from_filters(["a/#/b"], [], []).is_err());
        assert!(!ClientAcl::default().may_read("x"), "no rules: nothing");
    }

    /// Tiny deterministic generator (xorshift) so the test needs no rand crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// 10,000 rules; every check compared with a reference that matches each rule's filter with
    /// `topic::matches` one by one, and every allowed subscription checked against the topics it
    /// matches.
    #[test]
    fn auth_acl_ten_thousand_rules_agree_with_reference() {
        let mut rng = Rng(0x5eed);
        let mut text = String::new();
        // (subject, access, filter): subject None = pattern.
        let mut rules: Vec<(Option<String>, u8, String)> = Vec::new();
        let level = |rng: &mut Rng| ["a", "b", "c", "d", "+", "%c", "%u"][rng.below(7) as usize].to_string();
        for i in 0..10_000u64 {
            let depth = 1 + rng.below(4);
            let mut f: Vec<String> = (0..depth).map(|_| level(&mut rng)).collect();
            if rng.below(3) == 0 {
                f.push("#".into());
            }
            let perm = [READ, WRITE, READ | WRITE, DENY][if rng.below(20) == 0 { 3 } else { rng.below(3) as usize }];
            if perm == DENY {
                // Denies narrow: a literal first level and at least two levels, else one rule
                // like `+/#` denies everything and the test checks only "no".
                f[0] = ["a", "b", "c", "d"][rng.below(4) as usize].into();
                if f.len() < 2 {
                    f.push(level(&mut rng));
                }
            }
            let word = match perm {
                READ => "read",
                WRITE => "write",
                DENY => "deny",
                _ => "readwrite",
            };
            let pattern = i % 10 == 0;
            let subject = if pattern { None } else { Some(format!("u{}", rng.below(50))) };
            let filter = if pattern {
                f.join("/")
            } else {
                f.iter().map(|l| if l.starts_with('%') { "x" } else { l.as_str() }).collect::<Vec<_>>().join("/")
            };
            match &subject {
                None => text.push_str(&format!("pattern {word} {filter}\n")),
                Some(u) => text.push_str(&format!("user {u}\ntopic {word} {filter}\n")),
            }
            rules.push((subject, perm, filter));
        }
        let t0 = std::time::Instant::now();
        let acl = Acl::parse_mosquitto(&text).unwrap();
        let parse = t0.elapsed();

        // The reference: the rules that apply to this client, placeholders filled, in a list.
        let applicable = |user: &str, cid: &str| -> Vec<(u8, String)> {
            rules
                .iter()
                .filter(|(s, _, _)| s.as_deref().is_none_or(|s| s == user))
                .map(|(_, p, f)| (*p, f.replace("%c", cid).replace("%u", user)))
                .collect()
        };
        let allowed = |mine: &[(u8, String)], bit: u8, topic: &str| -> bool {
            let hit = |want: u8| mine.iter().any(|(p, f)| p & want != 0 && matches(f, topic));
            hit(bit) && !hit(DENY)
        };
        let topic_level = |rng: &mut Rng| ["a", "b", "c", "d", "x", "c7", "u3"][rng.below(7) as usize];
        let (mut checks, mut granted) = (0u32, 0u32);
        let (mut check_time, mut compile_time) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for _ in 0..30 {
            let user = format!("u{}", rng.below(60));
            let cid = if rng.below(2) == 0 { "c7".to_string() } else { "c8".into() };
            let t1 = std::time::Instant::now();
            let c = acl.for_client(Some(&user), &cid);
            compile_time += t1.elapsed();
            let mine = applicable(&user, &cid);
            for _ in 0..200 {
                let depth = 1 + rng.below(5);
                let topic: Vec<&str> = (0..depth).map(|_| topic_level(&mut rng)).collect();
                let topic = topic.join("/");
                let t1 = std::time::Instant::now();
                let (r, w) = (c.may_read(&topic), c.may_publish(&topic));
                check_time += t1.elapsed();
                assert_eq!(r, allowed(&mine, READ, &topic), "read {user} {cid} {topic}");
                assert_eq!(w, allowed(&mine, WRITE, &topic), "write {user} {cid} {topic}");
                checks += 2;
                granted += u32::from(r) + u32::from(w);

                // A subscription is allowed only if every topic it matches is readable.
                let mut fl: Vec<&str> = topic.split('/').map(|l| if rng.below(3) == 0 { "+" } else { l }).collect();
                if rng.below(3) == 0 {
                    fl.truncate(1 + rng.below(fl.len() as u64) as usize);
                    fl.push("#");
                }
                let filter = fl.join("/");
                if c.may_subscribe(&filter) {
                    for _ in 0..20 {
                        let d = fl.len() + rng.below(3) as usize;
                        let t: Vec<&str> = (0..d).map(|_| topic_level(&mut rng)).collect();
                        let mut t: Vec<&str> = t;
                        for (i, l) in fl.iter().enumerate() {
                            if *l != "+" && *l != "#" {
                                t[i] = l;
                            }
                        }
                        let t = t.join("/");
                        if matches(&filter, &t) {
                            assert!(allowed(&mine, READ, &t), "{user} {cid}: {filter} allowed, {t} not readable");
                        }
                    }
                }
            }
        }
        assert!(granted > 100 && granted < checks - 100, "the test must exercise both answers: {granted}/{checks}");
        eprintln!("10k random rules: parse {parse:?}; 30 compiles {compile_time:?}; {checks} checks {check_time:?}");
    }

    /// The fleet shape of issue #13: 10,000 users with a rule each, a few patterns. Checks
    /// stay one trie path long whatever the number of users; prints their cost.
    #[test]
    fn auth_acl_ten_thousand_users_fleet_cost() {
        let mut text = String::from("pattern readwrite devices/%c/#\npattern read $SYS/broker/clients/%c\n");
        for i in 0..10_000 {
            text.push_str(&format!(
                "user u{i}\ntopic read fleet/{i}/#\ntopic write fleet/{i}/up\ntopic deny fleet/{i}/secret\n"
            ));
        }
        let t0 = std::time::Instant::now();
        let acl = Acl::parse_mosquitto(&text).unwrap();
        let parse = t0.elapsed();
        let t0 = std::time::Instant::now();
        let c = acl.for_client(Some("u4242"), "dev-4242");
        let compile = t0.elapsed();
        let topics = [
            "devices/dev-4242/temp",
            "devices/dev-1/temp",
            "fleet/4242/up",
            "fleet/4242/secret",
            "fleet/1/up",
            "a/b/c/d/e/f",
        ];
        let want_pub = [true, false, true, false, false, false];
        let want_read = [true, false, true, false, false, false];
        const N: u32 = 100_000;
        let t0 = std::time::Instant::now();
        let mut yes = 0u32;
        for i in 0..N {
            let t = topics[i as usize % topics.len()];
            yes += u32::from(c.may_publish(t)) + u32::from(c.may_read(t));
        }
        let per_check = t0.elapsed() / (2 * N);
        for (i, t) in topics.iter().enumerate() {
            assert_eq!((c.may_publish(t), c.may_read(t)), (want_pub[i], want_read[i]), "{t}");
        }
        assert!(yes > 0 && c.may_subscribe("fleet/4242/+/x") && !c.may_subscribe("fleet/4242/#"));
        assert!(c.may_read("$SYS/broker/clients/dev-4242") && !c.may_subscribe("$SYS/#"));
        let none = Acl::default().for_client(Some("u1"), "c");
        assert!(!none.may_read("fleet/1/x"));
        eprintln!("10k users: parse {parse:?}, compile one client {compile:?}, {per_check:?} per check");
    }
}
