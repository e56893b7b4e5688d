// teia's dashboard. Everything a peer controls (names, messages, file names) is put in the
// page as text (textContent), never as HTML. Live updates come from /events (server-sent
// events); each view reloads what an event touched, at most once per REFRESH_MS.
"use strict";

const CSRF = document.querySelector('meta[name="teia-csrf"]').content;
const REFRESH_MS = 250;
// What the page keeps of what events bring: search results, finished downloads.
const RESULTS_KEPT = 500;
const FINISHED_KEPT = 100;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

const state = {
  me: "",
  results: new Map(), // hash+holder -> result
  downloads: new Map(), // hash -> download
  openEval: null,
  openJob: null,
  view: "network",
};

// An element with attributes and children (strings become text nodes).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

// Children without the absent ones (replaceChildren would show `null` as text).
const present = (...nodes) => nodes.filter((node) => node !== null && node !== undefined && node !== false);

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// Calls the node's API; JSON in and out; an error answer becomes a toast and a rejection.
async function api(method, path, body) {
  const options = { method, headers: { "X-Teia-Csrf": CSRF }, credentials: "same-origin" };
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) {
    const error = (data && data.error) || `${response.status} ${response.statusText}`;
    toast(error);
    throw new Error(error);
  }
  return data;
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// Runs `load` once soon, however often asked meanwhile.
function debounced(load) {
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; load().catch(() => {}); }, REFRESH_MS);
  };
}

// ---- views ----

function show(view) {
  if (!Object.hasOwn(loaders, view)) view = "network";
  state.view = view;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.dataset.view === view;
    tab.setAttribute("aria-selected", selected);
    tab.tabIndex = selected ? 0 : -1;
  }
  for (const panel of document.querySelectorAll('[role="tabpanel"]')) panel.hidden = panel.id !== view;
  loaders[view]().catch(() => {});
}

// ---- network ----

async function loadNetwork() {
  const peers = await api("GET", "/api/peers");
  drawGraph(peers);
  const body = $("links").tBodies[0];
  body.replaceChildren(...peers.links.map((l) => el("tr", { "data-peer": l.peer },
    el("td", {}, l.peer),
    el("td", {}, l.addr),
    el("td", {}, l.teia ? (l.encrypted ? `teia, encrypted (key ${l.fingerprint || "?"}…)` : "teia, plaintext") : "course peer, plaintext"),
    el("td", {}, l.rtt_ms === null ? "–" : `${l.rtt_ms.toFixed(2)} ms`),
    el("td", {}, `${l.sent} / ${l.received}`))));
  const names = new Set(["*", ...peers.links.map((l) => l.peer), ...peers.known.map((k) => k.peer)]);
  const ns = state.me.split("@")[1];
  if (ns) names.add(`#${ns}`);
  $("say-peers").replaceChildren(...[...names].map((n) => el("option", { value: n })));
  const stats = await api("GET", "/stats").catch(() => null);
  if (stats) {
    $("cluster").tBodies[0].replaceChildren(...stats.nodes.map((n) => el("tr", {},
      el("td", {}, n.address), el("td", {}, n.modules), el("td", {}, n.passed),
      el("td", {}, n.failed), el("td", {}, n.evaluations.join(", ") || "–"))));
  }
}

function drawGraph(peers) {
  const graph = $("graph");
  const [cx, cy] = [300, 210];
  const nodes = [];
  peers.links.forEach((l, i, all) => nodes.push({ ...l, ring: 120, i, n: all.length, kind: l.teia ? "teia" : "course" }));
  peers.known.slice(0, 24).forEach((k, i, all) => nodes.push({ ...k, ring: 185, i, n: all.length, kind: "known" }));
  const parts = [];
  for (const node of nodes) {
    const angle = (2 * Math.PI * node.i) / Math.max(node.n, 1) - Math.PI / 3 + (node.kind === "known" ? 0.3 : 0);
    node.x = cx + node.ring * Math.cos(angle);
    node.y = cy + node.ring * Math.sin(angle) * 0.85;
    parts.push(svg("line", { x1: cx, y1: cy, x2: node.x, y2: node.y, class: `edge ${node.kind}${node.encrypted ? " encrypted" : ""}` }));
  }
  for (const node of nodes) {
    const g = svg("g", { class: `peer ${node.kind}`, "data-peer": node.peer });
    g.append(svg("circle", { cx: node.x, cy: node.y, r: 9 }));
    g.append(svg("text", { x: node.x, y: node.y + 24, "text-anchor": "middle" }, node.peer));
    if (node.rtt_ms !== undefined && node.rtt_ms !== null) {
      g.append(svg("text", { x: node.x, y: node.y - 14, "text-anchor": "middle", class: "rtt" }, `${node.rtt_ms.toFixed(1)} ms`));
    }
    parts.push(g);
  }
  const self = svg("g", { class: "peer self", "data-peer": state.me });
  self.append(svg("circle", { cx, cy, r: 14 }));
  self.append(svg("text", { x: cx, y: cy + 32, "text-anchor": "middle" }, `${state.me} (this node)`));
  parts.push(self);
  graph.replaceChildren(...parts);
}

// ---- chat ----

async function loadChat() {
  const entries = await api("GET", "/api/chat");
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  list.replaceChildren(...entries.map((m) => el("li", { class: `msg ${m.direction}`, "data-msg-id": m.msg_id },
    el("span", { class: "who" }, m.direction === "in" ? m.src : `to ${m.dst}`),
    el("span", { class: "text" }, m.text),
    el("span", { class: `state ${m.state}`, title: m.detail || "" }, m.state))));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

$("say").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("say-text");
  await api("POST", "/api/chat", { to: $("say-to").value.trim(), text: text.value });
  text.value = "";
  text.focus();
});

// ---- files ----

function resultRow(r) {
  return el("tr", { "data-hash": r.hash },
    el("td", {}, r.name), el("td", {}, bytes(r.size)), el("td", {}, r.holder),
    el("td", {}, r.holder === state.me ? "yours" : el("button", { type: "button", onclick: () => get(r.hash) }, "Get")));
}

function drawResults() {
  $("results").tBodies[0].replaceChildren(...[...state.results.values()].map(resultRow));
}

async function get(hash) {
  await api("POST", "/api/downloads", { target: hash });
  loadDownloads().catch(() => {});
}

$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.results.clear();
  const answer = await api("POST", "/api/search", { text: $("search-text").value });
  for (const r of answer.local) state.results.set(r.hash + r.holder, r);
  drawResults();
});

// Keeps the last FINISHED_KEPT finished downloads (a Map iterates in insertion order).
function forgetOldDownloads() {
  const finished = [...state.downloads.values()].filter((d) => d.state);
  for (const d of finished.slice(0, Math.max(0, finished.length - FINISHED_KEPT))) state.downloads.delete(d.hash);
}

function drawDownloads() {
  forgetOldDownloads();
  $("downloads").tBodies[0].replaceChildren(...[...state.downloads.values()].map((d) => {
    const percent = d.size ? Math.floor((100 * d.bytes) / d.size) : 0;
    const done = d.state === "done";
    return el("tr", { "data-hash": d.hash, class: d.state || "" },
      el("td", {}, d.name),
      el("td", {}, el("progress", { max: 100, value: done ? 100 : percent, "aria-label": `${d.name} progress` }),
        " ", done ? "done" : d.state === "failed" ? `failed: ${d.reason}` : `${percent} %`,
        done && d.path ? el("div", { class: "muted" }, d.path) : null),
      el("td", {}, d.rate ? `${bytes(d.rate)}/s` : "–"),
      el("td", {}, d.holders ?? "–"),
      el("td", {}, done ? "–" : seconds(d.eta_seconds)),
      el("td", {}, d.state ? "" : el("button", { type: "button", onclick: () => api("DELETE", `/api/downloads/${d.hash}`) }, "Cancel")));
  }));
}

async function loadDownloads() {
  const running = await api("GET", "/api/downloads");
  for (const [hash, d] of state.downloads) if (!d.state) state.downloads.delete(hash);
  for (const d of running) state.downloads.set(d.hash, d);
  drawDownloads();
}

async function loadFiles() {
  const [shares, approvals] = await Promise.all([api("GET", "/api/shares"), api("GET", "/api/approvals")]);
  $("folders").replaceChildren(...shares.folders.map((f) => el("li", {}, el("span", {}, f), " ",
    el("button", { type: "button", onclick: async () => { await api("DELETE", `/api/shares?path=${encodeURIComponent(f)}`); loadFiles(); } }, "Stop sharing"))));
  $("shared-count").textContent = `${shares.file_count} files shared`;
  $("approvals").replaceChildren(...(approvals.length ? approvals.map((a) => el("li", { "data-id": a.id },
    `${a.peer} asks for ${a.name} (${bytes(a.size)}) `,
    el("button", { type: "button", onclick: () => answer(a.id, true) }, "Allow"), " ",
    el("button", { type: "button", onclick: () => answer(a.id, false) }, "Deny"))) : [el("li", { class: "muted" }, "none")]));
  await loadDownloads();
}

async function answer(id, allow) {
  await api("POST", `/api/approvals/${id}`, { allow });
  loadFiles().catch(() => {});
}

$("share").addEventListener("submit", async (event) => {
  event.preventDefault();
  await api("POST", "/api/shares", { path: $("share-path").value });
  $("share-path").value = "";
  loadFiles().catch(() => {});
});

// ---- evaluations ----

function dropZone(zone, input, upload) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) upload(file).catch(() => {});
  });
  input.addEventListener("change", () => { if (input.files[0]) upload(input.files[0]).catch(() => {}); input.value = ""; });
}

async function uploadEvaluation(file) {
  const form = new FormData();
  form.append("file", file);
  const created = await api("POST", "/evaluation", form);
  state.openEval = created.id;
  await loadEvaluations();
}

dropZone($("drop"), $("zip"), uploadEvaluation);

$("git").addEventListener("submit", async (event) => {
  event.preventDefault();
  const projects = $("git-urls").value.split(/\s+/).filter(Boolean);
  const created = await api("POST", "/evaluation", { projects });
  state.openEval = created.id;
  $("git-urls").value = "";
  await loadEvaluations();
});

async function loadEvaluations() {
  const list = await api("GET", "/evaluation?limit=50");
  list.sort((a, b) => b.id - a.id);
  $("evals").replaceChildren(...(list.length ? list.map((e) => el("li", { "data-eval": e.id },
    el("button", { type: "button", class: "link", onclick: () => { state.openEval = e.id; loadEvaluations(); } },
      `#${e.id}`), ` ${e.status}, submitted ${new Date(e.submitted_at * 1000).toLocaleString()}`)) : [el("li", { class: "muted" }, "none yet")]));
  if (state.openEval === null && list.length) state.openEval = list[0].id;
  if (state.openEval !== null) await loadEvaluation(state.openEval);
}

function moduleCell(path, m) {
  const piece = path.match(/ \[(\d+)\/(\d+)\]$/);
  const split = piece ? el("span", { class: "badge" }, `split: piece ${piece[1]} of ${piece[2]}`) : null;
  return [...stateCell(m), ...(split ? [" ", split] : [])];
}

function stateCell(m) {
  switch (m.status) {
    case "done": {
      const tags = [];
      if (m.cached) tags.push("cached");
      if (m.flaky && m.flaky.length) tags.push("flaky");
      if (m.disputed) tags.push("disputed");
      const verdict = m.failed + m.errors ? "failed" : "passed";
      return [el("span", { class: `badge ${verdict}` }, verdict), ` ${m.passed} passed, ${m.failed + m.errors} failed on ${m.node} in ${m.seconds.toFixed(1)} s ${tags.join(", ")}`];
    }
    case "running": return [el("span", { class: "badge running" }, "running"), ` on ${m.node}`];
    default: return [el("span", { class: "badge pending" }, "pending")];
  }
}

// A done module's failed tests, each with the end of pytest's report of it when kept.
function failuresOf(path, m) {
  if (m.status !== "done") return null;
  const why = new Map((m.failures || []).map((f) => [f.test, f.output]));
  const tests = m.failed_tests || [];
  // A piece of a split module (`path [i/k]`) says its module's errors under the module's path.
  const file = path.replace(/ \[\d+\/\d+\]$/, "");
  const ids = [...(why.has(file) ? [file] : []), ...tests];
  if (!ids.length) return null;
  const counted = m.failed + m.errors;
  const title = `${path}: failed tests (${counted > tests.length ? `${tests.length} of ${counted} listed` : tests.length})`;
  return el("details", { class: "failures", "data-failures": path, open: ids.length <= 8 ? "" : null },
    el("summary", {}, title),
    ...ids.map((id) => el("div", { class: "failure", "data-test": id },
      el("code", {}, id === file ? `${file} (the module itself)` : id),
      (m.flaky || []).includes(id) ? el("span", { class: "badge" }, "flaky") : null,
      why.has(id) ? el("pre", {}, why.get(id)) : el("p", { class: "muted" }, "no output kept"))));
}

async function loadEvaluation(id) {
  const d = await api("GET", `/evaluation/${id}`);
  const box = $("eval-detail");
  const projects = Object.entries(d.projects).map(([name, p]) => el("div", { class: "project", "data-project": name },
    el("h3", {}, `${name}: grade ${p.grade.toFixed(2)} (${p.tests.passed} passed, ${p.tests.failed + p.tests.errors} failed)`),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "module"), el("th", {}, "state"))),
      el("tbody", {}, ...Object.entries(p.modules).map(([path, m]) => el("tr", { "data-module": path },
        el("td", {}, path), el("td", {}, ...moduleCell(path, m))))))),
    ...Object.entries(p.modules).map(([path, m]) => failuresOf(path, m)).filter((f) => f)));
  box.replaceChildren(...present(el("h2", {}, `Evaluation #${d.id}: ${d.status}`),
    el("p", {}, `grade ${d.grade.toFixed(2)} · ${d.percent_passed.toFixed(1)} % passed · ${d.modules.executed} modules done, ${d.modules.running} running, ${d.modules.pending} pending · ${d.elapsed_seconds.toFixed(1)} s`),
    d.error ? el("p", { class: "error" }, d.error) : null,
    d.waiting ? el("p", { class: "muted" }, d.waiting) : null,
    ...projects));
  box.hidden = false;
}


// ---- jobs ----

dropZone($("job-zip").parentElement, $("job-zip"), async (file) => {
  const form = new FormData();
  form.append("file", file);
  const created = await api("POST", "/jobs", form);
  state.openJob = created.id;
  await loadJobs();
});

async function loadJobs() {
  let list;
  try { list = await api("GET", "/jobs"); } catch { $("job-counts").textContent = "This node takes no script jobs (start it with --tasks-dir)."; return; }
  $("job-counts").textContent = `${list.queued} queued, ${list.running} running, ${list.done} done`;
  $("job-list").replaceChildren(...list.jobs.map((j) => el("li", { "data-job": j.id },
    el("button", { type: "button", class: "link", onclick: () => { state.openJob = j.id; loadJobs(); } }, j.id),
    ` ${j.status}${j.worker ? ` on ${j.worker}` : ""}`)));
  if (state.openJob !== null) await loadJob(state.openJob);
}

async function loadJob(id) {
  const j = await api("GET", `/jobs/${encodeURIComponent(id)}`);
  const box = $("job-detail");
  box.replaceChildren(...present(el("h2", {}, `Job ${j.id}: ${j.status}`),
    j.worker ? el("p", {}, `running on ${j.worker}`) : null,
    j.exit_code !== undefined ? el("p", {}, `exit code ${j.exit_code}`) : null,
    j.waiting ? el("p", { class: "muted" }, j.waiting) : null,
    j.status === "done" ? el("p", {}, el("a", { href: `/jobs/${encodeURIComponent(j.id)}/result`, download: `${j.id}-result.zip` }, "Download the result")) : null,
    j.stdout !== undefined && j.stdout !== null ? el("pre", { class: "stdout" }, j.stdout) : null));
  box.hidden = false;
}

// ---- live events ----

const loaders = { network: loadNetwork, chat: loadChat, files: loadFiles, evaluations: loadEvaluations, jobs: loadJobs };
const refresh = Object.fromEntries(Object.entries(loaders).map(([view, load]) => [view, debounced(async () => { if (state.view === view) await load(); })]));

function onEvent(event) {
  switch (event.event) {
    case "link_up": case "link_down": case "dial_gave_up": case "metrics":
      refresh.network(); break;
    case "lagged":
      refresh[state.view](); break;
    case "message": case "sent": case "ack": case "undelivered": case "relay":
      refresh.chat(); break;
    case "search_results":
      for (const r of event.results || []) {
        if (state.results.size >= RESULTS_KEPT) break;
        state.results.set(r.hash + r.holder, r);
      }
      drawResults(); break;
    case "download_progress":
      state.downloads.set(event.hash, event);
      drawDownloads(); break;
    case "download_done": {
      const d = state.downloads.get(event.hash) || { hash: event.hash, name: event.name };
      state.downloads.set(event.hash, { ...d, state: "done", bytes: d.size, rate: 0, path: event.path });
      drawDownloads(); break;
    }
    case "download_failed":
      if (event.hash) {
        const d = state.downloads.get(event.hash) || { hash: event.hash, name: event.name };
        state.downloads.set(event.hash, { ...d, state: "failed", reason: event.reason });
        drawDownloads();
      }
      break;
    case "approval_request": case "shared":
      refresh.files(); break;
    case "evaluation_changed":
      refresh.evaluations(); refresh.network(); break;
    case "jobs_changed":
      refresh.jobs(); break;
    default: break;
  }
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { $("live").textContent = "live"; $("live").className = "live on"; refresh[state.view](); };
  source.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live"; };
  source.onmessage = (message) => {
    try { onEvent(JSON.parse(message.data)); } catch { /* not an event */ }
  };
}

// ---- start ----

for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => { location.hash = `/${tab.dataset.view}`; });
  tab.addEventListener("keydown", (event) => {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    next.focus();
    location.hash = `/${next.dataset.view}`;
  });
}
// The address says the view (`#/chat`): not a section's id, so the browser neither scrolls
// nor moves the focus.
const viewInAddress = () => location.hash.replace(/^#\/?/, "");
window.addEventListener("hashchange", () => show(viewInAddress()));

api("GET", "/api/node").then((node) => {
  state.me = node.peer_id;
  $("me").textContent = `${node.peer_id} · ${node.listen || "not listening"} · key ${(node.key || "").slice(0, 16)}…`;
  show(viewInAddress() || "network");
  connect();
}).catch(() => {});
