//! Authentication and authorization as data: who a client is, and what it may read and write.
//!
//! # Layout
//! - [`password`]: Mosquitto password files (`user:$7$…` PBKDF2-HMAC-SHA512, `user:$6$…` SHA-512,
//!   `user:$argon2id$…` PHC strings), verification in constant time, a bounded cache of
//!   successful verifications, and the edits a `sluice passwd` subcommand needs.
//! - [`acl`]: Mosquitto ACL files (`user`, `topic`, `pattern` with `%c`/`%u`) and the same rules
//!   in TOML, compiled per client at CONNECT into level tries that answer publish, subscribe and
//!   read checks without allocating.
//! - [`jwt`]: JSON Web Tokens given as the MQTT password (HS256, RS256, ES256; PEM key or JWKS),
//!   `exp`/`nbf` against a wall-clock time passed in, the user name from a claim, an optional
//!   EMQX-style ACL claim.
//! - [`config`]: the `[auth]` section of the configuration file.
//!
//! # Invariants
//! - **Fail closed.** Every error — a file that does not parse, an unknown hash kind, a token that
//!   cannot be checked, a placeholder that cannot be filled safely — denies; nothing here turns an
//!   error into access. A parse error rejects the whole file, so the caller keeps its previous
//!   rules (a reload never half-applies).
//! - **Sans-I/O.** Nothing here opens a file or reads a clock: the caller passes file contents
//!   and the current time. The one system call is the OS random source, for new salts.
//! - Slow work is separable: [`password::PasswordFile::verify`] can take milliseconds (argon2id)
//!   by design, so the file is `Send + Sync` and meant to be shared in an `Arc` and verified off
//!   the shard's reactor; [`password::VerifiedCache`] is what the shard consults first.
//!
//! Not wired into the shard or the network layer yet: this module knows nothing of connections.

pub mod acl;
pub mod config;
pub mod jwt;
pub mod password;

pub use acl::{Acl, AclError, ClientAcl};
pub use config::{AuthConfig, JwtConfig};
pub use jwt::{JwtError, JwtIdentity, JwtVerifier};
pub use password::{PasswordFile, PasswordFileError, Verdict, VerifiedCache};
