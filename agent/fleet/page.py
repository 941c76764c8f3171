"""The fleet page: one read-only HTML document the motoko agent serves at ``/`` (and ``/fleet``).

It polls ``GET /v1/view`` (the gateway duty's status: hosts, routing, drains, events, spend)
every 2 s and renders it as tables; it keeps the last data and shows a banner while a fetch
fails. No write action: no form, no POST, nothing but that one GET.

Everything from the network goes in with ``textContent`` / ``createTextNode`` (host names and
reasons come from reports and probes); never ``innerHTML``. The Content-Security-Policy allows
exactly the inline script and style below (by their SHA-256), fetches to the same origin, and
nothing else: no other script, no frame, no form target, no external load.
"""

from __future__ import annotations

import base64
import hashlib

#: Seconds between two fetches of ``/v1/view`` (the routing loop probes every 2 s too).
POLL_S = 2.0
#: A fetch not answered by then counts as failed (the banner shows), and the next one starts.
FETCH_TIMEOUT_S = 5.0

_STYLE = """
:root { color-scheme: light dark; --bad: #c62828; --warn: #b26a00; --ok: #2e7d32; --mute: #777; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem 1.5rem; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
#meta { color: var(--mute); }
#summary span { margin-right: 1rem; }
#error { display: none; background: var(--bad); color: #fff; padding: .5rem .75rem; margin: .5rem 0;
  border-radius: 4px; }
#error.shown { display: block; }
table { border-collapse: collapse; min-width: 40rem; }
th, td { text-align: left; padding: .2rem .6rem; border-bottom: 1px solid #8884; vertical-align: top; }
th { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.empty { color: var(--mute); font-style: italic; }
.bad { color: var(--bad); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
.ok { color: var(--ok); }
.mono { font-family: ui-monospace, monospace; }
"""

_SCRIPT = """
"use strict";
const POLL_MS = __POLL_MS__, TIMEOUT_MS = __TIMEOUT_MS__;
let last = null;       // the last view fetched (kept while fetches fail)
let lastAt = null;     // when it was fetched (this browser's clock)

function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(text(c)));
  return node;
}
function text(v) { return v === null || v === undefined || v === "" ? "-" : String(v); }
function age(seconds) {
  if (seconds === null || seconds === undefined || isNaN(seconds)) return "?";
  const s = Math.max(0, Math.floor(seconds));
  return s < 120 ? s + "s" : s < 7200 ? Math.floor(s / 60) + "m" : Math.floor(s / 3600) + "h";
}
function ago(at, now) { return at ? age(now - at) + " ago" : "never"; }
function clock(at) { return at ? new Date(at * 1000).toLocaleTimeString() : "-"; }
function load(l) {
  if (!l || (l.running == null && l.waiting == null)) return "-";
  return text(l.running) + " running / " + text(l.waiting) + " waiting";
}
function table(id, headers, rows, empty) {
  const box = document.getElementById(id);
  if (!rows.length) { box.replaceChildren(el("p", "empty", empty)); return; }
  const head = el("tr", null, ...headers.map((h) => el("th", null, h)));
  box.replaceChildren(el("table", null, el("thead", null, head), el("tbody", null, ...rows)));
}
function row(key, value, ...cells) {
  const tr = el("tr", null, ...cells.map((c) => (c instanceof Node ? c : el("td", null, c))));
  if (key) tr.setAttribute(key, text(value));
  return tr;
}
function td(cls, value) { return el("td", cls, value); }

function renderHosts(v, now) {
  const hosts = Array.isArray(v.fleet) ? v.fleet : [];
  table("hosts", ["host", "role", "commit", "stage", "health", "report", "stale", "GPU", "load", "last pass"],
    hosts.map((h) => {
      if (!h.reported) {
        return row("data-host", h.host, td("mono", h.host), "-", "-", "-", "-", td("warn", "never reported"),
          "-", "-", "-", "-");
      }
      const health = h.ready === true ? td("ok", h.health || "ready") : td(h.ready === false ? "bad" : null, h.health);
      const stage = td(h.stage === "ready" ? "ok" : h.stage === "failed" ? "bad" : "warn", h.stage);
      const gpu = td(h.gpu_status && h.gpu_status !== "ok" ? "warn" : null, h.gpu);
      return row("data-host", h.host, td("mono", h.host), h.role, td("mono", (h.commit || "").slice(0, 7)), stage,
        health, td("num", age(h.age_s)), h.stale ? td("bad", "STALE") : td(null, "no"), gpu, load(h.load),
        h.problem ? td("bad", h.problem) : td("ok", "ok"));
    }), "no host known (no report token in the desired state, or the fleet API is not up)");
  return hosts;
}

function renderRouting(v, now) {
  const backends = (v.routing_state && v.routing_state.backends) || {};
  const names = Object.keys(backends).sort();
  table("routing", ["backend", "state", "why", "since", "failures", "probe", "load"],
    names.map((name) => {
      const b = backends[name] || {};
      const inRouting = b.in_routing !== false;
      return row("data-backend", name, td("mono", name), td(inRouting ? "ok" : "bad", inRouting ? "in" : "OUT"),
        b.why, b.since ? ago(b.since, now) : "-", td("num", text(b.failures)), b.probe, load(b.load));
    }), "no backend probed yet");
  const aliases = v.routing || {};
  const chains = Object.keys(aliases).sort().map((alias) => {
    const r = aliases[alias] || {};
    const chain = Array.isArray(r.chain) ? r.chain : [r.backend];
    return row("data-alias", alias, td("mono", alias), chain.map(text).join(" > "), r.reason);
  });
  document.getElementById("aliases-box").hidden = !chains.length;
  if (chains.length) table("aliases", ["alias", "deployments, in order", "why"], chains, "");
  return names.filter((n) => backends[n] && backends[n].in_routing === false);
}

function renderDrains(v, now) {
  const box = document.getElementById("drains");
  const d = v.drains;
  if (!d || typeof d !== "object" || !Array.isArray(d.leases)) {
    box.replaceChildren(el("p", "empty", "this agent reports no rollouts"));
    return;
  }
  const leases = d.leases.map((l) => row("data-drain", l.host, td("mono", l.host),
    td("mono", (Array.isArray(l.backends) ? l.backends : []).map(text).join(", ")),
    td(l.state === "expired" ? null : "warn", l.state),
    l.granted_at ? ago(l.granted_at, now) : "-",
    l.expires_at ? (l.expires_at > now ? "in " + age(l.expires_at - now) : age(now - l.expires_at) + " ago") : "-",
    l.reason));
  const waiting = (Array.isArray(d.waiting) ? d.waiting : []).map((w) => row("data-drain", w.host,
    td("mono", w.host), "-", td("warn", "waiting"),
    typeof w.waiting_s === "number" ? age(w.waiting_s) + " ago" : "-", "-", w.why));
  table("drains", ["host", "backends", "state", "since", "expires", "why"], leases.concat(waiting),
    "no rollout in progress");
}

function renderEvents(v, now) {
  const events = (v.routing_state && v.routing_state.events) || [];
  table("events", ["when", "ago", "backend", "change", "why"],
    events.slice(0, 50).map((e) => row("data-event", e.backend, clock(e.at), td("num", ago(e.at, now)),
      td("mono", e.backend), td(e.change === "out" ? "bad" : "ok", e.change), e.why)),
    "no routing event yet");
}

function renderSpend(v) {
  const s = v.spend, box = document.getElementById("spend");
  if (!s) { box.replaceChildren(el("p", "empty", "no spend known")); return; }
  const money = (x) => (typeof x === "number" ? x.toFixed(2) + " USD" : text(x));
  const rows = [["spent", s.spent_usd === null || s.spent_usd === undefined ? "unknown (the proxy did not answer)"
    : money(s.spent_usd)], ["budget", money(s.budget_usd) + " per " + text(s.period)]];
  if (typeof s.spent_usd === "number" && typeof s.budget_usd === "number" && s.budget_usd > 0) {
    rows.push(["used", Math.round(100 * s.spent_usd / s.budget_usd) + "%" +
      (s.spent_usd >= s.budget_usd ? " - OVER BUDGET: openai/* served by the budget fallback" : "")]);
  }
  if (s.reset_at) rows.push(["resets", s.reset_at]);
  const check = v.last_reload_check;
  if (check) rows.push(["last reload check", (check.ok ? "ok" : "FAILED") + " in " + text(check.seconds) + " s: "
    + text(check.detail)]);
  box.replaceChildren(el("table", null, el("tbody", null,
    ...rows.map(([k, val]) => el("tr", null, el("th", null, k), el("td", null, val))))));
}

function render(v) {
  const now = typeof v.now === "number" ? v.now : Date.now() / 1000;
  const hosts = renderHosts(v, now);
  const out = renderRouting(v, now);
  renderDrains(v, now);
  renderEvents(v, now);
  renderSpend(v);
  const stale = hosts.filter((h) => h.stale || !h.reported).length;
  document.getElementById("summary").replaceChildren(
    el("span", null, hosts.length + " hosts"),
    el("span", stale ? "bad" : "ok", stale + " stale or silent"),
    el("span", out.length ? "bad" : "ok",
      out.length ? "OUT of routing: " + out.join(", ") : "every backend in routing"));
}

function tick() {
  const meta = document.getElementById("updated");
  meta.textContent = lastAt ? "updated " + lastAt.toLocaleTimeString() + " (" + age((Date.now() - lastAt) / 1000)
    + " ago)" : "not loaded yet";
}

function fail(message) {
  const banner = document.getElementById("error");
  banner.textContent = "Cannot read the fleet view: " + message +
    (lastAt ? " - showing the data of " + lastAt.toLocaleTimeString() : "");
  banner.className = "shown";
}

async function poll() {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const r = await fetch("/v1/view", {cache: "no-store", signal: ctl.signal, headers: {Accept: "application/json"}});
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error("HTTP " + r.status + (body && body.error ? ": " + body.error : ""));
    if (!body || typeof body !== "object") throw new Error("the answer is not a JSON object");
    render(body);
    last = body; lastAt = new Date();
    document.getElementById("error").className = "";
    document.getElementById("error").textContent = "";
  } catch (e) {
    fail(e && e.name === "AbortError" ? "no answer within " + TIMEOUT_MS / 1000 + " s" : String(e && e.message || e));
  } finally {
    clearTimeout(timer);
    tick();
    setTimeout(poll, POLL_MS);
  }
}

setInterval(tick, 1000);
poll();
""".replace("__POLL_MS__", str(int(POLL_S * 1000))).replace("__TIMEOUT_MS__", str(int(FETCH_TIMEOUT_S * 1000)))

_BODY = """<body>
<h1>LLM fleet</h1>
<div id="meta"><span id="updated">not loaded yet</span> &middot; read-only, refreshes every {poll:g} s</div>
<div id="error" role="alert"></div>
<p id="summary"></p>
<h2>Hosts</h2>
<div id="hosts"></div>
<h2>Routing in effect</h2>
<div id="routing"></div>
<div id="aliases-box" hidden><h2>Aliases</h2><div id="aliases"></div></div>
<h2>Rollouts (drains)</h2>
<div id="drains"></div>
<h2>Recent routing events</h2>
<div id="events"></div>
<h2>Spend</h2>
<div id="spend"></div>
"""


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE = (
    "<!doctype html>\n"
    '<html lang="en"><head><meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<link rel="icon" href="data:,">\n'
    "<title>LLM fleet</title>\n"
    f"<style>{_STYLE}</style>\n"
    "</head>\n" + _BODY.format(poll=POLL_S) + f"<script>{_SCRIPT}</script>\n</body></html>\n"
)
PAGE_BYTES = PAGE.encode()

#: The page's headers: only its own inline script and style run, it fetches from its origin only.
CSP = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_sha256(_SCRIPT)}",
        f"style-src {_sha256(_STYLE)}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CONTENT_TYPE = "text/html; charset=utf-8"
