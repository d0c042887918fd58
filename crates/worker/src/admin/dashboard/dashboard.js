// The worker dashboard: renders /dashboard.json every 2 s. Rates are the change between two
// polls. Text goes in with textContent only: nothing from the document is parsed as HTML.
"use strict";

const REFRESH_MS = 2000;
let previous = null;

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function rate(now, before, dtS) {
  if (before === null || before === undefined || now === null || now === undefined || !(dtS > 0)) return "–";
  return ((now - before) / dtS).toFixed(1);
}

// Pause or resume a kind or queue class (POST /pauses; only behind the admin auth).
async function change(action, target, name) {
  const res = await fetch("/pauses", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ action: action, target: target, name: name }),
  });
  const status = document.getElementById("status");
  if (!res.ok) {
    status.textContent = action + " " + name + " refused (HTTP " + res.status + ")";
    status.className = "status down";
  }
  refresh();
}

// The state cell of a kind or queue class: "paused (n held)" or "running", with its button
// when the page may change it.
function pauseCell(row, snap, target, name) {
  const paused = (snap.paused || []).find((p) => p.target === target + ":" + name);
  const td = cell(row, snap.paused === null ? null : paused ? "paused (" + paused.held + " held)" : "running");
  if (paused) td.className = "paused";
  if (snap.controls && snap.paused !== null) {
    const button = document.createElement("button");
    const action = paused ? "resume" : "pause";
    button.textContent = paused ? "Resume" : "Pause";
    button.dataset.action = action;
    button.dataset.target = target + ":" + name;
    button.addEventListener("click", () => change(action, target, name));
    td.appendChild(button);
  }
}

function decidedOf(kind) {
  return Object.values(kind.decided).reduce((a, b) => a + b, 0);
}

function render(snap) {
  const dtS = previous ? (snap.at_ms - previous.at_ms) / 1000 : 0;
  const status = document.getElementById("status");
  status.textContent = (snap.ready ? "consuming" : "no broker session") + " · " + new Date(snap.at_ms).toLocaleTimeString();
  status.className = "status " + (snap.ready ? "ok" : "down");

  const decidedByQueue = {};
  const before = {};
  if (previous) for (const k of previous.kinds) before[k.kind] = k;
  for (const k of snap.kinds) {
    if (!k.queue) continue;
    const was = before[k.kind];
    decidedByQueue[k.queue] = (decidedByQueue[k.queue] || 0) + decidedOf(k) - (was ? decidedOf(was) : decidedOf(k));
  }

  const queues = document.querySelector("#queues tbody");
  queues.replaceChildren();
  const depthBefore = {};
  if (previous) for (const q of previous.queues) depthBefore[q.name] = q.messages;
  for (const q of snap.queues) {
    const row = queues.insertRow();
    cell(row, q.name);
    cell(row, q.class === null ? "dead letters" : q.class);
    cell(row, q.messages, "n");
    cell(row, rate(q.messages, depthBefore[q.name], dtS), "n");
    cell(row, q.class && previous && dtS > 0 ? (decidedByQueue[q.class] / dtS).toFixed(1) : "–", "n");
    cell(row, q.consumers, "n");
    if (q.class === null) cell(row, ""); else pauseCell(row, snap, "queue", q.class);
  }
  document.getElementById("parked").textContent = snap.parked === null ? "–" : String(snap.parked);
  document.getElementById("scheduled").textContent = snap.scheduled === null ? "–" : String(snap.scheduled);

  const kinds = document.querySelector("#kinds tbody");
  kinds.replaceChildren();
  for (const k of snap.kinds) {
    const row = kinds.insertRow();
    cell(row, k.kind);
    cell(row, k.queue);
    cell(row, k.decided.succeeded || 0, "n");
    cell(row, k.decided.failed || 0, "n");
    cell(row, k.decided.dead_lettered || 0, "n");
    const was = before[k.kind];
    cell(row, previous ? rate(decidedOf(k), was ? decidedOf(was) : 0, dtS) : "–", "n");
    pauseCell(row, snap, "kind", k.kind);
  }

  const recent = document.querySelector("#recent tbody");
  recent.replaceChildren();
  for (const e of snap.recent) {
    const row = recent.insertRow();
    row.className = e.event;
    cell(row, new Date(e.at_ms).toLocaleTimeString());
    cell(row, e.event.replace("_", " "));
    cell(row, e.reason);
    linkToJob(cell(row, "", "id"), e.job_id);
    cell(row, e.kind);
    cell(row, e.queue);
    cell(row, e.attempts, "n");
  }
  document.getElementById("no-recent").hidden = snap.recent.length > 0;
  previous = snap;
}

// A job id as a link to its state and transitions (#job-<id>; metadata only).
function linkToJob(td, id) {
  if (!id) return;
  const a = document.createElement("a");
  a.href = "#job-" + id;
  a.textContent = id;
  td.appendChild(a);
}

// The job the address names (#job-<id>): its state and its transitions, from /jobs/<id>.
async function showJob() {
  const panel = document.getElementById("job");
  const id = location.hash.startsWith("#job-") ? location.hash.slice(5) : "";
  panel.hidden = !id;
  if (!id) return;
  const body = document.querySelector("#job-events tbody");
  body.replaceChildren();
  const title = document.getElementById("job-title");
  try {
    const res = await fetch("/jobs/" + encodeURIComponent(id), { cache: "no-store" });
    if (!res.ok) throw new Error(res.status === 404 ? "not known (or pruned)" : "HTTP " + res.status);
    const job = await res.json();
    title.textContent = "Job " + job.id + " · " + job.kind + " · " + job.client + " · " + job.status +
      (job.reason ? " (" + job.reason + ")" : "");
    for (const e of job.events) {
      const row = body.insertRow();
      cell(row, e.seq, "n");
      cell(row, e.status.replace(/_/g, " "));
      cell(row, new Date(e.at_ms).toLocaleTimeString());
    }
  } catch (e) {
    title.textContent = "Job " + id + ": " + e.message;
  }
}

window.addEventListener("hashchange", showJob);
showJob();

async function refresh() {
  try {
    const res = await fetch("/dashboard.json", { cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = "worker not answering (" + e.message + ")";
    status.className = "status down";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
