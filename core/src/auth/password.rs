//! Password files in Mosquitto's format, their verification, and a cache of verified logins.
//!
//! # Format
//! One `user:HASH` per line; lines whose first non-blank character is `#` and blank lines are
//! ignored. The user name is everything before the first `:`. HASH is one of:
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512 with a 64-byte output, as
//!   `mosquitto_passwd` 2.x writes it (its default, 101 iterations, 12-byte salt);
//! - `$6$<base64 salt>$<base64 hash>`: SHA-512(password ‖ salt), Mosquitto 1.x (`-H sha512`);
//! - a PHC string `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`, what [`hash_argon2id`] writes.
//!
//! Anything else on a line — a plain-text password, `$argon2i$`, a truncated hash — is an error
//! naming the line, and an error rejects the whole file ([`PasswordFileError`]): the caller keeps
//! the file it had (fail closed). A user listed twice is an error too, so which line counts is
//! never a guess.
//!
//! # Invariants
//! - Hash comparison is constant-time (ring's `pbkdf2::verify`, `subtle` for SHA-512, the PHC
//!   output comparison of `password-hash`).
//! - Work per verification is bounded at parse time: PBKDF2 iterations ≤ [`MAX_PBKDF2_ITERATIONS`],
//!   argon2 memory ≤ [`MAX_ARGON2_M_COST_KIB`] KiB, passes ≤ [`MAX_ARGON2_T_COST`], lanes ≤
//!   [`MAX_ARGON2_P_COST`], so a file cannot make one login take minutes.
//! - [`PasswordFile`] is immutable after parsing, `Send + Sync`: share it in an `Arc` and call
//!   [`PasswordFile::verify`] on a blocking thread — argon2id takes milliseconds on purpose and
//!   must not run on a shard's reactor. [`VerifiedCache`] (per shard, bounded) remembers recent
//!   successes so a reconnecting device does not pay that cost every time.
//!
//! Known limit: an unknown user is answered at once, without hashing, so response time tells
//! whether a user exists; the caller answers both with the same reason code and slows repeated
//! failures per address.

use std::collections::VecDeque;
use std::num::NonZeroU32;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;

use crate::HashMap;

/// Most PBKDF2 iterations a `$7$` entry may ask for (`mosquitto_passwd` writes 101).
pub const MAX_PBKDF2_ITERATIONS: u32 = 1_000_000;
/// Most memory an argon2 entry may ask for, in KiB (256 MiB; [`hash_argon2id`] uses 19 MiB).
pub const MAX_ARGON2_M_COST_KIB: u32 = 256 * 1024;
/// Most argon2 passes an entry may ask for.
pub const MAX_ARGON2_T_COST: u32 = 16;
/// Most argon2 lanes an entry may ask for.
pub const MAX_ARGON2_P_COST: u32 = 16;
/// Length of a `$6$`/`$7$` hash: one SHA-512 output.
const SHA512_LEN: usize = 64;
/// Longest salt accepted in a `$6$`/`$7$` entry, in bytes.
const MAX_SALT_LEN: usize = 256;

/// Why a password file was rejected. Line numbers start at 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordFileError {
    #[error("password file line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("password file line {line}: user `{user}` already defined on line {first}")]
    Duplicate { line: usize, user: String, first: usize },
    #[error("invalid user name {0:?}: must be non-empty and contain no `:` or line break")]
    InvalidUser(String),
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// The outcome of one verification.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// The user exists and the password is not theirs.
    BadPassword,
    UnknownUser,
}

/// One parsed entry.
#[derive(Clone, Debug)]
enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 { iterations: NonZeroU32, salt: Box<[u8]>, hash: Box<[u8]> },
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 { salt: Box<[u8]>, hash: Box<[u8]> },
    /// A PHC string, checked at parse time to be argon2id within bounds; parsed again on each
    /// verification (microseconds, against the milliseconds argon2 itself takes).
    Argon2id(Box<str>),
}

/// A parsed password file: user name → hash. Immutable, `Send + Sync`.
#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    users: HashMap<Box<str>, Hash>,
}

impl PasswordFile {
    /// Parses a whole file; the first bad line rejects it.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
        let mut users: HashMap<Box<str>, Hash> = HashMap::default();
        let mut first_line: HashMap<Box<str>, usize> = HashMap::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let err = |problem: String| PasswordFileError::Line { line, problem };
            let Some((user, hash)) = l.split_once(':') else {
                return Err(err("expected `user:hash`, found no `:`".into()));
            };
            if user.is_empty() {
                return Err(err("empty user name".into()));
            }
            let hash = parse_hash(hash).map_err(err)?;
            if let Some(&first) = first_line.get(user) {
                return Err(PasswordFileError::Duplicate { line, user: user.into(), first });
            }
            first_line.insert(user.into(), line);
            users.insert(user.into(), hash);
        }
        Ok(PasswordFile { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether checking this user's password is slow (argon2id): the caller runs such checks off
    /// the reactor. PBKDF2 with Mosquitto's 101 iterations and SHA-512 take microseconds.
    pub fn is_slow(&self, user: &str) -> bool {
        match self.users.get(user) {
            Some(Hash::Argon2id(_)) => true,
            Some(Hash::Pbkdf2Sha512 { iterations, .. }) => iterations.get() > 10_000,
            _ => false,
        }
    }

    /// Checks `password` against the user's entry, comparing hashes in constant time.
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        let Some(hash) = self.users.get(user) else { return Verdict::UnknownUser };
        let ok = match hash {
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                ring::pbkdf2::verify(ring::pbkdf2::PBKDF2_HMAC_SHA512, *iterations, salt, password, hash).is_ok()
            }
            Hash::Sha512 { salt, hash } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                bool::from(ctx.finish().as_ref().ct_eq(hash))
            }
            Hash::Argon2id(phc) => match PasswordHash::new(phc) {
                // Checked at parse time; a failure here still denies.
                Ok(h) => argon2::Argon2::default().verify_password(password, &h).is_ok(),
                Err(_) => false,
            },
        };
        if ok {
            Verdict::Accepted
        } else {
            Verdict::BadPassword
        }
    }
}

fn b64(field: &str, what: &str) -> Result<Vec<u8>, String> {
    STANDARD.decode(field).map_err(|e| format!("{what} is not valid base64: {e}"))
}

fn parse_hash(h: &str) -> Result<Hash, String> {
    if let Some(rest) = h.strip_prefix("$7$") {
        let parts: Vec<&str> = rest.split('$').collect();
        let [iters, salt, hash] = parts[..] else {
            return Err("`$7$` hash must be `$7$<iterations>$<salt>$<hash>`".into());
        };
        let iterations: u32 = iters.parse().map_err(|_| format!("`$7$` iterations {iters:?} is not a number"))?;
        let Some(iterations) = NonZeroU32::new(iterations).filter(|n| n.get() <= MAX_PBKDF2_ITERATIONS) else {
            return Err(format!("`$7$` iterations must be 1..={MAX_PBKDF2_ITERATIONS}, found {iterations}"));
        };
        let (salt, hash) = salt_and_hash(salt, hash)?;
        return Ok(Hash::Pbkdf2Sha512 { iterations, salt, hash });
    }
    if let Some(rest) = h.strip_prefix("$6$") {
        let parts: Vec<&str> = rest.split('$').collect();
        let [salt, hash] = parts[..] else {
            return Err("`$6$` hash must be `$6$<salt>$<hash>`".into());
        };
        let (salt, hash) = salt_and_hash(salt, hash)?;
        return Ok(Hash::Sha512 { salt, hash });
    }
    if h.starts_with("$argon2id$") {
        let parsed = PasswordHash::new(h).map_err(|e| format!("invalid argon2id PHC string: {e}"))?;
        let params = argon2::Params::try_from(&parsed).map_err(|e| format!("invalid argon2id parameters: {e}"))?;
        if params.m_cost() > MAX_ARGON2_M_COST_KIB
            || params.t_cost() > MAX_ARGON2_T_COST
            || params.p_cost() > MAX_ARGON2_P_COST
        {
            return Err(format!(
                "argon2id cost m={} t={} p={} exceeds the bound m<={MAX_ARGON2_M_COST_KIB} t<={MAX_ARGON2_T_COST} p<={MAX_ARGON2_P_COST}",
                params.m_cost(),
                params.t_cost(),
                params.p_cost()
            ));
        }
        if parsed.hash.is_none() || parsed.salt.is_none() {
            return Err("argon2id PHC string has no salt or no hash".into());
        }
        return Ok(Hash::Argon2id(h.into()));
    }
    let kind = if h.starts_with('$') { h.split('$').nth(1).unwrap_or("") } else { "" };
    if kind.is_empty() {
        Err("not a hash (a plain-text password? run `mosquitto_passwd -U` or `sluice passwd`)".into())
    } else {
        Err(format!("unknown hash kind `${kind}$` (accepted: $7$, $6$, $argon2id$)"))
    }
}

/// Decoded salt and hash of a `$6$`/`$7$` entry.
type SaltHash = (Box<[u8]>, Box<[u8]>);

fn salt_and_hash(salt: &str, hash: &str) -> Result<SaltHash, String> {
    let salt = b64(salt, "salt")?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err(format!("salt must be 1..={MAX_SALT_LEN} bytes, found {}", salt.len()));
    }
    let hash = b64(hash, "hash")?;
    if hash.len() != SHA512_LEN {
        return Err(format!("hash must be {SHA512_LEN} bytes (SHA-512), found {}", hash.len()));
    }
    Ok((salt.into(), hash.into()))
}

/// A new argon2id PHC string for `password` (argon2 crate defaults: m=19456 KiB, t=2, p=1 — the
/// OWASP minimum), with a random 16-byte salt from the OS.
pub fn hash_argon2id(password: &[u8]) -> Result<String, PasswordFileError> {
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| PasswordFileError::Hash("the OS random source failed".into()))?;
    hash_argon2id_with_salt(password, &salt)
}

/// [`hash_argon2id`] with a given salt (tests; reproducible output).
pub fn hash_argon2id_with_salt(password: &[u8], salt: &[u8; 16]) -> Result<String, PasswordFileError> {
    let salt = SaltString::encode_b64(salt).map_err(|e| PasswordFileError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordFileError::Hash(e.to_string()))
}

/// The file with `user`'s line set to `user:hash`: the first line for that user is replaced in
/// place, later ones for the same user are dropped, every other line (comments, blanks, other
/// users, their order) is kept as it was; a new user is appended. The result ends with a newline.
pub fn upsert_entry(file_text: &str, user: &str, hash: &str) -> Result<String, PasswordFileError> {
    if user.is_empty() || user.contains([':', '\n', '\r']) || user.trim() != user {
        return Err(PasswordFileError::InvalidUser(user.into()));
    }
    if hash.contains(['\n', '\r']) || parse_hash(hash).is_err() {
        return Err(PasswordFileError::Hash(format!("not an accepted hash: {hash:?}")));
    }
    let mut out = String::with_capacity(file_text.len() + user.len() + hash.len() + 2);
    let mut done = false;
    for raw in file_text.lines() {
        let t = raw.trim();
        let is_user = !t.starts_with('#') && t.split_once(':').is_some_and(|(u, _)| u == user);
        if is_user {
            if done {
                continue;
            }
            done = true;
            out.push_str(user);
            out.push(':');
            out.push_str(hash);
        } else {
            out.push_str(raw);
        }
        out.push('\n');
    }
    if !done {
        out.push_str(user);
        out.push(':');
        out.push_str(hash);
        out.push('\n');
    }
    Ok(out)
}

/// A 32-byte key from the OS random source, for [`VerifiedCache::new`].
pub fn random_cache_key() -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut k).ok()?;
    Some(k)
}

/// Counters of a [`VerifiedCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries pushed out, oldest first, to make room (the behaviour when full).
    pub evictions: u64,
}

/// Recent successful verifications: HMAC-SHA256(key, user ‖ 0 ‖ password) → expiry (`now_ms`
/// of the caller's clock). Bounded: at most `capacity` entries; when full, the entry inserted
/// first goes (oldest out), counted in [`CacheStats::evictions`]. Keyed, so the cache holds no
/// plain digest of a password; a hit means "this exact user and password verified less than
/// `ttl_ms` ago". Clear it whenever the password file is reloaded.
///
/// Invariant: `order` holds exactly the keys of `map`, each once, oldest first.
pub struct VerifiedCache {
    key: ring::hmac::Key,
    capacity: usize,
    ttl_ms: u64,
    map: HashMap<[u8; 32], u64>,
    order: VecDeque<[u8; 32]>,
    stats: CacheStats,
}

impl VerifiedCache {
    /// `key`: secret per process ([`random_cache_key`]); `capacity` ≥ 1 entries.
    pub fn new(key: [u8; 32], capacity: usize, ttl_ms: u64) -> VerifiedCache {
        let capacity = capacity.max(1);
        VerifiedCache {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            capacity,
            ttl_ms,
            map: HashMap::default(),
            order: VecDeque::with_capacity(capacity),
            stats: CacheStats::default(),
        }
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        // The 0 separates user from password: ("ab", "c") and ("a", "bc") differ. User names
        // never contain 0 (MQTT UTF-8 strings exclude U+0000).
        ctx.update(user.as_bytes());
        ctx.update(&[0]);
        ctx.update(password);
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether this user and password verified within the last `ttl_ms`.
    pub fn check(&mut self, user: &str, password: &[u8], now_ms: u64) -> bool {
        let d = self.digest(user, password);
        // An expired entry stays until it is refreshed or pushed out, keeping `order` exact.
        let hit = self.map.get(&d).is_some_and(|&exp| now_ms < exp);
        if hit {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        hit
    }

    /// Records a successful verification (call only after [`Verdict::Accepted`]).
    pub fn insert(&mut self, user: &str, password: &[u8], now_ms: u64) {
        let d = self.digest(user, password);
        let exp = now_ms.saturating_add(self.ttl_ms);
        if let Some(e) = self.map.get_mut(&d) {
            *e = exp;
            return;
        }
        if self.map.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
                self.stats.evictions += 1;
            }
        }
        self.map.insert(d, exp);
        self.order.push_back(d);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd -c -b FILE alice 's3cret pass'` (Mosquitto 2.0), then
    /// `mosquitto_passwd -b FILE bob hunter2`, `mosquitto_passwd -H sha512 -c -b F carol 'pässwörd'`
    /// and `mosquitto_passwd -I 1000 -c -b F dave xyz`.
    const MOSQUITTO_FILE: &str = "\
# made by mosquitto_passwd
alice:$7$101$THB+U8AF19njwmXp$CruZM9nC4FKYpcWYdtxYAxKu7pzsSBvnI4qseWBD8+d2GyUPopm5/iPKHzSQQfNvnYIu2xTkDkuVLfS6/21IYQ==
bob:$7$101$dUDH0dTKhLySJ1yG$vzIqRqLSbqYzQ0hgMSTd/osFqnaAbpAiDyMgo39qjn2fEHIcanDpZe1JoDoLo5gdxcjv/Kc1VWJsOvte9qUyoA==

carol:$6$0ggn3KYrcOWRSu7j$DlDpbFLwDfJDP242Hs05mASP+4+JFS3k4HCeWtREjcag1Sk7/yBg+mSwfeLdEg5lj4V53ZrPQ/oUIF+Eh+7Ong==
dave:$7$1000$JpG91VhC93Mn3f63$9NqcRRZvdjQKnIJgHKPqKDY+xe7ukn8R/xVzPEPCdk+9Oxig34bWhBKsBmV3VR6w9JtsmMgrgmkvZAznKf8dpA==
";

    #[test]
    fn auth_verifies_lines_written_by_mosquitto_passwd() {
        let f = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f.verify("alice", b"s3cret pass"), Verdict::Accepted);
        assert_eq!(f.verify("alice", b"s3cret pasS"), Verdict::BadPassword);
        assert_eq!(f.verify("alice", b""), Verdict::BadPassword);
        assert_eq!(f.verify("bob", b"hunter2"), Verdict::Accepted);
        assert_eq!(f.verify("bob", b"s3cret pass"), Verdict::BadPassword);
        assert_eq!(f.verify("carol", "pässwörd".as_bytes()), Verdict::Accepted);
        assert_eq!(f.verify("carol", b"passwort"), Verdict::BadPassword);
        let t0 = std::time::Instant::now();
        assert_eq!(f.verify("dave", b"xyz"), Verdict::Accepted);
        let t1 = std::time::Instant::now();
        assert_eq!(f.verify("alice", b"s3cret pass"), Verdict::Accepted);
        eprintln!("pbkdf2-sha512 verify: 1000 iterations {:?}, 101 iterations {:?}", t1 - t0, t1.elapsed());
        assert_eq!(f.verify("mallory", b"xyz"), Verdict::UnknownUser);
        assert!(!f.is_slow("alice"));
    }

    #[test]
    fn auth_argon2id_round_trip_and_upsert() {
        let t0 = std::time::Instant::now();
        let h = hash_argon2id(b"correct horse").unwrap();
        let hash_time = t0.elapsed();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let text = upsert_entry(MOSQUITTO_FILE, "erin", &h).unwrap();
        let f = PasswordFile::parse(&text).unwrap();
        assert_eq!(f.len(), 5);
        assert!(f.is_slow("erin"));
        let t0 = std::time::Instant::now();
        assert_eq!(f.verify("erin", b"correct horse"), Verdict::Accepted);
        eprintln!("argon2id: hash {hash_time:?}, verify {:?}", t0.elapsed());
        assert_eq!(f.verify("erin", b"correct horsf"), Verdict::BadPassword);
        // Two salts, two strings.
        assert_ne!(h, hash_argon2id(b"correct horse").unwrap());

        // Replacing bob keeps every other line byte for byte and in order.
        let h2 = hash_argon2id_with_salt(b"new", &[7; 16]).unwrap();
        let text2 = upsert_entry(&text, "bob", &h2).unwrap();
        let before: Vec<&str> = text.lines().collect();
        let after: Vec<&str> = text2.lines().collect();
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            if b.starts_with("bob:") {
                assert_eq!(*a, format!("bob:{h2}"));
            } else {
                assert_eq!(a, b);
            }
        }
        let f2 = PasswordFile::parse(&text2).unwrap();
        assert_eq!(f2.verify("bob", b"new"), Verdict::Accepted);
        assert_eq!(f2.verify("bob", b"hunter2"), Verdict::BadPassword);
        assert_eq!(f2.verify("alice", b"s3cret pass"), Verdict::Accepted);

        // Into an empty file, and one without a final newline.
        assert_eq!(upsert_entry("", "u", &h2).unwrap(), format!("u:{h2}\n"));
        assert_eq!(upsert_entry("# c", "u", &h2).unwrap(), format!("# c\nu:{h2}\n"));
        // A commented-out line for the user is a comment, not the user's line.
        assert_eq!(upsert_entry("#u:old\n", "u", &h2).unwrap(), format!("#u:old\nu:{h2}\n"));
        for bad in ["", "a:b", "a\nb", " a"] {
            assert!(matches!(upsert_entry("", bad, &h2), Err(PasswordFileError::InvalidUser(_))), "{bad:?}");
        }
        assert!(upsert_entry("", "u", "plain").is_err());
    }

    #[test]
    fn auth_password_file_errors_name_the_line() {
        let line_of = |text: &str| match PasswordFile::parse(text) {
            Err(PasswordFileError::Line { line, problem }) => (line, problem),
            other => panic!("{text:?}: {other:?}"),
        };
        let ok = "alice:$6$0ggn3KYrcOWRSu7j$DlDpbFLwDfJDP242Hs05mASP+4+JFS3k4HCeWtREjcag1Sk7/yBg+mSwfeLdEg5lj4V53ZrPQ/oUIF+Eh+7Ong==";
        let cases: &[(&str, &str)] = &[
            ("nocolon", "no `:`"),
            (":$6$x$y", "empty user"),
            ("u:plaintext", "plain-text"),
            ("u:$5$abc$def", "unknown hash kind `$5$`"),
            ("u:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaA", "unknown hash kind `$argon2i$`"),
            ("u:$7$abc$THB+U8AF19njwmXp$CruZ", "iterations"),
            ("u:$7$0$THB+U8AF19njwmXp$CruZ", "iterations must be"),
            ("u:$7$2000000$THB+U8AF19njwmXp$CruZ", "iterations must be"),
            ("u:$7$101$THB+U8AF19njwmXp", "`$7$` hash must be"),
            ("u:$7$101$!!!$CruZ", "salt is not valid base64"),
            ("u:$7$101$THB+U8AF19njwmXp$CruZ", "hash must be 64 bytes"),
            ("u:$6$0ggn3KYrcOWRSu7j$DlDp$x", "`$6$` hash must be"),
            ("u:$argon2id$garbage", "argon2id"),
            ("u:$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", "exceeds the bound"),
        ];
        for (bad, want) in cases {
            let text = format!("# header\n{ok}\n\n{bad}\n");
            let (line, problem) = line_of(&text);
            assert_eq!(line, 4, "{bad}");
            assert!(problem.contains(want), "{bad}: {problem}");
        }
        let dup = format!("{ok}\n#\n{ok}\n");
        assert_eq!(
            PasswordFile::parse(&dup).unwrap_err(),
            PasswordFileError::Duplicate { line: 3, user: "alice".into(), first: 1 }
        );
        assert!(PasswordFile::parse("").unwrap().is_empty());
    }

    #[test]
    fn auth_verified_cache_is_bounded_oldest_out_and_expires() {
        let mut c = VerifiedCache::new([1; 32], 3, 1000);
        assert!(!c.check("a", b"p", 0));
        c.insert("a", b"p", 0);
        assert!(c.check("a", b"p", 999));
        assert!(!c.check("a", b"p", 1000), "expired");
        assert!(!c.check("a", b"q", 10), "another password");
        assert!(!c.check("ap", b"", 10), "the separator keeps user and password apart");
        c.insert("a", b"p", 2000); // refresh, not a second entry
        assert_eq!(c.len(), 1);
        assert!(c.check("a", b"p", 2500));
        c.insert("b", b"p", 2000);
        c.insert("c", b"p", 2000);
        c.insert("d", b"p", 2000);
        assert_eq!(c.len(), 3);
        assert!(!c.check("a", b"p", 2001), "oldest pushed out");
        assert!(c.check("d", b"p", 2001));
        assert_eq!(c.stats().evictions, 1);
        for i in 0..100 {
            c.insert(&format!("u{i}"), b"p", 3000);
            assert!(c.len() <= 3);
        }
        assert_eq!(c.stats().evictions, 101);
        c.clear();
        assert!(c.is_empty());
        // Another key, another cache: digests are keyed.
        let mut other = VerifiedCache::new([2; 32], 3, 1000);
        other.insert("a", b"p", 0);
        assert_ne!(other.digest("a", b"p"), c.digest("a", b"p"));
    }

    #[test]
    fn auth_password_file_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<PasswordFile>();
        check::<std::sync::Arc<PasswordFile>>();
    }
}
