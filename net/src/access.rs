//! The `[auth]` files read into rules every shard applies, and their reload.
//!
//! [`load`] reads the password file, the ACL (file or inline tables) and the JWT key, and builds
//! one [`AccessRules`]. [`SharedAccess`] holds the current rules for every shard: a reload
//! (SIGHUP) that loads without error replaces them under a new generation; each shard picks them
//! up at its next tick (no lock on the packet path: a shard reads its own `Arc`). A reload that
//! fails — a file missing, a line that does not parse — keeps the previous rules and says which
//! file and line: access never opens because of an error (fail closed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_core::auth::{Acl, AclError, AuthConfig, JwtError, JwtVerifier, PasswordFile, PasswordFileError};
use sluice_core::shard::AccessRules;

/// Why the `[auth]` files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Config(#[from] sluice_core::auth::config::AuthConfigError),
    #[error("cannot read auth.{key} {}: {source}", path.display())]
    Read { key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("auth.password_file {}: {source}", path.display())]
    Passwords { path: PathBuf, source: PasswordFileError },
    #[error("auth.{key} {}: {source}", path.display())]
    Acl { key: &'static str, path: PathBuf, source: AclError },
    #[error("auth.jwt {}: {source}", path.display())]
    Jwt { path: PathBuf, source: JwtError },
}

fn read(key: &'static str, path: &Path) -> Result<String, AccessError> {
    std::fs::read_to_string(path).map_err(|source| AccessError::Read { key, path: path.into(), source })
}

/// Reads every file `cfg` names into rules with `generation`.
pub fn load(cfg: &AuthConfig, anonymous_listeners: &[bool], generation: u64) -> Result<AccessRules, AccessError> {
    cfg.validate()?;
    let passwords = match &cfg.password_file {
        Some(p) => Some(
            PasswordFile::parse(&read("password_file", p)?)
                .map_err(|source| AccessError::Passwords { path: p.clone(), source })?,
        ),
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
            Some(parsed.map_err(|source| AccessError::Acl { key: "acl_file", path: p.clone(), source })?)
        }
        None if !cfg.acl.is_empty() => {
            Some(Acl::from_toml_rules(&cfg.acl, "[[auth.acl]]").map_err(|source| AccessError::Acl {
                key: "acl",
                path: PathBuf::from("[[auth.acl]]"),
                source,
            })?)
        }
        None => None,
    };
    let jwt = match &cfg.jwt {
        Some(j) => {
            let path = [&j.secret_file, &j.public_key_file, &j.jwks_file].into_iter().flatten().next().cloned();
            let path = path.unwrap_or_default();
            let key =
                std::fs::read(&path).map_err(|source| AccessError::Read { key: "jwt", path: path.clone(), source })?;
            Some(JwtVerifier::new(j, &key).map_err(|source| AccessError::Jwt { path, source })?)
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

/// The rules every shard applies, replaced whole on reload.
pub struct SharedAccess {
    config: AuthConfig,
    anonymous_listeners: Vec<bool>,
    current: Mutex<Arc<AccessRules>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for SharedAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAccess").field("generation", &self.generation()).finish_non_exhaustive()
    }
}

impl SharedAccess {
    /// Loads the rules `config` names (an error here stops the start). `anonymous_listeners`:
    /// by listener index, whether that listener accepts clients without credentials.
    pub fn new(config: AuthConfig, anonymous_listeners: Vec<bool>) -> Result<SharedAccess, AccessError> {
        let rules = load(&config, &anonymous_listeners, 1)?;
        let current = Mutex::new(Arc::new(rules));
        Ok(SharedAccess { config, anonymous_listeners, current, generation: AtomicU64::new(1) })
    }

    /// Loads the files again. On success every shard switches at its next tick; on failure the
    /// previous rules stay and the error says why.
    pub fn reload(&self) -> Result<u64, AccessError> {
        let next = self.generation.load(Ordering::Acquire) + 1;
        let rules = load(&self.config, &self.anonymous_listeners, next)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        self.generation.store(next, Ordering::Release);
        Ok(next)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<AccessRules> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Entries and lifetime of each shard's cache of successful password checks.
    pub fn cache(&self) -> (usize, u64) {
        (self.config.verified_cache_entries, self.config.verified_cache_ttl_secs * 1000)
    }
}
