// agentmeter console: the one script. Live Data refreshes itself; everything else is plain
// forms and links, so the console works with scripts off (Live Data then needs a reload).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const body = document.querySelector("tbody[data-refresh]");
  if (!body) return;
  const refresh = async () => {
    try {
      const answer = await fetch(body.dataset.refresh + window.location.search, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      if (answer.status === 401) { window.location.assign("/login"); return; }
      if (answer.ok) body.innerHTML = await answer.text();
    } catch (_) {
      // The next tick tries again.
    }
  };
  window.setInterval(refresh, 3000);
});
