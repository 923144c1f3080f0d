/* herd dashboard: one page, one script, no dependencies.

   Reading order: formatting → HTML helpers (escape, in-place patch) → API calls (key, errors,
   reachability) → charts (inline SVG) → one function per tab → tab switching and start-up.
   Every figure comes from the router's JSON contract (/fleet/status and /dashboard/api/...). */
"use strict";

const TAB_FUNCTIONS = {
  overview: () => fleetOverview(),
  trends: () => trends(),
  models: () => modelInsights(),
  apps: () => apps(),
  benchmarks: () => benchmarks(),
  health: () => health(),
  recommendations: () => recommendations(),
  settings: () => settings(),
  requests: () => requests(),
};
const RANGES = { 1: "last hour", 24: "last 24 h", 168: "last 7 d", 720: "last 30 d" };
const FLEET_POLL_MS = 2000;
const PULL_POLL_MS = 2000;
const KEY_STORAGE = "herdApiKey";

const state = {
  hours: 24,
  tab: "overview",
  apiKey: readStoredKey(),
  fleet: null,            // last /fleet/status
  fleetAt: 0,             // when it arrived (ms)
  unreachable: false,
  needKey: false,
  staleTab: false,        // the shown tab failed for want of the router or the key: reload when back
  pollTimer: null,
  polling: false,         // a /fleet/status call is in flight
  pollAgain: false,       // someone asked for a poll meanwhile
  pullTimer: null,
  seq: {},                // tab -> load counter, so a slow old answer never paints over a newer one
  cache: {},              // tab -> last data, to redraw charts on resize
  expandedModels: new Set(),
  openTraceId: null,
  settings: null,
  management: null,
  benchRunning: false,
  seen: { model: new Set(), node: new Set(), app: new Set() },
};

// =============================================================================================
// Formatting: numbers for people; null is an em dash
// =============================================================================================

const DASH = "—";
const INT = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const isNum = (v) => typeof v === "number" && Number.isFinite(v);

// `+ 0` turns -0 (which the router sends for a penalty of nothing) into 0: no "-0" on screen
function fmtInt(v) {
  return isNum(v) ? INT.format(Math.round(v) + 0) : DASH;
}

function fmtFixed(v, digits) {
  if (!isNum(v)) return DASH;
  const text = v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  return /^-0(\.0*)?$/.test(text) ? text.slice(1) : text;
}

function fmtMs(ms) {
  if (!isNum(ms)) return DASH;
  if (ms === 0) return "0 ms";
  if (ms < 1) return "<1 ms";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 100) return `${s.toFixed(1)} s`;
  if (s < 3600) {
    const whole = Math.round(s);
    return whole % 60 ? `${Math.floor(whole / 60)} min ${whole % 60} s` : `${whole / 60} min`;
  }
  return `${(s / 3600).toFixed(1)} h`;
}

/** Short milliseconds for chart axes: "500 ms", "2.5 s", "1.7 min". */
function fmtMsAxis(ms) {
  if (!isNum(ms)) return DASH;
  if (ms === 0) return "0";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${+(ms / 1000).toFixed(1)} s`;
  return `${+(ms / 60000).toFixed(1)} min`;
}

function fmtSec(s) {
  return isNum(s) ? fmtMs(s * 1000) : DASH;
}

function fmtTps(v) {
  if (!isNum(v)) return DASH;
  return `${v < 10 ? v.toFixed(1) : fmtInt(v)} tok/s`;
}

function fmtGB(gb) {
  if (!isNum(gb)) return DASH;
  if (gb > 0 && gb < 1) return `${Math.round(gb * 1000)} MB`;
  if (gb < 100) return `${gb.toFixed(1)} GB`;
  return `${fmtInt(gb)} GB`;
}

// herd's *_gb fields count 1024³ bytes (as psutil and the agent do); bytes are shown the same way.
const BYTES_PER_GB = 1024 ** 3;

function fmtBytes(bytes) {
  return isNum(bytes) ? fmtGB(bytes / BYTES_PER_GB) : DASH;
}

function fmtRate(fraction) {
  if (!isNum(fraction)) return DASH;
  const pct = fraction * 100;
  return `${pct === 0 ? "0" : pct < 10 ? pct.toFixed(1) : Math.round(pct)} %`;
}

function fmtCompact(v) {
  if (!isNum(v)) return DASH;
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}B`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toFixed(0)}k`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(a < 10 && a % 1 ? 1 : 0)}`;
}

function fmtDuration(seconds) {
  if (!isNum(seconds)) return DASH;
  const s = Math.abs(seconds);
  if (s < 60) return `${Math.max(1, Math.round(s))} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${+(s / 3600).toFixed(s < 36000 ? 1 : 0)} h`;
  return `${+(s / 86400).toFixed(s < 864000 ? 1 : 0)} d`;
}

function fmtAgo(ts) {
  if (!isNum(ts)) return DASH;
  const d = Date.now() / 1000 - ts;
  if (d < 1 && d > -5) return "just now";
  if (d < 0) return `in ${fmtDuration(-d)}`;
  if (d < 60) return `${Math.round(d)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} d ago`;
}

function parseIso(text) {
  if (typeof text !== "string" || !text) return null;
  // Ollama sends nanoseconds ("…:00.123456789-07:00"); Date.parse wants at most milliseconds.
  const t = Date.parse(text.replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(t) ? null : t / 1000;
}

function fmtExpiry(iso) {
  const t = parseIso(iso);
  if (t === null) return DASH;
  const d = t - Date.now() / 1000;
  if (d > 365 * 86400) return "kept loaded";
  if (d <= 0) return "unloading";
  return `expires in ${fmtDuration(d)}`;
}

const CLOCK = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const DATE_TIME = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

function fmtClock(ts) {
  if (!isNum(ts)) return DASH;
  const date = new Date(ts * 1000);
  return date.toDateString() === new Date().toDateString() ? CLOCK.format(date) : DATE_TIME.format(date);
}

function fmtAxisTime(ts, hours) {
  const date = new Date(ts * 1000);
  if (hours <= 24) return new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }).format(date);
  if (hours <= 168) {
    const day = new Intl.DateTimeFormat(undefined, { weekday: "short" }).format(date);
    return `${day} ${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
  }
  return new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" }).format(date);
}

function rangeLabel(hours) {
  if (RANGES[hours]) return RANGES[hours];
  if (!isNum(hours)) return "selected range";
  return hours < 48 ? `last ${+hours.toFixed(1)} h` : `last ${+(hours / 24).toFixed(1)} d`;
}

function humanKey(key) {
  return String(key).replace(/_/g, " ");
}

/** A label for a figure whose value is shown with its unit: "size_gb" -> "size", "load_s" -> "load". */
function figureLabel(key) {
  return humanKey(String(key).replace(/_(gb|s|ms|tps)$/, ""));
}

/** Formats an evidence value by what its key says it is (…_s seconds, …_ms, …_gb, …tps, last_…). */
function fmtByKey(key, value) {
  if (value === null || value === undefined) return DASH;
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.map((v) => fmtByKey("", v)).join(", ") || DASH;
  if (typeof value === "object") {  // per node, e.g. {"rtx": 60.2, "studio": 31.0}: each formatted as `key` says
    return Object.entries(value).map(([name, v]) => `${name} ${fmtByKey(key, v)}`).join(" · ") || DASH;
  }
  if (!isNum(value)) return String(value);
  const k = key.toLowerCase();
  if (k === "last_used" || k === "last_seen" || k === "timestamp" || k === "started") return fmtAgo(value);
  if (k.endsWith("_ms")) return fmtMs(value);
  if (k.endsWith("_s")) return fmtSec(value);
  if (k.endsWith("_gb")) return fmtGB(value);
  if (k.includes("tps")) return fmtTps(value);
  if (k.endsWith("rate")) return fmtRate(value);
  return Number.isInteger(value) ? fmtInt(value) : fmtFixed(value, 1);
}

// =============================================================================================
// HTML helpers: escaping, small builders, and patching the DOM in place (no flicker)
// =============================================================================================

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function textOr(value) {
  return value === null || value === undefined || value === "" ? DASH : esc(value);
}

function ago(ts) {
  return isNum(ts) ? `<span class="ago" data-ago="${ts}" title="${esc(fmtClock(ts))}">${esc(fmtAgo(ts))}</span>` : DASH;
}

function statusBadge(status) {
  const s = String(status || "unknown");
  return `<span class="badge st-${esc(s)}">${esc(s)}</span>`;
}

function nodeStatusBadge(status) {
  const words = { online: "Online", degraded: "Degraded", offline: "Offline" };
  const s = words[status] ? status : "unknown";
  return `<span class="status-badge status-${s}"><span class="dot" aria-hidden="true"></span>${esc(words[s] || status || "Unknown")}</span>`;
}

function emptyLine(text) {
  return `<p class="empty">${esc(text)}</p>`;
}

/** A table from column specs {label, num?, cell(row) → HTML}. */
function table(id, columns, rows, rowAttrs = () => "") {
  const head = columns.map((c) => `<th scope="col"${c.num ? ' class="num"' : ""}${c.title ? ` title="${esc(c.title)}"` : ""}>${esc(c.label)}</th>`).join("");
  const body = rows.map((r, i) => `<tr${rowAttrs(r, i)}>${columns.map((c) => `<td${c.num ? ' class="num"' : ""}>${c.cell(r)}</td>`).join("")}</tr>`).join("");
  return `<div class="table-wrap"><table id="${esc(id)}" class="data"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function totalsBoxes(items) {
  return items.map(([key, label, value, extra]) =>
    `<div class="total" data-key="${esc(key)}"><div class="total-value">${value}</div><div class="total-label">${esc(label)}${extra ? ` <span class="muted">${extra}</span>` : ""}</div></div>`).join("");
}

/** Makes `target`'s children match `html`, touching only what differs (keeps scroll, focus, open rows). */
function patch(target, html) {
  const tpl = document.createElement("template");
  tpl.innerHTML = html;
  patchChildren(target, tpl.content);
}

function patchChildren(into, from) {
  const olds = Array.from(into.childNodes);
  const news = Array.from(from.childNodes);
  news.forEach((fresh, i) => {
    const old = olds[i];
    if (!old) {
      into.appendChild(fresh);
    } else if (old.nodeType !== fresh.nodeType || old.nodeName !== fresh.nodeName
               || (old.nodeType === 1 && old.getAttribute("data-key") !== fresh.getAttribute("data-key"))) {
      into.replaceChild(fresh, old);
    } else if (old.nodeType === 1) {
      patchAttributes(old, fresh);
      patchChildren(old, fresh);
    } else if (old.nodeValue !== fresh.nodeValue) {
      old.nodeValue = fresh.nodeValue;
    }
  });
  for (let i = olds.length - 1; i >= news.length; i--) into.removeChild(olds[i]);
}

function patchAttributes(old, fresh) {
  for (const { name, value } of Array.from(fresh.attributes)) {
    if (old.getAttribute(name) !== value) old.setAttribute(name, value);
  }
  for (const { name } of Array.from(old.attributes)) {
    if (!fresh.hasAttribute(name) && !(name === "open" && old.nodeName === "DETAILS")) old.removeAttribute(name);
  }
}

/** Shows a message line (`kind` "error", or "wait" for a neutral waiting note); "" hides it. */
function setError(id, message, kind = "error") {
  const el = document.getElementById(id);
  if (!el) return;
  el.hidden = !message;
  el.textContent = message || "";
  el.className = kind === "wait" ? "wait-line" : "error-line";
}

/** Replaces a select's options only when they changed; keeps the chosen value when it still exists. */
function setOptions(select, options, keep = select.value) {
  const signature = JSON.stringify(options);
  if (select.dataset.options !== signature) {
    select.dataset.options = signature;
    select.innerHTML = options.map((o) => `<option value="${esc(o.value)}"${o.disabled ? " disabled" : ""}>${esc(o.label)}</option>`).join("");
  }
  if (options.some((o) => o.value === keep && !o.disabled)) select.value = keep;
  else {
    const first = options.find((o) => !o.disabled);
    select.value = first ? first.value : "";
  }
}

// =============================================================================================
// API: every call sends X-Herd-Dashboard and the key; 401 asks for the key; a network error
// shows the "not reachable" line until the router answers again
// =============================================================================================

class ApiError extends Error {
  constructor(message, status, kind) {
    super(message);
    this.status = status;
    this.kind = kind;  // network | auth | http
  }
}

function readStoredKey() {
  try {
    return window.localStorage.getItem(KEY_STORAGE) || null;
  } catch (_) {
    return null;
  }
}

function storeKey(key) {
  try {
    if (key) window.localStorage.setItem(KEY_STORAGE, key);
    else window.localStorage.removeItem(KEY_STORAGE);
  } catch (_) { /* private mode: the key lives for this page only */ }
}

function withRange(path, params = {}) {
  const query = new URLSearchParams({ hours: String(state.hours) });
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) query.set(k, String(v));
  return `${path}?${query}`;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { "X-Herd-Dashboard": "1", Accept: "application/json" };
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (_) {
    setReachable(false);
    throw new ApiError(`herd is not reachable at ${location.origin}`, 0, "network");
  }
  setReachable(true);
  let text = "";
  try {
    text = await response.text();
  } catch (_) {
    setReachable(false);
    throw new ApiError(`herd is not reachable at ${location.origin}`, 0, "network");
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (response.status === 401) {
    const message = errorMessage(data, text, response);
    askForKey(message);
    throw new ApiError(message, 401, "auth");
  }
  if (!response.ok) throw new ApiError(errorMessage(data, text, response), response.status, "http");
  if (!data || typeof data !== "object") throw new ApiError(`herd answered ${path} with something that is not JSON`, response.status, "http");
  return data;
}

function errorMessage(data, text, response) {
  const error = data && data.error;
  if (typeof error === "string" && error) return error;
  if (error && typeof error.message === "string") return error.message;
  const snippet = !data && text && text.length < 200 ? `: ${text.trim()}` : "";
  return `${response.status} ${response.statusText || "error"}${snippet}`;
}

function setReachable(ok) {
  if (ok === !state.unreachable) return;
  state.unreachable = !ok;
  const line = $("#alert-unreachable");
  if (!ok) {
    line.innerHTML = `herd is not reachable at ${esc(location.origin)}: start <code>herd</code> on the router machine. Retrying every 2 s…`;
    line.hidden = false;
    state.staleTab = true;
  } else {
    line.hidden = true;
    line.textContent = "";
  }
  updateStatusLine();
}

function askForKey(message) {
  const dialog = $("#auth-dialog");
  const hadKey = Boolean(state.apiKey);
  state.needKey = true;
  state.staleTab = true;
  updateStatusLine();
  if (dialog.open) return;
  const error = $("#auth-error");
  error.hidden = !hadKey;
  error.textContent = hadKey ? `That key was refused: ${message}` : "";
  $("#api-key-input").value = "";
  showDialog(dialog);
}

function submitKey(event) {
  event.preventDefault();
  const key = $("#api-key-input").value.trim();
  if (!key) return;
  state.apiKey = key;
  storeKey(key);
  state.needKey = false;
  closeDialog($("#auth-dialog"));
  updateKeyHint();
  pollFleet();
  showTab(state.tab);
}

function forgetKey() {
  state.apiKey = null;
  storeKey(null);
  updateKeyHint();
  pollFleet();
}

function updateKeyHint() {
  const hint = $("#key-hint");
  if (hint) hint.hidden = !state.apiKey;
}

function showDialog(dialog) {
  if (typeof dialog.showModal === "function") {
    if (!dialog.open) dialog.showModal();
  } else {
    dialog.setAttribute("open", "");
  }
}

function closeDialog(dialog) {
  if (typeof dialog.close === "function") {
    if (dialog.open) dialog.close();
  } else {
    dialog.removeAttribute("open");
  }
}

/** An in-page confirmation (#confirm-dialog): resolves true when #confirm-ok is pressed. */
function confirmAction(title, message, okLabel) {
  const dialog = $("#confirm-dialog");
  if (typeof dialog.showModal !== "function") return Promise.resolve(window.confirm(`${title}\n\n${message}`));
  $("#confirm-title").textContent = title;
  $("#confirm-message").textContent = message;
  $("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    showDialog(dialog);
    $("#confirm-cancel").focus();
  });
}

// =============================================================================================
// Charts: inline SVG drawn here (time series, horizontal bars) and one shared tooltip
// =============================================================================================

const COLORS = {
  requests: "#3b82f6", errors: "#ef4444", p50: "#2563eb", p95: "#93c5fd", ttft50: "#059669", ttft95: "#6ee7b7",
  tokensIn: "#8b5cf6", tokensOut: "#f59e0b",
};

function niceTicks(max, count = 4) {
  if (!isNum(max) || max <= 0) return [0, 1];
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * power).find((s) => s >= raw) || 10 * power;
  const ticks = [];
  for (let v = 0; v < max + step * 0.999; v += step) ticks.push(+v.toFixed(10));
  return ticks.length > 1 ? ticks : [0, step];
}

function legend(series) {
  return `<div class="legend">${series.map((s) => `<span class="legend-item"><span class="swatch${s.line ? " line" : ""}" style="background:${s.color}"></span>${esc(s.label)}</span>`).join("")}</div>`;
}

/**
 * A time-series chart as SVG. mode: "overlay" (bars drawn over each other, e.g. errors over
 * requests), "stack" (stacked bars) or "lines" (one line per series; null breaks the line).
 */
function timeChart(el, { buckets, bucketS, hours, series, mode, yFmt }) {
  const W = Math.max(320, Math.floor(el.clientWidth || 800));
  const H = 210;
  const m = { l: 60, r: 14, t: 10, b: 26 };
  const iw = W - m.l - m.r;
  const ih = H - m.t - m.b;
  const n = buckets.length;
  const bw = iw / Math.max(1, n);
  const value = (b, s) => (isNum(b[s.key]) ? b[s.key] : null);
  let max = 0;
  for (const b of buckets) {
    if (mode === "stack") max = Math.max(max, series.reduce((sum, s) => sum + (value(b, s) || 0), 0));
    else for (const s of series) max = Math.max(max, value(b, s) || 0);
  }
  const ticks = niceTicks(max);
  const top = ticks[ticks.length - 1];
  const y = (v) => m.t + ih - (v / top) * ih;
  const parts = [];
  for (const t of ticks) {
    parts.push(`<line class="grid" x1="${m.l}" x2="${W - m.r}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}"/>`);
    parts.push(`<text class="axis" x="${m.l - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end">${esc(yFmt(t))}</text>`);
  }
  const every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(iw / 90))));
  for (let i = 0; i < n; i += every) {
    const x = m.l + i * bw + bw / 2;
    parts.push(`<text class="axis" x="${x.toFixed(1)}" y="${H - 8}" text-anchor="middle">${esc(fmtAxisTime(buckets[i].start, hours))}</text>`);
  }
  if (mode === "lines") {
    for (const s of series) {
      let d = "";
      let run = [];
      const flush = () => {
        if (run.length === 1) parts.push(`<circle cx="${run[0][0].toFixed(1)}" cy="${run[0][1].toFixed(1)}" r="2.5" fill="${s.color}"/>`);
        run = [];
      };
      buckets.forEach((b, i) => {
        const v = value(b, s);
        if (v === null) { flush(); return; }
        const pt = [m.l + i * bw + bw / 2, y(v)];
        d += `${run.length ? "L" : "M"}${pt[0].toFixed(1)} ${pt[1].toFixed(1)}`;
        run.push(pt);
      });
      flush();
      if (d) parts.push(`<path class="series" d="${d}" stroke="${s.color}"${s.dash ? ' stroke-dasharray="4 3"' : ""}/>`);
    }
  } else {
    const gap = bw > 6 ? Math.min(4, bw * 0.2) : bw > 2 ? 0.5 : 0;
    buckets.forEach((b, i) => {
      let base = 0;
      for (const s of series) {
        const v = value(b, s);
        if (!v) continue;
        const from = mode === "stack" ? base : 0;
        const y1 = y(from + v);
        const h = Math.max(1, y(from) - y1);
        parts.push(`<rect x="${(m.l + i * bw + gap / 2).toFixed(1)}" y="${y1.toFixed(1)}" width="${Math.max(0.8, bw - gap).toFixed(1)}" height="${h.toFixed(1)}" fill="${s.color}"/>`);
        if (mode === "stack") base += v;
      }
    });
  }
  parts.push(`<line class="baseline" x1="${m.l}" x2="${W - m.r}" y1="${m.t + ih}" y2="${m.t + ih}"/>`);
  parts.push(`<rect class="hover-band" x="0" y="${m.t}" width="${Math.max(1, bw).toFixed(1)}" height="${ih}" visibility="hidden"/>`);
  parts.push(`<rect class="hit-area" x="${m.l}" y="${m.t}" width="${iw}" height="${ih}" fill="transparent"/>`);
  el._chart = { buckets, series, bucketS, hours, left: m.l, bw, yFmt };
  const label = `${series.map((s) => s.label).join(", ")} per ${fmtDuration(bucketS)}`;
  patch(el, `${legend(series)}<svg class="chart-svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(label)}">${parts.join("")}</svg>`);
}

/** Horizontal bars: rows [{label, value, part?, title?}] (part is drawn over value, e.g. errors). */
function barChart(el, rows, { color, partColor, fmt, labelWidth: wantLabel = 220 }) {
  const W = Math.max(320, Math.floor(el.clientWidth || 700));
  const rowH = 26;
  const H = rows.length * rowH + 6;
  const valueW = 86;
  const labelWidth = Math.min(wantLabel, Math.floor(W * 0.4));
  const iw = Math.max(40, W - labelWidth - valueW - 10);
  const max = Math.max(1e-9, ...rows.map((r) => (isNum(r.value) ? r.value : 0)));
  const maxChars = Math.floor(labelWidth / 7.5);
  const parts = rows.map((r, i) => {
    const y = i * rowH + 4;
    const v = isNum(r.value) ? r.value : 0;
    const w = (v / max) * iw;
    const label = r.label.length > maxChars ? `${r.label.slice(0, maxChars - 1)}…` : r.label;
    const part = isNum(r.part) && r.part > 0 ? `<rect x="${labelWidth}" y="${y}" width="${Math.max(1, (r.part / max) * iw).toFixed(1)}" height="${rowH - 8}" rx="2" fill="${partColor}"/>` : "";
    return `<g class="bar-row" data-key="${esc(r.label)}"><title>${esc(r.title || `${r.label}: ${fmt(r.value)}`)}</title>`
      + `<text class="bar-label" x="${labelWidth - 8}" y="${y + rowH / 2}" text-anchor="end">${esc(label)}</text>`
      + `<rect class="bar-track" x="${labelWidth}" y="${y}" width="${iw}" height="${rowH - 8}" rx="2"/>`
      + `<rect x="${labelWidth}" y="${y}" width="${Math.max(v ? 1 : 0, w).toFixed(1)}" height="${rowH - 8}" rx="2" fill="${color}"/>${part}`
      + `<text class="bar-value" x="${labelWidth + iw + 8}" y="${y + rowH / 2}">${esc(fmt(r.value))}</text></g>`;
  });
  patch(el, `<svg class="chart-svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img">${parts.join("")}</svg>`);
}

function chartHover(event) {
  const tip = $("#chart-tip");
  const svg = event.target.closest && event.target.closest(".chart-svg");
  const holder = svg && svg.parentElement;
  const chart = holder && holder._chart;
  $$(".hover-band").forEach((band) => { if (!svg || !svg.contains(band)) band.setAttribute("visibility", "hidden"); });
  if (!chart || !chart.buckets.length) {
    tip.hidden = true;
    return;
  }
  const box = svg.getBoundingClientRect();
  const i = Math.floor((event.clientX - box.left - chart.left) / chart.bw);
  const bucket = chart.buckets[i];
  if (!bucket) {
    tip.hidden = true;
    return;
  }
  const band = $(".hover-band", svg);
  band.setAttribute("x", (chart.left + i * chart.bw).toFixed(1));
  band.setAttribute("visibility", "visible");
  const rows = chart.series.map((s) => `<div><span class="swatch" style="background:${s.color}"></span>${esc(s.label)} <b>${esc(isNum(bucket[s.key]) ? chart.yFmt(bucket[s.key], true) : DASH)}</b></div>`).join("");
  tip.innerHTML = `<div class="tip-title">${esc(fmtClock(bucket.start))} · ${esc(fmtDuration(chart.bucketS))}</div>${rows}`;
  tip.hidden = false;
  const x = Math.min(window.innerWidth - tip.offsetWidth - 8, event.clientX + 14);
  const yPos = Math.min(window.innerHeight - tip.offsetHeight - 8, event.clientY + 14);
  tip.style.left = `${Math.max(4, x)}px`;
  tip.style.top = `${Math.max(4, yPos)}px`;
}

// =============================================================================================
// Tab plumbing: each tab function loads its data and renders; errors land in #<tab>-error
// =============================================================================================

function ticket(tab) {
  const n = (state.seq[tab] || 0) + 1;
  state.seq[tab] = n;
  return () => state.seq[tab] === n && state.tab === tab;
}

function setRange(tab, range) {
  const el = document.getElementById(`${tab}-range`);
  if (!el) return;
  const hours = range && isNum(range.hours) ? range.hours : state.hours;
  let text = `Figures for the ${rangeLabel(hours)}`;
  if (range && isNum(range.since) && isNum(range.until)) text += ` (${DATE_TIME.format(new Date(range.since * 1000))} – ${DATE_TIME.format(new Date(range.until * 1000))})`;
  el.textContent = text;
}

async function runTab(tab) {
  try {
    await TAB_FUNCTIONS[tab]();
    if (state.tab === tab) setError(`${tab}-error`, "");
  } catch (error) {
    if (!(error instanceof ApiError)) {
      setError(`${tab}-error`, `Could not show this tab: ${error && error.message ? error.message : error}`);
      return;
    }
    if (error.kind === "network" || error.kind === "auth") {
      state.staleTab = true;
      setError(`${tab}-error`, error.kind === "auth" ? "Waiting for the API key…" : "Waiting for herd to answer…", "wait");
    } else {
      setError(`${tab}-error`, error.message);
    }
  }
}

// =============================================================================================
// Fleet Overview (#overview): /fleet/status every 2 s, updated in place
// =============================================================================================

async function pollFleet() {
  if (state.polling) {
    state.pollAgain = true;
    return;
  }
  state.polling = true;
  clearTimeout(state.pollTimer);
  if (!state.needKey) {
    try {
      state.fleet = await api("/fleet/status");
      state.fleetAt = Date.now();
      updateNoNodeAlert();
      if (state.tab === "overview") renderFleetOverview(state.fleet);
      if (state.staleTab && state.tab !== "overview") {
        state.staleTab = false;
        runTab(state.tab);
      }
      state.staleTab = false;
    } catch (error) {
      if (state.tab === "overview" && !state.fleet) {
        const waiting = error.kind === "auth" ? "Waiting for the API key…" : error.kind === "network" ? "Waiting for herd…" : error.message;
        patch($("#node-cards"), emptyLine(waiting));
      }
    }
    refreshAgoLabels();
  }
  updateStatusLine();
  state.polling = false;
  if (state.pollAgain) {
    state.pollAgain = false;
    pollFleet();
    return;
  }
  state.pollTimer = setTimeout(pollFleet, FLEET_POLL_MS);
}

async function fleetOverview() {
  if (state.fleet) renderFleetOverview(state.fleet);
  else pollFleet();
}

function updateNoNodeAlert() {
  const line = $("#alert-no-nodes");
  const fleet = state.fleet && state.fleet.fleet;
  const none = Boolean(fleet) && fleet.nodes_online === 0;
  line.hidden = !none;
  if (none) {
    const want = `No node is online: start <code>herd-node</code> on each Ollama machine, or <code>herd-node --router-url ${esc(location.protocol)}//${esc(location.host)}</code> where mDNS does not reach`;
    if (line.innerHTML !== want) line.innerHTML = want;
  }
}

function updateStatusLine() {
  const line = $("#status-line");
  let html;
  if (state.unreachable) html = `<span class="live-dot down"></span>Reconnecting…${state.fleetAt ? ` last update ${esc(CLOCK.format(new Date(state.fleetAt)))}` : ""}`;
  else if (state.needKey) html = `<span class="live-dot warn"></span>API key needed`;
  else if (state.fleet && state.fleet.fleet) {
    const f = state.fleet.fleet;
    html = `<span class="live-dot ${f.nodes_online ? "up" : "warn"}"></span>${fmtInt(f.nodes_online)} of ${fmtInt(f.nodes_total)} nodes online · ${fmtInt(f.requests_active)} running · ${fmtInt(f.requests_queued)} queued · updated ${esc(CLOCK.format(new Date(state.fleetAt)))}`;
  } else html = "Connecting…";
  if (line.innerHTML !== html) line.innerHTML = html;
}

function refreshAgoLabels() {
  for (const el of $$("[data-ago]")) {
    const text = fmtAgo(Number(el.getAttribute("data-ago")));
    if (el.textContent !== text) el.textContent = text;
  }
}

function renderFleetOverview(data) {
  const fleet = data.fleet || {};
  const nodes = Array.isArray(data.nodes) ? data.nodes : [];
  patch($("#fleet-totals"), totalsBoxes([
    ["nodes_online", "Nodes online", `${fmtInt(fleet.nodes_online)}<span class="of"> / ${fmtInt(fleet.nodes_total)}</span>`],
    ["models_loaded", "Models loaded", fmtInt(fleet.models_loaded)],
    ["requests_active", "Requests running", fmtInt(fleet.requests_active)],
    ["requests_queued", "Queued in herd", fmtInt(fleet.requests_queued)],
  ]));
  patch($("#node-cards"), nodes.length ? nodes.map(nodeCard).join("")
    : emptyLine("No nodes yet: start herd-node on each Ollama machine, or start herd with --node http://host:11434."));
}

/** The memory a node plans models into: VRAM on a discrete GPU, else (unified) memory. */
function memoryPool(node) {
  const gpu = node.gpu || null;
  if (gpu && isNum(gpu.vram_total_gb) && gpu.kind !== "apple") {
    return { label: "VRAM", total: gpu.vram_total_gb,
             available: isNum(gpu.vram_used_gb) ? Math.max(0, gpu.vram_total_gb - gpu.vram_used_gb) : null };
  }
  if (node.memory && isNum(node.memory.total_gb)) {
    return { label: gpu && gpu.kind === "apple" ? "unified memory" : "memory", total: node.memory.total_gb,
             available: isNum(node.memory.available_gb) ? node.memory.available_gb : null };
  }
  return { label: "memory", total: null, available: null };
}

function memoryBar(node, models) {
  const pool = memoryPool(node);
  const budget = isNum(node.memory_budget_gb) ? node.memory_budget_gb : null;
  if (pool.total === null && budget === null) {
    const gb = models.reduce((sum, m) => sum + (isNum(m.size_vram) ? m.size_vram : isNum(m.size) ? m.size : 0), 0) / BYTES_PER_GB;
    return `<div class="mem"><div class="mem-legend"><span class="k-models">models ${esc(fmtGB(gb))}</span> · <span class="muted">memory not reported (no herd-node agent)</span></div></div>`;
  }
  const modelsGb = models.reduce((sum, m) => sum + (isNum(m.size_vram) ? m.size_vram : isNum(m.size) ? m.size : 0), 0) / BYTES_PER_GB;
  const scale = Math.max(pool.total || 0, budget || 0, modelsGb, 1e-9);
  const pct = (gb) => `${Math.max(0, Math.min(100, (gb / scale) * 100)).toFixed(2)}%`;
  const other = pool.total !== null && pool.available !== null ? Math.max(0, pool.total - pool.available - modelsGb) : 0;
  const over = budget !== null && modelsGb > budget;
  const segments = [
    `<span class="seg seg-models${over ? " over" : ""}" style="width:${pct(modelsGb)}" title="Loaded models ${esc(fmtGB(modelsGb))}"></span>`,
    other > 0 ? `<span class="seg seg-other" style="width:${pct(other)}" title="Used by other programs ${esc(fmtGB(other))}"></span>` : "",
    pool.available !== null ? `<span class="seg seg-free" style="width:${pct(pool.available)}" title="Available ${esc(fmtGB(pool.available))}"></span>` : "",
  ].join("");
  const marker = budget !== null && budget < scale ? `<span class="budget-mark" style="left:${pct(budget)}" title="Budget ${esc(fmtGB(budget))}"></span>` : "";
  const legendText = [`<span class="k-models">models ${esc(fmtGB(modelsGb))}</span>`,
    pool.available !== null ? `<span class="k-free">available ${esc(fmtGB(pool.available))}</span>` : "",
    budget !== null ? `<span>budget ${esc(fmtGB(budget))}</span>` : "",
    pool.total !== null ? `<span class="muted">of ${esc(fmtGB(pool.total))} ${esc(pool.label)}</span>` : ""].filter(Boolean).join(" · ");
  return `<div class="mem"><div class="mem-bar" role="img" aria-label="Memory: ${esc(legendText.replace(/<[^>]+>/g, ""))}">${segments}${marker}</div><div class="mem-legend">${legendText}</div></div>`;
}

/** What a node computes on, in words: the GPUs herd-node listed (by name), else the kind. */
function gpuLabel(gpu) {
  if (!gpu || typeof gpu !== "object") return "";
  const names = Array.isArray(gpu.gpus) ? gpu.gpus.map((g) => g && g.name).filter(Boolean) : [];
  if (names.length) {
    const counts = new Map();
    for (const name of names) counts.set(name, (counts.get(name) || 0) + 1);
    const text = Array.from(counts, ([name, n]) => (n > 1 ? `${n} × ${name}` : name)).join(" + ");
    return isNum(gpu.vram_total_gb) ? `${text} (${fmtGB(gpu.vram_total_gb)})` : text;
  }
  if (gpu.kind === "apple" || gpu.unified) return "Apple silicon";
  const kind = gpu.kind === "nvidia" ? "NVIDIA GPU" : gpu.kind ? `${gpu.kind} GPU` : "GPU";
  return isNum(gpu.vram_total_gb) ? `${kind} (${fmtGB(gpu.vram_total_gb)})` : kind;
}

function nodeCard(node) {
  const models = Array.isArray(node.models_loaded) ? node.models_loaded : [];
  const offline = node.status === "offline";
  const queuedByModel = (state.fleet && state.fleet.fleet && state.fleet.fleet.queued_by_model) || {};
  const gpu = gpuLabel(node.gpu);
  const ctxHow = { reported: "reported by the node", seen: "seen in /api/ps", guessed: "herd's guess: no model has shown it yet" }[node.default_context];
  const ctx = isNum(node.default_context_length)
    ? `<span title="${esc(`The context a model gets here when a request does not set num_ctx${ctxHow ? ` (${ctxHow})` : ""}`)}">${node.default_context === "guessed" ? "≈ " : ""}${fmtInt(node.default_context_length)}</span>` : DASH;
  const stats = [
    ["Ollama", textOr(node.ollama_version)],
    ["Installed", Array.isArray(node.models_available) ? `${fmtInt(node.models_available.length)} model${node.models_available.length === 1 ? "" : "s"}` : DASH],
    ["CPU", isNum(node.cpu_percent) ? `${fmtFixed(node.cpu_percent, 0)} %` : DASH],
    ["Slots", isNum(node.num_parallel) ? `<span title="requests it runs at once for each model">${fmtInt(node.num_parallel)} <span class="muted">/ model</span></span>` : DASH],
    ["Default context", ctx],
    ["Decode speed", isNum(node.decode_gbs) ? `<span title="model gigabytes read per second while generating">${fmtInt(node.decode_gbs)} GB/s</span>` : DASH],
    ["Running", fmtInt(node.requests_active)],
    ["Last seen", ago(node.last_seen)],
  ].map(([k, v]) => `<div class="stat"><dt>${esc(k)}</dt><dd>${v}</dd></div>`).join("");
  const troubles = [];
  if (node.failures) troubles.push(`${fmtInt(node.failures)} failure${node.failures === 1 ? "" : "s"}${node.last_failure ? `: ${esc(node.last_failure)}` : ""}`);
  if (isNum(node.cooling_down_s) && node.cooling_down_s > 0) troubles.push(`cooling down for ${esc(fmtDuration(node.cooling_down_s))}`);
  if (node.ollama_error) troubles.push(`Ollama: ${esc(node.ollama_error)}`);
  const troubleText = troubles.join(" · ").replace(/<[^>]+>/g, "");
  // herd queues requests per model in the router (late binding), not per node: the queued count is fleet-wide
  const busy = (m) => {
    const queued = queuedByModel[m.name] || 0;
    return `${fmtInt(m.requests_active || 0)}${queued && !offline ? ` <span class="muted" title="waiting in herd for a slot on any node">+ ${fmtInt(queued)} queued</span>` : ""}`;
  };
  const loaded = models.length
    ? `<div class="table-wrap${offline ? " stale" : ""}"><table class="mini"><thead><tr><th scope="col">${offline ? "Was loaded" : "Loaded model"}</th><th scope="col" class="num">Size</th><th scope="col" class="num">Context</th><th scope="col">Unloads</th><th scope="col" class="num" title="requests running on this node">Running</th></tr></thead><tbody>${models.map((m) =>
      `<tr class="loaded-model" data-model="${esc(m.name)}"><td class="model-name">${esc(m.name)}</td><td class="num">${esc(fmtBytes(isNum(m.size_vram) ? m.size_vram : m.size))}</td><td class="num">${esc(fmtInt(m.context_length))}</td><td>${esc(fmtExpiry(m.expires_at))}</td><td class="num">${busy(m)}</td></tr>`).join("")}</tbody></table></div>`
    : `<p class="empty small">${offline ? "Offline: nothing loaded that herd can reach" : "No model loaded"}</p>`;
  const sub = [node.hostname && node.hostname !== node.node_id ? esc(node.hostname) : "", gpu ? `<span class="gpu">${esc(gpu)}</span>` : "",
    `<span class="mono">${textOr(node.ollama_url)}</span>`, node.source ? `via ${esc(node.source)}` : ""].filter(Boolean).join('<span class="sep">·</span>');
  return `<article class="card node-card node-${esc(node.status)}" data-key="${esc(node.node_id)}" data-node="${esc(node.node_id)}">
<header class="node-head"><h3 class="node-name">${esc(node.node_id)}</h3>${nodeStatusBadge(node.status)}</header>
<p class="node-sub">${sub}</p>
${memoryBar(node, models)}
<dl class="stats">${stats}</dl>
${troubles.length ? `<p class="node-trouble" title="${esc(troubleText)}">${troubles.join(" · ")}</p>` : ""}
${loaded}
</article>`;
}

// =============================================================================================
// Trends (#trends): /dashboard/api/usage
// =============================================================================================

async function trends() {
  const current = ticket("trends");
  const data = await api(withRange("/dashboard/api/usage"));
  if (!current()) return;
  state.cache.trends = data;
  renderTrends(data);
}

function renderTrends(data) {
  setRange("trends", data.range);
  const totals = data.totals || {};
  const buckets = Array.isArray(data.buckets) ? data.buckets : [];
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  const bucketS = isNum(data.bucket_s) ? data.bucket_s : 3600;
  patch($("#trends-totals"), totalsBoxes([
    ["requests", "Requests", fmtInt(totals.requests)],
    ["errors", "Errors", fmtInt(totals.errors), isNum(totals.errors) && totals.requests ? esc(fmtRate(totals.errors / totals.requests)) : ""],
    ["tokens_in", "Tokens in", fmtInt(totals.tokens_in)],
    ["tokens_out", "Tokens out", fmtInt(totals.tokens_out)],
  ]));
  const body = $("#trends-body");
  const hasData = (totals.requests || 0) > 0 || buckets.some((b) => b.requests);
  body.classList.toggle("is-empty", !hasData);
  let empty = $("#trends-empty");
  if (!hasData) {
    if (!empty) {
      empty = document.createElement("p");
      empty.id = "trends-empty";
      empty.className = "empty card";
      body.before(empty);
    }
    empty.textContent = `No requests in the ${rangeLabel(hours)}. Point your clients at ${location.origin} instead of an Ollama to see them here.`;
    return;
  }
  if (empty) empty.remove();
  const common = { buckets, bucketS, hours };
  timeChart($("#chart-requests"), { ...common, mode: "overlay", yFmt: (v) => fmtCompact(v),
    series: [{ key: "requests", label: "Requests", color: COLORS.requests }, { key: "errors", label: "Errors", color: COLORS.errors }] });
  timeChart($("#chart-latency"), { ...common, mode: "lines", yFmt: (v, exact) => (exact ? fmtMs(v) : fmtMsAxis(v)),
    series: [{ key: "latency_p50_ms", label: "Latency p50", color: COLORS.p50, line: true },
             { key: "latency_p95_ms", label: "Latency p95", color: COLORS.p95, line: true },
             { key: "ttft_p50_ms", label: "TTFT p50", color: COLORS.ttft50, line: true },
             { key: "ttft_p95_ms", label: "TTFT p95", color: COLORS.ttft95, line: true, dash: true }] });
  timeChart($("#chart-tokens"), { ...common, mode: "stack", yFmt: (v, exact) => (exact ? fmtInt(v) : fmtCompact(v)),
    series: [{ key: "tokens_in", label: "Tokens in", color: COLORS.tokensIn }, { key: "tokens_out", label: "Tokens out", color: COLORS.tokensOut }] });
}

// =============================================================================================
// Model Insights (#models): /dashboard/api/models, a row per model, expand for its nodes
// =============================================================================================

async function modelInsights() {
  const current = ticket("models");
  const data = await api(withRange("/dashboard/api/models"));
  if (!current()) return;
  state.cache.models = data;
  renderModelInsights(data);
}

function renderModelInsights(data) {
  setRange("models", data.range);
  const models = Array.isArray(data.models) ? data.models : [];
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  const body = $("#models-body");
  if (!models.length) {
    patch(body, emptyLine(`No requests in the ${rangeLabel(hours)}.`));
    return;
  }
  const cols = [
    ["Requests", (m) => fmtInt(m.requests)],
    ["Errors", (m) => errorsCell(m.errors, m.requests)],
    ["Latency p50", (m) => fmtMs(m.latency_p50_ms)],
    ["p95", (m) => fmtMs(m.latency_p95_ms)],
    ["TTFT p50", (m) => fmtMs(m.ttft_p50_ms)],
    ["p95", (m) => fmtMs(m.ttft_p95_ms)],
    ["Decode", (m) => fmtTps(m.decode_tps)],
    ["Prompt", (m) => fmtTps(m.prompt_tps)],
    ["Load", (m) => fmtSec(m.load_s)],
    ["Tokens in", (m) => fmtInt(m.tokens_in)],
    ["Tokens out", (m) => fmtInt(m.tokens_out)],
  ];
  const head = `<tr><th scope="col">Model</th>${cols.map(([label]) => `<th scope="col" class="num">${esc(label)}</th>`).join("")}<th scope="col">Nodes</th></tr>`;
  const rows = models.map((m) => {
    const open = state.expandedModels.has(m.model);
    const nodes = Array.isArray(m.nodes) ? m.nodes : [];
    const main = `<tr class="model-row${open ? " open" : ""}" data-key="row:${esc(m.model)}" data-model="${esc(m.model)}">
<td><button type="button" class="expand" data-action="toggle-model" data-model="${esc(m.model)}" aria-expanded="${open}"><span class="caret" aria-hidden="true">▸</span>${esc(m.model)}</button></td>
${cols.map(([, cell]) => `<td class="num">${cell(m)}</td>`).join("")}
<td>${nodes.map((n) => `<span class="chip">${esc(n.node_id)}</span>`).join(" ") || DASH}</td></tr>`;
    const detail = open ? `<tr class="model-nodes" data-key="nodes:${esc(m.model)}" data-model="${esc(m.model)}"><td colspan="${cols.length + 2}">${modelNodesDetail(m, nodes)}</td></tr>` : "";
    return main + detail;
  }).join("");
  patch(body, `<div class="table-wrap"><table id="models-table" class="data"><thead>${head}</thead><tbody>${rows}</tbody></table></div>`);
  for (const holder of $$(".model-tps-chart", body)) {
    const m = models.find((x) => x.model === holder.dataset.model);
    if (m) barChart(holder, (m.nodes || []).map((n) => ({ label: n.node_id, value: n.decode_tps })),
      { color: COLORS.p50, fmt: fmtTps, labelWidth: 120 });
  }
}

function errorsCell(errors, requests) {
  if (!isNum(errors)) return DASH;
  if (!errors) return "0";
  return `<span class="err">${fmtInt(errors)}</span>${requests ? ` <span class="muted">${esc(fmtRate(errors / requests))}</span>` : ""}`;
}

function modelNodesDetail(model, nodes) {
  if (!nodes.length) return emptyLine("No node served it in this range.");
  const list = table(`model-nodes-${model.model}`, [
    { label: "Node", cell: (n) => esc(n.node_id) },
    { label: "Requests", num: true, cell: (n) => fmtInt(n.requests) },
    { label: "Decode", num: true, cell: (n) => fmtTps(n.decode_tps) },
    { label: "Latency p50", num: true, cell: (n) => fmtMs(n.latency_p50_ms) },
  ], nodes);
  return `<div class="node-breakdown"><div><h4>Decode speed per node</h4><div class="chart model-tps-chart" data-model="${esc(model.model)}"></div></div><div>${list}</div></div>`;
}

// =============================================================================================
// Apps (#apps): /dashboard/api/apps
// =============================================================================================

async function apps() {
  const current = ticket("apps");
  const data = await api(withRange("/dashboard/api/apps"));
  if (!current()) return;
  state.cache.apps = data;
  renderApps(data);
}

function renderApps(data) {
  setRange("apps", data.range);
  const list = Array.isArray(data.apps) ? data.apps : [];
  const totals = data.totals || {};
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  patch($("#apps-totals"), totalsBoxes([
    ["apps", "Apps", fmtInt(list.length)],
    ["requests", "Requests", fmtInt(totals.requests)],
    ["errors", "Errors", fmtInt(totals.errors), isNum(totals.errors) && totals.requests ? esc(fmtRate(totals.errors / totals.requests)) : ""],
    ["tokens_in", "Tokens in", fmtInt(totals.tokens_in)],
    ["tokens_out", "Tokens out", fmtInt(totals.tokens_out)],
  ]));
  const body = $("#apps-body");
  if (!list.length) {
    patch(body, `<div class="card">${emptyLine(`No requests in the ${rangeLabel(hours)}.`)}<p class="hint">Tag requests with <code>metadata.tags</code>, the <code>X-Herd-Tags</code> header or OpenAI's <code>user</code> field; untagged traffic is grouped by client.</p></div>`);
    return;
  }
  const tableHtml = table("apps-table", [
    { label: "App", cell: (a) => `<span class="kind kind-${esc(a.kind)}">${esc(a.kind || "app")}</span> <span class="app-name">${esc(a.app)}</span>` },
    { label: "Requests", num: true, cell: (a) => fmtInt(a.requests) },
    { label: "Errors", num: true, cell: (a) => errorsCell(a.errors, a.requests) },
    { label: "Tokens in", num: true, cell: (a) => fmtInt(a.tokens_in) },
    { label: "Tokens out", num: true, cell: (a) => fmtInt(a.tokens_out) },
    { label: "Latency p50", num: true, cell: (a) => fmtMs(a.latency_p50_ms) },
    { label: "p95", num: true, cell: (a) => fmtMs(a.latency_p95_ms) },
    { label: "Models", cell: (a) => (Array.isArray(a.models) && a.models.length ? a.models.map((m) => `<span class="chip">${esc(m)}</span>`).join(" ") : DASH) },
  ], list, (a) => ` data-key="${esc(a.app)}" data-app="${esc(a.app)}"`);
  patch(body, `<div class="card chart-card"><h3>Requests per app <span class="muted small">errors in red</span></h3><div id="chart-apps" class="chart"></div></div>
<div class="card table-card">${tableHtml}<p class="hint">A request with two tags counts under each tag; the totals count it once.</p></div>`);
  barChart($("#chart-apps"), list.map((a) => ({ label: String(a.app ?? DASH), value: a.requests, part: a.errors,
    title: `${a.app}: ${fmtInt(a.requests)} requests, ${fmtInt(a.errors)} errors` })),
  { color: COLORS.requests, partColor: COLORS.errors, fmt: fmtInt, labelWidth: 280 });
}

// =============================================================================================
// Benchmarks (#benchmarks): speeds from traffic, stored runs, and a form to run one
// =============================================================================================

async function benchmarks() {
  const current = ticket("benchmarks");
  if (!state.fleet) state.fleet = await api("/fleet/status");
  if (!current()) return;
  renderBenchForm();
  const data = await api(withRange("/dashboard/api/benchmarks"));
  if (!current()) return;
  renderBenchmarks(data);
}

function renderBenchForm() {
  const nodes = (state.fleet && Array.isArray(state.fleet.nodes)) ? state.fleet.nodes : [];
  const nodeSelect = $("#bench-node");
  setOptions(nodeSelect, nodes.length ? nodes.map((n) => ({ value: n.node_id, label: n.status === "online" ? n.node_id : `${n.node_id} (${n.status})`, disabled: n.status === "offline" }))
    : [{ value: "", label: "no node", disabled: true }]);
  const node = nodes.find((n) => n.node_id === nodeSelect.value);
  const loaded = new Set(node ? (node.models_loaded || []).map((m) => m.name) : []);
  const available = node ? Array.from(new Set([...loaded, ...(node.models_available || [])])) : [];
  available.sort((a, b) => (loaded.has(b) - loaded.has(a)) || a.localeCompare(b));
  setOptions($("#bench-model"), available.length ? available.map((m) => ({ value: m, label: loaded.has(m) ? `${m} (loaded)` : m }))
    : [{ value: "", label: "no model on this node", disabled: true }]);
  $("#bench-run").disabled = state.benchRunning || !nodeSelect.value || !$("#bench-model").value;
}

function renderBenchmarks(data) {
  setRange("benchmarks", data.range);
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  const traffic = Array.isArray(data.traffic) ? data.traffic : [];
  const runs = Array.isArray(data.runs) ? data.runs : [];
  const running = data.running && typeof data.running === "object"
    ? `<p class="note running-note" id="bench-running"><span class="spinner" aria-hidden="true"></span>A benchmark is running on ${esc(data.running.node_id)} (${esc(data.running.model)}), started ${ago(data.running.started)}.</p>` : "";
  const trafficHtml = traffic.length ? table("bench-traffic", [
    { label: "Node", cell: (r) => esc(r.node_id) },
    { label: "Model", cell: (r) => esc(r.model) },
    { label: "Decode", num: true, cell: (r) => fmtTps(r.decode_tps) },
    { label: "Prompt", num: true, cell: (r) => fmtTps(r.prompt_tps) },
    { label: "TTFT p50", num: true, cell: (r) => fmtMs(r.ttft_p50_ms) },
    { label: "TTFT p95", num: true, cell: (r) => fmtMs(r.ttft_p95_ms) },
    { label: "Load", num: true, cell: (r) => fmtSec(r.load_s) },
    { label: "Samples", num: true, cell: (r) => fmtInt(r.samples) },
  ], traffic, (r) => ` data-key="${esc(`${r.node_id}|${r.model}`)}" data-node="${esc(r.node_id)}" data-model="${esc(r.model)}"`)
    : emptyLine(`No completed requests in the ${rangeLabel(hours)} to measure.`);
  const runsHtml = runs.length ? table("bench-runs", [
    { label: "When", cell: (r) => ago(r.started) },
    { label: "Node", cell: (r) => esc(r.node_id) },
    { label: "Model", cell: (r) => esc(r.model) },
    { label: "Single decode", num: true, cell: (r) => fmtTps(r.single && r.single.decode_tps) },
    { label: "Single TTFT", num: true, cell: (r) => fmtMs(r.single && r.single.ttft_ms) },
    { label: "Streams", num: true, cell: (r) => fmtInt(r.parallel ? r.parallel.streams : r.num_parallel) },
    { label: "Per stream", num: true, title: "decode speed of each stream when they run together", cell: (r) => fmtTps(r.parallel && r.parallel.decode_tps) },
    { label: "Together", num: true, title: "all streams added up", cell: (r) => fmtTps(r.parallel && r.parallel.aggregate_tps) },
    { label: "Parallel TTFT", num: true, cell: (r) => fmtMs(r.parallel && r.parallel.ttft_ms) },
    { label: "Took", num: true, cell: (r) => fmtSec(r.duration_s) },
    { label: "Result", cell: (r) => (r.error ? `<span class="err">${esc(r.error)}</span>` : '<span class="ok">ok</span>') },
  ], runs, (r) => ` data-key="${esc(r.run_id)}" data-run="${esc(r.run_id)}"`) : emptyLine("No benchmark has been run yet: run one above.");
  patch($("#benchmarks-body"), `${running}
<div class="card table-card"><h3>Measured from traffic</h3>${trafficHtml}</div>
<div class="card table-card"><h3>Benchmark runs <span class="muted small">one stream, then the node's parallel streams</span></h3>${runsHtml}</div>`);
}

async function runBenchmark(event) {
  event.preventDefault();
  if (state.benchRunning) return;
  const nodeId = $("#bench-node").value;
  const model = $("#bench-model").value;
  if (!nodeId || !model) return;
  const result = $("#bench-result");
  const button = $("#bench-run");
  const started = Date.now();
  state.benchRunning = true;
  button.disabled = true;
  button.textContent = "Running…";
  result.hidden = false;
  result.className = "result running";
  const tick = () => {
    result.innerHTML = `<span class="spinner" aria-hidden="true"></span>Running the benchmark on ${esc(nodeId)} (${esc(model)})… ${Math.round((Date.now() - started) / 1000)} s`;
  };
  tick();
  const timer = setInterval(tick, 1000);
  try {
    const data = await api("/dashboard/api/benchmarks", { method: "POST", body: { node_id: nodeId, model, load: $("#bench-load").checked } });
    const run = data.run || {};
    result.className = run.error ? "result error" : "result ok";
    result.innerHTML = run.error ? `Benchmark failed: ${esc(run.error)}`
      : `Done in ${esc(fmtSec(run.duration_s))}: one stream ${esc(fmtTps(run.single && run.single.decode_tps))} (first token ${esc(fmtMs(run.single && run.single.ttft_ms))}); `
        + `${esc(fmtInt(run.parallel && run.parallel.streams))} streams ${esc(fmtTps(run.parallel && run.parallel.decode_tps))} each, ${esc(fmtTps(run.parallel && run.parallel.aggregate_tps))} together.`;
  } catch (error) {
    result.className = "result error";
    result.textContent = error.kind === "auth" ? "The router wants an API key: enter it and run again." : error.message;
  } finally {
    clearInterval(timer);
    state.benchRunning = false;
    button.textContent = "Run benchmark";
    renderBenchForm();
  }
  if (state.tab === "benchmarks") runTab("benchmarks");
}

// =============================================================================================
// Health (#health): score, vitals, findings
// =============================================================================================

async function health() {
  const current = ticket("health");
  const data = await api(withRange("/dashboard/api/health"));
  if (!current()) return;
  setRange("health", data.range);
  const score = isNum(data.score) ? Math.max(0, Math.min(100, data.score)) : null;
  const grade = score === null ? "none" : score >= 80 ? "good" : score >= 50 ? "fair" : "poor";
  const words = { good: "Healthy", fair: "Needs attention", poor: "Unhealthy", none: "No score" };
  const v = data.vitals || {};
  const vitals = [
    ["nodes_online", "Nodes online", `${fmtInt(v.nodes_online)}<span class="of"> / ${fmtInt(v.nodes_total)}</span>`],
    ["requests", "Requests", fmtInt(v.requests)],
    ["error_rate", "Error rate", fmtRate(v.error_rate)],
    ["retry_rate", "Retry rate", fmtRate(v.retry_rate)],
    ["cold_loads", "Cold loads", fmtInt(v.cold_loads)],
    ["context_reloads", "Context reloads", fmtInt(v.context_reloads)],
    ["latency_p95_ms", "Latency p95", fmtMs(v.latency_p95_ms)],
    ["ttft_p95_ms", "First token p95", fmtMs(v.ttft_p95_ms)],
  ];
  if ("queue_p95_ms" in v) vitals.push(["queue_p95_ms", "Queue wait p95", fmtMs(v.queue_p95_ms)]);
  const known = new Set(vitals.map((x) => x[0]).concat(["nodes_total"]));
  for (const [k, value] of Object.entries(v)) if (!known.has(k)) vitals.push([k, figureLabel(k), esc(fmtByKey(k, value))]);
  const order = { critical: 0, warning: 1, info: 2 };
  const findings = (Array.isArray(data.findings) ? data.findings.slice() : []).sort((a, b) => (order[a.severity] ?? 3) - (order[b.severity] ?? 3));
  const circumference = 2 * Math.PI * 52;
  const gauge = `<svg class="gauge" viewBox="0 0 120 120" aria-hidden="true"><circle cx="60" cy="60" r="52" class="gauge-track"/>`
    + `<circle cx="60" cy="60" r="52" class="gauge-fill grade-${grade}" stroke-dasharray="${((score || 0) / 100 * circumference).toFixed(1)} ${circumference.toFixed(1)}" transform="rotate(-90 60 60)"/></svg>`;
  const findingsHtml = findings.length ? `<ul id="health-findings" class="findings">${findings.map((f) => `<li class="finding sev-${esc(f.severity)}" data-key="${esc(f.id)}-${esc(f.node_id)}" data-id="${esc(f.id)}" data-severity="${esc(f.severity)}">
<div class="finding-head"><span class="sev-badge sev-${esc(f.severity)}">${esc(f.severity || "info")}</span><strong class="finding-title">${esc(f.title)}</strong>${f.node_id ? `<span class="chip">${esc(f.node_id)}</span>` : ""}</div>
${f.evidence ? `<p class="evidence"><span class="label">Evidence</span> ${esc(f.evidence)}</p>` : ""}
${f.fix ? `<p class="fix"><span class="label">Fix</span> ${esc(f.fix)}</p>` : ""}</li>`).join("")}</ul>`
    : `<ul id="health-findings" class="findings"></ul>${emptyLine("No findings: nothing needs your attention.")}`;
  patch($("#health-body"), `<div class="health-top">
<div class="card score-card grade-${grade}"><div class="gauge-wrap">${gauge}<div id="health-score" class="score">${score === null ? DASH : fmtInt(score)}</div></div><div class="score-words">${esc(words[grade])}</div><div class="muted small">score out of 100</div></div>
<div id="health-vitals" class="totals vitals">${totalsBoxes(vitals)}</div></div>
<div class="card"><h3>Findings <span class="muted small">${fmtInt(findings.length)}</span></h3>${findingsHtml}</div>`);
}

// =============================================================================================
// Recommendations (#recommendations)
// =============================================================================================

const REC_KINDS = { keep_loaded: "Keep loaded", keep_alive: "Keep alive longer", unused_on_disk: "Unused on disk", better_node: "Better node" };

async function recommendations() {
  const current = ticket("recommendations");
  const data = await api(withRange("/dashboard/api/recommendations"));
  if (!current()) return;
  setRange("recommendations", data.range);
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  const list = Array.isArray(data.recommendations) ? data.recommendations : [];
  patch($("#recommendations-body"), list.length ? `<ul id="recs-list" class="recs">${list.map((r, i) => {
    const evidence = r.evidence && typeof r.evidence === "object" && !Array.isArray(r.evidence)
      ? Object.entries(r.evidence).map(([k, v]) => `<span class="ev"><span class="ev-k">${esc(figureLabel(k))}</span> ${esc(fmtByKey(k, v))}</span>`).join("")
      : r.evidence ? `<span class="ev">${esc(r.evidence)}</span>` : "";
    return `<li class="card rec kind-${esc(r.kind)}" data-key="${i}-${esc(r.kind)}-${esc(r.node_id)}-${esc(r.model)}" data-kind="${esc(r.kind)}">
<div class="rec-head"><span class="kind-badge">${esc(REC_KINDS[r.kind] || humanKey(r.kind || "advice"))}</span><span class="rec-target">${r.model ? `<strong>${esc(r.model)}</strong>` : ""}${r.node_id ? ` on <strong>${esc(r.node_id)}</strong>` : ""}</span></div>
<p class="rec-reason">${textOr(r.reason)}</p>${evidence ? `<div class="rec-evidence">${evidence}</div>` : ""}</li>`;
  }).join("")}</ul>` : `<div class="card">${emptyLine(`No recommendations for the ${rangeLabel(hours)}: nothing to change.`)}</div>`);
}

// =============================================================================================
// Settings (#settings): the six runtime settings, and model management with pulls
// =============================================================================================

async function settings() {
  const current = ticket("settings");
  const [values, management] = await Promise.all([api("/dashboard/api/settings"), api(withRange("/dashboard/api/model-management"))]);
  if (!current()) return;
  $("#settings-range").textContent = `Model use for the ${rangeLabel(state.hours)}`;
  state.settings = values;
  showSettingValues(values);
  updateKeyHint();
  state.management = management;
  renderModelManagement(management);
}

function showSettingValues(values) {
  for (const control of $$("[data-setting]")) {
    const key = control.dataset.setting;
    control.disabled = !(key in values);
    if (control.type === "checkbox") control.checked = Boolean(values[key]);
    else if (values[key] !== undefined) control.value = String(values[key]);
  }
}

async function changeSetting(event) {
  const control = event.target.closest("[data-setting]");
  if (!control) return;
  const key = control.dataset.setting;
  const value = control.type === "checkbox" ? control.checked : control.value;
  const saved = $("#settings-saved");
  control.disabled = true;
  saved.textContent = "Saving…";
  try {
    const values = await api("/dashboard/api/settings", { method: "POST", body: { [key]: value } });
    state.settings = values;
    setError("settings-error", "");
    saved.textContent = "Saved";
    showSettingValues(values);
  } catch (error) {
    saved.textContent = "";
    setError("settings-error", error.kind === "auth" ? "The router wants an API key: enter it and try again."
      : `Could not change ${humanKey(key)}: ${error.message}`);
    if (state.settings) showSettingValues(state.settings);
  } finally {
    control.disabled = !(state.settings && key in state.settings);
  }
}

function activePulls(pulls) {
  return pulls.filter((p) => p.status !== "success" && p.status !== "failed" && !p.error);
}

function renderModelManagement(data) {
  const nodes = Array.isArray(data.nodes) ? data.nodes : [];
  const pulls = Array.isArray(data.pulls) ? data.pulls : [];
  setOptions($("#pull-node"), nodes.length ? nodes.map((n) => ({ value: n.node_id, label: n.status && n.status !== "online" ? `${n.node_id} (${n.status})` : n.node_id, disabled: n.status === "offline" }))
    : [{ value: "", label: "no node", disabled: true }]);
  $("#pull-submit").disabled = !$("#pull-node").value;
  patch($("#pulls"), pulls.length ? `<ul class="pulls">${pulls.map((p) => {
    const failed = p.status === "failed" || Boolean(p.error);
    const done = p.status === "success";
    const pct = isNum(p.percent) ? Math.max(0, Math.min(100, p.percent)) : 0;
    return `<li class="pull${failed ? " failed" : done ? " done" : ""}" data-key="${esc(p.model)}" data-model="${esc(p.model)}" data-node="${esc(p.node_id)}">
<div class="pull-head"><strong>${esc(p.model)}</strong> onto ${esc(p.node_id)} <span class="muted">· started ${ago(p.started)}</span></div>
<div class="progress" role="progressbar" aria-label="Pull of ${esc(p.model)}" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${pct}"><span style="width:${pct}%"></span></div>
<div class="pull-status">${failed ? `<span class="err">Failed: ${esc(p.error || p.status)}</span>` : done ? '<span class="ok">Done</span>' : `${esc(p.status || "pulling")} · ${fmtInt(pct)} %`}</div></li>`;
  }).join("")}</ul>` : "");
  const fleetNodes = new Map(((state.fleet && state.fleet.nodes) || []).map((n) => [n.node_id, n]));
  patch($("#mm-body"), nodes.length ? nodes.map((n) => {
    const models = Array.isArray(n.models) ? n.models : [];
    const running = new Map(((fleetNodes.get(n.node_id) || {}).models_loaded || []).map((m) => [m.name, m]));
    const rows = models.length ? table(`mm-table-${n.node_id}`, [
      { label: "Model", cell: (m) => `<span class="model-name">${esc(m.name)}</span>` },
      { label: "Size", num: true, cell: (m) => fmtGB(m.size_gb) },
      { label: "Loaded", cell: (m) => (m.loaded ? `<span class="badge loaded">loaded</span> ${m.context_length ? `${fmtInt(m.context_length)} ctx · ` : ""}${esc(fmtExpiry(m.expires_at))}${running.get(m.name) && running.get(m.name).requests_active ? ` · ${fmtInt(running.get(m.name).requests_active)} running` : ""}` : '<span class="muted">on disk</span>') },
      { label: "Last used", cell: (m) => ago(m.last_used) },
      { label: "Requests", num: true, cell: (m) => fmtInt(m.requests) },
      { label: "", cell: (m) => `<button type="button" class="danger small delete-model" data-action="delete-model" data-node="${esc(n.node_id)}" data-model="${esc(m.name)}" aria-label="Delete ${esc(m.name)} from ${esc(n.node_id)}"${n.status === "offline" ? ' disabled title="the node is offline"' : ""}>Delete</button>` },
    ], models, (m) => ` data-key="${esc(m.name)}" data-model="${esc(m.name)}"`) : emptyLine("No models on this node.");
    return `<div class="card mm-node" data-key="${esc(n.node_id)}" data-node="${esc(n.node_id)}"><header class="node-head"><h3>${esc(n.node_id)}</h3>${nodeStatusBadge(n.status)}<span class="muted">${[isNum(n.memory_budget_gb) ? `budget ${esc(fmtGB(n.memory_budget_gb))}` : "", isNum(n.disk_used_gb) ? `${esc(fmtGB(n.disk_used_gb))} on disk` : "", `${fmtInt(models.length)} model${models.length === 1 ? "" : "s"}`].filter(Boolean).join(" · ")}</span></header>${rows}</div>`;
  }).join("") : `<div class="card">${emptyLine("No nodes known yet.")}</div>`);
  clearTimeout(state.pullTimer);
  if (activePulls(pulls).length && state.tab === "settings") state.pullTimer = setTimeout(refreshManagement, PULL_POLL_MS);
}

async function refreshManagement() {
  if (state.tab !== "settings") return;
  try {
    const data = await api(withRange("/dashboard/api/model-management"));
    if (state.tab !== "settings") return;
    state.management = data;
    renderModelManagement(data);
  } catch (error) {
    if (error.kind === "http") setError("mm-error", error.message);
    clearTimeout(state.pullTimer);
    state.pullTimer = setTimeout(refreshManagement, PULL_POLL_MS);
  }
}

async function pullModel(event) {
  event.preventDefault();
  const model = $("#pull-model").value.trim();
  const nodeId = $("#pull-node").value;
  if (!model) {
    setError("mm-error", "Type the name of the model to pull, e.g. qwen2.5:7b.");
    $("#pull-model").focus();
    return;
  }
  if (!nodeId) return;
  const ok = await confirmAction(`Pull ${model} onto ${nodeId}?`,
    `Downloads can be 10-100 GB and take a long time. ${nodeId} needs the disk space for it; herd shows the progress here.`, "Pull");
  if (!ok) return;
  try {
    const data = await api("/dashboard/api/pull", { method: "POST", body: { model, node_id: nodeId } });
    setError("mm-error", "");
    $("#pull-model").value = "";
    if (state.management) renderModelManagement({ ...state.management, pulls: data.pulls || state.management.pulls });
    refreshManagement();
  } catch (error) {
    setError("mm-error", error.kind === "auth" ? "The router wants an API key: enter it and try again." : `Could not pull ${model}: ${error.message}`);
  }
}

async function deleteModel(button) {
  const nodeId = button.dataset.node;
  const model = button.dataset.model;
  const node = ((state.management && state.management.nodes) || []).find((n) => n.node_id === nodeId);
  const info = node && (node.models || []).find((m) => m.name === model);
  const live = ((state.fleet && state.fleet.nodes) || []).find((n) => n.node_id === nodeId);
  const loaded = live && (live.models_loaded || []).find((m) => m.name === model);
  const active = loaded ? loaded.requests_active || 0 : 0;
  const message = info && info.loaded
    ? `${model} is loaded on ${nodeId} and in use${active ? ` (${active} request${active === 1 ? "" : "s"} right now)` : ""}. Deleting it unloads it, fails requests that use it, and removes ${fmtGB(info.size_gb)} from the disk.`
    : `This removes ${model}${info ? ` (${fmtGB(info.size_gb)})` : ""} from ${nodeId}'s disk. Using it there again means downloading it again.`;
  const ok = await confirmAction(`Delete ${model} from ${nodeId}?`, message, "Delete");
  if (!ok) return;
  button.disabled = true;
  try {
    await api("/dashboard/api/delete", { method: "POST", body: { model, node_id: nodeId } });
    setError("mm-error", "");
    await refreshManagement();
  } catch (error) {
    button.disabled = false;
    setError("mm-error", error.kind === "auth" ? "The router wants an API key: enter it and try again." : `Could not delete ${model} from ${nodeId}: ${error.message}`);
  }
}

// =============================================================================================
// Requests (#requests): the log with filters; a row opens its routing decision
// =============================================================================================

function requestFilters() {
  return { model: $("#req-model").value, node_id: $("#req-node").value, app: $("#req-app").value, status: $("#req-status").value };
}

async function requests() {
  const current = ticket("requests");
  const filters = requestFilters();
  const [data, appList] = await Promise.all([
    api(withRange("/dashboard/api/traces", { ...filters, limit: $("#req-limit").value })),
    api(withRange("/dashboard/api/apps")).catch(() => null),
  ]);
  if (!current()) return;
  setRange("requests", data.range);
  const traces = Array.isArray(data.traces) ? data.traces : [];
  rememberFilterValues(traces, appList);
  const hours = data.range && isNum(data.range.hours) ? data.range.hours : state.hours;
  const filtered = Object.values(filters).some(Boolean);
  const body = $("#requests-body");
  if (!traces.length) {
    patch(body, emptyLine(filtered ? `No requests match these filters in the ${rangeLabel(hours)}.` : `No requests in the ${rangeLabel(hours)}.`));
    return;
  }
  const count = `<p class="table-note muted small" id="requests-count">${fmtInt(traces.length)} newest request${traces.length === 1 ? "" : "s"}${filtered ? " matching the filters" : ""} · click one to see how herd routed it</p>`;
  patch(body, count + table("requests-table", [
    { label: "Time", cell: (t) => ago(t.timestamp) },
    { label: "Model", cell: (t) => `<span class="model-name">${esc(t.model || t.original_model || DASH)}</span>${t.original_model && t.model && t.original_model !== t.model ? ` <span class="muted" title="asked for ${esc(t.original_model)}">← ${esc(t.original_model)}</span>` : ""}` },
    { label: "Node", cell: (t) => textOr(t.node_id) },
    { label: "Status", cell: (t) => `${statusBadge(t.status)}${t.retry_count ? ` <span class="chip warn" title="retried on another node">retry ×${fmtInt(t.retry_count)}</span>` : ""}${t.fallback_used ? ' <span class="chip warn">fallback</span>' : ""}` },
    { label: "Latency", num: true, cell: (t) => fmtMs(t.latency_ms) },
    { label: "TTFT", num: true, cell: (t) => fmtMs(t.time_to_first_token_ms) },
    { label: "Queue", num: true, cell: (t) => (t.queue_ms ? fmtMs(t.queue_ms) : '<span class="muted">0</span>') },
    { label: "Tokens in → out", num: true, cell: (t) => `${fmtInt(t.prompt_tokens)} → ${fmtInt(t.completion_tokens)}` },
    { label: "App", cell: (t) => appsOf(t).map((a) => `<span class="app-name" title="${esc(a)}">${esc(a)}</span>`).join(", ") || DASH },
  ], traces, (t) => ` class="req-row${t.request_id === state.openTraceId ? " selected" : ""}" data-key="${esc(t.request_id)}" data-id="${esc(t.request_id)}" tabindex="0" title="Show how herd routed request ${esc(t.request_id)}"`));
}

/** The apps a request counts under: each of its tags, else its client (the router's `apps`). */
function appsOf(t) {
  if (Array.isArray(t.apps) && t.apps.length) return t.apps;
  return t.app ? [t.app] : [];
}

function rememberFilterValues(traces, appList) {
  const { model, node, app } = state.seen;
  for (const n of (state.fleet && state.fleet.nodes) || []) {
    node.add(n.node_id);
    for (const m of n.models_available || []) model.add(m);
  }
  for (const t of traces) {
    if (t.model) model.add(t.model);
    if (t.node_id) node.add(t.node_id);
    for (const a of appsOf(t)) app.add(a);
  }
  for (const a of (appList && Array.isArray(appList.apps) ? appList.apps : [])) app.add(a.app);
  const fill = (select, values) => {
    const keep = select.value;
    const list = Array.from(new Set([...values, ...(keep ? [keep] : [])])).sort((a, b) => a.localeCompare(b));
    setOptions(select, [{ value: "", label: "All" }, ...list.map((v) => ({ value: v, label: v }))], keep);
  };
  fill($("#req-model"), model);
  fill($("#req-node"), node);
  fill($("#req-app"), app);
}

const SECOND_PARTS = ["wait", "load", "reload", "service", "slowdown", "eviction", "risk"];
const SIGNALS = [["thermal", 0, 50], ["memory_fit", 0, 20], ["queue_depth", -30, 0], ["latency_history", -25, 0],
                 ["role_affinity", 0, 15], ["availability_trend", 0, 10], ["context_fit", 0, 15]];

async function openTrace(requestId) {
  state.openTraceId = requestId;
  for (const row of $$(".req-row")) row.classList.toggle("selected", row.dataset.id === requestId);
  const panel = $("#decision-panel");
  panel.hidden = false;
  document.body.classList.add("drawer-open");
  $("#decision-title").textContent = `Request ${requestId}`;
  const body = $("#decision");
  body.innerHTML = '<p class="empty">Loading…</p>';
  try {
    const data = await api(`/dashboard/api/traces/${encodeURIComponent(requestId)}`);
    if (state.openTraceId !== requestId) return;
    body.innerHTML = renderTrace(data.trace || {});
    body.scrollTop = 0;
  } catch (error) {
    if (state.openTraceId !== requestId) return;
    body.innerHTML = `<p class="error-line" id="decision-error">${esc(error.kind === "auth" ? "The router wants an API key." : error.message)}</p>`;
  }
}

function closeTrace() {
  state.openTraceId = null;
  $("#decision-panel").hidden = true;
  document.body.classList.remove("drawer-open");
  for (const row of $$(".req-row.selected")) row.classList.remove("selected");
  if (location.hash.startsWith("#requests/")) history.replaceState(null, "", `${location.pathname}${location.search}#requests`);
}

function renderTrace(t) {
  const fields = [
    ["Time", `${ago(t.timestamp)} <span class="muted">${esc(fmtClock(t.timestamp))}</span>`],
    ["Model", `${textOr(t.model)}${t.original_model && t.original_model !== t.model ? ` <span class="muted">asked for ${esc(t.original_model)}</span>` : ""}`],
    ["Node", textOr(t.node_id)],
    ["Status", statusBadge(t.status)],
    [appsOf(t).length > 1 ? "Apps" : "App", textOr(appsOf(t).join(", "))],
    ["Client", `${textOr(t.client_ip)}${t.user_agent ? ` <span class="muted">${esc(t.user_agent)}</span>` : ""}`],
    ["Endpoint", `${textOr(t.endpoint)} <span class="muted">${esc(t.api || "")}${t.stream ? " · stream" : ""}</span>`],
    ["Latency", esc(fmtMs(t.latency_ms))],
    ["First token", esc(fmtMs(t.time_to_first_token_ms))],
    ["Queue time", esc(fmtMs(t.queue_ms))],
    ["Tokens", `${esc(fmtInt(t.prompt_tokens))} in · ${esc(fmtInt(t.completion_tokens))} out`],
    ["Speed", `${esc(fmtTps(t.decode_tps))} decode · ${esc(fmtTps(t.prompt_tps))} prompt`],
    ["Load", `${esc(fmtMs(t.load_ms))}${t.cold_load ? ' <span class="chip warn">cold load</span>' : ""}`],
    ["Retries", `${esc(fmtInt(t.retry_count || 0))}${t.fallback_used ? " · fallback model used" : ""}`],
  ];
  const tags = Array.isArray(t.tags) && t.tags.length ? `<p class="tags">${t.tags.map((tag) => `<span class="chip">${esc(tag)}</span>`).join(" ")}</p>` : "";
  let html = `<dl class="trace-fields">${fields.map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${v}</dd></div>`).join("")}</dl>${tags}`;
  if (t.error_message && t.decision) html += `<p class="error-line">${esc(t.error_message)}</p>`;
  const events = Array.isArray(t.events) ? t.events : [];
  html += `<h3>Events</h3>${events.length ? `<ul id="decision-events" class="events">${events.map((e) => `<li>${describeEvent(e)}</li>`).join("")}</ul>` : '<p class="muted small" id="decision-events">No retries, fallbacks or context changes.</p>'}`;
  if (!t.decision) {
    html += `<div id="decision-refused" class="refused"><strong>Refused before routing</strong><p>${textOr(t.error_message)}</p></div>`;
    return html;
  }
  const attempts = Array.isArray(t.attempts) && t.attempts.length > 1 ? t.attempts : [t.decision];
  attempts.forEach((decision, i) => {
    const last = i === attempts.length - 1;
    const title = attempts.length > 1 ? `Attempt ${i + 1} of ${attempts.length}${last ? " (served)" : ""}` : "Routing decision";
    const inner = renderDecision(decision, last);
    html += last ? `<section class="decision-block" id="decision-final"><h3>${esc(title)}</h3>${inner}</section>`
      : `<details class="decision-block attempt"><summary>${esc(title)}: ${esc(decision && decision.chosen ? `chose ${decision.chosen}` : "no node")}</summary>${inner}</details>`;
  });
  return html;
}

function describeEvent(e) {
  if (!e || typeof e !== "object") return esc(String(e));
  const parts = [];
  if ("failed" in e) parts.push(`<span class="ev-kind err">retry</span> ${esc(e.failed)} failed${e.reason ? `: ${esc(e.reason)}` : ""}${e.retried ? "; retried on the next node" : ""}`);
  if ("fallback_model" in e) parts.push(`<span class="ev-kind warn">fallback</span> served ${esc(e.fallback_model)} instead`);
  if ("context" in e) parts.push(`<span class="ev-kind">context</span> ${esc(e.context)}`);
  if ("vram_fallback" in e) parts.push(`<span class="ev-kind warn">VRAM fallback</span> ${esc(e.vram_fallback)}`);
  if ("auto_pull" in e) parts.push(`<span class="ev-kind">auto-pull</span> ${esc(e.auto_pull)}`);
  const known = new Set(["failed", "reason", "retried", "fallback_model", "context", "vram_fallback", "auto_pull"]);
  const rest = Object.entries(e).filter(([k]) => !known.has(k));
  if (rest.length) parts.push(rest.map(([k, v]) => `<span class="ev-kind">${esc(humanKey(k))}</span> ${esc(typeof v === "object" ? JSON.stringify(v) : String(v))}`).join(" "));
  return parts.join("<br>") || DASH;
}

function renderDecision(decision, isFinal) {
  if (!decision || typeof decision !== "object") return emptyLine("No decision recorded.");
  const candidates = Array.isArray(decision.candidates) ? decision.candidates : [];
  const excluded = Array.isArray(decision.excluded) ? decision.excluded : [];
  const total = (c) => SECOND_PARTS.reduce((sum, k) => sum + (c.seconds && isNum(c.seconds[k]) ? Math.max(0, c.seconds[k]) : 0), 0);
  const scale = Math.max(1e-9, ...candidates.map((c) => Math.max(total(c), isNum(c.eta_s) ? c.eta_s : 0)));
  const idPrefix = isFinal ? "" : "attempt-";
  let html = decision.model ? `<p class="muted small">Model ${esc(decision.model)} · chosen <strong>${textOr(decision.chosen)}</strong></p>` : "";
  html += candidates.length ? `<div class="legend">${SECOND_PARTS.map((k) => `<span class="legend-item"><span class="swatch seg-${k}"></span>${k}</span>`).join("")}</div>
<ul ${isFinal ? 'id="decision-candidates" ' : ""}class="candidates">${candidates.map((c) => {
    const segs = SECOND_PARTS.map((k) => {
      const v = c.seconds && isNum(c.seconds[k]) ? c.seconds[k] : 0;
      return v > 0 ? `<span class="seg seg-${k}" style="width:${((v / scale) * 100).toFixed(2)}%" title="${k} ${esc(fmtSec(v))}"></span>` : "";
    }).join("");
    const breakdown = SECOND_PARTS.filter((k) => c.seconds && isNum(c.seconds[k]) && c.seconds[k] > 0).map((k) => `${k} ${fmtSec(c.seconds[k])}`).join(" + ");
    return `<li class="candidate${c.chosen ? " chosen" : ""}" data-node="${esc(c.node_id)}">
<div class="cand-head"><strong>${esc(c.node_id)}</strong>${c.chosen ? '<span class="badge chosen-badge">chosen</span>' : ""}<span class="cand-eta">${esc(fmtSec(isNum(c.eta_s) ? c.eta_s : segs ? total(c) : null))} expected</span><span class="muted">score ${esc(fmtFixed(c.score, 1))}</span></div>
<div class="eta-bar" role="img" aria-label="${esc(breakdown || "no expected time")}">${segs}</div>
<div class="cand-breakdown muted small">${esc(breakdown || "no expected wait")}${c.deferred ? " · waits for the node's other models to finish first" : ""}</div></li>`;
  }).join("")}</ul>` : emptyLine("No node was eligible.");
  if (candidates.some((c) => c.signals && typeof c.signals === "object")) {
    const head = candidates.map((c) => `<th scope="col" class="num${c.chosen ? " chosen" : ""}" data-node="${esc(c.node_id)}">${esc(c.node_id)}</th>`).join("");
    const rows = SIGNALS.map(([k, lo, hi]) => `<tr data-signal="${k}"><th scope="row">${esc(humanKey(k))} <span class="muted small">${lo}…${hi}</span></th>${candidates.map((c) => signalCell(c.signals && c.signals[k], lo, hi, c.chosen)).join("")}</tr>`).join("");
    const score = `<tr class="score-row"><th scope="row">score</th>${candidates.map((c) => `<td class="num${c.chosen ? " chosen" : ""}"><strong>${esc(fmtFixed(c.score, 1))}</strong></td>`).join("")}</tr>`;
    html += `<h4>Seven signals</h4><div class="table-wrap"><table ${isFinal ? 'id="decision-signals" ' : ""}class="data signals"><thead><tr><th scope="col">Signal</th>${head}</tr></thead><tbody>${rows}${score}</tbody></table></div>`;
  }
  html += `<h4>Excluded</h4>${excluded.length ? `<ul ${isFinal ? 'id="decision-excluded" ' : ""}class="excluded">${excluded.map((x) => `<li data-node="${esc(x.node_id)}"><strong>${esc(x.node_id)}</strong>: ${textOr(x.reason)}</li>`).join("")}</ul>` : `<p ${isFinal ? 'id="decision-excluded" ' : ""}class="muted small">No node was excluded.</p>`}`;
  return `<div class="${idPrefix}decision">${html}</div>`;
}

function signalCell(value, lo, hi, chosen) {
  if (!isNum(value)) return `<td class="num${chosen ? " chosen" : ""}">${DASH}</td>`;
  const span = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
  const width = Math.min(100, (Math.abs(value) / span) * 100);
  return `<td class="num sig${chosen ? " chosen" : ""}"><span class="sig-bar ${value < 0 ? "neg" : "pos"}" style="width:${width.toFixed(0)}%"></span><span class="sig-v">${esc(fmtFixed(value, Number.isInteger(value) ? 0 : 1))}</span></td>`;
}

// =============================================================================================
// Tab switching, range, events and start-up
// =============================================================================================

function parseHash() {
  const raw = decodeURIComponent(location.hash.replace(/^#/, ""));
  const [tab, ...rest] = raw.split("/");
  return { tab: TAB_FUNCTIONS[tab] ? tab : "overview", sub: rest.join("/") || null };
}

function showTab(tab) {
  if (!TAB_FUNCTIONS[tab]) tab = "overview";
  const changed = state.tab !== tab;
  state.tab = tab;
  for (const button of $$("[data-tab]")) {
    const on = button.dataset.tab === tab;
    button.setAttribute("aria-selected", String(on));
    button.classList.toggle("active", on);
    button.tabIndex = on ? 0 : -1;
    if (on && changed && typeof button.scrollIntoView === "function") button.scrollIntoView({ block: "nearest", inline: "nearest" });
  }
  for (const panel of $$(".tab-panel")) panel.hidden = panel.id !== `tab-${tab}`;
  if (tab !== "requests" && !$("#decision-panel").hidden) closeTrace();
  if (changed) clearTimeout(state.pullTimer);
  document.title = `herd · ${$(`[data-tab="${tab}"]`).textContent}`;
  runTab(tab);
}

function onHashChange() {
  const { tab, sub } = parseHash();
  showTab(tab);
  if (tab === "requests" && sub) openTrace(sub);
}

function setHours(hours) {
  state.hours = hours;
  const params = new URLSearchParams(location.search);
  params.set("hours", String(hours));
  history.replaceState(null, "", `${location.pathname}?${params}${location.hash}`);
  if (state.tab !== "overview") runTab(state.tab);
}

function onClick(event) {
  const tabButton = event.target.closest("[data-tab]");
  if (tabButton) {
    const want = `#${tabButton.dataset.tab}`;
    if (location.hash === want) showTab(tabButton.dataset.tab);
    else location.hash = want;
    return;
  }
  const action = event.target.closest("[data-action]");
  if (action && action.dataset.action === "toggle-model") {
    const model = action.dataset.model;
    if (state.expandedModels.has(model)) state.expandedModels.delete(model);
    else state.expandedModels.add(model);
    if (state.cache.models) renderModelInsights(state.cache.models);
    return;
  }
  if (action && action.dataset.action === "delete-model") {
    deleteModel(action);
    return;
  }
  const row = event.target.closest(".req-row");
  if (row) openTrace(row.dataset.id);
}

function onKeyDown(event) {
  if (event.key === "Escape" && !$("#decision-panel").hidden && !$("#confirm-dialog").open && !$("#auth-dialog").open) {
    closeTrace();
    return;
  }
  const row = event.target.closest && event.target.closest(".req-row");
  if (row && (event.key === "Enter" || event.key === " ")) {
    event.preventDefault();
    openTrace(row.dataset.id);
    return;
  }
  const tab = event.target.closest && event.target.closest("[data-tab]");
  if (tab && (event.key === "ArrowRight" || event.key === "ArrowLeft")) {
    const buttons = $$("[data-tab]");
    const next = buttons[(buttons.indexOf(tab) + (event.key === "ArrowRight" ? 1 : buttons.length - 1)) % buttons.length];
    next.focus();
    next.click();
  }
}

let resizeTimer = null;
function onResize() {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (state.tab === "trends" && state.cache.trends) renderTrends(state.cache.trends);
    if (state.tab === "apps" && state.cache.apps) renderApps(state.cache.apps);
    if (state.tab === "models" && state.cache.models) renderModelInsights(state.cache.models);
  }, 150);
}

function start() {
  const hours = Number(new URLSearchParams(location.search).get("hours"));
  if (RANGES[hours]) state.hours = hours;
  $("#range").value = String(state.hours);
  $("#range").addEventListener("change", (e) => setHours(Number(e.target.value)));
  document.addEventListener("click", onClick);
  document.addEventListener("keydown", onKeyDown);
  document.addEventListener("mousemove", chartHover);
  window.addEventListener("hashchange", onHashChange);
  window.addEventListener("resize", onResize);
  $("#auth-form").addEventListener("submit", submitKey);
  $("#auth-dialog").addEventListener("cancel", (e) => e.preventDefault());
  $("#confirm-dialog").addEventListener("cancel", () => { $("#confirm-dialog").returnValue = "cancel"; });
  $("#settings-form").addEventListener("change", changeSetting);
  $("#settings-form").addEventListener("submit", (e) => e.preventDefault());
  $("#forget-key").addEventListener("click", forgetKey);
  $("#pull-form").addEventListener("submit", pullModel);
  $("#bench-form").addEventListener("submit", runBenchmark);
  $("#bench-node").addEventListener("change", renderBenchForm);
  $("#bench-model").addEventListener("change", renderBenchForm);
  $("#req-filters").addEventListener("change", () => runTab("requests"));
  $("#req-filters").addEventListener("submit", (e) => { e.preventDefault(); runTab("requests"); });
  $("#decision-close").addEventListener("click", closeTrace);
  updateKeyHint();
  onHashChange();
  if (state.tab !== "overview") pollFleet();
}

start();
