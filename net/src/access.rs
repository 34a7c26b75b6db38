//! The `[auth]` files read into rules every shard applies, and their reload.
//!
//! [`load`] reads the password file, the ACL (file or inline tables) and the JWT key of one
//! auth section, and builds one [`AccessRules`]. [`SharedAccess`] holds the current rules of
//! every section for every shard — the global `[auth]` and each listener's own
//! `[listeners.auth]` — each set loaded, reloaded and failing on its own: a reload (SIGHUP)
//! loads every set again, and each that loads without error replaces its predecessor under a
//! new generation; each shard picks the sets up at its next tick (no lock on the packet path: a
//! shard reads its own `Arc`s). A set that fails to load — a file missing, a line that does not
//! parse — keeps its previous rules and says which key, file and line: access never opens
//! because of an error (fail closed), and the other sets are not disturbed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_core::auth::{Acl, AclError, AuthConfig, JwtError, JwtVerifier, PasswordFile, PasswordFileError};
use sluice_core::shard::{AccessRules, Shard};

/// Why an auth section's files could not be loaded. `section` is `auth` or `listeners[N].auth`.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Config(#[from] sluice_core::auth::config::AuthConfigError),
    #[error("cannot read {section}.{key} {}: {source}", path.display())]
    Read { section: String, key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{section}.password_file {}: {source}", path.display())]
    Passwords { section: String, path: PathBuf, source: PasswordFileError },
    #[error("{section}.{key} {}: {source}", path.display())]
    Acl { section: String, key: &'static str, path: PathBuf, source: AclError },
    #[error("{section}.jwt {}: {source}", path.display())]
    Jwt { section: String, path: PathBuf, source: JwtError },
}

/// Reads every file `cfg` (the section `section`: `auth`, `listeners[1].auth`) names into rules
/// with `generation`.
pub fn load(
    cfg: &AuthConfig,
    section: &str,
    anonymous_listeners: &[bool],
    generation: u64,
) -> Result<AccessRules, AccessError> {
    cfg.validate_as(section)?;
    let read = |key: &'static str, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            section: section.into(),
            key,
            path: path.into(),
            source,
        })
    };
    let passwords = match &cfg.password_file {
        Some(p) => Some(PasswordFile::parse(&read("password_file", p)?).map_err(|source| AccessError::Passwords {
            section: section.into(),
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let acl = match &cfg.acl_file {
        Some(p) => {
            let text = read("acl_file", p)?;
            let parsed = if p.extension().is_some_and(|e| e == "toml") {
                Acl::parse_toml(&text)
            } else {
                Acl::parse_mosquitto(&text)
            };
            Some(parsed.map_err(|source| AccessError::Acl {
                section: section.into(),
                key: "acl_file",
                path: p.clone(),
                source,
            })?)
        }
        None if !cfg.acl.is_empty() => {
            let inline = format!("[[{section}.acl]]");
            Some(Acl::from_toml_rules(&cfg.acl, &inline).map_err(|source| AccessError::Acl {
                section: section.into(),
                key: "acl",
                path: PathBuf::from(&inline),
                source,
            })?)
        }
        None => None,
    };
    let jwt = match &cfg.jwt {
        Some(j) => {
            let path = [&j.secret_file, &j.public_key_file, &j.jwks_file].into_iter().flatten().next().cloned();
            let path = path.unwrap_or_default();
            let key = std::fs::read(&path).map_err(|source| AccessError::Read {
                section: section.into(),
                key: "jwt",
                path: path.clone(),
                source,
            })?;
            Some(JwtVerifier::new(j, &key).map_err(|source| AccessError::Jwt {
                section: section.into(),
                path,
                source,
            })?)
        }
        None => None,
    };
    Ok(AccessRules {
        allow_anonymous: cfg.allow_anonymous,
        anonymous_listeners: anonymous_listeners.to_vec(),
        passwords,
        acl,
        jwt,
        generation,
    })
}

/// One auth section and the rules it loaded last.
struct RuleSource {
    /// `None`: the global `[auth]`; `Some(i)`: listener `i`'s own `[listeners.auth]`.
    listener: Option<u16>,
    /// Its config key: `auth`, `listeners[1].auth`.
    section: String,
    config: AuthConfig,
    current: Mutex<Arc<AccessRules>>,
}

impl RuleSource {
    fn current(&self) -> Arc<AccessRules> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a reload did: the generation now in force, and the sections that kept their previous
/// rules because their files did not load.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    pub failed: Vec<AccessError>,
}

/// The rules every shard applies, each set replaced whole on reload.
pub struct SharedAccess {
    sources: Vec<RuleSource>,
    anonymous_listeners: Vec<bool>,
    generation: AtomicU64,
}

impl std::fmt::Debug for SharedAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAccess").field("generation", &self.generation()).finish_non_exhaustive()
    }
}

impl SharedAccess {
    /// Loads the rules of the global `[auth]` (`global`) and of each listener's own
    /// (`per_listener[i]`, by listener index); an error here stops the start.
    /// `anonymous_listeners`: by listener index, whether that listener accepts clients without
    /// credentials. `None` when no section is configured: every client is accepted.
    pub fn new(
        global: Option<AuthConfig>,
        per_listener: Vec<Option<AuthConfig>>,
        anonymous_listeners: Vec<bool>,
    ) -> Result<Option<SharedAccess>, AccessError> {
        let mut sources = Vec::new();
        let mut generation = 0;
        let own = per_listener.into_iter().enumerate().filter_map(|(i, c)| Some((Some(i as u16), c?)));
        for (listener, config) in global.map(|c| (None, c)).into_iter().chain(own) {
            let section = listener.map_or_else(|| "auth".to_string(), |i| format!("listeners[{i}].auth"));
            generation += 1;
            let rules = load(&config, &section, &anonymous_listeners, generation)?;
            sources.push(RuleSource { listener, section, config, current: Mutex::new(Arc::new(rules)) });
        }
        if sources.is_empty() {
            return Ok(None);
        }
        Ok(Some(SharedAccess { sources, anonymous_listeners, generation: AtomicU64::new(generation) }))
    }

    /// Loads every section's files again. Each that loads replaces its rules (every shard
    /// switches at its next tick); each that fails keeps its previous rules, and is reported.
    pub fn reload(&self) -> Reloaded {
        let mut failed = Vec::new();
        let mut generation = self.generation.load(Ordering::Acquire);
        let mut changed = false;
        for s in &self.sources {
            match load(&s.config, &s.section, &self.anonymous_listeners, generation + 1) {
                Ok(rules) => {
                    generation += 1;
                    changed = true;
                    *s.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
                }
                Err(e) => failed.push(e),
            }
        }
        if changed {
            self.generation.store(generation, Ordering::Release);
        }
        Reloaded { generation, failed }
    }

    /// Grows whenever any section's rules were replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The global `[auth]`'s rules, if configured.
    pub fn current(&self) -> Option<Arc<AccessRules>> {
        self.sources.iter().find(|s| s.listener.is_none()).map(RuleSource::current)
    }

    /// Listener `listener`'s own rules, if it has its own `[listeners.auth]`.
    pub fn current_for(&self, listener: u16) -> Option<Arc<AccessRules>> {
        self.sources.iter().find(|s| s.listener == Some(listener)).map(RuleSource::current)
    }

    /// Hands `shard` the rules in force now, each set with its own cache of successful password
    /// checks (entries and lifetime from its section).
    pub fn install(&self, shard: &mut Shard) {
        for s in &self.sources {
            let (entries, ttl_ms) = (s.config.verified_cache_entries, s.config.verified_cache_ttl_secs * 1000);
            match s.listener {
                None => shard.set_access(s.current(), entries, ttl_ms),
                Some(i) => shard.set_listener_access(i, s.current(), entries, ttl_ms),
            }
        }
    }
}
