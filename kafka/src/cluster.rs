//! A Kafka cluster as one shard's Kafka thread sees it: a lazily built rskafka client of its own
//! (its own connections), partition leaders, and topic auto-creation.
//!
//! Each shard builds its own `Cluster` for every configured cluster, so nothing here is shared
//! between cores. The client slot is behind an async mutex only because the shard's producer
//! and its consumers (tasks of the same single-threaded runtime) both use it; it is taken when
//! connecting, never per record.
//!
//! Everything here is bounded by time: building the client, a metadata request or a topic
//! creation that does not answer within `request_timeout_ms` counts as failed, so a Kafka that
//! accepts connections and never answers cannot wedge the producers.

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
pub(crate) const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub(crate) struct Cluster {
    pub name: String,
    cfg: ClusterConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: Mutex<Option<Arc<Client>>>,
}

impl Cluster {
    pub(crate) fn new(name: String, cfg: ClusterConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Cluster { name, cfg, tls, client: Mutex::new(None) }
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

    /// The leader of each partition of `topic` (-1: none at the moment), creating the topic
    /// when configured to; retries until `deadline`.
    pub(crate) async fn leaders(&self, topic: &str, deadline: Instant) -> Result<Vec<i32>, ProduceError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.fetch_leaders(topic).await {
                Ok(Some(leaders)) => return Ok(leaders),
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
                    if let Some(fatal) = classify(&e).filter(|_| !retryable(&e)) {
                        return Err(fatal);
                    }
                    if is_connection_error(&e) {
                        self.reset().await;
                    }
                }
            }
            if Instant::now() + backoff >= deadline {
                tokio::time::sleep_until(deadline.into()).await;
                return Err(ProduceError::TimedOut);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    /// `None` when the topic does not exist (or has no partitions yet).
    async fn fetch_leaders(&self, topic: &str) -> Result<Option<Vec<i32>>, ClientError> {
        let client = self.client().await?;
        let topics = match tokio::time::timeout(self.request_timeout(), client.topic_leaders(&[topic.to_owned()])).await
        {
            Ok(r) => r?,
            Err(_) => return Err(ClientError::Timeout),
        };
        let Some(t) = topics.into_iter().find(|t| t.name == topic) else { return Ok(None) };
        match t.error {
            None => {}
            Some(ProtocolError::UnknownTopicOrPartition) => return Ok(None),
            // A topic just created answers "leader not available" for a moment.
            Some(ProtocolError::LeaderNotAvailable) if !t.partitions.is_empty() => {}
            Some(e) => {
                return Err(ClientError::ServerError {
                    protocol_error: e,
                    error_message: None,
                    request: rskafka::client::error::RequestContext::Topic(topic.to_owned()),
                    response: None,
                    is_virtual: true,
                })
            }
        }
        if t.partitions.is_empty() {
            return Ok(None);
        }
        // Partitions are numbered 0..n; a gap (never seen in practice) leaves a partition
        // without a leader until the next refresh.
        let n = t.partitions.iter().map(|p| p.partition + 1).max().unwrap_or(0).max(0) as usize;
        let mut leaders = vec![-1; n];
        for p in &t.partitions {
            if let Ok(i) = usize::try_from(p.partition) {
                leaders[i] = if p.error.is_none() || p.leader >= 0 { p.leader } else { -1 };
            }
        }
        Ok(Some(leaders))
    }

    /// Partitions of `topic` (for the consumers); retries until `deadline`.
    pub(crate) async fn partitions(&self, topic: &str, deadline: Instant) -> Result<i32, ProduceError> {
        self.leaders(topic, deadline).await.map(|l| l.len() as i32)
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

    /// Creates `topic` with `configs` unless it exists (an internal topic of the cluster).
    pub(crate) async fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        configs: &[(&'static str, String)],
    ) -> Result<(), ClientError> {
        let client = self.client().await?;
        let timeout_ms = self.cfg.request_timeout_ms.min(i32::MAX as u64) as i32;
        let configs: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ctl = client.controller_client()?;
        let fut = ctl.create_topic_with_configs(topic, partitions, self.cfg.replication_factor, &configs, timeout_ms);
        match tokio::time::timeout(self.request_timeout(), fut).await {
            Ok(Ok(())) => {
                tracing::info!(cluster = %self.name, %topic, partitions, ?configs, "created internal topic");
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

/// What a broker's error code says about the records (as opposed to "try again").
pub(crate) fn classify_protocol(e: ProtocolError) -> Option<ProduceError> {
    match e {
        ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge => Some(ProduceError::TooLarge),
        ProtocolError::UnknownTopicOrPartition | ProtocolError::InvalidTopicException => {
            Some(ProduceError::UnknownTopic)
        }
        ProtocolError::TopicAuthorizationFailed | ProtocolError::ClusterAuthorizationFailed => {
            Some(ProduceError::NotAuthorized)
        }
        _ => None,
    }
}

/// Whether a partition that answered `e` may take the same records on another attempt.
pub(crate) fn retryable_protocol(e: ProtocolError) -> bool {
    match classify_protocol(e) {
        // A topic just created, or a leader moving, answers "unknown" for a moment.
        Some(ProduceError::UnknownTopic) => e == ProtocolError::UnknownTopicOrPartition,
        Some(_) => false,
        // Anything the broker did not say is about the records themselves: a corrupt or
        // invalid batch would fail again.
        None => !matches!(
            e,
            ProtocolError::CorruptMessage
                | ProtocolError::InvalidRecord
                | ProtocolError::UnsupportedForMessageFormat
                | ProtocolError::InvalidRequiredAcks
                | ProtocolError::UnsupportedCompressionType
        ),
    }
}

/// A failure that says something definite about the record (as opposed to "try again").
pub(crate) fn classify(e: &ClientError) -> Option<ProduceError> {
    match e {
        ClientError::ServerError { protocol_error, .. } => classify_protocol(*protocol_error),
        _ => None,
    }
}

/// Whether another attempt may succeed.
pub(crate) fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::ServerError { protocol_error, .. } => retryable_protocol(*protocol_error),
        _ => true,
    }
}

pub(crate) fn is_connection_error(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connection(_) | ClientError::Request(_) | ClientError::Timeout | ClientError::RetryFailed(_)
    )
}
