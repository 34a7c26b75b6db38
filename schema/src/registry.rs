//! A Confluent Schema Registry client (blocking HTTP, `ureq` with rustls): schema by id, the
//! subjects and versions that use an id, a subject's latest or pinned version. Callers run it
//! off the shards (the Kafka thread's blocking pool); every call is bounded by `timeout_ms`.
//!
//! Only calls every Confluent-compatible registry answers are used (not `POST
//! /subjects/{subject}`, the lookup by schema, which some do not implement).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use crate::avro::AvroSchema;

/// What a registry client needs from `[schema_registries.NAME]`.
#[derive(Clone, Debug, Default)]
pub struct RegistrySettings {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates for an https URL (the bundled Mozilla roots otherwise).
    pub ca_file: Option<String>,
    pub timeout_ms: u64,
}

/// Why a registry call did not give a schema; each names the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("schema registry `{registry}`: {what} not found")]
    NotFound { registry: String, what: String },
    #[error("schema registry `{registry}` unreachable ({url}): {error}")]
    Unreachable { registry: String, url: String, error: String },
    #[error("schema registry `{registry}` answered {status} for {url}: {body}")]
    Status { registry: String, url: String, status: u16, body: String },
    #[error("schema registry `{registry}`: {what}: {problem}")]
    BadAnswer { registry: String, what: String, problem: String },
    /// Too many fetches already running on this thread.
    #[error("schema registry `{registry}`: {max} fetches already wait for answers")]
    Busy { registry: String, max: usize },
    #[error("schema registry `{registry}`: ca_file: {problem}")]
    Tls { registry: String, problem: String },
}

/// A subject's version as the registry has it.
#[derive(Debug, Clone)]
pub struct SubjectVersion {
    pub id: u32,
    pub version: u32,
    pub schema: Arc<AvroSchema>,
}

#[derive(Debug, Clone)]
pub struct RegistryClient {
    name: String,
    base: String,
    agent: ureq::Agent,
    authorization: Option<String>,
}

impl RegistryClient {
    pub fn new(name: &str, s: &RegistrySettings) -> Result<RegistryClient, RegistryError> {
        let tls_err = |problem: String| RegistryError::Tls { registry: name.into(), problem };
        let mut roots = rustls::RootCertStore::empty();
        match &s.ca_file {
            Some(path) => {
                for c in sluice_pem::read_certs("ca_file", path).map_err(|e| tls_err(e.to_string()))? {
                    roots.add(c).map_err(|e| tls_err(format!("{path}: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = Duration::from_millis(s.timeout_ms.max(1));
        let agent = ureq::AgentBuilder::new().timeout(timeout).tls_config(Arc::new(tls)).build();
        let authorization = s.username.as_ref().map(|u| {
            let pair = format!("{u}:{}", s.password.as_deref().unwrap_or(""));
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        });
        Ok(RegistryClient { name: name.into(), base: s.url.trim_end_matches('/').to_string(), agent, authorization })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, path: &str, what: &str) -> Result<serde_json::Value, RegistryError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url).set("Accept", "application/vnd.schemaregistry.v1+json, application/json");
        if let Some(a) = &self.authorization {
            req = req.set("Authorization", a);
        }
        match req.call() {
            Ok(resp) => resp.into_json().map_err(|e| RegistryError::BadAnswer {
                registry: self.name.clone(),
                what: what.into(),
                problem: e.to_string(),
            }),
            Err(ureq::Error::Status(404, _)) => {
                Err(RegistryError::NotFound { registry: self.name.clone(), what: what.into() })
            }
            Err(ureq::Error::Status(status, resp)) => {
                let mut body = resp.into_string().unwrap_or_default();
                body.truncate(200);
                Err(RegistryError::Status { registry: self.name.clone(), url, status, body })
            }
            Err(ureq::Error::Transport(t)) => {
                Err(RegistryError::Unreachable { registry: self.name.clone(), url, error: t.to_string() })
            }
        }
    }

    fn parse(&self, what: &str, text: Option<&str>) -> Result<Arc<AvroSchema>, RegistryError> {
        let bad =
            |problem: String| RegistryError::BadAnswer { registry: self.name.clone(), what: what.into(), problem };
        let text = text.ok_or_else(|| bad("no `schema` in the answer".into()))?;
        AvroSchema::parse(text).map(Arc::new).map_err(|e| bad(format!("not an Avro schema: {e}")))
    }

    /// `GET /schemas/ids/{id}`.
    pub fn schema_by_id(&self, id: u32) -> Result<Arc<AvroSchema>, RegistryError> {
        let what = format!("schema id {id}");
        let v = self.get(&format!("/schemas/ids/{id}"), &what)?;
        if let Some(t) = v.get("schemaType").and_then(|t| t.as_str()).filter(|t| *t != "AVRO") {
            return Err(RegistryError::BadAnswer {
                registry: self.name.clone(),
                what,
                problem: format!("schema type {t}, not AVRO"),
            });
        }
        self.parse(&what, v.get("schema").and_then(|s| s.as_str()))
    }

    /// `GET /schemas/ids/{id}/versions`: the subjects (with versions) that use `id`.
    pub fn subjects_of_id(&self, id: u32) -> Result<Vec<(String, u32)>, RegistryError> {
        let what = format!("subjects of schema id {id}");
        let v = self.get(&format!("/schemas/ids/{id}/versions"), &what)?;
        let list = v.as_array().ok_or_else(|| RegistryError::BadAnswer {
            registry: self.name.clone(),
            what,
            problem: "not a list".into(),
        })?;
        Ok(list
            .iter()
            .filter_map(|e| Some((e.get("subject")?.as_str()?.to_string(), e.get("version")?.as_u64()? as u32)))
            .collect())
    }

    /// `GET /subjects/{subject}/versions/{version|latest}`.
    pub fn subject_version(&self, subject: &str, version: Option<u32>) -> Result<SubjectVersion, RegistryError> {
        let v_text = version.map_or_else(|| "latest".to_string(), |v| v.to_string());
        let what = format!("subject `{subject}` version {v_text}");
        let v = self.get(&format!("/subjects/{}/versions/{v_text}", encode_path(subject)), &what)?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
        let (Some(id), Some(version)) = (num("id"), num("version")) else {
            return Err(RegistryError::BadAnswer {
                registry: self.name.clone(),
                what,
                problem: "no id or version".into(),
            });
        };
        let schema = self.parse(&what, v.get("schema").and_then(|s| s.as_str()))?;
        Ok(SubjectVersion { id, version, schema })
    }
}

/// A subject in a URL path: everything but unreserved characters percent-encoded.
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_percent_encoded_in_paths() {
        assert_eq!(encode_path("devices-value"), "devices-value");
        assert_eq!(encode_path("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn an_unreachable_registry_is_a_clear_error_within_the_time_out() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let s = RegistrySettings { url: format!("http://127.0.0.1:{port}/"), timeout_ms: 2000, ..Default::default() };
        let c = RegistryClient::new("r", &s).unwrap();
        let t = std::time::Instant::now();
        let e = c.schema_by_id(1).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(&e, RegistryError::Unreachable { registry, url, .. } if registry == "r" && url.ends_with("/schemas/ids/1")),
            "{e}"
        );
    }

    #[test]
    fn a_missing_ca_file_names_the_registry_and_the_file() {
        let s = RegistrySettings {
            url: "https://x".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = RegistryClient::new("cloud", &s).unwrap_err().to_string();
        assert!(e.starts_with("schema registry `cloud`: ca_file: ca_file /nonexistent/ca.pem"), "{e}");
    }
}
