// Signet's web UI: live updates of the overview (server-sent events) and
// confirmations before actions. Every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (live && live.dataset.events && window.EventSource) {
    var source = new EventSource(live.dataset.events);
    source.addEventListener(live.dataset.event || "overview", function (e) {
      live.innerHTML = e.data;
      live.dataset.updated = String(Number(live.dataset.updated || "0") + 1);
      if (state) { state.textContent = "Live: updated " + new Date().toLocaleTimeString() + "."; }
    });
    source.addEventListener("error", function () {
      if (state) { state.textContent = "Live updates paused; reconnecting…"; }
    });
  }
  // On the document, so forms that arrive with a live update ask too.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      e.preventDefault();
    }
  });
});
