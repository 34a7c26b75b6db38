//! The admin API (`/api/v1/…`, see `docs/openapi.yaml`) and `/readyz`.
//!
//! Each handler asks every shard and merges: a listing's pages are sorted by key on each shard
//! and merged here, so `after` (the last key of the previous page) pages through all shards at
//! once. Input is checked before any shard is asked: a bad number, a page over `PAGE_MAX`, an
//! empty or malformed filter is a 400 that says which parameter.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sluice_core::shard::{AdminQuery, AdminReply, ClientInfo, Snapshot, PAGE_MAX};

use crate::server::{json_resp, only, respond, ApiError, Resp, State};

const PAGE_DEFAULT: usize = 100;

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn limit(params: &[(String, String)]) -> Result<usize, ApiError> {
    let Some(v) = param(params, "limit") else { return Ok(PAGE_DEFAULT) };
    match v.parse::<usize>() {
        Ok(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
        _ => Err(ApiError::bad(format!("limit: `{v}` is not a number from 1 to {PAGE_MAX}"))),
    }
}

/// Parameters a route knows; any other is refused (a typo should not silently list everything).
fn known(params: &[(String, String)], names: &[&str]) -> Result<(), ApiError> {
    match params.iter().find(|(k, _)| !names.contains(&k.as_str())) {
        Some((k, _)) => Err(ApiError::bad(format!("unknown parameter `{k}` (this route takes: {})", names.join(", ")))),
        None => Ok(()),
    }
}

fn required<'a>(params: &'a [(String, String)], name: &str) -> Result<&'a str, ApiError> {
    match param(params, name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::bad(format!("parameter `{name}` is required"))),
    }
}

pub(crate) async fn route(
    state: &Arc<State>,
    method: &Method,
    path: &str,
    params: &[(String, String)],
) -> Result<Resp, ApiError> {
    if let Some(id) = path.strip_prefix("/api/v1/clients/") {
        only(method, &[Method::GET, Method::DELETE])?;
        known(params, &[])?;
        let id = percent_decode(id)?;
        return if method == Method::DELETE { disconnect(state, &id).await } else { client(state, &id).await };
    }
    match path {
        "/metrics" => {
            only(method, &[Method::GET])?;
            let snaps = snapshots(state).await?;
            let text = crate::metrics::render(state, &snaps);
            Ok(respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text))
        }
        "/api/v1/overview" => {
            only(method, &[Method::GET])?;
            known(params, &[])?;
            overview(state).await
        }
        "/api/v1/clients" | "/api/v1/sessions" => {
            only(method, &[Method::GET])?;
            known(params, &["search", "after", "limit"])?;
            let (search, after) = (param(params, "search").unwrap_or(""), param(params, "after").unwrap_or(""));
            let (search, after, limit) = (search.to_string(), after.to_string(), limit(params)?);
            let q = if path.ends_with("clients") {
                AdminQuery::Clients { search, after, limit }
            } else {
                AdminQuery::Sessions { search, after, limit }
            };
            clients(state, q, limit).await
        }
        "/api/v1/subscriptions" => {
            only(method, &[Method::GET])?;
            known(params, &["filter", "after", "after_filter", "limit"])?;
            let filter = param(params, "filter").map(str::to_string);
            if filter.as_deref() == Some("") {
                return Err(ApiError::bad("filter: must not be empty"));
            }
            let after = (
                param(params, "after").unwrap_or("").to_string(),
                param(params, "after_filter").unwrap_or("").to_string(),
            );
            subscriptions(state, filter, after, limit(params)?).await
        }
        "/api/v1/retained" => {
            only(method, &[Method::GET])?;
            known(params, &["filter", "limit"])?;
            let filter = param(params, "filter").unwrap_or("#").to_string();
            if filter.is_empty() {
                return Err(ApiError::bad("filter: must not be empty"));
            }
            retained_list(state, filter, limit(params)?).await
        }
        "/api/v1/retained/message" => {
            only(method, &[Method::GET, Method::DELETE])?;
            known(params, &["topic"])?;
            let topic = required(params, "topic")?;
            if topic.contains(['+', '#']) {
                return Err(ApiError::bad("topic: a topic name, without wildcards"));
            }
            if method == Method::DELETE {
                retained_delete(state, topic).await
            } else {
                retained_get(state, topic).await
            }
        }
        "/api/v1/mappings" => {
            only(method, &[Method::GET])?;
            known(params, &[])?;
            mappings(state).await
        }
        "/api/v1/clusters" => {
            only(method, &[Method::GET])?;
            known(params, &[])?;
            Ok(json_resp(StatusCode::OK, &clusters_json(state)))
        }
        "/api/v1/cluster" => {
            only(method, &[Method::GET])?;
            known(params, &[])?;
            Ok(json_resp(StatusCode::OK, &cluster_json(state)))
        }
        "/api/v1/spill" => {
            only(method, &[Method::GET])?;
            known(params, &[])?;
            spill(state).await
        }
        "/api/v1/live" => {
            only(method, &[Method::GET])?;
            known(params, &["filter"])?;
            let filter = required(params, "filter")?.to_string();
            crate::live::stream(state, filter).await
        }
        _ if method == Method::GET => {
            crate::assets::get(path).ok_or_else(|| ApiError::not_found(format!("no such path: {path}")))
        }
        _ => Err(ApiError::not_found(format!("no such path: {path}"))),
    }
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad("malformed %-escape in the path"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad("the path is not UTF-8"))
}

pub(crate) async fn snapshots(state: &State) -> Result<Vec<Snapshot>, ApiError> {
    Ok(state
        .ask_all(AdminQuery::Snapshot)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            AdminReply::Snapshot(s) => Some(*s),
            _ => None,
        })
        .collect())
}

fn client_json(c: &ClientInfo, details: bool) -> Value {
    let mut v = json!({
        "client_id": c.client_id,
        "shard": c.shard,
        "connected": c.connected,
        "protocol": c.protocol,
        "keep_alive_secs": c.keep_alive_secs,
        "username": c.username,
        "listener": c.listener,
        "subscription_count": c.subscription_count,
        "inflight": c.inflight,
        "queued": c.queued,
        "session_expiry_secs": c.session_expiry_secs,
    });
    if let Some(claim) = c.cluster_claim {
        v["cluster_claim"] = claim.into();
    }
    if details {
        v["subscriptions"] =
            c.subscriptions.iter().map(|(f, q)| json!({ "filter": f, "qos": q })).collect::<Vec<_>>().into();
    }
    v
}

async fn clients(state: &State, q: AdminQuery, limit: usize) -> Result<Resp, ApiError> {
    let mut items = Vec::new();
    let mut total = 0;
    for r in state.ask_all(q).await? {
        if let AdminReply::Clients(p) = r {
            total += p.total;
            items.extend(p.items);
        }
    }
    items.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    items.truncate(limit);
    let next_after = (total > items.len()).then(|| items.last().map(|c| c.client_id.clone())).flatten();
    Ok(json_resp(
        StatusCode::OK,
        &json!({
            "items": items.iter().map(|c| client_json(c, false)).collect::<Vec<_>>(),
            "total": total,
            "next_after": next_after,
        }),
    ))
}

async fn client(state: &State, id: &str) -> Result<Resp, ApiError> {
    for r in state.ask_all(AdminQuery::Client { client_id: id.to_string() }).await? {
        if let AdminReply::Client(Some(c)) = r {
            return Ok(json_resp(StatusCode::OK, &client_json(&c, true)));
        }
    }
    Err(ApiError::not_found(format!("no session with client id `{id}`")))
}

async fn disconnect(state: &State, id: &str) -> Result<Resp, ApiError> {
    let replies = state.ask_all(AdminQuery::Disconnect { client_id: id.to_string() }).await?;
    if replies.iter().any(|r| matches!(r, AdminReply::Done(true))) {
        Ok(json_resp(StatusCode::OK, &json!({ "client_id": id, "disconnected": true })))
    } else {
        Err(ApiError::not_found(format!("no connected client with id `{id}`")))
    }
}

async fn subscriptions(
    state: &State,
    filter: Option<String>,
    after: (String, String),
    limit: usize,
) -> Result<Resp, ApiError> {
    let mut items = Vec::new();
    let mut total = 0;
    for r in state.ask_all(AdminQuery::Subscriptions { filter, after, limit }).await? {
        if let AdminReply::Subscriptions(p) = r {
            total += p.total;
            items.extend(p.items);
        }
    }
    items.sort_by(|a, b| (&a.client_id, &a.filter).cmp(&(&b.client_id, &b.filter)));
    items.truncate(limit);
    // The cursor of the next page: the last (client id, filter) of this one.
    let next = (total > items.len()).then(|| items.last()).flatten();
    Ok(json_resp(
        StatusCode::OK,
        &json!({
            "items": items.iter().map(|s| json!({"client_id": s.client_id, "filter": s.filter, "qos": s.qos, "shard": s.shard})).collect::<Vec<_>>(),
            "total": total,
            "next_after": next.map(|s| &s.client_id),
            "next_after_filter": next.map(|s| &s.filter),
        }),
    ))
}

fn payload_json(p: &[u8]) -> Value {
    match std::str::from_utf8(p) {
        Ok(s) => json!({ "payload": s, "payload_base64": Value::Null }),
        Err(_) => {
            use base64::Engine;
            json!({ "payload": Value::Null, "payload_base64": base64::engine::general_purpose::STANDARD.encode(p) })
        }
    }
}

fn retained_json(r: &sluice_core::shard::RetainedInfo) -> Value {
    let mut v = json!({ "topic": r.topic, "qos": r.qos, "shard": r.shard, "payload_bytes": r.payload.len() });
    if let (Value::Object(o), Value::Object(p)) = (&mut v, payload_json(&r.payload)) {
        o.extend(p);
    }
    v
}

async fn retained_list(state: &State, filter: String, limit: usize) -> Result<Resp, ApiError> {
    let mut items = Vec::new();
    for r in state.ask_all(AdminQuery::Retained { filter, limit }).await? {
        if let AdminReply::Retained(v) = r {
            items.extend(v);
        }
    }
    items.sort_by(|a, b| a.topic.cmp(&b.topic));
    items.truncate(limit);
    Ok(json_resp(StatusCode::OK, &json!({ "items": items.iter().map(retained_json).collect::<Vec<_>>() })))
}

async fn retained_get(state: &State, topic: &str) -> Result<Resp, ApiError> {
    // A filter without wildcards matches exactly its own topic.
    for r in state.ask_all(AdminQuery::Retained { filter: topic.to_string(), limit: 1 }).await? {
        if let AdminReply::Retained(v) = r {
            if let Some(m) = v.first() {
                return Ok(json_resp(StatusCode::OK, &retained_json(m)));
            }
        }
    }
    Err(ApiError::not_found(format!("no retained message on `{topic}`")))
}

async fn retained_delete(state: &State, topic: &str) -> Result<Resp, ApiError> {
    let replies = state.ask_all(AdminQuery::DeleteRetained { topic: topic.to_string() }).await?;
    if replies.iter().any(|r| matches!(r, AdminReply::Done(true))) {
        Ok(json_resp(StatusCode::OK, &json!({ "topic": topic, "deleted": true })))
    } else {
        Err(ApiError::not_found(format!("no retained message on `{topic}`")))
    }
}

/// The shards' counters summed, plus what the dashboard's overview shows.
async fn overview(state: &State) -> Result<Resp, ApiError> {
    let snaps = snapshots(state).await?;
    let mut total = sluice_core::shard::Stats::default();
    let (mut connections, mut produced, mut failed, mut spill_records, mut spill_bytes) = (0, 0, 0, 0, 0);
    for s in &snaps {
        total += s.stats;
        connections += s.connections;
        for (_, _, m) in &s.mappings {
            produced += m.records_produced;
            failed += m.records_failed;
        }
        if let Some((r, b, _)) = s.spill {
            spill_records += r;
            spill_bytes += b;
        }
    }
    let dropped = total.dropped_queue_full + total.dropped_slow_qos0 + total.dropped_expired + total.dropped_too_large;
    Ok(json_resp(
        StatusCode::OK,
        &json!({
            "shards": snaps.len(),
            "uptime_secs": snaps.first().map_or(0, |s| s.uptime_ms / 1000),
            "connections": connections,
            "clients_connected": total.clients_connected,
            "sessions": total.sessions,
            "subscriptions": total.subscriptions,
            "retained": total.retained,
            "messages_received": total.messages_received,
            "messages_sent": total.messages_sent,
            "bytes_received": total.bytes_received,
            "bytes_sent": total.bytes_sent,
            "messages_dropped": dropped,
            "kafka_records_produced": produced,
            "kafka_records_failed": failed,
            "spill_records": spill_records,
            "spill_disk_bytes": spill_bytes,
            "auth_failures": total.auth_failures,
            "per_shard": snaps.iter().map(|s| json!({
                "shard": s.shard,
                "connections": s.connections,
                "messages_received": s.stats.messages_received,
                "messages_sent": s.stats.messages_sent,
            })).collect::<Vec<_>>(),
        }),
    ))
}

fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let n: u64 = buckets.iter().sum();
    if n == 0 {
        return None;
    }
    let want = (n as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, c) in buckets.iter().enumerate() {
        seen += c;
        if seen >= want {
            let bounds = sluice_core::shard::LATENCY_BUCKETS_US;
            // The bucket's upper bound (the last one: past 30 s).
            return Some(bounds.get(i).copied().unwrap_or(bounds[bounds.len() - 1]) as f64 / 1e6);
        }
    }
    None
}

async fn mappings(state: &State) -> Result<Resp, ApiError> {
    let snaps = snapshots(state).await?;
    let dead: Vec<(String, u64)> = state.sources.kafka.as_ref().map(|k| k.dead_lettered()).unwrap_or_default();
    let missing: Vec<(String, String)> = state
        .sources
        .kafka
        .as_ref()
        .map(|k| k.clusters().into_iter().flat_map(|c| c.missing_topics).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in &state.sources.mqtt_to_kafka {
        let mut per_cluster: std::collections::BTreeMap<String, sluice_core::shard::MappingStats> = Default::default();
        for s in &snaps {
            for (name, cluster, st) in &s.mappings {
                if *name == m.name {
                    *per_cluster.entry(cluster.clone()).or_default() += st;
                }
            }
        }
        out.push(json!({
            "name": m.name,
            "direction": "mqtt_to_kafka",
            "filters": m.filters,
            "destinations": m.destinations.iter().map(|d| json!({
                "cluster": d.cluster,
                "topic": d.topic.fixed_topic(),
                "partition": d.partition,
            })).collect::<Vec<_>>(),
            "dead_lettered": dead.iter().find(|(n, _)| *n == m.name).map_or(0, |(_, c)| *c),
            "missing_topics": missing.iter().filter(|(n, _)| *n == m.name).map(|(_, t)| t.clone()).collect::<Vec<_>>(),
            "clusters": per_cluster.iter().map(|(c, st)| json!({
                "cluster": c,
                "messages": st.messages_in,
                "bytes": st.bytes_in,
                "records_produced": st.records_produced,
                "records_failed": st.records_failed,
                "records_retried": st.records_retried,
                "records_spilled": st.records_spilled,
                "records_dropped": st.records_dropped,
                "records_in_flight": st.in_flight,
                "ack_latency_p50_seconds": quantile(&st.latency_buckets, 0.5),
                "ack_latency_p99_seconds": quantile(&st.latency_buckets, 0.99),
            })).collect::<Vec<_>>(),
        }));
    }
    let lag = state.sources.kafka.as_ref().map(|k| k.lag()).unwrap_or_default();
    let inbound_missing = state.sources.kafka.as_ref().map(|k| k.inbound_missing()).unwrap_or_default();
    for m in &state.sources.kafka_to_mqtt {
        let mut c = sluice_core::shard::InboundCounters::default();
        for s in &snaps {
            for (name, st) in &s.inbound {
                if *name == m.name {
                    c.records_read += st.records_read;
                    c.messages_published += st.messages_published;
                    c.records_skipped += st.records_skipped;
                }
            }
        }
        out.push(json!({
            "name": m.name,
            "direction": "kafka_to_mqtt",
            "cluster": m.cluster,
            "kafka_topics": m.kafka_topics,
            "kafka_topic_pattern": m.kafka_topic_pattern,
            "mqtt_topics": m.mqtt_topics,
            "records_read": c.records_read,
            "messages_published": c.messages_published,
            "records_skipped": c.records_skipped,
            "missing_topics": inbound_missing.iter().filter(|(n, _, _)| *n == m.name).map(|(_, t, _)| t.clone()).collect::<Vec<_>>(),
            "missing_topic_attempts": inbound_missing.iter().filter(|(n, _, _)| *n == m.name).map(|(_, _, a)| *a).sum::<u64>(),
            "partitions": lag.iter().filter(|((n, _, _), _)| *n == m.name).map(|((_, t, p), l)| json!({
                "topic": t, "partition": p, "next_offset": l.next_offset, "high_watermark": l.high_watermark, "lag": l.lag(),
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(json_resp(StatusCode::OK, &json!({ "items": out })))
}

fn clusters_json(state: &State) -> Value {
    let clusters = state.sources.kafka.as_ref().map(|k| k.clusters()).unwrap_or_default();
    json!({ "items": clusters.iter().map(|c| json!({
        "name": c.name,
        "needed": c.needed,
        "checked": c.checked,
        "connected": c.connected,
        "last_error": c.last_error,
        "probe_failures": c.probe_failures,
        "missing_topics": c.missing_topics.iter().map(|(m, t)| json!({"mapping": m, "topic": t})).collect::<Vec<_>>(),
    })).collect::<Vec<_>>() })
}

/// The node's cluster as its heartbeats say (`null` when it is in none).
fn cluster_json(state: &State) -> Value {
    let Some(v) = state.sources.kafka.as_ref().and_then(|k| k.cluster()) else { return Value::Null };
    json!({
        "name": v.name,
        "node": v.node,
        "topics_ready": v.topics_ready,
        "last_error": v.last_error,
        "members": v.members,
        "floor": v.floor,
        "sessions_adopted": v.sessions_adopted,
        "adopted_messages": v.adopted_messages,
        "adopted_left_out": v.adopted_left_out,
        "adoptions_incomplete": v.adoptions_incomplete,
        "settled": v.settled,
        "wills_held": v.wills_held,
        "wills_published": v.wills_published,
        "wills_released_again": v.wills_released_again,
        "wills_refused": v.wills_refused,
        "sessions_refused": v.sessions_refused,
        "shares_refused": v.shares_refused,
        "adoptions_refused": v.adoptions_refused,
        "ends_refused": v.ends_refused,
    })
}

async fn spill(state: &State) -> Result<Resp, ApiError> {
    let snaps = snapshots(state).await?;
    Ok(json_resp(
        StatusCode::OK,
        &json!({
            "max_bytes_per_shard": state.sources.spill_max_bytes,
            "items": snaps.iter().map(|s| json!({
                "shard": s.shard,
                "enabled": s.spill.is_some(),
                "spilling": s.spilling,
                "records": s.spill.map_or(0, |x| x.0),
                "disk_bytes": s.spill.map_or(0, |x| x.1),
                "replayed": s.spill.map_or(0, |x| x.2),
                "kafka_in_flight": s.kafka_pending,
            })).collect::<Vec<_>>(),
        }),
    ))
}

/// Ready: every listener bound, and every cluster a mapping needs answering — or, while one
/// does not, the outage path at work: some shard spilling (publishers acknowledged from disk)
/// and no shard's log at its limit. An idle broker whose Kafka is gone is not ready: nothing
/// has shown that its spill log takes the records.
pub(crate) async fn readyz(state: &State) -> Resp {
    let (bound, expected) = state.sources.listeners.counts();
    let listeners_up = bound >= expected;
    let clusters = state.sources.kafka.as_ref().map(|k| k.clusters()).unwrap_or_default();
    let kafka_ok = clusters.iter().filter(|c| c.needed).all(|c| c.connected);
    let mut spill_ok = false;
    if !kafka_ok {
        if let Ok(snaps) = snapshots(state).await {
            spill_ok = snaps.iter().any(|s| s.spilling)
                && snaps.iter().all(|s| s.spill.is_none_or(|x| x.1 < state.sources.spill_max_bytes));
        }
    }
    let missing: Vec<Value> = clusters
        .iter()
        .flat_map(|c| c.missing_topics.iter().map(move |(m, t)| json!({"cluster": c.name, "mapping": m, "topic": t})))
        .collect();
    let ready = listeners_up && (kafka_ok || spill_ok);
    let body = json!({
        "ready": ready,
        "listeners": { "bound": bound, "expected": expected, "up": listeners_up },
        "kafka": clusters.iter().filter(|c| c.needed).map(|c| json!({
            "cluster": c.name, "connected": c.connected, "last_error": c.last_error,
        })).collect::<Vec<_>>(),
        "spilling_within_limit": spill_ok,
        "missing_topics": missing,
    });
    json_resp(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_percent_decoded_and_a_bad_escape_refused() {
        assert_eq!(percent_decode("car%2F1%20x").unwrap(), "car/1 x");
        assert!(percent_decode("bad%zz").is_err());
        assert!(percent_decode("cut%4").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut b = [0u64; sluice_core::shard::LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(quantile(&b, 0.5), None);
        b[1] = 98; // ≤ 1 ms
        b[6] = 2; // ≤ 50 ms
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        assert_eq!(quantile(&b, 0.99), Some(0.05));
    }
}
