// stoker dashboard: draws /api/* as pages (runs, a run, compare, jobs, a job, models).
// Plain JavaScript with no library: every text goes in through textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#c2410c", "#1849a9", "#067647", "#9e77ed", "#b42318", "#0e9384", "#854a0e", "#475467"];
const SVG_NS = "http://www.w3.org/2000/svg";
const SVG_TAGS = new Set(["svg", "g", "line", "polyline", "text", "rect", "circle", "title"]);
let key = localStorage.getItem("stoker-dashboard-key") || "";
let info = { auth: false, actions: false, servers: [] };
let poller = null;  // the current page's refresh, stopped when the page changes

// --- small helpers ------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = SVG_TAGS.has(tag) ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function num(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e15) return v.toLocaleString("en");
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return v.toLocaleString("en", { maximumSignificantDigits: digits });
}
function si(v) {
  if (v === null || v === undefined) return "–";
  for (const [d, s] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (Math.abs(v) >= d) return (v / d).toFixed(1) + s;
  return num(v);
}
function bytes(v) {
  if (v === null || v === undefined) return "–";
  for (const [d, s] of [[2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]]) if (v >= d) return (v / d).toFixed(1) + " " + s;
  return v + " B";
}
function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }
function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000), s = (Date.now() / 1000 - t);
  const clock = d.toLocaleTimeString("en-GB");
  return s < 86400 ? clock : d.toISOString().slice(0, 10) + " " + clock;
}
// A command line as a shell would take it back: arguments with spaces or quotes in single quotes.
function shellJoin(args) {
  return args.map(a => /^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'").join(" ");
}
function state(s) { return h("span", { class: "state " + s, text: s }); }
function table(head, rows, numeric = []) {
  return h("table", {}, h("thead", {}, h("tr", {}, head.map(c => h("th", { text: c })))),
    h("tbody", {}, rows.map(r => h("tr", {}, r.map((c, i) =>
      h("td", { class: numeric.includes(i) ? "num" : null }, c))))));
}
function kv(pairs) {
  return h("table", { class: "kv" }, h("tbody", {}, pairs.map(([k, v]) => h("tr", {}, h("td", { text: k }), h("td", {}, v)))));
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}), used = key;
  if (key) headers["Authorization"] = "Bearer " + key;
  if (options.body) headers["Content-Type"] = "application/json";
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) {
    if (used !== key) return api(path, options);  // a key was given while this was on its way
    askKey(used ? "that key was refused; enter the dashboard's API key" : "this dashboard needs its API key");
    throw new Error("API key needed");
  }
  if (options.raw) return r;
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function askKey(message) {
  document.getElementById("key-form").classList.remove("hidden");
  document.getElementById("key-message").textContent = message;
}

function setStatus(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = bad ? "error" : "";
}

// --- charts -------------------------------------------------------------------------------

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(+v.toPrecision(12));
  return out;
}

function extent(values) {  // [min, max] without spreading (an argument list has a size limit)
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

// Screen points of a series; beyond two per pixel column, each column keeps its lowest and
// highest point (in their order), so a long run draws fast and its spikes stay visible.
function thin(xs, ys, px, py, width) {
  const all = [];
  xs.forEach((x, i) => { const y = ys[i]; if (y !== null && isFinite(y)) all.push([px(x), py(y)]); });
  if (all.length <= 2 * width) return all;
  const out = [];
  let col = null, lo = null, hi = null;
  const flush = () => { if (lo) { if (lo === hi) out.push(lo); else out.push(...(lo[0] <= hi[0] ? [lo, hi] : [hi, lo])); } };
  for (const p of all) {
    const c = Math.floor(p[0]);
    if (c !== col) { flush(); col = c; lo = hi = p; continue; }
    if (p[1] > lo[1]) lo = p;  // screen y grows downwards: the lowest value has the largest y
    if (p[1] < hi[1]) hi = p;
  }
  flush();
  return out;
}

// series: [{name, xs, ys, color, dash}] -> an SVG line chart; `data-points` counts the drawn points.
function chart(title, series, opts = {}) {
  const W = opts.width || 440, H = opts.height || 240, L = 56, R = 12, T = 24, B = 34;
  let xs = [], ys = [], points = 0;
  for (const s of series) s.xs.forEach((x, i) => { const y = s.ys[i]; if (y !== null && isFinite(y)) { xs.push(x); ys.push(y); } });
  const svg = h("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(h("text", { class: "title", x: L, y: 15, text: title }));
  if (!xs.length) {
    svg.append(h("text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no points yet" }));
    svg.setAttribute("data-points", "0");
    return svg;
  }
  let [x0, x1] = extent(xs), [y0, y1] = extent(ys);
  if (opts.zero) y0 = Math.min(0, y0);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of ticks(y0, y1)) {
    svg.append(h("line", { class: "grid", x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    svg.append(h("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end", text: opts.percent ? (100 * t).toFixed(1) + "%" : si(t) }));
  }
  for (const t of ticks(x0, x1, 4)) svg.append(h("text", { x: px(t), y: H - B + 16, "text-anchor": "middle", text: si(t) }));
  svg.append(h("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(h("text", { x: W - R, y: H - 4, "text-anchor": "end", text: opts.xlabel || "step" }));
  series.forEach((s, k) => {
    const pts = thin(s.xs, s.ys, px, py, W - L - R).map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`);
    points += pts.length;
    const color = s.color || COLORS[k % COLORS.length];
    svg.append(h("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.5,
      "stroke-dasharray": s.dash ? "5 3" : null, "data-series": s.name }));
    if (pts.length === 1 || (s.markers && pts.length <= 300)) for (const p of pts) { const [cx, cy] = p.split(","); svg.append(h("circle", { cx, cy, r: 2.5, fill: color })); }
    if (series.length > 1 || s.name) {
      const ly = T + 4 + 14 * k;
      svg.append(h("line", { x1: W - R - 120, x2: W - R - 104, y1: ly, y2: ly, stroke: color, "stroke-width": 2, "stroke-dasharray": s.dash ? "5 3" : null }));
      svg.append(h("text", { x: W - R - 100, y: ly + 4, text: s.name.length > 18 ? s.name.slice(0, 17) + "…" : s.name }));
    }
  });
  svg.setAttribute("data-points", String(points));
  svg.setAttribute("data-last-x", String(extent(xs)[1]));
  return svg;
}

// Memory per rank from layout.json: model state (params, grads, optimizer) and peak memory,
// each rank a labelled line and two bars on one scale.
function memoryChart(perRank) {
  const kinds = [["params", "#1849a9"], ["grads", "#9e77ed"], ["optimizer", "#0e9384"]];
  const W = 440, L = 12, R = 12, rowH = 46, H = 44 + rowH * perRank.length;
  const peak = r => r.peak_cuda || r.peak_rss || 0;
  const state = r => kinds.reduce((a, [k]) => a + (r[k] || 0), 0);
  const max = Math.max(1, ...perRank.map(r => Math.max(state(r), peak(r))));
  const sx = v => Math.max(v > 0 ? 1 : 0, v / max * (W - L - R));
  const svg = h("svg", { class: "chart", width: W, height: H, role: "img", "aria-label": "memory per rank" },
    h("text", { class: "title", x: L, y: 15, text: "memory per rank" }));
  perRank.forEach((r, i) => {
    const y = 24 + i * rowH;
    svg.append(h("text", { x: L, y: y + 10, text: `rank ${i}: params ${bytes(r.params)}, grads ${bytes(r.grads)}, ` +
      `optimizer ${bytes(r.optimizer)}; ${r.peak_cuda ? "peak GPU" : "peak RSS"} ${bytes(peak(r))}` }));
    let x = L;
    for (const [k, color] of kinds) {
      const w = sx(r[k] || 0);
      svg.append(h("rect", { x, y: y + 15, width: w, height: 10, fill: color }, h("title", { text: `${k} ${bytes(r[k])}` })));
      x += w;
    }
    svg.append(h("rect", { x: L, y: y + 28, width: sx(peak(r)), height: 10, fill: "#f79009" }, h("title", { text: `peak ${bytes(peak(r))}` })));
  });
  const ly = H - 8;
  [...kinds, ["peak", "#f79009"]].forEach(([k, color], i) => {
    svg.append(h("rect", { x: L + i * 90, y: ly - 9, width: 10, height: 10, fill: color }), h("text", { x: L + 14 + i * 90, y: ly, text: k }));
  });
  return svg;
}

// --- pages --------------------------------------------------------------------------------

const main = () => document.getElementById("main");

async function runsPage(view) {
  const picked = new Set();  // kept across refreshes
  const compare = h("button", { disabled: true, id: "compare", onclick: () => { location.hash = "#/compare/" + [...picked].map(encodeURIComponent).join(","); } }, "Compare selected");
  const draw = async () => {
    const runs = await api("/api/runs");
    const rows = runs.map(r => [
      h("input", { type: "checkbox", "data-run": r.name, checked: picked.has(r.name), onchange: e => { e.target.checked ? picked.add(r.name) : picked.delete(r.name); compare.disabled = picked.size < 2; } }),
      h("a", { href: "#/runs/" + encodeURIComponent(r.name), text: r.name }), state(r.state), r.model, si(r.params),
      r.layout || "–", `${num(r.step)} / ${num(r.steps)}`, si(r.tokens), num(r.loss, 4), num(r.val_loss, 4), pct(r.mfu),
      si(r.tokens_per_s), String(r.checkpoints), String(r.adapters), when(r.updated)]);
    view.replaceChildren(h("h1", { text: "Runs" }), h("p", { class: "muted", text: `run directories under ${info.runs || "the runs directory"}` }),
      runs.length ? table(["", "run", "state", "model", "params", "layout", "step", "tokens", "loss", "val loss", "MFU", "tok/s", "ckpts", "adapters", "updated"], rows, [4, 6, 7, 8, 9, 10, 11, 12, 13])
        : h("p", { text: "No runs yet: `stoker train` writes one (train.out_dir) under this directory." }),
      h("div", { class: "toolbar" }, compare, h("span", { class: "muted", text: "pick two or more runs to plot their losses together" })));
  };
  await draw();
  let ticks = 0;
  return async () => { if (++ticks % 3 === 0) await draw(); };  // every 6 s: each run's files are read
}

// Live metrics of one run: fetches only what was appended since the last call.
function metricsFeed(name) {
  const feed = { train: null, val: null, offset: 0, inode: null };
  feed.pull = async () => {
    const q = `?offset=${feed.offset}` + (feed.inode === null ? "" : `&inode=${feed.inode}`);
    const m = await api(`/api/runs/${encodeURIComponent(name).replace(/%2F/g, "/")}/metrics${q}`);
    if (m.reset || !feed.train) { feed.train = m.train; feed.val = m.val; }
    else {
      for (const k in m.train) for (const x of m.train[k]) feed.train[k].push(x);  // no spread: a long gap may bring 100k+
      for (const k in m.val) for (const x of m.val[k]) feed.val[k].push(x);
    }
    feed.offset = m.offset; feed.inode = m.inode;
    return m.train.step.length + m.val.step.length;
  };
  return feed;
}

async function runPage(view, name) {
  const path = encodeURIComponent(name).replace(/%2F/g, "/");
  const feed = metricsFeed(name);
  let run = await api("/api/runs/" + path);
  await feed.pull();
  const charts = h("div", { class: "charts", id: "charts" }), head = h("div", {});
  const draw = () => {
    const t = feed.train, v = feed.val;
    charts.replaceChildren(
      chart("loss", [{ name: "train", xs: t.step, ys: t.loss }, { name: "validation", xs: v.step, ys: v.val_loss, dash: true, markers: true }], { id: "loss" }),
      chart("learning rate", [{ name: "", xs: t.step, ys: t.lr }]),
      chart("throughput (tokens/s)", [{ name: "", xs: t.step, ys: t.tokens_per_s }], { zero: true }),
      chart("MFU", [{ name: "", xs: t.step, ys: t.mfu }], { zero: true, percent: true }),
      chart("gradient norm", [{ name: "", xs: t.step, ys: t.grad_norm }]),
      run.layout_detail && run.layout_detail.per_rank ? memoryChart(run.layout_detail.per_rank) : h("p", { class: "muted", text: "no layout.json yet (written after the first step)" }));
    charts.firstChild.id = "loss-chart";
  };
  const drawHead = () => head.replaceChildren(kv([
    ["state", state(run.state)], ["model", `${run.model}, ${si(run.params)} parameters`],
    ["layout", `${run.layout || "–"}${run.world > 1 ? ` (${run.world} processes)` : ""}`], ["tuning", run.method],
    ["step", `${num(run.step)} of ${num(run.steps)}`], ["tokens", si(run.tokens)], ["loss", num(run.loss, 4)],
    ["validation loss", num(run.val_loss, 4)], ["MFU", pct(run.mfu)], ["tokens/s", si(run.tokens_per_s)]]));
  drawHead(); draw();
  const ckpts = run.checkpoint_list.length ? table(["checkpoint", "step", "size", "written"], run.checkpoint_list.map(c => [c.name, num(c.step), bytes(c.bytes), when(c.time)]), [1, 2])
    : h("p", { class: "muted", text: "no checkpoints yet" });
  const adapters = run.adapter_list.length ? table(["adapter", "kind", "rank / virtual tokens", "tasks", "size"], run.adapter_list.map(a => [a.name, a.kind, String(a.rank ?? a.virtual_tokens ?? "–"), a.tasks.join(", ") || "–", bytes(a.bytes)]))
    : h("p", { class: "muted", text: "no adapters (a tuning run writes them under adapters/)" });
  view.replaceChildren(h("h1", {}, h("a", { href: "#/runs", text: "Runs" }), " / ", name), head, h("h2", { text: "Curves" }), charts,
    h("h2", { text: "Checkpoints" }), ckpts, h("h2", { text: "Adapters" }), adapters,
    h("h2", { text: "Config" }), h("pre", { id: "config", text: toml(run.config) }));
  let ticksSinceHead = 0;
  return async () => {
    const n = await feed.pull();
    if (++ticksSinceHead >= 3 || n) { run = await api("/api/runs/" + path); drawHead(); ticksSinceHead = 0; }
    if (n) draw();
  };
}

function toml(cfg) {
  const out = [];
  for (const [section, values] of Object.entries(cfg || {})) {
    if (typeof values !== "object" || values === null) { out.push(`${section} = ${JSON.stringify(values)}`); continue; }
    out.push(`[${section}]`);
    for (const [k, v] of Object.entries(values)) out.push(`${k} = ${JSON.stringify(v)}`);
    out.push("");
  }
  return out.join("\n") || "(no config.toml)";
}

async function comparePage(view, names) {
  const feeds = names.map(n => ({ name: n, feed: metricsFeed(n) }));
  await Promise.all(feeds.map(f => f.feed.pull()));
  const box = h("div", { class: "charts" });
  const draw = () => {
    const loss = [], val = [];
    feeds.forEach((f, i) => {
      loss.push({ name: f.name, xs: f.feed.train.step, ys: f.feed.train.loss, color: COLORS[i % COLORS.length] });
      val.push({ name: f.name, xs: f.feed.val.step, ys: f.feed.val.val_loss, color: COLORS[i % COLORS.length], markers: true });
    });
    const tps = feeds.map((f, i) => ({ name: f.name, xs: f.feed.train.step, ys: f.feed.train.tokens_per_s, color: COLORS[i % COLORS.length] }));
    box.replaceChildren(chart("training loss", loss, { width: 660, height: 320 }), chart("validation loss", val, { width: 660, height: 320 }),
      chart("throughput (tokens/s)", tps, { width: 660, height: 320, zero: true }));
    box.firstChild.id = "compare-chart";
  };
  draw();
  view.replaceChildren(h("h1", {}, h("a", { href: "#/runs", text: "Runs" }), " / compare"), h("p", { class: "muted", text: names.join(" · ") }), box);
  return async () => { let n = 0; for (const f of feeds) n += await f.feed.pull(); if (n) draw(); };
}

async function jobsPage(view) {
  const draw = async () => {
    const j = await api("/api/jobs");
    if (!j.exists) return [h("h1", { text: "Jobs" }), h("p", { text: `No job store at ${j.home} yet: \`stoker jobs submit\` makes one.` })];
    const queues = table(["queue", "cohort", "quota", "used", "borrowed", "borrowing limit", "running", "waiting", "strategy"],
      j.queues.map(q => [q.name, q.cohort || "–", String(q.nominal_quota), String(q.used), String(q.borrowed),
        q.borrowing_limit === null ? "none" : String(q.borrowing_limit), String(q.running), String(q.waiting), q.strategy]), [2, 3, 4, 5, 6, 7]);
    const rows = j.jobs.slice().reverse().map(x => [h("a", { href: "#/jobs/" + x.id, text: String(x.id) }), x.name, state(x.state), x.queue, x.priority,
      String(x.slots), x.backend + (x.remote_id ? " " + x.remote_id : ""), when(x.submitted),
      x.why ? h("span", { class: "why-text", "data-job": x.id, text: x.why.join("; ") })
        : x.reason || (x.state === "running" ? "running since " + when(x.started) : "")]);
    return [h("h1", { text: "Jobs" }), h("p", { class: "muted", text: `job store ${j.home}` }), h("h2", { text: "Queues" }), queues,
      h("h2", { text: "Jobs" }), rows.length ? table(["id", "name", "state", "queue", "priority", "slots", "backend", "submitted", "why / reason"], rows, [5])
        : h("p", { text: "No jobs." })];
  };
  view.replaceChildren(...await draw());
  return async () => view.replaceChildren(...await draw());
}

async function jobPage(view, id) {
  const log = h("pre", { id: "log" }), body = h("div", {}), msg = h("span", { id: "action-message" });
  const act = async (action) => {
    try {
      const r = await api(`/api/jobs/${id}/${action}`, { method: "POST", body: "{}" });
      msg.className = ""; msg.textContent = action === "cancel" ? `job ${id}: ${r.state}` : `submitted as job ${r.id}`;
      if (action === "resubmit" && r.id !== id) location.hash = "#/jobs/" + r.id;
    } catch (e) { msg.className = "error"; msg.textContent = e.message; }
  };
  const why = "cancel and resubmit need the dashboard started with --api-key";
  const buttons = h("div", { class: "toolbar" },
    h("button", { id: "cancel", onclick: () => act("cancel"), disabled: !info.actions, title: info.actions ? null : why }, "Cancel"),
    h("button", { id: "resubmit", onclick: () => act("resubmit"), disabled: !info.actions, title: info.actions ? null : why }, "Resubmit"), msg);
  const draw = async () => {
    const [j, l] = await Promise.all([api("/api/jobs/" + id), api(`/api/jobs/${id}/log`)]);
    body.replaceChildren(kv([["state", state(j.state)], ["name", j.name], ["queue", j.queue], ["priority", `${j.priority} (${j.priority_value})`],
      ["slots", String(j.slots)], ["backend", j.backend + (j.remote_id ? " " + j.remote_id : "")], ["command", h("code", { text: shellJoin(j.command) })],
      ["workdir", j.workdir || "–"], ["attempt", String(j.attempt)], ["restarts / preemptions", `${j.restarts} / ${j.preemptions}`],
      ["exit code", j.exit_code === null ? "–" : String(j.exit_code)], ["submitted", when(j.submitted)], ["started", when(j.started)], ["finished", when(j.finished)]]),
      h("h2", { text: "Why" }), h("ul", { class: "why", id: "why" }, j.why.map(w => h("li", { text: w }))),
      h("h2", { text: "History" }), table(["time", "state", "detail"], j.history.map(e => [when(e.time), state(e.state), e.detail])),
      h("h2", { text: "Log" + (l.truncated ? ` (last ${bytes(l.text.length)} of ${bytes(l.bytes)})` : "") }));
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = l.text || "(no output yet)";
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  await draw();
  view.replaceChildren(h("h1", {}, h("a", { href: "#/jobs", text: "Jobs" }), ` / job ${id}`), buttons, body, log);
  return draw;
}

async function modelsPage(view) {
  const list = await api("/api/serve");
  if (!list.length) {
    view.replaceChildren(h("h1", { text: "Models" }), h("p", { text: "This dashboard watches no server: start it with --serve http://127.0.0.1:8000 (repeat for more)." }));
    return null;
  }
  const series = list.map(() => ({ t: [], models: {} }));  // samples of /metrics, this page's own memory
  const boxes = list.map((s, i) => {
    const charts = h("div", { class: "charts", id: `server-${i}-charts` });
    const models = s.models.filter(m => !m.parent).map(m => m.id);
    const names = s.models.map(m => m.id);
    const select = h("select", { id: `model-${i}` }, names.map(n => h("option", { value: n, text: n })));
    const prompt = h("textarea", { id: `prompt-${i}`, text: "Once upon a time" });
    const maxTokens = h("input", { type: "number", id: `max-tokens-${i}`, value: 48, min: 1, max: 4096 });
    const temperature = h("input", { type: "number", id: `temperature-${i}`, value: 0, min: 0, max: 2, step: 0.1 });
    const out = h("pre", { id: `output-${i}`, class: "output" }), note = h("span", { class: "muted", id: `playground-status-${i}` });
    const send = h("button", { class: "primary", id: `send-${i}`, onclick: () => stream(i, select.value, prompt.value, +maxTokens.value, +temperature.value, out, note, send) }, "Send");
    const modelsTable = h("div", { id: `models-${i}` });
    s.drawModels = (now) => modelsTable.replaceChildren(now.ok
      ? table(["model", "base", "loaded", "context"], now.models.map(m => [m.id, m.parent || "–", m.loaded ? "yes" : "no", String(m.context_length)]), [3])
      : h("p", { class: "error", text: now.error }));
    s.drawModels(s);
    s.draw = () => {
      const d = series[i];
      const per = (key) => models.map((m, k) => ({ name: m, xs: d.t, ys: d.t.map((_, j) => (d.models[m] || [])[j]?.[key] ?? null), color: COLORS[k % COLORS.length] }));
      const lat = models.flatMap((m, k) => ["p50", "p90", "p99"].map((p, pi) => ({ name: `${m} ${p}`, xs: d.t, ys: d.t.map((_, j) => (d.models[m] || [])[j]?.["latency_" + p] ?? null), color: COLORS[(k * 3 + pi) % COLORS.length] })));
      charts.replaceChildren(chart("tokens/s", per("tokens_per_s"), { zero: true, xlabel: "seconds" }),
        chart("request latency (s, since start)", lat, { zero: true, xlabel: "seconds" }),
        chart("queue depth", per("queue_depth"), { zero: true, xlabel: "seconds" }),
        chart("running sequences", per("running"), { zero: true, xlabel: "seconds" }));
    };
    return h("section", { class: "server" }, h("h2", { text: s.url }), modelsTable, charts,
      h("h2", { text: "Playground" }),
      h("div", { class: "playground" }, h("div", { class: "toolbar" }, h("label", {}, "model ", select),
        h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temperature), send, note), prompt, out));
  });
  view.replaceChildren(h("h1", { text: "Models" }), ...boxes);
  const t0 = Date.now() / 1000;
  let polls = 0;
  const pull = async () => {
    if (++polls % 5 === 0) (await api("/api/serve")).forEach((now, i) => list[i].drawModels(now));  // loaded or not
    await Promise.all(list.map(async (s, i) => {
      const m = await api(`/api/serve/${i}/metrics`);
      const d = series[i];
      d.t.push(m.time - t0);
      for (const [name, v] of Object.entries(m.models)) (d.models[name] = d.models[name] || [])[d.t.length - 1] = v;
      if (d.t.length > 300) { d.t.shift(); for (const k in d.models) d.models[k].shift(); }
      s.draw();
    }));
  };
  await pull();
  return pull;
}

// The playground: the server's stream, shown as it arrives.
async function stream(i, model, prompt, maxTokens, temperature, out, note, button) {
  out.textContent = ""; out.classList.remove("error"); button.disabled = true;
  const t0 = performance.now();
  let pieces = 0;
  note.textContent = "streaming…";
  try {
    const r = await api(`/api/serve/${i}/completions`, { method: "POST", raw: true, body: JSON.stringify({ model, prompt, max_tokens: maxTokens, temperature }) });
    if (!r.ok) { const b = await r.json().catch(() => ({})); throw new Error(b.error || r.statusText); }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim(); buf = buf.slice(nl + 1);
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") { done = true; break; }
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        for (const c of ev.choices || []) if (c.text) { out.textContent += c.text; pieces++; }
      }
    }
    note.textContent = `done: ${pieces} pieces in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
    out.setAttribute("data-done", "1");
  } catch (e) {
    out.classList.add("error"); note.textContent = e.message; out.setAttribute("data-done", "error");
  } finally { button.disabled = false; }
}

// --- routing ------------------------------------------------------------------------------

let routeSeq = 0;  // the newest navigation; a slower, older one never draws over it

async function route() {
  if (poller) { clearInterval(poller.timer); poller = null; }
  const me = ++routeSeq, view = h("div", {});
  const parts = (location.hash || "#/runs").slice(2).split("/");
  const page = parts[0] || "runs", rest = parts.slice(1).join("/");
  for (const n of ["runs", "jobs", "models"]) document.getElementById("nav-" + n).classList.toggle("active", n === page || (n === "runs" && page === "compare"));
  let refresh = null;
  try {
    if (page === "runs" && rest) refresh = await runPage(view, decodeURIComponent(rest));
    else if (page === "runs") refresh = await runsPage(view);
    else if (page === "compare") refresh = await comparePage(view, rest.split(",").map(decodeURIComponent));
    else if (page === "jobs" && rest) refresh = await jobPage(view, +rest);
    else if (page === "jobs") refresh = await jobsPage(view);
    else if (page === "models") refresh = await modelsPage(view);
    else view.replaceChildren(h("p", { text: "No such page." }));
    if (me === routeSeq) setStatus("updated " + new Date().toLocaleTimeString("en-GB"));
  } catch (e) {
    view.replaceChildren(h("p", { class: "error", text: e.message }));
    if (me === routeSeq) setStatus(e.message, true);
  }
  if (me !== routeSeq) return;
  main().replaceChildren(view);
  if (refresh) {
    const self = { timer: null, busy: false };
    self.timer = setInterval(async () => {
      if (self.busy) return;
      self.busy = true;
      try { await refresh(); setStatus("updated " + new Date().toLocaleTimeString("en-GB")); }
      catch (e) { setStatus(e.message, true); }
      finally { self.busy = false; }
    }, POLL_MS);
    poller = self;
  }
  document.body.setAttribute("data-page", page);
}

async function start() {
  document.getElementById("key-form").addEventListener("submit", e => {
    e.preventDefault();
    key = document.getElementById("key-input").value.trim();
    localStorage.setItem("stoker-dashboard-key", key);
    document.getElementById("key-form").classList.add("hidden");
    api("/api/info").then(i => { info = i; route(); }, () => route());
  });
  info = await api("/api/info").catch(() => info);
  if (info.auth && !key) askKey("this dashboard needs its API key");
  window.addEventListener("hashchange", route);
  route();
}

start();
