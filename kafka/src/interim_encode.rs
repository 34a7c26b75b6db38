//! Interim: one RecordBatch through rskafka's own protocol types, until `batch` lands.
use bytes::Bytes;
use rskafka::protocol::record::{
    ControlBatchOrRecords, Record, RecordBatch, RecordBatchCompression, RecordBatchTimestampType, RecordHeader,
};
use rskafka::protocol::traits::WriteType;
use sluice_core::bridge::KafkaRecord;
use sluice_core::config::Compression;

pub(crate) fn encode<'a>(records: impl Iterator<Item = &'a KafkaRecord>, compression: Compression) -> Bytes {
    let recs: Vec<&KafkaRecord> = records.collect();
    let first = recs.first().map(|r| r.timestamp_ms).unwrap_or(0);
    let max = recs.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    let batch = RecordBatch {
        base_offset: 0,
        partition_leader_epoch: -1,
        last_offset_delta: recs.len() as i32 - 1,
        first_timestamp: first,
        max_timestamp: max,
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
        records: ControlBatchOrRecords::Records(
            recs.iter()
                .enumerate()
                .map(|(i, r)| Record {
                    timestamp_delta: r.timestamp_ms - first,
                    offset_delta: i as i32,
                    key: r.key().map(|k| k.to_vec()),
                    value: Some(r.value.to_vec()),
                    headers: {
                        let mut h = Vec::new();
                        r.for_each_header(|k, v| h.push(RecordHeader { key: k.into(), value: v.into() }));
                        h
                    },
                })
                .collect(),
        ),
        compression: match compression {
            Compression::None => RecordBatchCompression::NoCompression,
            Compression::Gzip => RecordBatchCompression::Gzip,
            Compression::Lz4 => RecordBatchCompression::Lz4,
            Compression::Snappy => RecordBatchCompression::Snappy,
            Compression::Zstd => RecordBatchCompression::Zstd,
        },
        is_transactional: false,
        timestamp_type: RecordBatchTimestampType::CreateTime,
    };
    let mut out = Vec::new();
    let _ = batch.write(&mut out);
    out.into()
}
