"use strict";
// The supervisor dashboard's behaviour (served as /dashboard.js, loaded with `defer`).
// The page runs under a strict Content-Security-Policy (`script-src 'self'; style-src 'self';
// connect-src 'self'`): no eval or string-built code, no inline handlers, no markup parsed from
// strings; looks change through classes, `hidden` and CSSOM properties (`element.style.x`,
// which the policy allows), never through a `style` attribute.

const $ = (id) => document.getElementById(id);

// ---- Session ----
// Signing in exchanges an API key at POST /v1/auth/token for a short-lived token, and only the
// token is kept: the key is read from the field, sent once, and the field is cleared. The token
// lives in sessionStorage, which is scoped to this tab and gone when it closes, yet survives a
// reload (no new sign-in for an F5); a stolen token is worth little as it expires soon, and it
// is refreshed before it does. The browser's WebSocket cannot send an Authorization header, so
// the socket carries the token in its query string; fetches send it as a Bearer header.
const TOKEN_KEY = "switchboard.token";
const TOKEN_URL = "/v1/auth/token";
const EXPIRED = "Session expired — enter your key again.";
const FORBIDDEN = "This key may not watch calls: the dashboard takes a supervisor or admin key.";
// setTimeout fires at once past 2^31-1 ms: long waits are taken in steps of at most an hour.
const MAX_TIMER_MS = 3600 * 1000;
// {token, expires_at, tenant, role, refreshAt}: refreshAt (ms, local clock) is when 2/3 of the
// token's lifetime has passed. Null while signed out.
let auth = null;
// Bumped on every sign-in and sign-out: an answer that arrives for an older session is dropped.
let authGeneration = 0;
let refreshTimer = null;
// The token exchange under way, shared by whoever needs a refresh meanwhile.
let refreshing = null;
// Set when a refresh made after a failed connection worked, cleared when a socket opens.
let refreshedAfterFailure = false;
let signingIn = false;

// ---- Calls ----
// State of the page: the latest event of each call, keyed by call id, and the stream
// sequence to resume from after a reconnect.
const STATES = ["IN_PROGRESS", "COMPLETED", "PROCESSING_AI", "ARCHIVED", "FAILED"];
const calls = new Map();
const rows = new Map();
const dirty = new Set();
const dirtyCounts = new Set();
let lastSeq = null;
let streamId = null;
// The resume point of a snapshot whose pages are still arriving.
let pendingResume = null;
let heartbeatSecs = 20;
let retentionSecs = 86400;
let lastFrameAt = Date.now();
let stateFilter = null;
let textFilter = "";
let socket = null;
let retryDelay = 500;
let reconnectTimer = null;
let renderQueued = false;
// Only one page of rows is in the document at a time, whatever the number of calls: the
// first screen of ten thousand calls renders as fast as that of ten.
const PAGE_SIZE = 100;
let page = 0;
let openCall = null;
let order = null;

const tbody = $("rows");

// POSTs a credential (an API key to sign in, or the current token to refresh) to the token
// endpoint. Answers {ok: true, session} or {ok: false, status, retryAfter}; status 0 when the
// notifier could not be reached.
async function exchange(credential) {
  let response;
  try {
    response = await fetch(TOKEN_URL, {
      method: "POST",
      headers: { Authorization: `Bearer ${credential}` },
      cache: "no-store",
    });
  } catch {
    return { ok: false, status: 0 };
  }
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: the status says enough */ }
  if (!response.ok) {
    return { ok: false, status: response.status, retryAfter: Number(response.headers.get("Retry-After")) || null };
  }
  const expires = Date.parse(body?.expires_at);
  if (typeof body?.token !== "string" || !body.token || Number.isNaN(expires)) {
    return { ok: false, status: -1 };
  }
  // The lifetime is measured on the server's clock (its Date header) so that a local clock
  // that is off does not move the refresh; the refresh is then timed on the local clock.
  const now = Date.now();
  const serverNow = Date.parse(response.headers.get("Date") ?? "");
  const lifetime = Math.max(expires - (Number.isNaN(serverNow) ? now : serverNow), 0);
  return {
    ok: true,
    session: { token: body.token, expires_at: body.expires_at, tenant: String(body.tenant ?? ""), role: String(body.role ?? ""), refreshAt: now + lifetime * 2 / 3 },
  };
}

function storeSession(session) {
  const { token, expires_at, tenant, role } = session;
  try {
    sessionStorage.setItem(TOKEN_KEY, JSON.stringify({ token, expires_at, tenant, role }));
  } catch { /* storage disabled: the session lasts as long as the page */ }
}

function forgetSession() {
  try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* storage disabled */ }
}

// The token this tab stored, if it is still good for a few seconds.
function storedSession() {
  let saved;
  try { saved = JSON.parse(sessionStorage.getItem(TOKEN_KEY) ?? "null"); } catch { saved = null; }
  const expires = Date.parse(saved?.expires_at);
  const now = Date.now();
  if (typeof saved?.token !== "string" || !saved.token || Number.isNaN(expires) || expires - now < 5000) {
    forgetSession();
    return null;
  }
  // When it was issued is not stored: what is left of it stands for its lifetime, which
  // still refreshes it before it expires.
  return { token: saved.token, expires_at: saved.expires_at, tenant: String(saved.tenant ?? ""), role: String(saved.role ?? ""), refreshAt: now + (expires - now) * 2 / 3 };
}

function showTenant() {
  $("tenant").textContent = auth.tenant;
  $("tenant").title = auth.role ? `role: ${auth.role}` : "";
}

function signIn(session) {
  authGeneration += 1;
  auth = session;
  refreshedAfterFailure = false;
  storeSession(session);
  showTenant();
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("session").hidden = false;
  $("app").hidden = false;
  scheduleRender();
  scheduleRefresh();
  retryDelay = 500;
  connect();
}

// Back to the sign-in form: the token is dropped, the socket closed, and what the session
// showed is cleared (the next key may belong to another tenant).
function signOut(message = "") {
  authGeneration += 1;
  auth = null;
  forgetSession();
  clearTimeout(refreshTimer);
  refreshTimer = null;
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  if (socket) {
    const ws = socket;
    socket = null;
    ws.onmessage = null;
    ws.onclose = null;
    // Closing a socket still connecting makes the browser log an error: it is closed once open.
    if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
    else { ws.onopen = null; ws.close(1000); }
  }
  resetView();
  $("session").hidden = true;
  $("app").hidden = true;
  $("detail").hidden = true;
  $("tenant").textContent = "";
  $("tenant").title = "";
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("api-key").focus();
}

function resetView() {
  calls.clear();
  for (const tr of rows.values()) tr.remove();
  rows.clear();
  dirty.clear();
  dirtyCounts.clear();
  lastSeq = null;
  streamId = null;
  pendingResume = null;
  stateFilter = null;
  textFilter = "";
  $("filter").value = "";
  for (const box of $("counts").children) box.classList.remove("active");
  page = 0;
  openCall = null;
  scheduleRender();
}

// Exchanges the current token for a fresh one: "ok", "expired" (401/403: signed out, with a
// message), "failed" (unreachable, rate limited, a server error: the session goes on) or
// "stale" (signed out or in again meanwhile). One exchange per session at a time.
function refresh() {
  if (!refreshing || refreshing.generation !== authGeneration) {
    const started = { generation: authGeneration, retryAfter: null };
    started.promise = refreshOnce(started).finally(() => { if (refreshing === started) refreshing = null; });
    refreshing = started;
  }
  const attempt = refreshing;
  return attempt.promise.then((outcome) => ({ outcome, retryAfter: attempt.retryAfter }));
}

async function refreshOnce(attempt) {
  if (!auth) return "stale";
  const result = await exchange(auth.token);
  if (attempt.generation !== authGeneration) return "stale";
  if (result.ok) {
    auth = result.session;
    storeSession(auth);
    showTenant();
    scheduleRefresh();
    return "ok";
  }
  if (result.status === 401 || result.status === 403) {
    signOut(result.status === 401 ? EXPIRED : FORBIDDEN);
    return "expired";
  }
  attempt.retryAfter = result.retryAfter;
  return "failed";
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  const wait = Math.max(auth.refreshAt - Date.now(), 1000);
  refreshTimer = setTimeout(refreshWhenDue, Math.min(wait, MAX_TIMER_MS));
}

async function refreshWhenDue() {
  refreshTimer = null;
  if (!auth) return;
  if (Date.now() < auth.refreshAt) { scheduleRefresh(); return; }
  const generation = authGeneration;
  const { outcome, retryAfter } = await refresh();
  // A refresh that could not be made is tried again while the token lasts (and after it:
  // then the server answers 401, which signs out).
  if (outcome === "failed" && generation === authGeneration) {
    auth.refreshAt = Date.now() + Math.max(15, retryAfter ?? 0) * 1000;
    scheduleRefresh();
  }
}

function signInError(result) {
  switch (result.status) {
    case 0: return "Could not reach the notifier. Check the connection and try again.";
    case 401: return "That key was not accepted: it is unknown, revoked or expired.";
    case 403: return FORBIDDEN;
    case 429: return `Too many attempts: try again ${result.retryAfter ? `in ${result.retryAfter} s` : "in a moment"}.`;
    case -1: return "The notifier's answer could not be read. Try again.";
    default: return `Sign-in failed (HTTP ${result.status}). Try again.`;
  }
}

// Works for a click, Enter in the field, and form.requestSubmit().
$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (signingIn) return;
  const field = $("api-key");
  const key = field.value.trim();
  if (!key) {
    $("login-error").textContent = "Enter your API key.";
    field.focus();
    return;
  }
  signingIn = true;
  $("login-submit").disabled = true;
  $("login-error").textContent = "";
  // A header value takes visible ASCII only; anything else cannot be a key.
  const result = /^[\x21-\x7e]+$/.test(key) ? await exchange(key) : { ok: false, status: 401 };
  // The key has done its job: it leaves the page (the field is cleared, `key` goes out of scope).
  field.value = "";
  signingIn = false;
  $("login-submit").disabled = false;
  if (result.ok) signIn(result.session);
  else {
    $("login-error").textContent = signInError(result);
    field.focus();
  }
});

$("logout").addEventListener("click", () => signOut());

// ---- Live connection ----

function setConnection(kind, text) {
  $("conn").className = kind;
  $("conn-text").textContent = text;
}

function connect() {
  reconnectTimer = null;
  if (!auth) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // Resume after the last sequence seen, in the stream it belongs to: the server answers with
  // exactly what was missed, or a fresh snapshot when it cannot.
  const resume = lastSeq !== null ? `?since=${lastSeq}` + (streamId ? `&stream=${encodeURIComponent(streamId)}` : "") : "";
  // The credential follows the resume parameters (a WebSocket cannot send headers).
  const token = auth.token;
  const credential = `${resume ? "&" : "?"}token=${encodeURIComponent(token)}`;
  setConnection("down", lastSeq === null ? "connecting…" : "reconnecting…");
  const ws = new WebSocket(`${proto}//${location.host}/ws${resume}${credential}`);
  socket = ws;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    refreshedAfterFailure = false;
    retryDelay = 500;
    lastFrameAt = Date.now();
    setConnection("connected", "connected");
  };
  ws.onmessage = (e) => { lastFrameAt = Date.now(); receive(JSON.parse(e.data)); };
  ws.onclose = (e) => {
    if (socket !== ws) return;
    socket = null;
    // Refused before opening (the browser reports only 1006, whatever the reason) or closed
    // because the credential behind it was revoked (4401): the token may be the cause.
    if (!opened || e.code === 4401) recoverSession(token);
    else reconnectLater();
  };
}

// One refresh tells whether the token is still good: a 401 ends the session (sign-in form,
// "session expired"); any other outcome goes on to the usual backoff. After a refresh that
// worked, none is made again until a socket opens: the fresh token was just accepted, so the
// failure has another cause (the notifier restarting, a proxy) and the backoff alone paces
// the attempts. An unreachable notifier costs one token request per attempt, paced the same.
async function recoverSession(usedToken) {
  if (!auth) return;
  const generation = authGeneration;
  // A token replaced since this socket started (a scheduled refresh) is simply tried.
  if (auth.token === usedToken && !refreshedAfterFailure) {
    setConnection("down", "checking the session…");
    const { outcome } = await refresh();
    if (generation !== authGeneration) return; // signed out meanwhile (a 401 does that)
    if (outcome === "ok") refreshedAfterFailure = true;
  }
  reconnectLater();
}

function reconnectLater() {
  socket = null;
  if (!auth) return;
  const wait = Math.round(retryDelay * (0.8 + Math.random() * 0.4));
  setConnection("down", `reconnecting in ${Math.ceil(wait / 1000)} s…`);
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(connect, wait);
  retryDelay = Math.min(retryDelay * 2, 10000);
}

// The server sends a heartbeat every `heartbeat_secs`. A connection that went silent for
// longer (sleep, Wi-Fi change, a half-open TCP connection) is dropped and replaced, rather
// than left showing frozen rows under a green dot.
setInterval(() => {
  if (socket && socket.readyState === WebSocket.OPEN && Date.now() - lastFrameAt > heartbeatSecs * 2500) {
    const dead = socket;
    dead.onclose = null;
    dead.onmessage = null;
    dead.close();
    reconnectLater();
  }
}, 2000);

function receive(frame) {
  switch (frame.type) {
    case "snapshot":
      // A snapshot replaces the view: no row from before it can be stale.
      calls.clear();
      for (const row of rows.values()) row.remove();
      rows.clear();
      for (const call of frame.calls) calls.set(call.call_id, call);
      for (const id of calls.keys()) dirty.add(id);
      // A paged snapshot is a resume point only once its last page is in: a connection
      // lost halfway reconnects without `since` and gets the whole snapshot again.
      pendingResume = { seq: frame.seq, stream: frame.stream ?? null };
      lastSeq = null;
      streamId = null;
      if (!frame.more) completeSnapshot();
      heartbeatSecs = frame.heartbeat_secs ?? heartbeatSecs;
      retentionSecs = frame.retention_secs ?? retentionSecs;
      break;
    case "snapshot_page":
      // The rest of a large snapshot, older calls after newer ones.
      for (const call of frame.calls) {
        const known = calls.get(call.call_id);
        if (!known || known.version < call.version) { calls.set(call.call_id, call); dirty.add(call.call_id); }
      }
      if (!frame.more) completeSnapshot();
      break;
    case "status": {
      const known = calls.get(frame.call_id);
      if (!known || known.version < frame.version) {
        calls.set(frame.call_id, frame);
        dirty.add(frame.call_id);
      }
      if (!pendingResume) lastSeq = Math.max(lastSeq ?? 0, frame.seq);
      break;
    }
    case "heartbeat":
      return;
    case "progress": {
      // Packet counts of a streaming call, between its status events.
      const known = calls.get(frame.call_id);
      if (known && known.state === "IN_PROGRESS") {
        calls.set(frame.call_id, { ...known, packets_received: frame.packets_received, missing_packets: frame.missing_packets });
        dirtyCounts.add(frame.call_id);
        scheduleRender(false);
      }
      return;
    }
    case "lagged":
      setConnection("connected", "connected (caught up after falling behind)");
      break;
    case "error":
      console.warn("notifier:", frame.message);
      break;
  }
  scheduleRender();
}

function completeSnapshot() {
  if (pendingResume) { lastSeq = pendingResume.seq; streamId = pendingResume.stream; pendingResume = null; }
}

// ---- Rendering ----

function scheduleRender(reorder = true) {
  if (reorder) order = null;
  if (!renderQueued) { renderQueued = true; requestAnimationFrame(render); }
}

function matches(call) {
  if (stateFilter && call.state !== stateFilter) return false;
  if (!textFilter) return true;
  const hay = `${call.call_id} ${call.state} ${call.transcript ?? ""} ${call.last_error ?? ""} ${call.sentiment?.label ?? ""}`;
  return hay.toLowerCase().includes(textFilter);
}

function cell(tr, cls) {
  const td = document.createElement("td");
  td.className = cls;
  tr.appendChild(td);
  return td;
}

function newRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.callId = id;
  for (const cls of ["id", "state", "num packets", "num missing", "num attempts", "sentiment", "transcript", "when"]) cell(tr, cls);
  tr.children[0].textContent = id;
  return tr;
}

function fill(tr, call) {
  const [, state, packets, missing, attempts, sentiment, transcript] = tr.children;
  state.replaceChildren();
  const badge = document.createElement("span");
  badge.className = `badge ${call.state}`;
  badge.textContent = call.state;
  state.appendChild(badge);
  if (call.last_error && call.state !== "ARCHIVED") {
    const err = document.createElement("span");
    err.className = "err";
    err.textContent = call.next_attempt_at ? `${call.last_error} · retry ${relative(call.next_attempt_at)}` : call.last_error;
    err.title = call.last_error;
    state.appendChild(err);
  }
  packets.textContent = call.packets_received;
  missing.textContent = call.missing_packets;
  attempts.textContent = call.ai_attempts;
  sentiment.replaceChildren();
  if (call.sentiment) {
    const s = document.createElement("span");
    s.className = `sent-${call.sentiment.label}`;
    s.textContent = `${call.sentiment.label} ${call.sentiment.score >= 0 ? "+" : ""}${call.sentiment.score.toFixed(2)}`;
    sentiment.appendChild(s);
  }
  transcript.replaceChildren();
  if (call.transcript) {
    // Events carry a preview; the whole transcript is in the detail view.
    const d = document.createElement("div");
    d.textContent = call.transcript_truncated ? `${call.transcript}…` : call.transcript;
    d.title = call.transcript_truncated ? "Open the call for the whole transcript" : call.transcript;
    transcript.appendChild(d);
  }
  tr.dataset.at = call.at;
  // A short highlight; the Web Animations API needs no forced layout per row (and, unlike a
  // style attribute, is allowed by the page's style-src).
  if (tr.animate) tr.animate([{ backgroundColor: "#fff7d6" }, { backgroundColor: "transparent" }], { duration: 1200, easing: "ease-out" });
}

function relative(iso) {
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < -1) return `in ${-s} s`;
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return new Date(iso).toLocaleTimeString();
}

function render() {
  renderQueued = false;
  // Newest change first; only the current page gets rows. The order is computed again only
  // when a status, the filter or the set of calls changed (progress reports do not reorder).
  if (order === null || dirty.size) order = [...calls.values()].filter(matches).sort((a, b) => (a.at < b.at ? 1 : a.at > b.at ? -1 : 0));
  const pages = Math.max(1, Math.ceil(order.length / PAGE_SIZE));
  page = Math.min(page, pages - 1);
  const shown = order.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
  const shownIds = new Set(shown.map((c) => c.call_id));
  // Rows off the page are dropped (they are rebuilt when their page is shown).
  for (const [id, tr] of rows) if (!shownIds.has(id)) { tr.remove(); rows.delete(id); }
  for (const listed of shown) {
    // The order may be older than a progress report: take the call as it is now.
    const call = calls.get(listed.call_id) ?? listed;
    let tr = rows.get(call.call_id);
    if (!tr) { tr = newRow(call.call_id); rows.set(call.call_id, tr); fill(tr, call); }
    else if (dirty.has(call.call_id)) fill(tr, call);
    else if (dirtyCounts.has(call.call_id)) {
      // Progress only changes two numbers: no highlight, no reordering.
      tr.children[2].textContent = call.packets_received;
      tr.children[3].textContent = call.missing_packets;
    }
  }
  dirty.clear();
  dirtyCounts.clear();
  let anchor = tbody.firstChild;
  for (const call of shown) {
    const tr = rows.get(call.call_id);
    if (tr !== anchor) tbody.insertBefore(tr, anchor); else anchor = anchor.nextSibling;
  }
  $("empty").style.display = order.length ? "none" : "block";
  $("empty").textContent = calls.size ? "No call matches the filter." : "No calls yet.";
  $("pager").style.display = order.length > PAGE_SIZE ? "flex" : "none";
  $("page-text").textContent = `${page * PAGE_SIZE + 1}–${page * PAGE_SIZE + shown.length} of ${order.length.toLocaleString()}`;
  $("prev").disabled = page === 0;
  $("next").disabled = page >= pages - 1;
  renderCounts();
  tick();
}

// The detail view: the call in full from the read API (events carry a transcript preview).
async function openDetail(id) {
  if (!auth) return;
  openCall = id;
  const panel = $("detail");
  panel.hidden = false;
  $("detail-id").textContent = id;
  $("detail-facts").replaceChildren();
  $("detail-transcript").textContent = "Loading…";
  $("detail-history").replaceChildren();
  resetPlayer();
  const token = auth.token;
  let call;
  try {
    const response = await fetch(`/v1/call/${encodeURIComponent(id)}`, { headers: { Authorization: `Bearer ${token}` } });
    if (response.status === 401) {
      // Refreshed meanwhile: ask again with the new token. Otherwise the session is over.
      if (auth && auth.token !== token) { if (openCall === id) openDetail(id); }
      else if (auth) signOut(EXPIRED);
      return;
    }
    call = await response.json();
    if (!response.ok) throw new Error(call?.error?.message ?? response.statusText);
  } catch (e) {
    if (openCall === id) $("detail-transcript").textContent = `Could not load the call: ${e.message}`;
    return;
  }
  if (openCall !== id) return;
  const facts = [["State", call.state], ["Packets", call.packets_received], ["Missing", call.missing_packets],
    ["AI attempts", call.ai_attempts], ["Sentiment", call.sentiment ? `${call.sentiment.label} ${call.sentiment.score.toFixed(2)}` : "—"],
    ["Last error", call.last_error ?? "—"]];
  for (const [k, v] of facts) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    $("detail-facts").append(dt, dd);
  }
  $("detail-audio").hidden = !call.encoding || call.encoding === "text";
  $("detail-transcript").textContent = call.transcript ?? "No transcript yet.";
  for (const h of call.history ?? []) {
    const li = document.createElement("li");
    li.textContent = `${h.from_state ?? "·"} → ${h.to_state} (${h.reason}) ${new Date(h.at).toLocaleTimeString()}`;
    $("detail-history").appendChild(li);
  }
}

// The call's audio: fetched with the token (an <audio src> cannot send one) and played from
// a blob: URL, released when the view closes or shows another call.
let playerUrl = null;
function resetPlayer() {
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.hidden = true;
  $("listen").hidden = false;
  $("listen").disabled = false;
  $("listen").textContent = "▶ Listen";
  if (playerUrl) { URL.revokeObjectURL(playerUrl); playerUrl = null; }
}

$("listen").addEventListener("click", async () => {
  const id = openCall;
  if (!auth || !id) return;
  $("listen").disabled = true;
  $("listen").textContent = "Loading audio…";
  try {
    const response = await fetch(`/v1/call/${encodeURIComponent(id)}/audio.wav`, { headers: { Authorization: `Bearer ${auth.token}` } });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body?.error?.message ?? response.statusText);
    }
    const blob = await response.blob();
    if (openCall !== id) return;
    playerUrl = URL.createObjectURL(blob);
    const player = $("player");
    player.src = playerUrl;
    player.hidden = false;
    $("listen").hidden = true;
  } catch (e) {
    if (openCall === id) { $("listen").textContent = `Could not load the audio: ${e.message}`; }
  }
});

tbody.addEventListener("click", (e) => {
  const tr = e.target.closest("tr");
  if (tr?.dataset.callId) openDetail(tr.dataset.callId);
});
$("detail").querySelector(".close").addEventListener("click", () => { openCall = null; resetPlayer(); $("detail").hidden = true; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("detail").querySelector(".close").click(); });
$("prev").addEventListener("click", () => { page = Math.max(0, page - 1); scheduleRender(); });
$("next").addEventListener("click", () => { page += 1; scheduleRender(); });

function renderCounts() {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const call of calls.values()) counts[call.state] = (counts[call.state] ?? 0) + 1;
  const box = $("counts");
  if (!box.children.length) {
    for (const s of STATES) {
      const el = document.createElement("div");
      el.className = "count";
      el.dataset.state = s;
      const n = document.createElement("span");
      n.className = "n";
      n.textContent = "0";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = s.replace("_", " ");
      el.append(n, label);
      el.addEventListener("click", () => { stateFilter = stateFilter === s ? null : s; page = 0; for (const c of box.children) c.classList.toggle("active", c.dataset.state === stateFilter); scheduleRender(); });
      box.appendChild(el);
    }
  }
  for (const el of box.children) el.querySelector(".n").textContent = counts[el.dataset.state];
}

function tick() {
  for (const tr of tbody.children) tr.lastChild.textContent = relative(tr.dataset.at);
}

// Calls older than the server's retention window are gone from its view: drop them here too,
// so a page left open for days holds what the server holds.
setInterval(() => {
  const cutoff = Date.now() - retentionSecs * 1000;
  let dropped = false;
  for (const [id, call] of calls) {
    if (Date.parse(call.at) < cutoff) {
      calls.delete(id);
      rows.get(id)?.remove();
      rows.delete(id);
      dropped = true;
    }
  }
  if (dropped) scheduleRender();
}, 60000);

$("filter").addEventListener("input", (e) => { textFilter = e.target.value.trim().toLowerCase(); page = 0; scheduleRender(); });
setInterval(tick, 1000);
renderCounts();

// A token this tab already holds is used as it is (a refused one leads, through one refresh,
// back here); otherwise the sign-in form.
const saved = storedSession();
if (saved) signIn(saved);
else signOut();
