// sluice dashboard: polls the admin API once a second, charts rates with uPlot, and shows the
// live message view from /api/v1/live (Server-Sent Events). No build step, no dependencies but
// uPlot (embedded beside this file).
"use strict";

const POINTS = 120; // two minutes at one poll a second
const $ = (sel) => document.querySelector(sel);
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };

async function api(path, opts) {
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

// ---- pages -------------------------------------------------------------------------------
function showPage() {
  const name = (location.hash || "#overview").slice(1);
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === "page-" + name));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === name));
  if (name === "clients") loadClients(false);
}
window.addEventListener("hashchange", showPage);

// ---- charts ------------------------------------------------------------------------------
function makeChart(target, labels) {
  const data = [[]].concat(labels.map(() => []));
  const opts = {
    width: 520, height: 200,
    series: [{}].concat(labels.map((l, i) => ({ label: l, stroke: ["#2f7bd8", "#e0812f", "#26a269", "#c0262d"][i % 4], width: 2 }))),
    axes: [{}, { size: 60 }],
    scales: { x: { time: true } },
  };
  const plot = new uPlot(opts, data, document.getElementById(target));
  return {
    plot, data,
    push(t, values) {
      data[0].push(t);
      values.forEach((v, i) => data[i + 1].push(v));
      if (data[0].length > POINTS) data.forEach((s) => s.shift());
      plot.setData(data);
    },
  };
}

const charts = {
  messages: makeChart("chart-messages", ["in", "out"]),
  kafka: makeChart("chart-kafka", ["produced", "failed"]),
  connections: makeChart("chart-connections", ["connections"]),
  errors: makeChart("chart-errors", ["dropped/s", "spill records"]),
};
let mappingChart = null;
window.sluiceCharts = charts; // the browser test reads how many points the charts have

// ---- overview ----------------------------------------------------------------------------
let last = null;
async function pollOverview() {
  const o = await api("/api/v1/overview");
  const now = Date.now() / 1000;
  if (last) {
    const dt = Math.max(now - last.t, 0.001);
    const rate = (k) => Math.max(0, (o[k] - last.o[k]) / dt);
    charts.messages.push(now, [rate("messages_received"), rate("messages_sent")]);
    charts.kafka.push(now, [rate("kafka_records_produced"), rate("kafka_records_failed")]);
    charts.connections.push(now, [o.connections]);
    charts.errors.push(now, [rate("messages_dropped"), o.spill_records]);
  }
  last = { t: now, o };
  const cards = $("#cards");
  cards.replaceChildren();
  for (const [k, label] of [["clients_connected", "clients"], ["sessions", "sessions"], ["subscriptions", "subscriptions"],
    ["retained", "retained"], ["messages_received", "messages in"], ["messages_sent", "messages out"],
    ["kafka_records_produced", "into Kafka"], ["kafka_records_failed", "Kafka failures"], ["messages_dropped", "dropped"],
    ["spill_records", "spill backlog"], ["auth_failures", "auth failures"]]) {
    const c = el("div", undefined, "card");
    c.append(el("div", String(o[k]), "v"), el("div", label, "k"));
    cards.append(c);
  }
  $("#status").textContent = o.shards + " shards, up " + o.uptime_secs + " s";
}

// ---- mappings, clusters, spill -----------------------------------------------------------
let lastMappings = null;
function cell(tr, text, cls) { tr.append(el("td", text === null || text === undefined ? "–" : String(text), cls)); }
const ms = (s) => (s === null || s === undefined ? null : (s * 1000).toFixed(1) + " ms");

async function pollMappings() {
  const m = await api("/api/v1/mappings");
  const now = Date.now() / 1000;
  const outBody = $("#out-mappings tbody"), inBody = $("#in-mappings tbody");
  outBody.replaceChildren(); inBody.replaceChildren();
  const rates = [];
  const names = [];
  for (const map of m.items.filter((x) => x.direction === "mqtt_to_kafka")) {
    const rows = map.clusters.length ? map.clusters : [{ cluster: map.destinations.map((d) => d.cluster).join(", ") }];
    for (const c of rows) {
      const key = map.name + "/" + c.cluster;
      const prev = lastMappings ? lastMappings.values[key] : undefined;
      const rate = prev !== undefined ? Math.max(0, ((c.records_produced || 0) - prev) / Math.max(now - lastMappings.t, 0.001)) : 0;
      rates.push(rate); names.push(key);
      const tr = el("tr");
      cell(tr, map.name); cell(tr, map.filters.join(" ")); cell(tr, c.cluster); cell(tr, rate.toFixed(1));
      cell(tr, c.records_produced || 0); cell(tr, ms(c.ack_latency_p50_seconds)); cell(tr, ms(c.ack_latency_p99_seconds));
      cell(tr, c.records_failed || 0, c.records_failed ? "bad" : ""); cell(tr, c.records_retried || 0); cell(tr, map.dead_lettered);
      cell(tr, map.missing_topics.length ? "missing topic: " + map.missing_topics.join(", ") : "ok", map.missing_topics.length ? "bad" : "ok");
      outBody.append(tr);
    }
  }
  const prevIn = lastMappings ? lastMappings.nextIn : undefined;
  lastMappings = { t: now, values: {}, prevIn, nextIn: {} };
  const inRates = lastMappings.nextIn;
  for (const map of m.items.filter((x) => x.direction === "mqtt_to_kafka")) for (const c of map.clusters) lastMappings.values[map.name + "/" + c.cluster] = c.records_produced;
  if (names.length) {
    if (!mappingChart || mappingChart.names !== names.join("|")) {
      document.getElementById("chart-mappings").replaceChildren();
      mappingChart = makeChart("chart-mappings", names);
      mappingChart.names = names.join("|");
    }
    mappingChart.push(now, rates);
  }
  for (const map of m.items.filter((x) => x.direction === "kafka_to_mqtt")) {
    const tr = el("tr");
    const lag = map.partitions.reduce((a, p) => a + p.lag, 0);
    const key = "in:" + map.name;
    const prev = lastMappings.prevIn ? lastMappings.prevIn[key] : undefined;
    const rate = prev !== undefined ? Math.max(0, (map.records_read - prev.v) / Math.max(now - prev.t, 0.001)) : 0;
    inRates[key] = { v: map.records_read, t: now };
    cell(tr, map.name); cell(tr, map.cluster); cell(tr, map.kafka_topics.join(" ") || map.kafka_topic_pattern);
    cell(tr, rate.toFixed(1)); cell(tr, map.records_read); cell(tr, map.messages_published); cell(tr, map.records_skipped); cell(tr, lag);
    cell(tr, map.missing_topics.length ? "missing topic: " + map.missing_topics.join(", ") : "ok", map.missing_topics.length ? "bad" : "ok");
    inBody.append(tr);
  }
  const cl = await api("/api/v1/clusters");
  const cBody = $("#clusters tbody");
  cBody.replaceChildren();
  for (const c of cl.items) {
    const tr = el("tr");
    cell(tr, c.name); cell(tr, !c.checked ? "checking" : c.connected ? "connected" : "unreachable", c.connected ? "ok" : "bad");
    cell(tr, c.last_error); cell(tr, c.probe_failures); cell(tr, c.missing_topics.map((m) => m.topic + " (" + m.mapping + ")").join(", "));
    cBody.append(tr);
  }
  const sp = await api("/api/v1/spill");
  const sBody = $("#spill tbody");
  sBody.replaceChildren();
  for (const s of sp.items) {
    const tr = el("tr");
    cell(tr, s.shard); cell(tr, s.spilling ? "yes" : "no", s.spilling ? "bad" : ""); cell(tr, s.records); cell(tr, s.disk_bytes); cell(tr, s.replayed); cell(tr, s.kafka_in_flight);
    sBody.append(tr);
  }
}

// ---- clients -----------------------------------------------------------------------------
let clientsAfter = "";
async function loadClients(more) {
  if (!more) clientsAfter = "";
  const q = new URLSearchParams({ search: $("#client-q").value, limit: "50" });
  if (clientsAfter) q.set("after", clientsAfter);
  const page = await api("/api/v1/clients?" + q);
  const body = $("#clients tbody");
  if (!more) body.replaceChildren();
  for (const c of page.items) {
    const tr = el("tr");
    const id = el("td"); const a = el("a", c.client_id); a.href = "#clients"; a.className = "client-link";
    a.addEventListener("click", (e) => { e.preventDefault(); details(c.client_id); });
    id.append(a); tr.append(id);
    cell(tr, c.protocol); cell(tr, c.shard); cell(tr, c.subscription_count); cell(tr, c.inflight); cell(tr, c.queued);
    const td = el("td"); const b = el("button", "Disconnect"); b.className = "disconnect"; b.dataset.client = c.client_id;
    b.addEventListener("click", async () => {
      try { await api("/api/v1/clients/" + encodeURIComponent(c.client_id), { method: "DELETE" }); tr.remove(); }
      catch (e) { $("#client-details").textContent = e.message; }
    });
    td.append(b); tr.append(td); body.append(tr);
  }
  clientsAfter = page.next_after || "";
  $("#clients-more").hidden = !page.next_after;
}
async function details(id) {
  try { $("#client-details").textContent = JSON.stringify(await api("/api/v1/clients/" + encodeURIComponent(id)), null, 2); }
  catch (e) { $("#client-details").textContent = e.message; }
}
$("#client-search").addEventListener("submit", (e) => { e.preventDefault(); loadClients(false); });
$("#clients-more").addEventListener("click", () => loadClients(true));

// ---- live view ---------------------------------------------------------------------------
let live = null;
const LIVE_ROWS = 200;
function text(v) { return v === null || v === undefined ? "" : typeof v === "string" ? v : "base64:" + v.base64; }
function stopLive() { if (live) { live.close(); live = null; } $("#live-state").textContent = "stopped"; }
$("#live-stop").addEventListener("click", stopLive);
$("#live-form").addEventListener("submit", (e) => {
  e.preventDefault();
  stopLive();
  live = new EventSource("/api/v1/live?filter=" + encodeURIComponent($("#live-filter").value));
  $("#live-state").textContent = "watching";
  live.addEventListener("stats", (ev) => { const s = JSON.parse(ev.data); if (s.skipped) $("#live-state").textContent = "watching (" + s.skipped + " not sampled)"; });
  live.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    const tr = el("tr");
    tr.className = "live-row";
    cell(tr, new Date(m.time_ms).toISOString().slice(11, 23)); cell(tr, m.topic);
    tr.append(el("td", text(m.payload), "payload")); cell(tr, m.qos); cell(tr, m.client_id);
    cell(tr, m.kafka.length ? m.kafka.map((k) => k.cluster + ":" + k.topic + (k.partition === null ? " (partition: " + k.partition_by + ")" : " partition " + k.partition) +
      " key=" + text(k.key) + " headers=" + k.headers.map((h) => h[0] + "=" + text(h[1])).join(",")).join(" | ") : "not bridged");
    const body = $("#live tbody");
    body.prepend(tr);
    while (body.children.length > LIVE_ROWS) body.lastChild.remove();
  };
  live.onerror = () => { $("#live-state").textContent = "reconnecting"; };
});

// ---- main loop ---------------------------------------------------------------------------
async function tick() {
  try { await pollOverview(); await pollMappings(); }
  catch (e) { $("#status").textContent = "error: " + e.message; console.error("dashboard poll failed:", e); }
}
showPage();
tick();
setInterval(tick, 1000);
