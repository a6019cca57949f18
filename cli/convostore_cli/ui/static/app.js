"use strict";
// The session browser. Everything from a session is put in the page as text
// (textContent, text nodes, attribute values): never as markup. It only reads.

const KEY = (() => {
  const given = location.hash.match(/key=([A-Za-z0-9_-]+)/);
  if (given) {
    sessionStorage.setItem("convostore-ui-key", given[1]);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("convostore-ui-key") || "";
})();
const PAGE = 50;
const LONG = 2000;
const state = { store: null, session: null, branch: "main", cursor: null, query: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function say(text) {
  $("status").textContent = text;
}

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of params || []) if (value !== null && value !== "") query.append(name, value);
  const url = "/api/" + path + (query.toString() ? "?" + query : "");
  const resp = await fetch(url, { headers: { "X-Convostore-Ui-Key": KEY } });
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch { body = null; }
  if (!resp.ok && !(path === "readyz" && body)) {
    const code = body && body.error ? body.error.code : text.slice(0, 120);
    const error = new Error(`${resp.status} ${code}`);
    error.status = resp.status;
    throw error;
  }
  return body;
}

const storePath = () => `v1/stores/${encodeURIComponent(state.store)}`;
const sessionPath = () => `${storePath()}/sessions/${encodeURIComponent(state.session)}`;

function choose(list, current) {
  for (const button of list.querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button === current));
  }
}

async function loadStores() {
  const ready = await api("readyz");
  const list = $("stores");
  list.replaceChildren();
  for (const [name, health] of Object.entries(ready.stores || {})) {
    const button = el("button", { type: "button", "data-store": name },
      name, el("span", { class: "meta" }, health === "ok" ? "ready" : health));
    button.addEventListener("click", guarded(() => { choose(list, button); return openStore(name); }));
    list.append(el("li", {}, button));
  }
  say(ready.ready ? "The sidecar is ready." : "Some stores are not ready.");
  const first = list.querySelector("button");
  if (first) { choose(list, first); await openStore(first.dataset.store); }
}

async function openStore(name) {
  state.store = name;
  state.query = { prefix: "", label: "" };
  await listSessions(true);
}

async function listSessions(fresh) {
  if (fresh) { state.cursor = null; $("sessions").replaceChildren(); }
  const { prefix, label } = state.query;
  let page;
  try {
    if (prefix) throw Object.assign(new Error("by prefix"), { status: 501 });
    page = await api(`${storePath()}/sessions:find`, [["label", label], ["cursor", state.cursor], ["limit", PAGE]]);
  } catch (error) {
    if (error.status !== 501 || label) throw error;
    page = await api(`${storePath()}/sessions`, [["prefix", prefix], ["cursor", state.cursor], ["limit", PAGE]]);
  }
  const list = $("sessions");
  for (const found of page.sessions) {
    const record = typeof found === "string" ? { session_id: found } : found;
    const meta = record.created_at ? `started ${record.created_at}` : null;
    const button = el("button", { type: "button", "data-session": record.session_id },
      record.session_id, meta && el("span", { class: "meta" }, meta));
    button.addEventListener("click", guarded(() => { choose(list, button); return openSession(record.session_id); }));
    list.append(el("li", {}, button));
  }
  state.cursor = page.next_cursor;
  $("more").hidden = !state.cursor;
  say(`${list.children.length} session(s) in store ${state.store}.`);
}

async function openSession(id) {
  state.session = id;
  state.branch = "main";
  $("session-heading").textContent = `Session ${id}`;
  const labels = $("labels");
  labels.replaceChildren();
  try {
    const record = await api(`${sessionPath()}/metadata`);
    for (const [name, value] of Object.entries(record.labels || {})) labels.append(el("dt", {}, name), el("dd", {}, value));
  } catch (error) {
    if (![404, 501].includes(error.status)) throw error;
  }
  let branches = [];
  try {
    branches = (await api(`${sessionPath()}/branches`)).branches;
  } catch (error) {
    if (error.status !== 501) throw error;
  }
  $("branches-section").hidden = branches.length < 2;
  if (branches.length > 1) await drawBranches(branches);
  await showBranch("main");
  $("session").focus();
}

async function drawBranches(branches) {
  // A branch forks from the earlier branch it shares most user turns with, after them.
  // The turns are read from everything said (a compaction since does not hide them).
  const turns = {};
  for (const b of branches) {
    const said = await api(`${sessionPath()}/items`, [["branch", b.branch_id], ["view", "full"]]);
    turns[b.branch_id] = (said.items || said).filter((i) => i.role === "user").map((i) => JSON.stringify(i));
  }
  const shared = (a, b) => { let n = 0; while (n < a.length && n < b.length && a[n] === b[n]) n++; return n; };
  const ordered = [...branches].sort((a, b) => (a.branch_id === "main" ? -1 : b.branch_id === "main" ? 1 : a.created_at.localeCompare(b.created_at)));
  const nodes = {};
  const root = $("branches");
  root.replaceChildren();
  ordered.forEach((b, index) => {
    let parent = null, common = -1;
    for (const earlier of ordered.slice(0, index)) {
      const n = shared(turns[b.branch_id], turns[earlier.branch_id]);
      if (n > common) { common = n; parent = earlier.branch_id; }
    }
    const label = parent ? `${b.branch_id} (from ${parent} after turn ${common})` : b.branch_id;
    const button = el("button", { type: "button", "aria-pressed": String(b.branch_id === state.branch), "data-branch": b.branch_id },
      `${label}: ${b.user_turns} turn(s), ${b.message_count} item(s)`);
    button.addEventListener("click", guarded(() => {
      for (const other of root.querySelectorAll("button")) other.setAttribute("aria-pressed", String(other === button));
      return showBranch(b.branch_id);
    }));
    const node = el("li", {}, button, el("ul", {}));
    nodes[b.branch_id] = node;
    (parent ? nodes[parent].querySelector("ul") : root).append(node);
  });
}

async function showBranch(branch) {
  state.branch = branch;
  const where = [["branch", branch]];
  const live = await api(`${sessionPath()}/items`, where);
  let shape = null;
  try {
    shape = (await api(`${sessionPath()}/branches/${encodeURIComponent(branch)}/shape`)).items;
  } catch (error) {
    if (![404, 501].includes(error.status)) throw error;
  }
  render($("live"), live.items || live, shape);
  await showUsage(branch);
  let full = null;
  try {
    full = await api(`${sessionPath()}/items`, [...where, ["view", "full"]]);
  } catch (error) {
    if (![400, 501].includes(error.status)) throw error;
  }
  const archived = full && JSON.stringify(full) !== JSON.stringify(live);
  $("archive-section").hidden = !archived;
  if (archived) render($("archive"), full.items || full, null);
  say(`Branch ${branch} of session ${state.session}.`);
}

function text(item) {
  const content = item.content ?? item.output ?? item.summary;
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => (typeof part === "string" ? part : part.text ?? part.refusal ?? "")).join("\n");
  return "";
}

function kindOf(item) {
  if (item.type === "compaction") return ["summary", "Compaction summary (it replaced the items before it)"];
  if (item.role === "user") return ["user", "User"];
  if (item.role === "assistant") return ["assistant", "Assistant"];
  if (item.role === "system" || item.role === "developer") return ["assistant", item.role];
  return ["other", item.type || item.role || "item"];
}

function raw(item) {
  return el("details", { class: "raw" }, el("summary", {}, "Raw JSON"), el("pre", {}, JSON.stringify(item, null, 2)));
}

function body(words) {
  const shown = el("p", { class: "text" }, words);
  if (words.length <= LONG) return shown;
  return el("details", {}, el("summary", {}, `Long text (${words.length} characters)`), shown);
}

function render(list, items, shape) {
  list.replaceChildren();
  const outputs = new Map();
  for (const item of items) if (item.type === "function_call_output") outputs.set(item.call_id, item);
  const folded = new Set();
  let turn = null;
  items.forEach((item, index) => {
    if (folded.has(item)) return;
    const itemTurn = shape && shape.length === items.length ? shape[index].turn : null;
    if (itemTurn !== null && itemTurn !== turn) {
      turn = itemTurn;
      list.append(el("li", { class: "turn" }, turn === 0 ? "Before the first turn" : `Turn ${turn}`));
    }
    if (item.type === "function_call") {
      const output = outputs.get(item.call_id);
      if (output) folded.add(output);
      list.append(el("li", { class: "item tool" },
        el("span", { class: "kind" }, `Tool call: ${item.name}`),
        el("pre", { "aria-label": "arguments" }, item.arguments ?? ""),
        output ? el("pre", { "aria-label": "output" }, typeof output.output === "string" ? output.output : JSON.stringify(output.output)) : el("p", {}, "(no output yet)"),
        raw(output ? [item, output] : item)));
      return;
    }
    const [kind, title] = kindOf(item);
    const words = text(item);
    list.append(el("li", { class: `item ${kind}` }, el("span", { class: "kind" }, title),
      words ? body(words) : null, raw(item)));
  });
  if (!items.length) list.append(el("li", {}, "No items."));
}

async function showUsage(branch) {
  let turns = [];
  try {
    turns = (await api(`${sessionPath()}/branches/${encodeURIComponent(branch)}/usage`)).turns;
  } catch (error) {
    if (![404, 501].includes(error.status)) throw error;
  }
  $("usage-section").hidden = !turns.length;
  const box = $("usage");
  box.replaceChildren();
  if (!turns.length) return;
  const most = Math.max(1, ...turns.map((t) => Math.max(t.input_tokens, t.output_tokens)));
  const ns = "http://www.w3.org/2000/svg";
  const width = 24 * turns.length + 10;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "usage");
  svg.setAttribute("viewBox", `0 0 ${width} 110`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Tokens in and out per turn");
  svg.setAttribute("preserveAspectRatio", "none");
  turns.forEach((t, i) => {
    for (const [j, kind, value] of [[0, "in", t.input_tokens], [1, "out", t.output_tokens]]) {
      const bar = document.createElementNS(ns, "rect");
      const height = Math.round((100 * value) / most);
      bar.setAttribute("class", kind);
      bar.setAttribute("x", String(5 + 24 * i + 10 * j));
      bar.setAttribute("y", String(105 - height));
      bar.setAttribute("width", "9");
      bar.setAttribute("height", String(height));
      const title = document.createElementNS(ns, "title");
      title.textContent = `Turn ${t.user_turn_number}: ${value} tokens ${kind}`;
      bar.append(title);
      svg.append(bar);
    }
  });
  const rows = turns.map((t) => el("li", {}, `Turn ${t.user_turn_number}: ${t.input_tokens} in, ${t.output_tokens} out, ${t.requests} request(s)`));
  box.append(svg, el("p", { class: "legend" }, "Blue: tokens in; orange: tokens out."), el("ul", { class: "legend" }, ...rows));
}

function guarded(action) {
  return (event) => {
    if (event) event.preventDefault();
    action().catch((error) => say(`Could not read from the sidecar: ${error.message}`));
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", guarded(async () => {
    state.query = { prefix: $("prefix").value.trim(), label: $("label").value.trim() };
    await listSessions(true);
  }));
  $("more").addEventListener("click", guarded(() => listSessions(false)));
  guarded(loadStores)();
});
