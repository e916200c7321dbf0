// The Grex dashboard: reads the node's JSON API every two seconds and draws the cluster.
// Rates and latency quantiles come from the difference between two readings of each node's
// counters (as Prometheus's rate() and histogram_quantile() do).
"use strict";

const POLL_MS = 2000;
const HISTORY = 90; // points kept for the charts (three minutes)
// Upper bounds of the latency buckets, in seconds (grex_client::proto::LATENCY_BOUNDS_S).
const BOUNDS = Array.from({ length: 16 }, (_, i) => 0.00005 * 2 ** i);
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f",
  "#bab0ac", "#e15759"];

const state = {
  token: sessionStorage.getItem("grex-token") || "",
  previous: new Map(), // node id -> {at, jobs, latency}
  history: [], // {at, rate, p50, p99}
  colors: new Map(), // node id -> color
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function short(id) {
  return id ? id.slice(0, 8) : "—";
}

function colorOf(id) {
  if (!state.colors.has(id)) state.colors.set(id, PALETTE[state.colors.size % PALETTE.length]);
  return state.colors.get(id);
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.code || "", body.error || response.statusText);
  return body;
}

// The latency under which fraction q of the jobs between two readings fell (seconds).
function quantile(before, after, q) {
  const counts = after.map((n, i) => n - ((before && before[i]) || 0));
  const total = counts.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  const rank = q * total;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    const n = counts[i];
    if (n > 0 && seen + n >= rank) {
      if (i >= BOUNDS.length) return BOUNDS[BOUNDS.length - 1];
      const lower = i === 0 ? 0 : BOUNDS[i - 1];
      return lower + (BOUNDS[i] - lower) * Math.min(1, Math.max(0, (rank - seen) / n));
    }
    seen += n;
  }
  return BOUNDS[BOUNDS.length - 1];
}

const ms = (seconds) => (seconds == null ? "—" : (seconds * 1000).toFixed(seconds < 0.001 ? 3 : 1));
const mib = (bytes) => `${(bytes / 1048576).toFixed(1)} MiB`;
const time = (atMs) => new Date(atMs).toLocaleTimeString();

// Per-node rates since the last reading, and the cluster's.
function rates(stats) {
  const perNode = new Map();
  let jobs = 0;
  let seconds = 0;
  let before = null;
  let after = null;
  for (const member of stats.members) {
    const s = member.stats;
    if (!s) continue;
    const done = s.status.jobs_ok + s.status.jobs_failed;
    const last = state.previous.get(member.id);
    state.previous.set(member.id, { at: stats.at_ms, jobs: done, latency: s.latency });
    if (!last || stats.at_ms <= last.at || done < last.jobs) continue;
    const dt = (stats.at_ms - last.at) / 1000;
    const rate = (done - last.jobs) / dt;
    perNode.set(member.id, {
      rate,
      p50: quantile(last.latency, s.latency, 0.5),
      p99: quantile(last.latency, s.latency, 0.99),
    });
    jobs += done - last.jobs;
    seconds = Math.max(seconds, dt);
    before = (before || s.latency.map(() => 0)).map((n, i) => n + (last.latency[i] || 0));
    after = (after || s.latency.map(() => 0)).map((n, i) => n + s.latency[i]);
  }
  const cluster = seconds > 0
    ? { at: stats.at_ms, rate: jobs / seconds, p50: after && quantile(before, after, 0.5), p99: after && quantile(before, after, 0.99) }
    : null;
  return { perNode, cluster };
}

function drawChart(canvas, series, format, floor) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 48, right: 8, top: 8, bottom: 18 };
  ctx.clearRect(0, 0, width, height);
  const values = series.flatMap((s) => s.points.filter((v) => v != null));
  const max = Math.max(floor, ...values) * 1.15;
  ctx.strokeStyle = "#ddd";
  ctx.fillStyle = "#555";
  ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + ((height - pad.top - pad.bottom) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.left, y);
    ctx.lineTo(width - pad.right, y);
    ctx.stroke();
    ctx.fillText(format(max * (1 - i / 4)), 2, y + 4);
  }
  const times = state.history.filter(Boolean).map((h) => h.at);
  const span = times.length > 1 ? Math.round((times[times.length - 1] - times[0]) / 1000) : 0;
  ctx.fillText(`the last ${span} s`, pad.left, height - 4);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    s.points.forEach((v, i) => {
      const x = pad.left + ((width - pad.left - pad.right) * i) / Math.max(1, HISTORY - 1);
      if (v == null) {
        drawing = false;
        return;
      }
      const y = height - pad.bottom - ((height - pad.top - pad.bottom) * v) / max;
      if (drawing) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  }
}

function renderCharts() {
  const points = (key) => state.history.map((h) => (h ? h[key] : null));
  drawChart(document.getElementById("rate-chart"), [{ color: "#4e79a7", points: points("rate") }], (v) => v.toFixed(v < 10 ? 1 : 0), 1);
  drawChart(
    document.getElementById("latency-chart"),
    [{ color: "#59a14f", points: points("p50") }, { color: "#e15759", points: points("p99") }],
    (v) => (v * 1000).toFixed(v < 0.01 ? 2 : 0),
    0.001,
  );
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

function renderNodes(stats, nodes, perNode) {
  const info = new Map((nodes ? nodes.nodes : []).map((n) => [n.id, n]));
  const rows = stats.members.map((member) => {
    const n = info.get(member.id) || {};
    const s = member.stats;
    const r = perNode.get(member.id);
    const reach = member.alive ? "up" : "down";
    return el(
      "tr",
      { "data-node": member.id, "data-alive": String(member.alive), class: member.alive ? "" : "down" },
      el("td", { title: member.id }, el("span", { class: "swatch", style: `background:${colorOf(member.id)}` }),
        el("a", { href: member.http ? `${member.http}/ui` : "#" }, short(member.id)),
        member.id === stats.node ? " (this node)" : ""),
      el("td", { title: n.meta_voter ? "votes in the meta group (membership, the flock map, users)" : "" },
        n.state || "active", n.meta_voter ? el("span", { class: "tag" }, "meta") : ""),
      el("td", { class: `reach ${reach}` }, reach),
      el("td", {}, n.zone || "—"),
      el("td", {}, s ? s.status.version : n.version || "—"),
      el("td", {}, n.flocks ?? "—"),
      el("td", {}, s ? s.leads.length : n.leads ?? "—"),
      el("td", { class: "num" }, r ? r.rate.toFixed(1) : "—"),
      el("td", { class: "num" }, r ? ms(r.p50) : "—"),
      el("td", { class: "num" }, r ? ms(r.p99) : "—"),
      el("td", { class: "num" }, s ? s.status.jobs_running : "—"),
      el("td", { class: "num" }, s ? s.apply_lag : "—"),
      el("td", { class: "num" }, s ? mib(s.status.cache_bytes) : "—"),
      el("td", { class: "quiet why" }, member.error || ""),
    );
  });
  fill("nodes", rows);
}

function renderFlocks(flocks, stats) {
  const lags = new Map();
  for (const member of stats.members) {
    for (const lead of member.stats ? member.stats.leads : []) lags.set(lead.flock, lead.lag);
  }
  const alive = new Map(stats.members.map((m) => [m.id, m.alive]));
  let led = 0;
  let settled = 0;
  const cells = flocks.flocks.map((f) => {
    const leader = f.leader && alive.get(f.leader) !== false ? f.leader : null;
    if (leader) led++;
    if (f.settled) settled++;
    const lag = lags.get(f.flock);
    const classes = ["flock", leader ? "" : "leaderless", f.settled ? "" : "moving"].filter(Boolean).join(" ");
    const title = `flock ${f.flock}\nleader: ${leader || "none"}\nherders: ${f.herders.join(", ")}\n` +
      `${f.settled ? "settled" : "moving"}${lag != null ? `\nlag: ${lag} entries` : ""}`;
    return el("div", {
      class: classes,
      "data-flock": String(f.flock),
      "data-leader": leader || "",
      title,
      style: leader ? `background:${colorOf(leader)}` : "",
    }, String(f.flock), lag ? el("small", {}, ` +${lag}`) : "");
  });
  document.getElementById("flocks").replaceChildren(...cells);
  document.getElementById("flock-summary").textContent =
    `${flocks.flocks.length} flocks · ${led} led · ${settled} settled · map version ${flocks.version}`;
  const legend = stats.members.map((m) =>
    el("span", { class: "legend" }, el("span", { class: "swatch", style: `background:${colorOf(m.id)}` }), short(m.id)));
  legend.push(el("span", { class: "legend" }, el("span", { class: "swatch leaderless" }), "no leader"));
  document.getElementById("legend").replaceChildren(...legend);
}

function renderErrors(stats) {
  const failed = stats.members.flatMap((m) => (m.stats ? m.stats.failed.map((j) => ({ node: m.id, ...j })) : []));
  failed.sort((a, b) => b.at_ms - a.at_ms);
  fill("errors", failed.slice(0, 20).map((j) => el("tr", {},
    el("td", {}, time(j.at_ms)), el("td", {}, short(j.node)), el("td", {}, j.module),
    el("td", { class: "mono" }, j.bucket_hash), el("td", { class: "error" }, j.error || ""),
    el("td", { class: "num" }, (j.total_us / 1000).toFixed(1)))));
}

function renderSlowest(recent) {
  fill("slowest", recent.slowest.slice(0, 10).map((j) => el("tr", {},
    el("td", {}, time(j.at_ms)), el("td", {}, j.module), el("td", { class: "mono" }, j.bucket_hash),
    el("td", { class: "num" }, (j.queue_us / 1000).toFixed(1)), el("td", { class: "num" }, (j.run_us / 1000).toFixed(1)),
    el("td", { class: "num" }, (j.commit_us / 1000).toFixed(1)), el("td", { class: "num" }, (j.total_us / 1000).toFixed(1)))));
}

function renderModules(modules) {
  fill("modules", modules.modules.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", { class: "mono" }, m.id.slice(0, 23) + "…"), el("td", { class: "num" }, `${m.size} B`))));
}

function problem(message) {
  const box = document.getElementById("problem");
  box.hidden = !message;
  box.textContent = message || "";
}

async function refresh() {
  try {
    const [stats, flocks, recent, modules] = await Promise.all([
      api("/v1/cluster/stats"), api("/v1/flocks"), api("/v1/jobs/recent"), api("/v1/modules"),
    ]);
    // A lone node has no members list to read; the stats say all there is.
    const nodes = await api("/v1/cluster/nodes").catch(() => null);
    const { perNode, cluster } = rates(stats);
    state.history.push(cluster);
    if (state.history.length > HISTORY) state.history.shift();
    const up = stats.members.filter((m) => m.alive).length;
    document.getElementById("summary").textContent =
      `${stats.members.length} nodes, ${up} up · ${flocks.flocks.length} flocks · answered by ${short(stats.node)}` +
      (cluster ? ` · ${cluster.rate.toFixed(1)} jobs/s, p99 ${ms(cluster.p99)} ms` : "");
    document.getElementById("updated").textContent = `updated ${time(stats.at_ms)}`;
    document.body.dataset.members = String(stats.members.length);
    document.body.dataset.up = String(up);
    renderNodes(stats, nodes, perNode);
    renderFlocks(flocks, stats);
    renderErrors(stats);
    renderSlowest(recent);
    renderModules(modules);
    renderCharts();
    document.getElementById("sign-in").hidden = true;
    problem(null);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
      document.getElementById("sign-in").hidden = false;
      problem(`${e.message}`);
    } else {
      problem(`cannot reach this node: ${e.message}`);
    }
  }
}

document.getElementById("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("grex-token", state.token);
  refresh();
});

async function loop() {
  await refresh();
  setTimeout(loop, POLL_MS);
}
loop();
