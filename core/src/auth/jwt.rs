//! JSON Web Tokens as MQTT passwords: signature, validity window, identity, optional ACL.
//!
//! # Accepted
//! - `HS256` with a shared secret (at least [`MIN_HS256_SECRET_LEN`] bytes: a short secret can
//!   be guessed offline from any token); `RS256` and `ES256` with a PEM public key, or a JWKS
//!   document whose keys are picked by the token's `kid` (a token without `kid` is accepted
//!   only when the set holds exactly one usable key).
//! - The header's `alg` must be the configured algorithm: no `none`, no HS256 token checked
//!   with an RSA public key as its secret.
//! - `exp` (required unless `require_exp = false`) and `nbf`, as NumericDate seconds, against
//!   `now_unix_secs` passed in with `leeway_secs` either way. Wall-clock time: the shard's
//!   monotonic `now_ms` is not a Unix time.
//! - The user name from `user_claim` (default `sub`); with `client_id_claim`, that claim must
//!   equal the CONNECT's client id.
//! - With `acl_claim`, EMQX's form `{"pub": [filters], "sub": [filters], "all": [filters]}`
//!   becomes the client's [`ClientAcl`] (`all` = both). Unknown keys or non-filters reject the
//!   token; an absent claim gives `acl: None` (the caller falls back to the ACL file).
//!
//! # Invariants
//! - Fail closed: every failure is a [`JwtError`]; nothing is granted from a token whose
//!   signature, window or claims did not all check.
//! - Signatures are checked by ring (through `jsonwebtoken` 9), the provider rustls uses here.
//!   [`JwtVerifier`] is `Send + Sync`: an RS256/ES256 check costs tens of microseconds and may
//!   run off the reactor like password hashes.
//! - No clock and no file: keys come in as bytes, time as a parameter.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::acl::ClientAcl;
use crate::auth::config::JwtConfig;

/// Shortest HS256 secret accepted, in bytes.
pub const MIN_HS256_SECRET_LEN: usize = 16;
/// Longest token accepted, in bytes (MQTT passwords may be 64 KiB; a token is a few hundred).
pub const MAX_TOKEN_LEN: usize = 8192;

#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

impl JwtAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
        }
    }
}

/// Why a token (or the key material) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    #[error("token expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired { exp: u64, now: u64, leeway: u64 },
    #[error("token not valid before {nbf} (now {now}, leeway {leeway}s)")]
    NotYetValid { nbf: u64, now: u64, leeway: u64 },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm {found} is not the configured {expected:?}")]
    WrongAlgorithm { expected: JwtAlgorithm, found: String },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("no key for kid {0:?}")]
    UnknownKid(Option<String>),
    #[error("token has no claim `{0}` (or it is not a non-empty string/number)")]
    MissingClaim(String),
    #[error("token claim `{claim}` is not the client id")]
    ClientIdMismatch { claim: String },
    #[error("token ACL claim `{claim}`: {problem}")]
    InvalidAclClaim { claim: String, problem: String },
    /// The configured key material (not a token).
    #[error("JWT key: {0}")]
    Key(String),
}

/// Who a verified token says the client is.
#[derive(Clone, Debug)]
pub struct JwtIdentity {
    pub user: String,
    /// `exp`, when the token has one: the caller disconnects the client then.
    pub expires_at_unix_secs: Option<u64>,
    pub acl: Option<ClientAcl>,
}

enum Keys {
    One(DecodingKey),
    /// (kid, key); keys of other types or algorithms in the set are left out at load.
    Set(Vec<(Option<String>, DecodingKey)>),
}

/// Verifies tokens with one configuration and key material. Immutable, `Send + Sync`.
pub struct JwtVerifier {
    alg: JwtAlgorithm,
    keys: Keys,
    validation: Validation,
    user_claim: String,
    client_id_claim: Option<String>,
    leeway_secs: u64,
    acl_claim: Option<String>,
    require_exp: bool,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::One(_) => "one key".to_string(),
            Keys::Set(s) => format!("{} JWKS keys", s.len()),
        };
        f.debug_struct("JwtVerifier").field("alg", &self.alg).field("keys", &keys).finish_non_exhaustive()
    }
}

fn key_err(e: impl std::fmt::Display) -> JwtError {
    JwtError::Key(e.to_string())
}

impl JwtVerifier {
    /// `key_material`: the contents of the file the config names (`secret_file`,
    /// `public_key_file` or `jwks_file`).
    pub fn new(cfg: &JwtConfig, key_material: &[u8]) -> Result<JwtVerifier, JwtError> {
        let keys = match (cfg.algorithm, &cfg.jwks_file) {
            (JwtAlgorithm::HS256, _) => {
                let s = key_material;
                let s = s.strip_suffix(b"\n").map(|s| s.strip_suffix(b"\r").unwrap_or(s)).unwrap_or(s);
                if s.len() < MIN_HS256_SECRET_LEN {
                    return Err(JwtError::Key(format!(
                        "HS256 secret is {} bytes, needs at least {MIN_HS256_SECRET_LEN}",
                        s.len()
                    )));
                }
                Keys::One(DecodingKey::from_secret(s))
            }
            (alg, Some(_)) => Keys::Set(jwks_keys(alg, key_material)?),
            (JwtAlgorithm::RS256, None) => Keys::One(DecodingKey::from_rsa_pem(key_material).map_err(key_err)?),
            (JwtAlgorithm::ES256, None) => Keys::One(DecodingKey::from_ec_pem(key_material).map_err(key_err)?),
        };
        let mut validation = Validation::new(cfg.algorithm.jwt());
        // The window is checked below against the time passed in; jsonwebtoken would read the
        // system clock. `aud`/`iss` are not part of this configuration.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Ok(JwtVerifier {
            alg: cfg.algorithm,
            keys,
            validation,
            user_claim: cfg.user_claim.clone(),
            client_id_claim: cfg.client_id_claim.clone(),
            leeway_secs: cfg.leeway_secs,
            acl_claim: cfg.acl_claim.clone(),
            require_exp: cfg.require_exp,
        })
    }

    /// Verifies `token` (the MQTT password) for a CONNECT with `client_id`, at `now_unix_secs`.
    pub fn verify(&self, token: &str, client_id: &str, now_unix_secs: u64) -> Result<JwtIdentity, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if header.alg != self.alg.jwt() {
            return Err(JwtError::WrongAlgorithm { expected: self.alg, found: format!("{:?}", header.alg) });
        }
        let key = match &self.keys {
            Keys::One(k) => k,
            Keys::Set(set) => match &header.kid {
                Some(kid) => match set.iter().find(|(k, _)| k.as_deref() == Some(kid.as_str())) {
                    Some((_, key)) => key,
                    None => return Err(JwtError::UnknownKid(Some(kid.clone()))),
                },
                None if set.len() == 1 => &set[0].1,
                None => return Err(JwtError::UnknownKid(None)),
            },
        };
        let data = jsonwebtoken::decode::<Value>(token, key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::Crypto(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_) => JwtError::BadSignature,
            ErrorKind::InvalidAlgorithm => JwtError::WrongAlgorithm { expected: self.alg, found: "?".into() },
            _ => JwtError::Malformed(e.to_string()),
        })?;
        let Value::Object(claims) = data.claims else {
            return Err(JwtError::Malformed("claims are not a JSON object".into()));
        };
        let leeway = self.leeway_secs;
        let now = now_unix_secs;
        let exp = numeric_date(&claims, "exp")?;
        match exp {
            Some(exp) if now >= exp.saturating_add(leeway) => return Err(JwtError::Expired { exp, now, leeway }),
            None if self.require_exp => return Err(JwtError::MissingClaim("exp".into())),
            _ => {}
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")? {
            if now.saturating_add(leeway) < nbf {
                return Err(JwtError::NotYetValid { nbf, now, leeway });
            }
        }
        let user =
            string_claim(&claims, &self.user_claim).ok_or_else(|| JwtError::MissingClaim(self.user_claim.clone()))?;
        if let Some(c) = &self.client_id_claim {
            let v = string_claim(&claims, c).ok_or_else(|| JwtError::MissingClaim(c.clone()))?;
            if v != client_id {
                return Err(JwtError::ClientIdMismatch { claim: c.clone() });
            }
        }
        let acl = match &self.acl_claim {
            None => None,
            Some(name) => match claims.get(name) {
                None => None,
                Some(v) => Some(
                    acl_from_claim(v).map_err(|problem| JwtError::InvalidAclClaim { claim: name.clone(), problem })?,
                ),
            },
        };
        Ok(JwtIdentity { user, expires_at_unix_secs: exp, acl })
    }
}

/// A NumericDate claim: seconds, possibly fractional (RFC 7519 §2), floored.
fn numeric_date(claims: &serde_json::Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(JwtError::Malformed(format!("`{name}` is not a non-negative NumericDate"))),
        },
        Some(_) => Err(JwtError::Malformed(format!("`{name}` is not a number"))),
    }
}

/// A claim as an identity: a non-empty string, or an integer written as a string.
fn string_claim(claims: &serde_json::Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

fn acl_from_claim(v: &Value) -> Result<ClientAcl, String> {
    let Value::Object(m) = v else { return Err("must be an object with `pub`, `sub`, `all` lists".into()) };
    let mut lists: [Vec<&str>; 3] = Default::default();
    for (k, v) in m {
        let slot = match k.as_str() {
            "pub" => 0,
            "sub" => 1,
            "all" => 2,
            other => return Err(format!("unknown key `{other}` (expected pub, sub, all)")),
        };
        let Value::Array(items) = v else { return Err(format!("`{k}` must be a list of filters")) };
        for i in items {
            let Value::String(s) = i else { return Err(format!("`{k}` must be a list of filters")) };
            lists[slot].push(s);
        }
    }
    let [publish, subscribe, all] = lists;
    let write = publish.iter().chain(&all).copied();
    let read = subscribe.iter().chain(&all).copied();
    ClientAcl::from_filters(read, write, []).map_err(|e| e.to_string())
}

/// The keys of a JWKS document usable for `alg`.
fn jwks_keys(alg: JwtAlgorithm, json: &[u8]) -> Result<Vec<(Option<String>, DecodingKey)>, JwtError> {
    let set: JwkSet = serde_json::from_slice(json).map_err(|e| JwtError::Key(format!("JWKS is not valid: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let fits = match (&jwk.algorithm, alg) {
            (AlgorithmParameters::RSA(_), JwtAlgorithm::RS256) => true,
            (AlgorithmParameters::EllipticCurve(ec), JwtAlgorithm::ES256) => ec.curve == EllipticCurve::P256,
            _ => false,
        };
        let alg_ok = jwk.common.key_algorithm.is_none_or(|a| {
            matches!((a, alg), (KeyAlgorithm::RS256, JwtAlgorithm::RS256) | (KeyAlgorithm::ES256, JwtAlgorithm::ES256))
        });
        let use_ok = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
        if fits && alg_ok && use_ok {
            keys.push((jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk).map_err(key_err)?));
        }
    }
    if keys.is_empty() {
        return Err(JwtError::Key(format!("JWKS has no {alg:?} signing key")));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const RSA_PRIVATE: &[u8] = include_bytes!("testdata/rsa_private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("testdata/rsa_public.pem");
    const RSA2_PRIVATE: &[u8] = include_bytes!("testdata/rsa2_private.pem");
    const RSA2_PUBLIC: &[u8] = include_bytes!("testdata/rsa2_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("testdata/ec_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("testdata/ec_public.pem");
    const JWKS: &[u8] = include_bytes!("testdata/jwks.json");
    const PYJWT: &str = include_str!("testdata/pyjwt_tokens.txt");
    const SECRET: &[u8] = b"a shared secret of 32 bytes ....";
    const NOW: u64 = 1_750_000_000;

    fn cfg(alg: JwtAlgorithm, jwks: bool) -> JwtConfig {
        JwtConfig {
            algorithm: alg,
            secret_file: None,
            public_key_file: None,
            jwks_file: jwks.then(|| "jwks.json".into()),
            user_claim: "sub".into(),
            client_id_claim: None,
            leeway_secs: 30,
            acl_claim: Some("acl".into()),
            require_exp: true,
        }
    }

    fn hs(claims: &Value) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn rs(claims: &Value, key: &[u8], kid: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(Into::into);
        encode(&h, claims, &EncodingKey::from_rsa_pem(key).unwrap()).unwrap()
    }

    fn pyjwt(name: &str) -> &'static str {
        PYJWT.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')).unwrap()
    }

    #[test]
    fn auth_jwt_hs256_window_and_identity() {
        let v = JwtVerifier::new(&cfg(JwtAlgorithm::HS256, false), &[SECRET, b"\n"].concat()).unwrap();
        let t = hs(&json!({"sub": "dev-1", "exp": NOW + 60, "nbf": NOW - 10}));
        let id = v.verify(&t, "whatever", NOW).unwrap();
        assert_eq!((id.user.as_str(), id.expires_at_unix_secs), ("dev-1", Some(NOW + 60)));
        assert!(id.acl.is_none());

        // exp with 30 s of leeway: valid until exp + 30, not at it.
        let t = hs(&json!({"sub": "d", "exp": NOW}));
        assert!(v.verify(&t, "c", NOW + 29).is_ok());
        assert_eq!(v.verify(&t, "c", NOW + 30).unwrap_err(), JwtError::Expired { exp: NOW, now: NOW + 30, leeway: 30 });
        let t = hs(&json!({"sub": "d", "exp": NOW + 999, "nbf": NOW + 31}));
        assert_eq!(v.verify(&t, "c", NOW).unwrap_err(), JwtError::NotYetValid { nbf: NOW + 31, now: NOW, leeway: 30 });
        assert!(v.verify(&t, "c", NOW + 1).is_ok());
        // Fractional NumericDate.
        assert!(v.verify(&hs(&json!({"sub": "d", "exp": (NOW + 5) as f64 + 0.5})), "c", NOW).is_ok());

        assert_eq!(v.verify(&hs(&json!({"sub": "d"})), "c", NOW).unwrap_err(), JwtError::MissingClaim("exp".into()));
        assert_eq!(
            v.verify(&hs(&json!({"exp": NOW + 9})), "c", NOW).unwrap_err(),
            JwtError::MissingClaim("sub".into())
        );
        assert_eq!(
            v.verify(&hs(&json!({"sub": "", "exp": NOW + 9})), "c", NOW).unwrap_err(),
            JwtError::MissingClaim("sub".into())
        );
        assert!(matches!(v.verify(&hs(&json!({"sub": "d", "exp": "soon"})), "c", NOW), Err(JwtError::Malformed(_))));

        // Another secret signed it.
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "d", "exp": NOW + 9}),
            &EncodingKey::from_secret(b"another secret of enough bytes"),
        );
        assert_eq!(v.verify(&other.unwrap(), "c", NOW).unwrap_err(), JwtError::BadSignature);
        // The payload changed after signing.
        let t = hs(&json!({"sub": "dev-1", "exp": NOW + 60}));
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "admin", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        parts[1] = forged.split('.').nth(1).unwrap();
        assert_eq!(v.verify(&parts.join("."), "c", NOW).unwrap_err(), JwtError::BadSignature);

        for garbage in ["", "abc", "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(matches!(v.verify(garbage, "c", NOW), Err(JwtError::Malformed(_))), "{garbage:?}");
        }
        assert!(JwtVerifier::new(&cfg(JwtAlgorithm::HS256, false), b"short\n").is_err());
    }

    #[test]
    fn auth_jwt_client_id_claim_and_acl_claim() {
        let mut c = cfg(JwtAlgorithm::HS256, false);
        c.client_id_claim = Some("cid".into());
        c.user_claim = "user".into();
        let v = JwtVerifier::new(&c, SECRET).unwrap();
        let t = hs(&json!({"user": "u", "cid": "dev-9", "exp": NOW + 60,
            "acl": {"pub": ["devices/dev-9/up/#"], "sub": ["devices/dev-9/cmd/+"], "all": ["shared/dev-9"]}}));
        let id = v.verify(&t, "dev-9", NOW).unwrap();
        assert_eq!(id.user, "u");
        let acl = id.acl.unwrap();
        assert!(acl.may_publish("devices/dev-9/up/t") && !acl.may_read("devices/dev-9/up/t"));
        assert!(acl.may_subscribe("devices/dev-9/cmd/+") && !acl.may_publish("devices/dev-9/cmd/x"));
        assert!(acl.may_publish("shared/dev-9") && acl.may_read("shared/dev-9"));
        assert!(!acl.may_subscribe("devices/#"));
        assert_eq!(v.verify(&t, "dev-8", NOW).unwrap_err(), JwtError::ClientIdMismatch { claim: "cid".into() });
        let no_cid = hs(&json!({"user": "u", "exp": NOW + 60}));
        assert_eq!(v.verify(&no_cid, "dev-9", NOW).unwrap_err(), JwtError::MissingClaim("cid".into()));
        for bad in [
            json!(["a"]),
            json!({"pub": "a/#"}),
            json!({"pub": [1]}),
            json!({"publish": ["a"]}),
            json!({"sub": ["a/#/b"]}),
        ] {
            let t = hs(&json!({"user": "u", "cid": "d", "exp": NOW + 60, "acl": bad}));
            assert!(matches!(v.verify(&t, "d", NOW), Err(JwtError::InvalidAclClaim { .. })), "{bad}");
        }
    }

    #[test]
    fn auth_jwt_rs256_es256_pem_and_jwks() {
        let claims = json!({"sub": "dev-1", "exp": NOW + 60});
        let v = JwtVerifier::new(&cfg(JwtAlgorithm::RS256, false), RSA_PUBLIC).unwrap();
        assert_eq!(v.verify(&rs(&claims, RSA_PRIVATE, None), "c", NOW).unwrap().user, "dev-1");
        assert_eq!(v.verify(&rs(&claims, RSA2_PRIVATE, None), "c", NOW).unwrap_err(), JwtError::BadSignature);
        // Algorithm confusion: an HS256 token whose "secret" is the RSA public key.
        let confused = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(RSA_PUBLIC)).unwrap();
        assert!(matches!(v.verify(&confused, "c", NOW), Err(JwtError::WrongAlgorithm { .. })));

        let v = JwtVerifier::new(&cfg(JwtAlgorithm::ES256, false), EC_PUBLIC).unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("ec-1".into());
        let es = encode(&h, &claims, &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap()).unwrap();
        assert_eq!(v.verify(&es, "c", NOW).unwrap().user, "dev-1");
        assert!(matches!(v.verify(&rs(&claims, RSA_PRIVATE, None), "c", NOW), Err(JwtError::WrongAlgorithm { .. })));
        assert!(JwtVerifier::new(&cfg(JwtAlgorithm::ES256, false), RSA_PUBLIC).is_err());
        assert!(JwtVerifier::new(&cfg(JwtAlgorithm::RS256, false), b"not a pem").is_err());

        // JWKS: the kid picks the key; two RSA keys, so a token without kid is refused.
        let v = JwtVerifier::new(&cfg(JwtAlgorithm::RS256, true), JWKS).unwrap();
        assert!(v.verify(&rs(&claims, RSA_PRIVATE, Some("rsa-1")), "c", NOW).is_ok());
        assert!(v.verify(&rs(&claims, RSA2_PRIVATE, Some("rsa-2")), "c", NOW).is_ok());
        assert_eq!(v.verify(&rs(&claims, RSA2_PRIVATE, Some("rsa-1")), "c", NOW).unwrap_err(), JwtError::BadSignature);
        assert_eq!(
            v.verify(&rs(&claims, RSA_PRIVATE, Some("rsa-9")), "c", NOW).unwrap_err(),
            JwtError::UnknownKid(Some("rsa-9".into()))
        );
        assert_eq!(v.verify(&rs(&claims, RSA_PRIVATE, None), "c", NOW).unwrap_err(), JwtError::UnknownKid(None));
        // The EC key of the set is not an RS256 key.
        assert_eq!(
            v.verify(&rs(&claims, RSA_PRIVATE, Some("ec-1")), "c", NOW).unwrap_err(),
            JwtError::UnknownKid(Some("ec-1".into()))
        );
        // ES256 from the same set: one EC key, so no kid is needed.
        let v = JwtVerifier::new(&cfg(JwtAlgorithm::ES256, true), JWKS).unwrap();
        let es_nokid =
            encode(&Header::new(Algorithm::ES256), &claims, &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap()).unwrap();
        assert!(v.verify(&es_nokid, "c", NOW).is_ok() && v.verify(&es, "c", NOW).is_ok());
        assert!(JwtVerifier::new(&cfg(JwtAlgorithm::RS256, true), b"{\"keys\": []}").is_err());
        assert!(JwtVerifier::new(&cfg(JwtAlgorithm::RS256, true), b"{").is_err());
        let _ = RSA2_PUBLIC;
    }

    /// Tokens made by PyJWT 2.15.1 (see the fixture's header), verified here.
    #[test]
    fn auth_jwt_accepts_pyjwt_tokens() {
        let check = |v: &JwtVerifier, name: &str| {
            let id = v.verify(pyjwt(name), "device-7", NOW).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((id.user.as_str(), id.expires_at_unix_secs), ("device-7", Some(4_102_444_800)), "{name}");
            let acl = id.acl.unwrap();
            assert!(acl.may_publish("devices/device-7/up") && !acl.may_publish("devices/device-8/up"), "{name}");
            assert!(acl.may_subscribe("devices/device-7/x/cmd") && !acl.may_subscribe("devices/device-7/#"), "{name}");
            // nbf is 1_700_000_000: before it (beyond leeway), refused.
            assert!(matches!(v.verify(pyjwt(name), "device-7", 1_600_000_000), Err(JwtError::NotYetValid { .. })));
            assert!(matches!(v.verify(pyjwt(name), "device-7", 4_102_444_800 + 30), Err(JwtError::Expired { .. })));
        };
        let mut c = cfg(JwtAlgorithm::HS256, false);
        c.client_id_claim = Some("sub".into());
        check(&JwtVerifier::new(&c, b"pyjwt-shared-secret").unwrap(), "hs256");
        c.algorithm = JwtAlgorithm::RS256;
        check(&JwtVerifier::new(&c, RSA_PUBLIC).unwrap(), "rs256_kid");
        c.jwks_file = Some("jwks.json".into());
        let v = JwtVerifier::new(&c, JWKS).unwrap();
        check(&v, "rs256_kid");
        check(&v, "rs256_kid2");
        c.algorithm = JwtAlgorithm::ES256;
        check(&JwtVerifier::new(&c, JWKS).unwrap(), "es256");
        c.jwks_file = None;
        check(&JwtVerifier::new(&c, EC_PUBLIC).unwrap(), "es256");
    }

    #[test]
    fn auth_jwt_verifier_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<JwtVerifier>();
    }
}
