use std::io::{Read, Write};

use crate::protocol::{
    api_key::ApiKey,
    api_version::{ApiVersion, ApiVersionRange},
    error::Error,
    messages::{read_versioned_array, write_versioned_array},
    primitives::{Int16, Int32, Int64, NullableString, Records, String_},
    traits::{ReadType, WriteType},
};

use super::{
    ReadVersionedError, ReadVersionedType, RequestBody, VectoredBody, WriteVersionedError,
    WriteVersionedType,
};

#[derive(Debug)]
pub struct ProduceRequestPartitionData {
    /// The partition index.
    pub index: Int32,

    /// The record data to be produced.
    pub records: ProduceRecords,
}

/// sluice patch: the records of one partition, either as rskafka's own batches or as bytes the
/// caller already encoded (one or more complete RecordBatch v2, written as they are).
#[derive(Debug)]
pub enum ProduceRecords {
    Batches(Records),
    Encoded(bytes::Bytes),
}

impl<W> WriteType<W> for ProduceRecords
where
    W: Write,
{
    fn write(&self, writer: &mut W) -> Result<(), crate::protocol::traits::WriteError> {
        match self {
            ProduceRecords::Batches(r) => r.write(writer),
            ProduceRecords::Encoded(b) => {
                let len = i32::try_from(b.len()).map_err(crate::protocol::traits::WriteError::Overflow)?;
                Int32(len).write(writer)?;
                writer.write_all(b)?;
                Ok(())
            }
        }
    }
}

impl<W> WriteVersionedType<W> for ProduceRequestPartitionData
where
    W: Write,
{
    fn write_versioned(
        &self,
        writer: &mut W,
        version: ApiVersion,
    ) -> Result<(), WriteVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        self.index.write(writer)?;
        self.records.write(writer)?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct ProduceRequestTopicData {
    /// The topic name.
    pub name: String_,

    /// Each partition to produce to.
    pub partition_data: Vec<ProduceRequestPartitionData>,
}

impl<W> WriteVersionedType<W> for ProduceRequestTopicData
where
    W: Write,
{
    fn write_versioned(
        &self,
        writer: &mut W,
        version: ApiVersion,
    ) -> Result<(), WriteVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        self.name.write(writer)?;
        write_versioned_array(writer, version, Some(&self.partition_data))?;

        Ok(())
    }
}

#[derive(Debug)]
pub struct ProduceRequest {
    /// The transactional ID, or null if the producer is not transactional.
    ///
    /// Added in version 3.
    pub transactional_id: NullableString,

    /// The number of acknowledgments the producer requires the leader to have received before considering a request complete.
    ///
    /// Allowed values: 0 for no acknowledgments, 1 for only the leader and -1 for the full ISR.
    pub acks: Int16,

    /// The timeout to await a response in milliseconds.
    pub timeout_ms: Int32,

    /// Each topic to produce to.
    pub topic_data: Vec<ProduceRequestTopicData>,
}

impl<W> WriteVersionedType<W> for ProduceRequest
where
    W: Write,
{
    fn write_versioned(
        &self,
        writer: &mut W,
        version: ApiVersion,
    ) -> Result<(), WriteVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        if v >= 3 {
            self.transactional_id.write(writer)?;
        }
        self.acks.write(writer)?;
        self.timeout_ms.write(writer)?;
        write_versioned_array(writer, version, Some(&self.topic_data))?;

        Ok(())
    }
}

/// sluice patch: the encoded batches are the parts: the frame buffer holds only the fields
/// around them (the same bytes as `write_versioned`, v3–v7).
impl VectoredBody for ProduceRequest {
    fn write_vectored_body(
        &self,
        buf: &mut Vec<u8>,
        version: ApiVersion,
        parts: &mut Vec<(usize, bytes::Bytes)>,
    ) -> Result<(), WriteVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);
        let count = |n: usize| {
            i32::try_from(n)
                .map(Int32)
                .map_err(|e| WriteVersionedError::WriteError(crate::protocol::traits::WriteError::Overflow(e)))
        };
        if v >= 3 {
            self.transactional_id.write(buf)?;
        }
        self.acks.write(buf)?;
        self.timeout_ms.write(buf)?;
        count(self.topic_data.len())?.write(buf)?;
        for t in &self.topic_data {
            t.name.write(buf)?;
            count(t.partition_data.len())?.write(buf)?;
            for p in &t.partition_data {
                p.index.write(buf)?;
                match &p.records {
                    ProduceRecords::Encoded(b) => {
                        count(b.len())?.write(buf)?;
                        parts.push((buf.len(), b.clone()));
                    }
                    batches @ ProduceRecords::Batches(_) => batches.write(buf)?,
                }
            }
        }
        Ok(())
    }

    fn inline_size_hint(&self) -> usize {
        16 + self.topic_data.iter().map(|t| 8 + t.name.0.len() + 8 * t.partition_data.len()).sum::<usize>()
    }
}

impl RequestBody for ProduceRequest {
    type ResponseBody = ProduceResponse;

    fn size_hint(&self) -> usize {
        // Fixed fields, then per topic its name and per partition its index, length and bytes.
        16 + self
            .topic_data
            .iter()
            .map(|t| {
                8 + t.name.0.len()
                    + t.partition_data
                        .iter()
                        .map(|p| {
                            8 + match &p.records {
                                ProduceRecords::Encoded(b) => b.len(),
                                ProduceRecords::Batches(_) => 0,
                            }
                        })
                        .sum::<usize>()
            })
            .sum::<usize>()
    }

    const API_KEY: ApiKey = ApiKey::Produce;

    /// That's enough for for.
    ///
    /// Note that we do not support produce request prior to version 3, since this is the version when message version 2
    /// was introduced ([KIP-98]).
    ///
    /// [KIP-98]: https://cwiki.apache.org/confluence/display/KAFKA/KIP-98+-+Exactly+Once+Delivery+and+Transactional+Messaging
    const API_VERSION_RANGE: ApiVersionRange =
        ApiVersionRange::new(ApiVersion(Int16(3)), ApiVersion(Int16(7)));

    const FIRST_TAGGED_FIELD_IN_REQUEST_VERSION: ApiVersion = ApiVersion(Int16(9));
}

#[derive(Debug)]
#[allow(missing_copy_implementations)]
pub struct ProduceResponsePartitionResponse {
    /// The partition index.
    pub index: Int32,

    /// Error code.
    pub error: Option<Error>,

    /// The base offset.
    pub base_offset: Int64,

    /// The timestamp returned by broker after appending the messages.
    ///
    /// If CreateTime is used for the topic, the timestamp will be -1. If LogAppendTime is used for the topic, the
    /// timestamp will be the broker local time when the messages are appended.
    ///
    /// Added in version 2.
    pub log_append_time_ms: Option<Int64>,

    /// The log start offset.
    ///
    /// Added in version 5.
    pub log_start_offset: Option<Int64>,
}

impl<R> ReadVersionedType<R> for ProduceResponsePartitionResponse
where
    R: Read,
{
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        Ok(Self {
            index: Int32::read(reader)?,
            error: Error::new(Int16::read(reader)?.0),
            base_offset: Int64::read(reader)?,
            log_append_time_ms: (v >= 2).then(|| Int64::read(reader)).transpose()?,
            log_start_offset: (v >= 5).then(|| Int64::read(reader)).transpose()?,
        })
    }
}

#[derive(Debug)]
pub struct ProduceResponseResponse {
    /// The topic name
    pub name: String_,

    /// Each partition that we produced to within the topic.
    pub partition_responses: Vec<ProduceResponsePartitionResponse>,
}

impl<R> ReadVersionedType<R> for ProduceResponseResponse
where
    R: Read,
{
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        Ok(Self {
            name: String_::read(reader)?,
            partition_responses: read_versioned_array(reader, version)?.unwrap_or_default(),
        })
    }
}

#[derive(Debug)]
pub struct ProduceResponse {
    /// Each produce response
    pub responses: Vec<ProduceResponseResponse>,

    /// The duration in milliseconds for which the request was throttled due to a quota violation, or zero if the request did not violate any quota.
    ///
    /// Added in version 1.
    pub throttle_time_ms: Option<Int32>,
}

impl<R> ReadVersionedType<R> for ProduceResponse
where
    R: Read,
{
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let v = version.0.0;
        assert!(v <= 7);

        Ok(Self {
            responses: read_versioned_array(reader, version)?.unwrap_or_default(),
            throttle_time_ms: (v >= 1).then(|| Int32::read(reader)).transpose()?,
        })
    }
}
