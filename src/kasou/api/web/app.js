// kasoud's web console: the VM list with live graphs, a create form, lifecycle and snapshot
// actions, a serial console (xterm.js over the console WebSocket) and the event log.
//
// It only speaks the REST API of the daemon that serves it (same origin; routes in
// docs/api.md): GET /v1/vms and /metrics every REFRESH_MS, EventSource on /v1/events, a
// WebSocket on /v1/vms/NAME/console. It keeps no state of its own beyond the last
// HISTORY samples per VM for the graphs. Everything the daemon or a guest wrote reaches the
// DOM through textContent (never innerHTML): VM names, messages and console bytes are
// untrusted.
//
// Auth: a page opened as /?token=T keeps T in sessionStorage (and drops it from the address
// bar); it goes as a bearer header on fetches and as ?token= on the WebSocket and the
// EventSource, which cannot set headers.

import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";

const REFRESH_MS = 2000;
const HISTORY = 60; // samples kept per VM and graph: 2 minutes at REFRESH_MS
const LOG_TAIL = 64 * 1024; // console bytes replayed from the log when a console opens
const MAX_EVENTS = 500;
const TOKEN_KEY = "kasou.token";

const $ = (selector) => document.querySelector(selector);

// ---- auth and requests --------------------------------------------------------------------

function takeToken() {
  const url = new URL(window.location.href);
  const token = url.searchParams.get("token");
  if (token !== null) {
    sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

const token = takeToken();

/** An http(s) or ws(s) URL on this origin, with ?token= where headers cannot carry it. */
function streamUrl(path, scheme) {
  const url = new URL(path, window.location.href);
  if (scheme !== undefined) url.protocol = scheme;
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

/** A request failed: the daemon's problem+json answer (RFC 9457), or what went wrong. */
class ApiError extends Error {
  constructor(problem) {
    super(problem.detail ? `${problem.title}: ${problem.detail}` : problem.title);
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError({ title: "kasoud does not answer", detail: String(error), status: 0 });
  }
  if (!response.ok) {
    const problem = await problemOf(response);
    if (response.status === 401) {
      problem.detail = `${problem.detail ?? ""} (in a browser: open this page as /?token=TOKEN)`;
    }
    throw new ApiError(problem);
  }
  const type = response.headers.get("Content-Type") || "";
  if (response.status === 204) return null;
  return type.includes("json") ? response.json() : response.text();
}

async function problemOf(response) {
  const text = await response.text();
  try {
    const problem = JSON.parse(text);
    if (problem && typeof problem.title === "string") return problem;
    // FastAPI's own shape, before the daemon's handlers turn it into a problem
    if (problem && problem.detail !== undefined) {
      return { title: response.statusText, detail: JSON.stringify(problem.detail) };
    }
  } catch {
    // not JSON: fall through to the status line
  }
  return { title: `${response.status} ${response.statusText}`, detail: text.slice(0, 200) };
}

// ---- the error banner ---------------------------------------------------------------------

function showError(error) {
  $("#banner-text").textContent = error instanceof Error ? error.message : String(error);
  $("#banner").hidden = false;
}

$("#banner-close").addEventListener("click", () => {
  $("#banner").hidden = true;
});

/** Run an action; a failure goes to the banner, never to an unhandled rejection. */
async function attempt(action) {
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  }
}

// ---- metrics ------------------------------------------------------------------------------

/** Prometheus text format (exposition format 0.0.4) to [{name, labels, value}]. */
function parsePrometheus(text) {
  const samples = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const row of text.split("\n")) {
    if (row === "" || row.startsWith("#")) continue;
    const match = line.exec(row);
    if (match === null) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(label)) {
      labels[key] = value.replace(/\\(.)/g, (_, ch) => (ch === "n" ? "\n" : ch));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

/**
 * Per VM totals from the daemon's metrics: CPU seconds, resident memory, disk and network
 * bytes (summed over devices and directions). Names are matched by what they measure, so a
 * renamed prefix or an added label does not blank the graphs.
 */
function vmTotals(samples) {
  const totals = new Map();
  const kinds = [
    ["cpu", /cpu_seconds(_total)?$/],
    ["memory", /memory_rss(_bytes)?$/],
    ["disk", /(disk|block)_.*bytes(_total)?$/],
    ["net", /net(work)?_.*bytes(_total)?$/],
  ];
  for (const sample of samples) {
    const vm = sample.labels.vm ?? sample.labels.name;
    if (vm === undefined || !Number.isFinite(sample.value)) continue;
    const kind = kinds.find(([, pattern]) => pattern.test(sample.name));
    if (kind === undefined) continue;
    if (!totals.has(vm)) totals.set(vm, { cpu: null, memory: null, disk: null, net: null });
    const entry = totals.get(vm);
    entry[kind[0]] = (entry[kind[0]] ?? 0) + sample.value;
  }
  return totals;
}

// ---- per VM history and sparklines --------------------------------------------------------

const history = new Map(); // name -> {last: {time, totals}, cpu: [], memory: [], disk: [], net: []}

function record(name, totals, now) {
  let entry = history.get(name);
  if (entry === undefined) {
    entry = { last: null, cpu: [], memory: [], disk: [], net: [] };
    history.set(name, entry);
  }
  const push = (series, value) => {
    series.push(value);
    if (series.length > HISTORY) series.shift();
  };
  const last = entry.last;
  const rate = (kind) => {
    if (last === null || totals[kind] === null || last.totals[kind] === null) return null;
    const seconds = (now - last.time) / 1000;
    const delta = totals[kind] - last.totals[kind];
    return seconds > 0 && delta >= 0 ? delta / seconds : null; // a restart resets counters
  };
  const cpu = rate("cpu");
  push(entry.cpu, cpu === null ? null : cpu * 100); // % of one host CPU
  push(entry.memory, totals.memory);
  push(entry.disk, rate("disk"));
  push(entry.net, rate("net"));
  entry.last = { time: now, totals };
}

const formats = {
  cpu: (v) => `${v.toFixed(1)} %`,
  memory: (v) => bytes(v),
  disk: (v) => `${bytes(v)}/s`,
  net: (v) => `${bytes(v)}/s`,
};

function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value;
  let unit = 0;
  while (v >= 1024 && unit < units.length - 1) {
    v /= 1024;
    unit += 1;
  }
  return `${v.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** A line and a filled area for `series` (nulls are gaps), scaled to its own maximum. */
function drawSparkline(canvas, series, color) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const values = series.filter((v) => v !== null);
  if (values.length === 0) return;
  const top = Math.max(...values) || 1;
  const step = width / Math.max(HISTORY - 1, 1);
  const offset = HISTORY - series.length; // newest sample at the right edge
  const x = (i) => (offset + i) * step;
  const y = (v) => height - 1 - (v / top) * (height - 3);
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = color;
  ctx.fillStyle = `${color}33`;
  let run = [];
  const flush = () => {
    if (run.length === 0) return;
    ctx.beginPath();
    ctx.moveTo(x(run[0][0]), height);
    for (const [i, v] of run) ctx.lineTo(x(i), y(v));
    ctx.lineTo(x(run[run.length - 1][0]), height);
    ctx.closePath();
    ctx.fill();
    ctx.beginPath();
    run.forEach(([i, v], n) => (n === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
    if (run.length === 1) ctx.arc(x(run[0][0]), y(run[0][1]), 1.5, 0, 2 * Math.PI);
    ctx.stroke();
    run = [];
  };
  series.forEach((v, i) => (v === null ? flush() : run.push([i, v])));
  flush();
}

const colors = { cpu: "#3b82f6", memory: "#a855f7", disk: "#f59e0b", net: "#10b981" };

// ---- the VM list --------------------------------------------------------------------------

let vms = [];
let selected = null;

function uptime(vm, now) {
  const up = vm.state === "running" || vm.state === "paused";
  if (!up || vm.started_at === null || vm.started_at === undefined) return "";
  let seconds = Math.max(0, Math.floor(now / 1000 - vm.started_at));
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size || parts.length > 0) {
      parts.push(`${Math.floor(seconds / size)}${unit}`);
      seconds %= size;
    }
  }
  parts.push(`${seconds}s`);
  return parts.slice(0, 2).join(" ");
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function renderVms() {
  const now = Date.now();
  const body = $("#vm-rows");
  const rows = [];
  for (const vm of vms) {
    const row = document.createElement("tr");
    row.dataset.vm = vm.name;
    if (vm.name === selected) row.classList.add("selected");
    cell(row, vm.name, "name");
    cell(row, vm.state, `state state-${vm.state}`);
    cell(row, String(vm.spec.vcpus));
    cell(row, vm.spec.memory);
    const cpu = history.get(vm.name)?.cpu.at(-1);
    cell(row, cpu === null || cpu === undefined ? "" : formats.cpu(cpu), "num");
    cell(row, uptime(vm, now), "num");
    const canvas = document.createElement("canvas");
    canvas.className = "spark";
    cell(row, "").append(canvas);
    row.addEventListener("click", () => select(vm.name));
    rows.push([row, canvas, vm.name]);
  }
  body.replaceChildren(...rows.map(([row]) => row));
  for (const [, canvas, name] of rows) {
    drawSparkline(canvas, history.get(name)?.cpu ?? [], colors.cpu);
  }
  $("#vm-empty").hidden = vms.length > 0;
  renderDetail();
}

async function refresh() {
  const [list, metrics, host] = await Promise.all([
    api("GET", "/v1/vms"),
    api("GET", "/metrics").catch(() => ""), // graphs stay empty; the list still shows
    api("GET", "/v1/host"),
  ]);
  $("#host").textContent = `${host.running} of ${host.vms} running · kasoud ${host.version}`;
  vms = list;
  const now = Date.now();
  const totals = vmTotals(parsePrometheus(typeof metrics === "string" ? metrics : ""));
  for (const vm of vms) {
    record(vm.name, totals.get(vm.name) ?? { cpu: null, memory: null, disk: null, net: null }, now);
  }
  for (const name of history.keys()) {
    if (!vms.some((vm) => vm.name === name)) history.delete(name);
  }
  const current = vms.find((vm) => vm.name === selected);
  if (selected !== null && current === undefined) select(null);
  // The console socket exists only while the VM runs: (re)connect once it does.
  if (current !== undefined && current.state === "running" && socket === null) {
    openConsole(selected);
  }
  renderVms();
}

let refreshing = null;

/** Refresh now, or after the refresh in flight (two at once would interleave samples). */
function refreshSoon() {
  if (refreshing === null) {
    refreshing = attempt(refresh).finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

async function loop() {
  await refreshSoon();
  setTimeout(loop, REFRESH_MS);
}

// ---- the selected VM: actions, graphs, console --------------------------------------------

function renderDetail() {
  const vm = vms.find((v) => v.name === selected);
  $("#detail").hidden = vm === undefined;
  if (vm === undefined) return;
  $("#detail-name").textContent = vm.name;
  const state = $("#detail-state");
  state.textContent = vm.state;
  state.className = `state state-${vm.state}`;
  const ended = vm.exit_status !== null && vm.exit_status !== undefined;
  const exit = ended ? `exit status ${vm.exit_status}` : "";
  $("#detail-message").textContent = [vm.message, exit].filter(Boolean).join(" · ");
  const entry = history.get(vm.name);
  for (const canvas of document.querySelectorAll("canvas[data-graph]")) {
    const kind = canvas.dataset.graph;
    const series = entry?.[kind] ?? [];
    drawSparkline(canvas, series, colors[kind]);
    const last = series.at(-1);
    const none = series.every((v) => v === null) ? "no data" : "";
    document.querySelector(`[data-value="${kind}"]`).textContent =
      last === null || last === undefined ? none : formats[kind](last);
  }
}

function select(name) {
  if (name === selected) return;
  selected = name;
  $("#delete").textContent = "Delete";
  delete $("#delete").dataset.armed;
  $("#snapshot-status").textContent = "";
  $("#restore-status").textContent = "";
  renderVms();
  openConsole(name);
  loadBackups(name);
}

// The restore list: the selected VM's backups (newest first), then the snapshot folder typed
// in the snapshot form. Restoring into a new name makes a new VM (a clone) and starts it; a
// backup restored with the name left empty brings the selected VM itself back (it is stopped
// first). The API has no such restore for a snapshot folder: that one needs a new name.
async function loadBackups(name) {
  const list = $("#restore-source");
  list.replaceChildren();
  if (name === null) return;
  let backups = [];
  try {
    backups = await api("GET", `/v1/vms/${encodeURIComponent(name)}/backups`);
  } catch {
    backups = []; // no backups to offer; the snapshot choice stays
  }
  if (name !== selected) return;
  for (const backup of backups.reverse()) {
    const option = document.createElement("option");
    option.value = `backup:${backup.id}`;
    const when = new Date(backup.created * 1000).toLocaleString();
    option.textContent = `backup ${when} (${bytes(backup.size)})`;
    list.append(option);
  }
  const snapshot = document.createElement("option");
  snapshot.value = "snapshot";
  snapshot.textContent = "the snapshot folder above";
  list.append(snapshot);
}

async function follow(op, status, what) {
  while (op.state === "running") {
    status.textContent = `${what}: ${Math.round(op.progress * 100)} %`;
    await new Promise((resolve) => setTimeout(resolve, 500));
    op = await api("GET", `/v1/operations/${encodeURIComponent(op.id)}`);
  }
  if (op.state === "failed") {
    status.textContent = `${what} failed`;
    throw new ApiError(op.error ?? { title: `the ${what} failed` });
  }
  return op;
}

$("#backup-now").addEventListener("click", () => {
  const name = selected;
  const status = $("#restore-status");
  attempt(async () => {
    const op = await api("POST", `/v1/vms/${encodeURIComponent(name)}/backups`);
    const done = await follow(op, status, "backup");
    status.textContent = `backup ${done.result?.id ?? ""} made`;
    await loadBackups(name);
  });
});

$("#restore-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const status = $("#restore-status");
  const source = form.elements.source.value;
  const target = form.elements.name.value.trim();
  const name = selected;
  attempt(async () => {
    let vm;
    try {
      vm = await restore(source, name, target, status);
    } catch (error) {
      status.textContent = "restore failed";
      throw error;
    }
    status.textContent = `${vm.name} ${vm.state}`;
    form.elements.name.value = "";
    await refreshSoon();
    select(vm.name); // the restored VM, with its console
  });
});

/** Restore `source` (a backup of `name`, or the snapshot folder) into `target`. */
async function restore(source, name, target, status) {
  if (source.startsWith("backup:")) {
    status.textContent = `restoring into ${target || name}`;
    const id = encodeURIComponent(source.slice("backup:".length));
    const body = target ? { name: target } : {};
    return api("POST", `/v1/vms/${encodeURIComponent(name)}/backups/${id}/restore`, body);
  }
  const path = $("#snapshot-form").elements.path.value.trim();
  if (!path || !target) {
    throw new Error("A snapshot restores into a new VM: type its folder above and a new name.");
  }
  status.textContent = `restoring into ${target}`;
  return api("POST", "/v1/vms?start=true", { name: target, restore: path, clone: true });
}

for (const button of document.querySelectorAll("button[data-action]")) {
  button.addEventListener("click", () =>
    attempt(async () => {
      await api("POST", `/v1/vms/${encodeURIComponent(selected)}/${button.dataset.action}`);
      await refreshSoon();
    }),
  );
}

// Delete asks twice (the second click within the same selection) rather than through a
// modal dialog; a running VM is deleted with force, which stops it first.
$("#delete").addEventListener("click", () => {
  const button = $("#delete");
  if (button.dataset.armed === undefined) {
    button.dataset.armed = "1";
    button.textContent = `Really delete ${selected}?`;
    return;
  }
  attempt(async () => {
    await api("DELETE", `/v1/vms/${encodeURIComponent(selected)}?force=true`);
    select(null);
    await refreshSoon();
  });
});

$("#snapshot-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const status = $("#snapshot-status");
  const name = selected;
  attempt(async () => {
    status.textContent = "snapshot: starting";
    let op = await api("POST", `/v1/vms/${encodeURIComponent(name)}/snapshots`, {
      path: form.elements.path.value,
    });
    while (op.state === "running") {
      status.textContent = `snapshot: ${Math.round(op.progress * 100)} %`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      op = await api("GET", `/v1/operations/${encodeURIComponent(op.id)}`);
    }
    if (op.state === "failed") {
      status.textContent = "snapshot failed";
      throw new ApiError(op.error ?? { title: "the snapshot failed" });
    }
    status.textContent = `snapshot written to ${op.result?.path ?? form.elements.path.value}`;
  });
});

// convertEol: a guest writing bare LF (the guest kit, boot loaders) would otherwise draw a
// staircase; CRLF from a Linux tty (onlcr) is unaffected.
const terminal = new Terminal({
  convertEol: true,
  cursorBlink: true,
  fontSize: 13,
  scrollback: 5000,
  theme: { background: "#0b1020" },
});
const fit = new FitAddon();
terminal.loadAddon(fit);
terminal.open($("#terminal"));
window.addEventListener("resize", () => fit.fit());

let socket = null;
const encoder = new TextEncoder();

terminal.onData((text) => {
  if (socket !== null && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(text));
});

/** How many leading bytes of `live` the tail of `log` already holds (they overlap when the
 *  log was read after the socket connected). */
function overlap(log, live) {
  for (let n = Math.min(log.length, live.length); n > 0; n -= 1) {
    let same = true;
    for (let i = 0; i < n && same; i += 1) same = log[log.length - n + i] === live[i];
    if (same) return n;
  }
  return 0;
}

/**
 * Connect the terminal to NAME's console. The socket carries live bytes only, so the page
 * first replays the tail of the console log; bytes that arrive while the log is read are
 * held and written after it, less what the log already showed.
 */
function openConsole(name) {
  if (socket !== null) {
    socket.onclose = null;
    socket.close();
    socket = null;
  }
  terminal.reset();
  const status = $("#console-status");
  status.textContent = "";
  if (name === null) return;
  requestAnimationFrame(() => fit.fit());
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(streamUrl(`/v1/vms/${encodeURIComponent(name)}/console`, scheme));
  ws.binaryType = "arraybuffer";
  socket = ws;
  let held = [];
  const toBytes = (data) =>
    typeof data === "string" ? encoder.encode(data) : new Uint8Array(data);
  ws.onmessage = (event) => {
    if (held !== null) held.push(toBytes(event.data));
    else terminal.write(toBytes(event.data));
  };
  ws.onopen = async () => {
    status.textContent = "connected";
    let log = new Uint8Array();
    try {
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      const path = `/v1/vms/${encodeURIComponent(name)}/logs?tail=${LOG_TAIL}`;
      const response = await fetch(path, { headers });
      if (response.ok) log = new Uint8Array(await response.arrayBuffer());
    } catch {
      // no log to replay: the live bytes still show
    }
    if (socket !== ws) return;
    const live = new Uint8Array(held.reduce((n, chunk) => n + chunk.length, 0));
    held.reduce((at, chunk) => (live.set(chunk, at), at + chunk.length), 0);
    held = null;
    terminal.write(log);
    terminal.write(live.subarray(overlap(log, live)));
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    const why = event.reason ? `: ${event.reason}` : "";
    status.textContent = event.code === 1000 ? "closed" : `closed (${event.code}${why})`;
  };
}

// ---- create -------------------------------------------------------------------------------

$("#create-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const field = (name) => form.elements[name].value.trim();
  const spec = { name: field("name"), memory: field("memory"), vcpus: Number(field("vcpus")) };
  if (field("kernel")) spec.kernel = field("kernel");
  if (field("cmdline")) spec.cmdline = field("cmdline");
  const start = form.elements.start.checked;
  attempt(async () => {
    const vm = await api("POST", `/v1/vms?start=${start}`, spec);
    $("#banner").hidden = true;
    form.elements.name.value = "";
    await refreshSoon();
    select(vm.name);
  });
});

// ---- events -------------------------------------------------------------------------------

function addEvent(event) {
  const item = document.createElement("li");
  item.dataset.kind = event.kind;
  const time = document.createElement("time");
  time.textContent = new Date(event.time * 1000).toLocaleTimeString();
  const text = document.createElement("span");
  const what = [event.vm, event.kind, event.state, event.message].filter(Boolean).join(" · ");
  text.textContent = what;
  item.append(time, text);
  const log = $("#event-log");
  log.prepend(item);
  while (log.children.length > MAX_EVENTS) log.lastElementChild.remove();
}

let lastEvent = 0;

function listen() {
  const source = new EventSource(streamUrl(`/v1/events?since=${lastEvent}`));
  const status = $("#events-status");
  const onEvent = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return; // not an Event: a keep-alive or a comment
    }
    if (typeof event.id !== "number" || event.id <= lastEvent) return;
    lastEvent = event.id;
    addEvent(event);
    if (event.vm) refreshSoon();
  };
  source.onmessage = onEvent; // kasoud sends unnamed events: `id:` and `data:` only
  source.onopen = () => {
    status.textContent = "live";
  };
  source.onerror = () => {
    status.textContent = "reconnecting";
    // EventSource retries by itself, but from its own URL: resume from the last id seen
    if (source.readyState === EventSource.CLOSED) setTimeout(listen, REFRESH_MS);
  };
}

// ---- start --------------------------------------------------------------------------------

listen();
loop();
