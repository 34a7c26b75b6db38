//! Who a client is and what it may do: authentication at CONNECT, authorization per packet.
//!
//! The rules ([`AccessRules`]: password file, ACL, JWT verifier) are built by the caller from
//! the `[auth]` configuration and shared by every shard in an `Arc`; a reload (SIGHUP) hands each
//! shard a new `Arc` with a higher generation. Without rules (no `[auth]` section) every client
//! is accepted and may do anything, as before; the network layer then listens on loopback only
//! unless told otherwise. A listener with its own `[listeners.auth]` has its own rules (and its
//! own cache of password checks): they replace the global ones for every connection it
//! accepted — at CONNECT, on each packet and on each delivery. The connection's listener picks
//! its rules with one indexed load, so one global `[auth]` costs what it did before.
//!
//! - **CONNECT**: a user name and password is checked against the password file, or the
//!   password is a JWT, or the client certificate a TLS listener verified names the user
//!   (`use_identity_as_username`). A password hash that is slow by design (argon2id) is not checked on the
//!   shard: the CONNECT waits ([`ConnState::Authenticating`](super::ConnState)) while the caller
//!   checks it off the reactor ([`Effects::verify`](super::Effects::verify)) and reports back
//!   ([`Shard::on_verified`](super::Shard::on_verified)); successful checks are cached per shard
//!   (bounded). Refusals are MQTT 5 0x86 (bad user name or password) / 0x87 (not authorized),
//!   3.1.1 return codes 4 / 5, counted, and — from an address that failed before — sent only after
//!   a back-off that doubles per failure up to [`BACKOFF_MAX_MS`], so a guessing storm costs its
//!   sender time and the shard nothing.
//! - **Per packet**: a connection's ACL is compiled once at CONNECT (placeholders filled in) and
//!   again after a reload, at its next packet. PUBLISH needs write permission (MQTT 5 PUBACK/PUBREC
//!   0x87; 3.1.1 acknowledged and dropped, as Mosquitto does), each SUBSCRIBE filter needs read
//!   permission for everything it can match (0x87 / 0x80), and every delivery to the client —
//!   live, queued, retained, shared or from Kafka — needs read permission at the moment it is
//!   written, so a message the client may not read never reaches it.
//!
//! Invariants: fail closed — an error anywhere refuses; a connection holds its identity in its
//! own [`ConnAuth`], so a reload never changes who a connected client is, only what it may do.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::auth::{Acl, ClientAcl, JwtVerifier, PasswordFile, Verdict, VerifiedCache};
use crate::HashMap;

use super::ConnId;

/// Longest a refusal is delayed after repeated failures from one address.
pub(super) const BACKOFF_MAX_MS: u64 = 5_000;
/// First delay after a failure.
const BACKOFF_FIRST_MS: u64 = 100;
/// Addresses remembered for back-off per shard; when full, the oldest half is forgotten.
const FAILING_ADDRS_MAX: usize = 10_000;
/// Refusals waiting out their back-off per shard; beyond, refusals go at once.
const DELAYED_REFUSALS_MAX: usize = 10_000;
/// Password checks handed off the shard and not answered yet, per shard. Each holds a CONNECT;
/// beyond, CONNECTs that need one are refused at once (0x89, server busy), so a flood of slow
/// hashes cannot queue up unbounded work in front of everyone else's CONNECT.
pub(super) const VERIFYING_MAX: usize = 64;
/// A failure older than this no longer counts.
const FAILURE_MEMORY_MS: u64 = 60_000;

/// The rules every shard applies. Immutable; replaced whole on reload.
#[derive(Default)]
pub struct AccessRules {
    pub allow_anonymous: bool,
    /// By listener index: clients without credentials are accepted on that listener (its
    /// `allow_anonymous`), whatever `allow_anonymous` says for the others.
    pub anonymous_listeners: Vec<bool>,
    pub passwords: Option<PasswordFile>,
    pub acl: Option<Acl>,
    pub jwt: Option<JwtVerifier>,
    /// Grows with every reload: connections recompile their ACL when it changed.
    pub generation: u64,
}

/// A connection's identity and permissions.
pub(super) struct ConnAuth {
    pub(super) user: Option<Box<str>>,
    /// `None`: no ACL configured, everything allowed.
    acl: Option<ClientAcl>,
    /// The ACL came from the JWT: reloads do not replace it.
    acl_from_token: bool,
    generation: u64,
    /// The JWT's `exp`, on the shard's clock: the connection closes then.
    pub(super) expires_at_ms: Option<u64>,
}

impl ConnAuth {
    pub(super) fn may_publish(&self, topic: &str) -> bool {
        self.acl.as_ref().is_none_or(|a| a.may_publish(topic))
    }

    /// Without an ACL everything but `$SYS` may be read: `$SYS/#` (the broker's own figures) only
    /// by users an ACL rule names.
    pub(super) fn may_subscribe(&self, filter: &str) -> bool {
        match &self.acl {
            Some(a) => a.may_subscribe(filter),
            None => !filter.starts_with('$'),
        }
    }

    pub(super) fn may_read(&self, topic: &str) -> bool {
        match &self.acl {
            Some(a) => a.may_read(topic),
            None => !topic.starts_with('$'),
        }
    }

    /// After a reload: the ACL for this client under `rules`, unless the token gave it one.
    pub(super) fn refresh(&mut self, rules: &AccessRules, client_id: &str) {
        if self.generation == rules.generation || self.acl_from_token {
            return;
        }
        self.generation = rules.generation;
        self.acl = rules.acl.as_ref().map(|a| a.for_client(self.user.as_deref(), client_id));
    }
}

/// A password check for the caller to run off the reactor, then report with
/// [`Shard::on_verified`](super::Shard::on_verified).
pub struct VerifyJob {
    pub conn: ConnId,
    pub rules: Arc<AccessRules>,
    pub user: String,
    pub password: Bytes,
}

impl std::fmt::Debug for VerifyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("VerifyJob").field("conn", &self.conn).field("user", &self.user).finish_non_exhaustive()
    }
}

impl VerifyJob {
    /// Runs the check (milliseconds for argon2id): whether the password is the user's.
    pub fn run(&self) -> bool {
        self.rules.passwords.as_ref().is_some_and(|p| p.verify(&self.user, &self.password) == Verdict::Accepted)
    }
}

/// What a CONNECT presents.
pub(super) struct Credentials<'a> {
    /// The listener that accepted the connection.
    pub(super) listener: u16,
    pub(super) client_id: &'a str,
    /// The client certificate's name, from a listener with `use_identity_as_username`.
    pub(super) identity: Option<&'a str>,
    pub(super) user: Option<&'a str>,
    pub(super) password: Option<&'a Bytes>,
}

/// What authentication decided for a CONNECT.
pub(super) enum Decision {
    Granted(Box<ConnAuth>),
    /// Refused with this MQTT 5 reason code (0x86 or 0x87); `why` goes to the log.
    Refused(u8, &'static str),
    /// The password check runs off the shard.
    Verify(VerifyJob),
    /// [`VERIFYING_MAX`] checks are already under way: refused (0x89), nothing queued.
    Busy,
}

/// One set of rules in force on a shard, with its own cache of successful password checks (a
/// check passed against one listener's password file says nothing about another's).
struct RuleSet {
    rules: Arc<AccessRules>,
    cache: Option<VerifiedCache>,
}

impl RuleSet {
    fn new(rules: Arc<AccessRules>, cache_entries: usize, cache_ttl_ms: u64) -> RuleSet {
        let cache = (cache_entries > 0)
            .then(crate::auth::password::random_cache_key)
            .flatten()
            .map(|k| VerifiedCache::new(k, cache_entries, cache_ttl_ms));
        RuleSet { rules, cache }
    }
}

/// A shard's authentication state: the rules (global, and listeners' own), their caches of
/// successful checks, and the back-off of failing addresses.
pub(super) struct Access {
    /// The global `[auth]`: for every listener without its own.
    global: Option<RuleSet>,
    /// By listener index: that listener's own `[listeners.auth]`, replacing `global` for its
    /// connections. Empty when no listener has its own (the common case).
    listeners: Vec<Option<RuleSet>>,
    /// Address → (failures, last failure).
    failing: HashMap<IpAddr, (u32, u64)>,
    /// Refusals waiting out their back-off: (due, connection, reason code).
    pub(super) delayed: Vec<(u64, ConnId, u8)>,
    /// Checks handed off ([`Decision::Verify`]) and not reported back yet.
    verifying: usize,
}

impl Access {
    pub(super) fn new() -> Self {
        Access { global: None, listeners: Vec::new(), failing: HashMap::default(), delayed: Vec::new(), verifying: 0 }
    }

    /// Whether any rules are in force (on any listener).
    pub(super) fn enabled(&self) -> bool {
        self.global.is_some() || !self.listeners.is_empty()
    }

    fn set_for(&mut self, listener: u16) -> Option<&mut RuleSet> {
        set_of(&mut self.global, &mut self.listeners, listener)
    }

    /// The rules for connections accepted by `listener`: its own, else the global ones; `None`:
    /// that listener authenticates no one.
    pub(super) fn rules_for(&self, listener: u16) -> Option<&Arc<AccessRules>> {
        match self.listeners.get(usize::from(listener)) {
            Some(Some(own)) => Some(&own.rules),
            _ => self.global.as_ref().map(|s| &s.rules),
        }
    }

    /// New global rules (at start, or a reload). The cache of checks made under the old ones goes.
    pub(super) fn set_rules(&mut self, rules: Arc<AccessRules>, cache_entries: usize, cache_ttl_ms: u64) {
        self.global = Some(RuleSet::new(rules, cache_entries, cache_ttl_ms));
    }

    /// New rules of `listener`'s own (at start, or a reload), replacing the global ones there.
    pub(super) fn set_listener_rules(
        &mut self,
        listener: u16,
        rules: Arc<AccessRules>,
        cache_entries: usize,
        cache_ttl_ms: u64,
    ) {
        let i = usize::from(listener);
        if self.listeners.len() <= i {
            self.listeners.resize_with(i + 1, || None);
        }
        self.listeners[i] = Some(RuleSet::new(rules, cache_entries, cache_ttl_ms));
    }

    /// Authenticates a CONNECT. `now_unix_ms` is wall time (JWT `exp`/`nbf`); `now_ms` the shard's.
    pub(super) fn decide(&mut self, conn: ConnId, who: Credentials<'_>, now_ms: u64, now_unix_ms: i64) -> Decision {
        let Credentials { listener, client_id, identity, user, password } = who;
        let Some(set) = set_of(&mut self.global, &mut self.listeners, listener) else {
            return Decision::Granted(Box::new(open_auth()));
        };
        let rules = set.rules.clone();
        let grant = |user: Option<&str>, acl: Option<ClientAcl>, acl_from_token, expires_at_ms| {
            let acl = if acl_from_token { acl } else { rules.acl.as_ref().map(|a| a.for_client(user, client_id)) };
            Decision::Granted(Box::new(ConnAuth {
                user: user.map(Into::into),
                acl,
                acl_from_token,
                generation: rules.generation,
                expires_at_ms,
            }))
        };
        // A client certificate verified by a listener with `use_identity_as_username` is the
        // credential: its name is the user name, no password needed (mutual TLS).
        if let Some(id) = identity {
            return grant(Some(id), None, false, None);
        }
        let (Some(user), Some(password)) = (user, password) else {
            let anonymous_here = rules.anonymous_listeners.get(usize::from(listener)).copied().unwrap_or(false);
            if user.is_none() && password.is_none() && (rules.allow_anonymous || anonymous_here) {
                return grant(None, None, false, None);
            }
            return Decision::Refused(reason_for_missing(user.is_some()), "no user name or password");
        };
        if let Some(jwt) = &rules.jwt {
            if let Ok(token) = std::str::from_utf8(password) {
                if token.matches('.').count() == 2 {
                    let now_secs = u64::try_from(now_unix_ms / 1000).unwrap_or(0);
                    return match jwt.verify(token, client_id, now_secs) {
                        Ok(id) => {
                            let expires_at_ms = id.expires_at_unix_secs.map(|exp| {
                                let left_ms = (exp as i64).saturating_mul(1000).saturating_sub(now_unix_ms);
                                now_ms.saturating_add(u64::try_from(left_ms).unwrap_or(0))
                            });
                            let from_token = id.acl.is_some();
                            grant(Some(&id.user), id.acl, from_token, expires_at_ms)
                        }
                        Err(_) => Decision::Refused(crate::packet::reason::BAD_USERNAME_OR_PASSWORD, "token refused"),
                    };
                }
            }
        }
        let Some(passwords) = &rules.passwords else {
            return Decision::Refused(crate::packet::reason::BAD_USERNAME_OR_PASSWORD, "no password file");
        };
        if set.cache.as_mut().is_some_and(|c| c.check(user, password, now_ms)) {
            return grant(Some(user), None, false, None);
        }
        if passwords.is_slow(user) {
            if self.verifying >= VERIFYING_MAX {
                return Decision::Busy;
            }
            self.verifying += 1;
            return Decision::Verify(VerifyJob {
                conn,
                rules: rules.clone(),
                user: user.to_string(),
                password: password.clone(),
            });
        }
        match passwords.verify(user, password) {
            Verdict::Accepted => {
                if let Some(c) = set.cache.as_mut() {
                    c.insert(user, password, now_ms);
                }
                grant(Some(user), None, false, None)
            }
            Verdict::BadPassword => Decision::Refused(crate::packet::reason::BAD_USERNAME_OR_PASSWORD, "bad password"),
            Verdict::UnknownUser => Decision::Refused(crate::packet::reason::BAD_USERNAME_OR_PASSWORD, "unknown user"),
        }
    }

    /// The off-reactor check of `user`'s `password` on `listener` said `ok`: the connection's
    /// grant, or `None` when refused (or the rules went away meanwhile).
    pub(super) fn verified(
        &mut self,
        listener: u16,
        user: &str,
        password: &[u8],
        client_id: &str,
        ok: bool,
        now_ms: u64,
    ) -> Option<Box<ConnAuth>> {
        let set = self.set_for(listener).filter(|_| ok)?;
        let rules = &set.rules;
        let auth = ConnAuth {
            user: Some(user.into()),
            acl: rules.acl.as_ref().map(|a| a.for_client(Some(user), client_id)),
            acl_from_token: false,
            generation: rules.generation,
            expires_at_ms: None,
        };
        if let Some(c) = set.cache.as_mut() {
            c.insert(user, password, now_ms);
        }
        Some(Box::new(auth))
    }

    /// A check handed off came back (whether or not its connection is still there).
    pub(super) fn check_returned(&mut self) {
        self.verifying = self.verifying.saturating_sub(1);
    }

    /// A refusal for bad credentials from `addr`: how long to hold it back (0 = send now).
    pub(super) fn failed(&mut self, addr: Option<IpAddr>, now_ms: u64) -> u64 {
        let Some(addr) = addr else { return 0 };
        if self.failing.len() >= FAILING_ADDRS_MAX && !self.failing.contains_key(&addr) {
            // Forget the addresses that failed longest ago.
            let mut ages: Vec<u64> = self.failing.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.failing.retain(|_, (_, t)| *t > cut);
        }
        let e = self.failing.entry(addr).or_insert((0, now_ms));
        if now_ms.saturating_sub(e.1) > FAILURE_MEMORY_MS {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now_ms;
        if e.0 <= 1 || self.delayed.len() >= DELAYED_REFUSALS_MAX {
            return 0;
        }
        (BACKOFF_FIRST_MS << (e.0 - 2).min(10)).min(BACKOFF_MAX_MS)
    }

    /// Refusals whose back-off ran out.
    pub(super) fn due(&mut self, now_ms: u64) -> Vec<(ConnId, u8)> {
        if self.delayed.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.delayed.retain(|(at, conn, code)| {
            let due = *at <= now_ms;
            if due {
                out.push((*conn, *code));
            }
            !due
        });
        out
    }
}

/// `listener`'s own rules, else the global ones (a function of the two fields, so that a caller
/// may hold the set and touch the other fields of [`Access`]).
fn set_of<'a>(
    global: &'a mut Option<RuleSet>,
    listeners: &'a mut [Option<RuleSet>],
    listener: u16,
) -> Option<&'a mut RuleSet> {
    match listeners.get_mut(usize::from(listener)) {
        Some(Some(own)) => Some(own),
        _ => global.as_mut(),
    }
}

/// The identity of a connection when no rules are configured: nobody, allowed everything.
fn open_auth() -> ConnAuth {
    ConnAuth { user: None, acl: None, acl_from_token: false, generation: 0, expires_at_ms: None }
}

fn reason_for_missing(has_user: bool) -> u8 {
    if has_user {
        crate::packet::reason::BAD_USERNAME_OR_PASSWORD
    } else {
        crate::packet::reason::NOT_AUTHORIZED
    }
}
