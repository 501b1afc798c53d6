// Signet's web UI: live updates of the overview (server-sent events) and
// confirmations before actions. Every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (live && live.dataset.events && window.EventSource) {
    var source = new EventSource(live.dataset.events);
    source.addEventListener("overview", function (e) {
      live.innerHTML = e.data;
      live.dataset.updated = String(Number(live.dataset.updated || "0") + 1);
      if (state) { state.textContent = "Live: updated " + new Date().toLocaleTimeString() + "."; }
    });
    source.addEventListener("error", function () {
      if (state) { state.textContent = "Live updates paused; reconnecting…"; }
    });
  }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.dataset.confirm)) { e.preventDefault(); }
    });
  });
});
