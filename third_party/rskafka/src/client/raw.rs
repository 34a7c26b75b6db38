//! sluice patch: what a producer that batches by broker needs from rskafka.
//!
//! rskafka's [`PartitionClient`](super::partition::PartitionClient) sends one produce request per
//! partition and encodes records from its own owned types. A producer that puts every partition
//! a broker leads into one request, with batches it encoded itself, needs three things instead:
//! the leader of every partition of a topic, a connection to a chosen broker (with the client's
//! TLS and SASL settings), and a produce request carrying pre-encoded RecordBatch bytes per
//! partition. Retries, back-off and leader changes are the caller's business here: nothing below
//! retries.

use bytes::Bytes;

use crate::{
    client::{
        Client,
        error::{Error, ProtocolError, Result},
    },
    connection::{BrokerConnection, MetadataLookupMode},
    messenger::RequestError,
    protocol::{
        messages::{ProduceRecords, ProduceRequest, ProduceRequestPartitionData, ProduceRequestTopicData},
        primitives::{Int16, Int32, NullableString, String_},
    },
};

/// One partition of a topic and the broker that leads it (`leader` is -1 while it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLeader {
    pub partition: i32,
    pub leader: i32,
    pub error: Option<ProtocolError>,
}

/// A topic's partitions as the metadata response gave them, sorted by partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLeaders {
    pub name: String,
    pub error: Option<ProtocolError>,
    pub partitions: Vec<PartitionLeader>,
}

/// The batches of one topic in a produce request: one encoded RecordBatch (or several, back to
/// back) per partition.
#[derive(Debug, Clone)]
pub struct TopicBatches {
    pub topic: String,
    pub partitions: Vec<(i32, Bytes)>,
}

/// The broker's answer for one partition of a produce request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAck {
    pub topic: String,
    pub partition: i32,
    pub error: Option<ProtocolError>,
    pub base_offset: i64,
}

/// A produce request's answers, and how long the broker asks the client to hold back (quotas).
#[derive(Debug, Clone)]
pub struct ProduceAcks {
    pub partitions: Vec<PartitionAck>,
    pub throttle_ms: i32,
}

/// A connection of its own to one broker.
#[derive(Debug, Clone)]
pub struct BrokerLink {
    broker_id: i32,
    conn: BrokerConnection,
}

impl Client {
    /// Leaders of the partitions of `topics`, asked of any broker (this also refreshes the
    /// client's view of the brokers). A topic that does not exist comes back with its error.
    pub async fn topic_leaders(&self, topics: &[String]) -> Result<Vec<TopicLeaders>> {
        let (response, _gen) =
            self.brokers.request_metadata(&MetadataLookupMode::ArbitraryBroker, Some(topics.to_vec())).await?;
        Ok(response
            .topics
            .into_iter()
            .map(|t| {
                let mut partitions: Vec<PartitionLeader> = t
                    .partitions
                    .into_iter()
                    .map(|p| PartitionLeader { partition: p.partition_index.0, leader: p.leader_id.0, error: p.error })
                    .collect();
                partitions.sort_by_key(|p| p.partition);
                TopicLeaders { name: t.name.0, error: t.error, partitions }
            })
            .collect())
    }

    /// A new connection to broker `broker_id` (as the last metadata named it), or `None` when
    /// the client knows no such broker.
    pub async fn connect_broker(&self, broker_id: i32) -> Result<Option<BrokerLink>> {
        Ok(self.brokers.connect(broker_id).await?.map(|conn| BrokerLink { broker_id, conn }))
    }
}

impl BrokerLink {
    pub fn broker_id(&self) -> i32 {
        self.broker_id
    }

    /// Sends one produce request (`acks` -1 = all in-sync replicas, 1 = the leader) and waits
    /// for its answer. Requests on one link may overlap; each gets its own answer.
    pub async fn produce(&self, acks: i16, timeout_ms: i32, topics: Vec<TopicBatches>) -> Result<ProduceAcks, Error> {
        let request = produce_request(acks, timeout_ms, topics);
        // The batches go to the socket from their own buffers (one vectored write per request).
        let response = self.conn.request_vectored(request).await.map_err(|e: RequestError| Error::Request(e))?;
        Ok(ProduceAcks {
            throttle_ms: response.throttle_time_ms.map(|t| t.0).unwrap_or(0),
            partitions: response
                .responses
                .into_iter()
                .flat_map(|t| {
                    let topic = t.name.0;
                    t.partition_responses.into_iter().map(move |p| PartitionAck {
                        topic: topic.clone(),
                        partition: p.index.0,
                        error: p.error,
                        base_offset: p.base_offset.0,
                    })
                })
                .collect(),
        })
    }
}

fn produce_request(acks: i16, timeout_ms: i32, topics: Vec<TopicBatches>) -> ProduceRequest {
    ProduceRequest {
        transactional_id: NullableString(None),
        acks: Int16(acks),
        timeout_ms: Int32(timeout_ms),
        topic_data: topics
            .into_iter()
            .map(|t| ProduceRequestTopicData {
                name: String_(t.topic),
                partition_data: t
                    .partitions
                    .into_iter()
                    .map(|(p, b)| ProduceRequestPartitionData { index: Int32(p), records: ProduceRecords::Encoded(b) })
                    .collect(),
            })
            .collect(),
    }
}

/// For sluice's tests (rskafka's own need its dev-dependencies): the produce request body of
/// `topics` at `version`, written in one buffer (`vectored` false) or as the vectored path
/// writes it (the fields around the batches, the batches spliced in at their offsets).
#[doc(hidden)]
pub fn produce_body_for_tests(topics: Vec<TopicBatches>, version: i16, vectored: bool) -> Vec<u8> {
    use crate::protocol::{
        api_version::ApiVersion,
        messages::{VectoredBody, WriteVersionedType},
    };
    let request = produce_request(-1, 1000, topics);
    let mut buf = Vec::new();
    if !vectored {
        request.write_versioned(&mut buf, ApiVersion(Int16(version))).expect("write");
        return buf;
    }
    let mut parts = Vec::new();
    request.write_vectored_body(&mut buf, ApiVersion(Int16(version)), &mut parts).expect("write");
    let mut out = Vec::new();
    let mut at = 0;
    for (offset, part) in parts {
        out.extend_from_slice(&buf[at..offset]);
        out.extend_from_slice(&part);
        at = offset;
    }
    out.extend_from_slice(&buf[at..]);
    out
}

/// For sluice's tests: how the messenger writes a frame with parts spliced in.
#[doc(hidden)]
pub use crate::messenger::write_spliced;
