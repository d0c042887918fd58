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
  }

  const recent = document.querySelector("#recent tbody");
  recent.replaceChildren();
  for (const e of snap.recent) {
    const row = recent.insertRow();
    row.className = e.event;
    cell(row, new Date(e.at_ms).toLocaleTimeString());
    cell(row, e.event.replace("_", " "));
    cell(row, e.reason);
    cell(row, e.job_id, "id");
    cell(row, e.kind);
    cell(row, e.queue);
    cell(row, e.attempts, "n");
  }
  document.getElementById("no-recent").hidden = snap.recent.length > 0;
  previous = snap;
}

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
