//! The `[auth]` section of the configuration: where credentials and rules come from.
//!
//! ```toml
//! [auth]
//! allow_anonymous = false            # default: a client without credentials is refused
//! password_file = "/etc/sluice/passwd"
//! acl_file = "/etc/sluice/acl"       # Mosquitto format; or inline `[[auth.acl]]` tables
//! verified_cache_entries = 10000     # per shard: recent successful password checks
//! verified_cache_ttl_secs = 300
//!
//! [auth.jwt]
//! algorithm = "RS256"                # HS256 | RS256 | ES256
//! public_key_file = "/etc/sluice/jwt.pem"   # or `jwks_file`; HS256: `secret_file`
//! user_claim = "sub"
//! client_id_claim = "sub"            # optional: this claim must equal the client id
//! leeway_secs = 30
//! acl_claim = "acl"                  # optional: EMQX-style {"pub": [...], "sub": [...], "all": [...]}
//! require_exp = true
//! ```
//!
//! Only types and validation live here: the files are read by the binary (core does no I/O),
//! which hands their contents to [`crate::auth::password::PasswordFile::parse`],
//! [`crate::auth::acl::Acl::parse_mosquitto`] and [`crate::auth::jwt::JwtVerifier::new`].
//! Fail closed: a configuration that names no way to authenticate and does not say
//! `allow_anonymous = true` lets no one in.

use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::acl::AclRuleToml;
use crate::auth::jwt::JwtAlgorithm;

/// Longest accepted `jwt.leeway_secs`: clocks that disagree by more are a problem to fix, not
/// to paper over with tokens that live longer than they say.
pub const MAX_JWT_LEEWAY_SECS: u64 = 300;
/// Most entries `verified_cache_entries` may ask for, per shard.
pub const MAX_VERIFIED_CACHE_ENTRIES: usize = 1_000_000;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Clients that present no user name (and no certificate identity) are accepted.
    pub allow_anonymous: bool,
    /// Mosquitto password file (`user:$7$…`, `$6$`, `$argon2id$`).
    pub password_file: Option<PathBuf>,
    /// Mosquitto ACL file. Exclusive with inline `acl` tables.
    pub acl_file: Option<PathBuf>,
    /// Inline `[[auth.acl]]` tables (see [`crate::auth::acl`]).
    pub acl: Vec<AclRuleToml>,
    pub jwt: Option<JwtConfig>,
    /// Bound of each shard's [`crate::auth::password::VerifiedCache`]; 0 disables the cache.
    pub verified_cache_entries: usize,
    pub verified_cache_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            password_file: None,
            acl_file: None,
            acl: Vec::new(),
            jwt: None,
            verified_cache_entries: 10_000,
            verified_cache_ttl_secs: 300,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret (the file's bytes, one trailing line break removed).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// RS256/ES256: a PEM public key (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// RS256/ES256: a JWKS document; the token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The claim that holds the user name.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// When set, this claim must equal the client id of the CONNECT.
    #[serde(default)]
    pub client_id_claim: Option<String>,
    /// Seconds of clock difference allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// When set, the claim with the client's allowed filters (EMQX style).
    #[serde(default)]
    pub acl_claim: Option<String>,
    /// A token without `exp` is refused (it would never expire).
    #[serde(default = "yes")]
    pub require_exp: bool,
}

fn default_user_claim() -> String {
    "sub".into()
}

fn default_leeway() -> u64 {
    30
}

fn yes() -> bool {
    true
}

/// A configuration error naming the key at fault, whole: `auth.jwt.secret_file`, or
/// `listeners[1].auth.acl` for a listener's own `[listeners.auth]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("config key `{key}`: {problem}")]
pub struct AuthConfigError {
    pub key: String,
    pub problem: String,
}

impl AuthConfig {
    /// Whether any way to authenticate is configured (a password file or JWT).
    pub fn authenticates(&self) -> bool {
        self.password_file.is_some() || self.jwt.is_some()
    }

    /// Whether every client must authenticate: a way to authenticate, and no anonymous access.
    pub fn authenticates_every_client(&self) -> bool {
        self.authenticates() && !self.allow_anonymous
    }

    /// Checks what the types alone cannot, for the global `[auth]`.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        self.validate_as("auth")
    }

    /// Checks what the types alone cannot; errors name keys under `section` (`auth`, or
    /// `listeners[2].auth` for a listener's own settings).
    pub fn validate_as(&self, section: &str) -> Result<(), AuthConfigError> {
        let err = |key: &str, problem: &str| {
            Err(AuthConfigError { key: format!("{section}.{key}"), problem: problem.into() })
        };
        if self.acl_file.is_some() && !self.acl.is_empty() {
            return err("acl", "give `acl_file` or inline `acl` tables, not both");
        }
        if self.verified_cache_entries > MAX_VERIFIED_CACHE_ENTRIES {
            return err("verified_cache_entries", &format!("at most {MAX_VERIFIED_CACHE_ENTRIES}"));
        }
        if let Some(j) = &self.jwt {
            let sources = [&j.secret_file, &j.public_key_file, &j.jwks_file].iter().filter(|s| s.is_some()).count();
            if sources != 1 {
                return err("jwt", "give exactly one of `secret_file`, `public_key_file`, `jwks_file`");
            }
            match j.algorithm {
                JwtAlgorithm::HS256 if j.secret_file.is_none() => {
                    return err("jwt.secret_file", "HS256 needs `secret_file`");
                }
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 if j.secret_file.is_some() => {
                    return err("jwt.secret_file", "RS256/ES256 verify with `public_key_file` or `jwks_file`");
                }
                _ => {}
            }
            if j.leeway_secs > MAX_JWT_LEEWAY_SECS {
                return err("jwt.leeway_secs", &format!("at most {MAX_JWT_LEEWAY_SECS}"));
            }
            if j.user_claim.is_empty() {
                return err("jwt.user_claim", "must name a claim");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        auth: AuthConfig,
    }

    fn parse(text: &str) -> Result<AuthConfig, String> {
        let d: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        d.auth.validate().map_err(|e| e.to_string())?;
        Ok(d.auth)
    }

    #[test]
    fn auth_config_defaults_fail_closed() {
        let c = parse("[auth]\n").unwrap();
        assert!(!c.allow_anonymous && !c.authenticates());
        assert_eq!(c, AuthConfig::default());
    }

    #[test]
    fn auth_config_full_and_inline_acl() {
        let text = r#"
[auth]
password_file = "/etc/sluice/passwd"

[[auth.acl]]
pattern = true
allow_publish = ["devices/%c/#"]

[auth.jwt]
algorithm = "RS256"
jwks_file = "/etc/sluice/jwks.json"
client_id_claim = "sub"
acl_claim = "acl"
"#;
        let c = parse(text).unwrap();
        let j = c.jwt.as_ref().unwrap();
        assert_eq!(
            (j.algorithm, j.user_claim.as_str(), j.leeway_secs, j.require_exp),
            (JwtAlgorithm::RS256, "sub", 30, true)
        );
        assert!(c.authenticates());
        // The inline tables compile with line numbers from the whole document.
        let acl = crate::auth::acl::Acl::from_toml_rules(&c.acl, text).unwrap();
        assert!(acl.for_client(None, "d1").may_publish("devices/d1/x"));
        let bad = text.replace("devices/%c/#", "devices/#/x");
        let c = parse(&bad).unwrap();
        assert!(matches!(
            crate::auth::acl::Acl::from_toml_rules(&c.acl, &bad),
            Err(crate::auth::acl::AclError::Line { line: 7, .. })
        ));
    }

    #[test]
    fn auth_config_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[auth]\nallow_anonymos = true\n", "unknown field `allow_anonymos`"),
            ("[auth]\nacl_file = \"a\"\n[[auth.acl]]\nanonymous = true\n", "auth.acl"),
            ("[auth.jwt]\nalgorithm = \"HS256\"\n", "auth.jwt`: give exactly one"),
            ("[auth.jwt]\nalgorithm = \"HS256\"\npublic_key_file = \"k\"\n", "auth.jwt.secret_file"),
            ("[auth.jwt]\nalgorithm = \"ES256\"\nsecret_file = \"k\"\n", "auth.jwt.secret_file"),
            ("[auth.jwt]\nalgorithm = \"RS256\"\njwks_file = \"k\"\nsecret_file = \"s\"\n", "exactly one"),
            ("[auth.jwt]\nalgorithm = \"RS256\"\njwks_file = \"k\"\nleeway_secs = 3600\n", "auth.jwt.leeway_secs"),
            ("[auth.jwt]\nalgorithm = \"none\"\njwks_file = \"k\"\n", "unknown variant `none`"),
            ("[auth.jwt]\nalgorithm = \"RS256\"\njwks_file = \"k\"\nuser = \"x\"\n", "unknown field `user`"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
