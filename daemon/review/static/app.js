// The review station: queue, live feed, part view with decisions, product page, history.
// Every request carries the token from sessionStorage as "Authorization: Bearer"; nothing is
// loaded from anywhere but this daemon.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: sessionStorage.getItem("inspectd-token"), part: null, view: null, feed: null };
const fmt = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));
const ago = (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function api(path, body) {
  const opts = { headers: { Authorization: `Bearer ${state.token}` } };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401) { signOut("the token was refused"); throw new Error("unauthorized"); }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { const e = new Error(data.error || r.statusText); e.status = r.status; throw e; }
  return data;
}

// ------------------------------------------------------------------ sign in
function signOut(why) {
  sessionStorage.removeItem("inspectd-token");
  state.token = null;
  if (state.feed) state.feed.abort();
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.token = $("#login-token").value.trim();
  try {
    await api("/v1/review/products");
  } catch (err) {
    $("#login-error").textContent = err.message === "unauthorized" ? "the token was refused" : err.message;
    return;
  }
  sessionStorage.setItem("inspectd-token", state.token);
  $("#login-token").value = "";
  start();
});
$("#logout").addEventListener("click", () => signOut(""));

// ------------------------------------------------------------------ tabs
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => showTab(b.dataset.tab));
}
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab-page")) s.hidden = s.id !== `tab-${name}`;
  $("#part").hidden = true;
  if (name === "product") loadProducts();
}

// ------------------------------------------------------------------ queue
async function loadQueue() {
  const q = await api("/v1/review/queue?limit=200");
  $("#queue-count").textContent = q.waiting;
  const rows = q.items.map((v) => `<tr data-id="${v.verdict_id}" class="v-${esc(v.verdict)}">
    <td>${esc(v.part_id)}</td><td>${esc(v.product)}</td>
    <td>${esc(v.verdict)}${v.zero_shot ? ' <span class="tag">cold start</span>' : ""}</td>
    <td>${fmt(v.score)}</td><td>${fmt(v.threshold)}</td><td>${esc(v.model_version)}</td>
    <td>${ago(q.now - v.decided_at)}</td></tr>`);
  $("#queue-table tbody").innerHTML = rows.join("") || '<tr><td colspan="7" class="muted">nothing waiting</td></tr>';
}
$("#queue-table").addEventListener("click", (e) => { const tr = e.target.closest("tr[data-id]"); if (tr) openPart(tr.dataset.id); });

// ------------------------------------------------------------------ live feed (SSE over fetch)
async function runFeed() {
  const ctrl = new AbortController();
  state.feed = ctrl;
  while (state.token && !ctrl.signal.aborted) {
    try {
      const r = await fetch("/v1/review/events", { headers: { Authorization: `Bearer ${state.token}` }, signal: ctrl.signal });
      if (r.status === 401) { signOut("the token was refused"); return; }
      if (!r.ok) throw new Error(`feed: ${r.status}`);
      $("#feed-state").textContent = "feed: live";
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (err) {
      if (ctrl.signal.aborted) return;
    }
    $("#feed-state").textContent = "feed: reconnecting";
    await new Promise((res) => setTimeout(res, 2000));
    loadQueue().catch(() => {});
  }
}

function onEvent(block) {
  let type = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) type = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (type === "resync") { loadQueue().catch(() => {}); return; }
  if (type !== "verdict") return;
  const v = JSON.parse(data);
  const li = document.createElement("li");
  li.className = `v-${v.verdict}`;
  li.dataset.id = v.verdict_id ?? "";
  li.textContent = `${new Date(v.decided_at * 1000).toLocaleTimeString()}  ${v.product}  ${v.part_id}  ` +
    `${v.verdict}${v.zero_shot ? " (cold start)" : ""}  ${v.score === null ? v.error || "" : fmt(v.score)}`;
  const list = $("#live-list");
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
  if (v.verdict === "review" || v.zero_shot) loadQueue().catch(() => {});
}
$("#live-list").addEventListener("click", (e) => { const li = e.target.closest("li[data-id]"); if (li && li.dataset.id) openPart(li.dataset.id); });

// ------------------------------------------------------------------ part view and decisions
const pointView = new PointView($("#view-canvas"));
const imageView = new ImageView($("#view-canvas"));
for (const v of [pointView, imageView]) v.onMark = (n) => { $("#region-count").textContent = n; };

async function openPart(id) {
  const p = await api(`/v1/review/parts/${id}`);
  state.part = p;
  const v = p.verdict;
  $("#part").hidden = false;
  $("#part-title").textContent = `${v.product} / ${v.part_id}`;
  $("#part-info").innerHTML = `verdict <b>${esc(v.verdict)}</b>${v.zero_shot ? " (cold start)" : ""}, score ${fmt(v.score)},
    threshold ${fmt(v.threshold)} (review from ${fmt(v.review_low)}, fail from ${fmt(v.fail_from)}),
    model ${esc(v.model_version)} (${esc(v.scorer)}), sensor ${esc(v.sensor_id)} #${esc(v.seq)}`;
  $("#current-label").textContent = p.label ? `labelled ${p.label.label}${p.label.kind ? ` (${p.label.kind})` : ""} by ${p.label.user}` : "not labelled yet";
  $("#decision-result").textContent = "";
  $("#region-count").textContent = "0";
  $("#kind").value = "";
  const view = p.view;
  state.view = view.kind === "points" ? pointView : view.kind === "image" ? imageView : null;
  for (const x of [pointView, imageView]) { x.markMode = $("#mark-mode").checked; x.active = x === state.view; }
  $("#view-note").textContent = view.kind === "none" ? view.why :
    `${view.above_threshold ?? "?"} ${view.kind === "points" ? `of ${view.n_total} points` : "pixels"} at or above the threshold` +
    (view.kind === "points" ? "; drag to rotate, wheel to zoom" : "");
  $("#view-canvas").dataset.kind = view.kind;
  if (state.view) state.view.set(view); else pointView.set({ xyz: [], rgb: [], index: [] });
  drawLegend(view.legend);
  $("#part").scrollIntoView();
}

function drawLegend(lg) {
  if (!lg) return;
  $("#legend-bar").style.background = `linear-gradient(to right, ${lg.colors.join(",")})`;
  $("#legend-max").textContent = fmt(lg.max, 3);
  $("#legend-threshold").textContent = `threshold ${fmt(lg.threshold, 4)} (middle of the scale)`;
}

$("#part-close").addEventListener("click", () => { $("#part").hidden = true; state.part = null; });
$("#mark-mode").addEventListener("change", (e) => { pointView.markMode = imageView.markMode = e.target.checked; });
$("#region-clear").addEventListener("click", () => state.view && state.view.clearMarks());
$("#show-base").addEventListener("change", (e) => { imageView.showBase = e.target.checked; imageView.draw(); });

// Sorted indices as [start, length] runs: a painted image area stays small on the wire.
function runs(sorted) {
  const out = [];
  for (const i of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === i) last[1] += 1; else out.push([i, 1]);
  }
  return out;
}

async function decide(label) {
  if (!state.part) return;
  const body = { label };
  if (label === "defective") {
    const kind = $("#kind").value.trim();
    if (kind) body.kind = kind;
    if (state.view && state.view.marked.size) body.region_runs = runs([...state.view.marked].sort((a, b) => a - b));
  }
  try {
    const r = await api(`/v1/review/parts/${state.part.verdict.verdict_id}/label`, body);
    $("#decision-result").innerHTML = `<span class="ok">stored: ${esc(r.label)}${r.kind ? ` (${esc(r.kind)})` : ""} by ${esc(r.user)}</span>` +
      (r.collected ? `<br><span class="ok">collected for enrollment: ${esc(r.collected)}</span>` : "");
    $("#current-label").textContent = `labelled ${r.label}${r.kind ? ` (${r.kind})` : ""} by ${r.user}`;
    loadQueue().catch(() => {});
  } catch (err) {
    $("#decision-result").innerHTML = `<span class="bad">not stored: ${esc(err.message)}</span>`;
  }
}
$("#btn-good").addEventListener("click", () => decide("good"));
$("#btn-defective").addEventListener("click", () => decide("defective"));

// ------------------------------------------------------------------ history
$("#history-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = new URLSearchParams();
  const add = (k, v) => { if (v) q.set(k, v); };
  add("product", $("#h-product").value.trim());
  add("verdict", $("#h-verdict").value);
  add("part_id", $("#h-part").value.trim());
  for (const [k, el] of [["since", "#h-since"], ["until", "#h-until"]]) {
    if ($(el).value) q.set(k, String(new Date($(el).value).getTime() / 1000));
  }
  const h = await api(`/v1/review/history?${q}`);
  $("#history-table tbody").innerHTML = h.items.map((v) => `<tr data-id="${v.verdict_id}" class="v-${esc(v.verdict)}">
    <td>${esc(v.part_id)}</td><td>${esc(v.product)}</td><td>${esc(v.verdict)}</td><td>${fmt(v.score)}</td>
    <td>${new Date(v.decided_at * 1000).toLocaleString()}</td>
    <td>${v.label ? `${esc(v.label.label)}${v.label.kind ? ` (${esc(v.label.kind)})` : ""}` : ""}</td></tr>`).join("") ||
    '<tr><td colspan="6" class="muted">no verdict matches</td></tr>';
});
$("#history-table").addEventListener("click", (e) => { const tr = e.target.closest("tr[data-id]"); if (tr) openPart(tr.dataset.id); });

// ------------------------------------------------------------------ product page
async function loadProducts() {
  const { products } = await api("/v1/review/products");
  const sel = $("#p-select"), keep = sel.value;
  sel.innerHTML = products.map((p) => `<option>${esc(p)}</option>`).join("");
  $("#product-names").innerHTML = sel.innerHTML;
  if (products.includes(keep)) sel.value = keep;
  if (sel.value) loadProduct(sel.value);
}
$("#p-select").addEventListener("change", (e) => loadProduct(e.target.value));

function rateText(r, what) {
  if (!r.n) return `no ${what} parts yet`;
  return `${(100 * r.rate).toFixed(1)} % (${r.k} of ${r.n}; 95 % CI ${(100 * r.ci95[0]).toFixed(1)}–${(100 * r.ci95[1]).toFixed(1)} %)`;
}

async function loadProduct(name) {
  const ticket = (state.productTicket = (state.productTicket || 0) + 1);  // answers of an older choice are dropped
  const p = await api(`/v1/review/products/${encodeURIComponent(name)}`);
  if (ticket !== state.productTicket) return;
  const c = p.counts;
  $("#product-body").innerHTML = `<table class="facts">
    <tr><th>model</th><td>${esc(p.model_version)} (revision ${esc(p.model_revision)}), scorer ${esc(p.scorer)}${p.zero_shot ? " — cold start" : ""}</td></tr>
    <tr><th>threshold</th><td>${fmt(p.threshold)}; review band ${fmt(p.review_low)} – ${fmt(p.fail_from)}</td></tr>
    <tr><th>verdicts</th><td>pass ${c.pass}, review ${c.review}, fail ${c.fail}, error ${c.error}</td></tr>
    <tr><th>review queue</th><td>${p.queue.waiting} waiting, oldest ${ago(p.queue.oldest_wait_s)}</td></tr>
    <tr><th>labelled</th><td>${p.labelled.good} good, ${p.labelled.defective} defective</td></tr>
    <tr><th>false rejects</th><td id="p-frr">${rateText(p.false_reject, "confirmed-good")}${p.false_reject.n ? " of confirmed-good parts failed" : ""}</td></tr>
    <tr><th>escapes</th><td id="p-escape">${rateText(p.escape, "confirmed-defective")}${p.escape.n ? " of confirmed-defective parts passed" : ""}</td></tr>
    </table><p class="muted">Rates over the parts people labelled: mostly review parts, so they describe the review band more than the whole line.</p>`;
  drawHistogram(p.histogram);
  try {
    const s = await api(`/v1/shadow?product=${encodeURIComponent(name)}`);
    if (ticket !== state.productTicket) return;
    $("#shadow-body").innerHTML = `<h3>Shadow model</h3><p>live ${esc(s.live_version)}, shadow ${esc(s.shadow_version)}:
      ${s.n} parts, agreement ${(100 * s.agreement).toFixed(1)} %, ${s.disagreements.length} disagreements</p>` +
      `<table class="rows"><tr><th>part</th><th>live</th><th>shadow</th></tr>${s.disagreements.slice(0, 20).map((d) =>
        `<tr><td>${esc(d.part_id)}</td><td>${esc(d.live_verdict)} ${fmt(d.live_score)}</td><td>${esc(d.shadow_verdict)} ${fmt(d.shadow_score)}</td></tr>`).join("")}</table>`;
  } catch (err) {
    if (ticket !== state.productTicket) return;
    $("#shadow-body").innerHTML = err.status === 404 ? '<p class="muted">no shadow model for this product</p>' : "";
  }
}

function drawHistogram(h) {
  const cv = $("#hist-canvas"), ctx = cv.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.fillStyle = "#333"; ctx.font = "12px sans-serif";
  if (!h.edges.length) { ctx.fillText("no labelled parts yet", 20, 30); return; }
  const n = h.good.length, top = Math.max(1, ...h.good, ...h.defective), W = cv.width - 60, H = cv.height - 50;
  const lo = h.edges[0], hi = h.edges[n], x = (v) => 40 + (W * (v - lo)) / (hi - lo), bw = W / n;
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = "rgba(40,160,80,0.7)";
    ctx.fillRect(40 + i * bw, 20 + H - (H * h.good[i]) / top, bw / 2, (H * h.good[i]) / top);
    ctx.fillStyle = "rgba(210,50,50,0.7)";
    ctx.fillRect(40 + i * bw + bw / 2, 20 + H - (H * h.defective[i]) / top, bw / 2, (H * h.defective[i]) / top);
  }
  ctx.fillStyle = "#333";
  ctx.fillText(fmt(lo, 3), 35, cv.height - 12); ctx.fillText(fmt(hi, 3), cv.width - 60, cv.height - 12);
  ctx.fillText("good", cv.width - 120, 14); ctx.fillText("defective", cv.width - 80, 14);
  if (h.threshold !== null) {
    ctx.strokeStyle = "#000"; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(x(h.threshold), 15); ctx.lineTo(x(h.threshold), 20 + H); ctx.stroke();
    ctx.setLineDash([]);
    const tx = x(h.threshold);
    ctx.fillText("threshold", tx > cv.width - 90 ? tx - 62 : tx + 3, 28);
  }
}

// ------------------------------------------------------------------ start
function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  loadQueue().catch(() => {});
  runFeed();
}
if (state.token) start(); else signOut("");
