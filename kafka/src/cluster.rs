//! A Kafka cluster as the producers see it: a lazily built rskafka client, topic metadata with a
//! refresh interval, and topic auto-creation.
//!
//! Everything here is bounded by time: building the client, a metadata request or a topic
//! creation that does not answer within `request_timeout_ms` counts as failed, so a Kafka that
//! accepts connections and never answers cannot wedge the producers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rskafka::client::error::{Error as ClientError, ProtocolError};
use rskafka::client::partition::{PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::BackoffConfig;
use sluice_core::bridge::ProduceError;
use sluice_core::config::{ClusterConfig, SaslMechanism};
use tokio::sync::Mutex;

/// Pause between attempts while Kafka is unreachable.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub(crate) struct Cluster {
    pub name: String,
    cfg: ClusterConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: Mutex<Option<Arc<Client>>>,
    metadata: Mutex<HashMap<Arc<str>, (i32, Instant)>>,
}

impl Cluster {
    pub(crate) fn new(name: String, cfg: ClusterConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Cluster { name, cfg, tls, client: Mutex::new(None), metadata: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub(crate) fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.delivery_timeout_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.request_timeout_ms)
    }

    /// The client, connecting first if needed (bounded by the request time-out).
    pub(crate) async fn client(&self) -> Result<Arc<Client>, ClientError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut b = ClientBuilder::new(self.cfg.bootstrap.clone()).client_id("sluice").backoff_config(BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
            // rskafka retries internally; our own loop owns the delivery deadline.
            deadline: Some(self.request_timeout()),
        });
        if let Some(tls) = &self.tls {
            b = b.tls_config(tls.clone());
        }
        if let Some(s) = &self.cfg.sasl {
            let cred = Credentials::new(s.username.clone(), s.password.clone());
            b = b.sasl_config(match s.mechanism {
                SaslMechanism::Plain => SaslConfig::Plain(cred),
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(cred),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(cred),
            });
        }
        let client = match tokio::time::timeout(self.request_timeout(), b.build()).await {
            Ok(r) => Arc::new(r?),
            Err(_) => return Err(ClientError::Timeout),
        };
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the client after a connection-level failure, so the next attempt reconnects.
    pub(crate) async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Partitions of `topic`, creating it when configured to; retries until `deadline`.
    pub(crate) async fn partitions(&self, topic: &Arc<str>, deadline: Instant) -> Result<i32, ProduceError> {
        if let Some((n, at)) = self.metadata.lock().await.get(topic) {
            if at.elapsed() < Duration::from_millis(self.cfg.metadata_max_age_ms) {
                return Ok(*n);
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.fetch_partitions(topic).await {
                Ok(Some(n)) => {
                    self.metadata.lock().await.insert(topic.clone(), (n, Instant::now()));
                    return Ok(n);
                }
                Ok(None) if !self.cfg.auto_create_topics => return Err(ProduceError::UnknownTopic),
                Ok(None) => match self.create_topic(topic).await {
                    Ok(()) => continue,
                    Err(e) => {
                        if let Some(fatal) = classify(&e).filter(|_| !retryable(&e)) {
                            return Err(fatal);
                        }
                        tracing::warn!(cluster = %self.name, %topic, error = %e, "creating Kafka topic failed; retrying");
                    }
                },
                Err(e) => {
                    tracing::debug!(cluster = %self.name, %topic, error = %e, "Kafka metadata request failed");
                    if is_connection_error(&e) {
                        self.reset().await;
                    }
                }
            }
            if Instant::now() + backoff >= deadline {
                // A stale count is better than failing while Kafka is briefly away.
                if let Some((n, _)) = self.metadata.lock().await.get(topic) {
                    return Ok(*n);
                }
                tokio::time::sleep_until(deadline.into()).await;
                return Err(ProduceError::TimedOut);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    async fn fetch_partitions(&self, topic: &str) -> Result<Option<i32>, ClientError> {
        let client = self.client().await?;
        let topics = match tokio::time::timeout(self.request_timeout(), client.list_topics()).await {
            Ok(r) => r?,
            Err(_) => return Err(ClientError::Timeout),
        };
        Ok(topics.into_iter().find(|t| t.name == topic).map(|t| t.partitions.len() as i32).filter(|n| *n > 0))
    }

    async fn create_topic(&self, topic: &str) -> Result<(), ClientError> {
        let client = self.client().await?;
        let ctl = client.controller_client()?;
        let timeout_ms = self.cfg.request_timeout_ms.min(i32::MAX as u64) as i32;
        let fut = ctl.create_topic(topic, self.cfg.partitions, self.cfg.replication_factor, timeout_ms);
        match tokio::time::timeout(self.request_timeout(), fut).await {
            Ok(Ok(())) => {
                tracing::info!(cluster = %self.name, %topic, partitions = self.cfg.partitions, "created Kafka topic");
                Ok(())
            }
            Ok(Err(ClientError::ServerError { protocol_error: ProtocolError::TopicAlreadyExists, .. })) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    pub(crate) async fn partition_client(&self, topic: &str, partition: i32) -> Result<PartitionClient, ClientError> {
        let client = self.client().await?;
        match tokio::time::timeout(
            self.request_timeout(),
            client.partition_client(topic, partition, UnknownTopicHandling::Error),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }
}

/// A failure that says something definite about the record (as opposed to "try again").
pub(crate) fn classify(e: &ClientError) -> Option<ProduceError> {
    match e {
        ClientError::ServerError { protocol_error, .. } => match protocol_error {
            ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge => Some(ProduceError::TooLarge),
            ProtocolError::UnknownTopicOrPartition => Some(ProduceError::UnknownTopic),
            ProtocolError::TopicAuthorizationFailed | ProtocolError::ClusterAuthorizationFailed => {
                Some(ProduceError::NotAuthorized)
            }
            ProtocolError::InvalidTopicException => Some(ProduceError::UnknownTopic),
            _ => None,
        },
        _ => None,
    }
}

/// Whether another attempt may succeed.
pub(crate) fn retryable(e: &ClientError) -> bool {
    match classify(e) {
        // A topic just created, or a leader moving, answers "unknown" for a moment.
        Some(ProduceError::UnknownTopic) => {
            matches!(e, ClientError::ServerError { protocol_error: ProtocolError::UnknownTopicOrPartition, .. })
        }
        Some(_) => false,
        None => true,
    }
}

pub(crate) fn is_connection_error(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connection(_) | ClientError::Request(_) | ClientError::Timeout | ClientError::RetryFailed(_)
    )
}
