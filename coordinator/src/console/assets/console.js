// Ampora console: the little the pages need from the browser. Live fleet rows (the server
// says when, over Server-Sent Events; the rows come as server-rendered HTML), a live part
// polled as server-rendered HTML (a rollout's page, until the part says it is final), copy
// buttons, and a confirmation before destructive forms. No inline scripts (see the CSP).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("fleet-live");
  if (live && window.EventSource) {
    let busy = false;
    const refresh = () => {
      if (busy) return;
      busy = true;
      fetch(live.dataset.rows, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => { live.innerHTML = html; live.dataset.refreshed = String(Date.now()); })
        .catch(() => {})
        .finally(() => { busy = false; });
    };
    const events = new EventSource(live.dataset.events);
    events.addEventListener("changed", refresh);
  }

  // [data-poll]: fetch the part again every POLL_MS, at most POLL_MAX times, until what
  // it holds carries [data-final]; not while the tab is hidden.
  const POLL_MS = 2000, POLL_MAX = 1800;
  document.querySelectorAll("[data-poll]").forEach((part) => {
    let polls = 0;
    const tick = () => {
      if (part.querySelector("[data-final]") || polls >= POLL_MAX) return;
      if (document.hidden) { setTimeout(tick, POLL_MS); return; }
      polls += 1;
      fetch(part.dataset.poll, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => { part.innerHTML = html; part.dataset.refreshed = String(Date.now()); })
        .catch(() => {})
        .finally(() => setTimeout(tick, POLL_MS));
    };
    setTimeout(tick, POLL_MS);
  });

  document.addEventListener("click", (e) => {
    const copy = e.target.closest("[data-copy]");
    if (copy) {
      const text = document.getElementById(copy.dataset.copy).textContent;
      navigator.clipboard.writeText(text).then(() => { copy.textContent = "Copied"; });
    }
    const confirmed = e.target.closest("[data-confirm]");
    if (confirmed && !window.confirm(confirmed.dataset.confirm)) {
      e.preventDefault();
    }
  });
});
