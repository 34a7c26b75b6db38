//! The live message view: `/api/v1/live?filter=F` as Server-Sent Events.
//!
//! Each open view is one tap on every shard ([`AdminQuery::LiveWatch`]); this task polls the
//! taps every [`POLL`] and writes each sample as one `data:` event (JSON: the MQTT message and
//! the Kafka records it became), plus a `stats` event with what was skipped. The shards bound
//! the rate ([`sluice_core::shard::TAP_RATE_PER_SEC`] per shard), the buffer, and forget a
//! tap nobody polls; here at most [`crate::LIVE_STREAMS_MAX`] views are open at once (503
//! beyond), and a view whose browser went away ends at its next write.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use sluice_core::shard::{AdminQuery, AdminReply, LiveSample};
use tokio::sync::mpsc;

use crate::server::{ApiError, Resp, RespBody, State};

const POLL: Duration = Duration::from_millis(250);

fn bytes_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => {
            use base64::Engine;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

/// Where a record goes: the mapping's partition, the producers' placement by key (when the
/// probe knows the topic's partitions), or the sticky partition of keyless records.
fn placement(state: &State, r: &sluice_core::shard::LiveRecord) -> (Option<i32>, &'static str) {
    match (r.partition, &r.key) {
        (Some(p), _) => (Some(p), "mapping"),
        (None, Some(k)) => {
            let p = state.sources.kafka.as_ref().and_then(|h| h.partition_for_key(&r.cluster, &r.topic, k));
            (p, "key")
        }
        (None, None) => (None, "sticky"),
    }
}

fn sample_json(state: &State, s: &LiveSample) -> Value {
    json!({
        "time_ms": s.wall_ms,
        "topic": s.topic,
        "payload": bytes_json(&s.payload),
        "payload_bytes": s.payload_len,
        "qos": s.qos,
        "retain": s.retain,
        "client_id": s.client_id,
        "shard": s.shard,
        "kafka": s.records.iter().map(|r| (r, placement(state, r))).map(|(r, (partition, by))| json!({
            "mapping": r.mapping,
            "cluster": r.cluster,
            "topic": r.topic,
            "partition": partition,
            "partition_by": by,
            "key": r.key.as_deref().map(bytes_json),
            "headers": r.headers.iter().map(|(k, v)| json!([k, bytes_json(v)])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub(crate) async fn stream(state: &Arc<State>, filter: String) -> Result<Resp, ApiError> {
    let Ok(permit) = state.live_open.clone().try_acquire_owned() else {
        return Err(ApiError::unavailable(format!("{} live views are open already", crate::LIVE_STREAMS_MAX)));
    };
    let tap = state.next_tap.fetch_add(1, Ordering::Relaxed);
    // Start the taps first, so a malformed filter is a 400 rather than an empty stream.
    state.ask_all(AdminQuery::LiveWatch { tap, filter: filter.clone() }).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let st = state.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tx.send(Bytes::from(format!("event: open\ndata: {}\n\n", json!({ "filter": filter })))).await;
        loop {
            tokio::time::sleep(POLL).await;
            let Ok(replies) = st.ask_all(AdminQuery::LiveTake { tap }).await else { continue };
            let mut out = String::new();
            let mut skipped = 0;
            let mut lost = false;
            for r in replies {
                if let AdminReply::Live(b) = r {
                    lost |= !b.known;
                    skipped += b.skipped;
                    for s in &b.samples {
                        out.push_str(&format!("data: {}\n\n", sample_json(&st, s)));
                    }
                }
            }
            if lost {
                // A shard forgot the tap (it went unpolled too long): start it again.
                let _ = st.ask_all(AdminQuery::LiveWatch { tap, filter: filter.clone() }).await;
            }
            out.push_str(&format!("event: stats\ndata: {}\n\n", json!({ "skipped": skipped })));
            if tx.send(Bytes::from(out)).await.is_err() {
                break;
            }
        }
        let _ = st.ask_all(AdminQuery::LiveStop { tap }).await;
    });
    let mut r = Response::new(RespBody::Stream(rx));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}
