// Ampora console: the little the pages need from the browser. Live fleet rows (the server
// says when, over Server-Sent Events; the rows come as server-rendered HTML), copy buttons,
// and a confirmation before destructive forms. No inline scripts anywhere (see the CSP).
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
