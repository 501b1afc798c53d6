// Signet's web UI: the theme, the handshake with Proxmox VE's "Signing" tab, live
// updates (server-sent events) and confirmations before actions. Every page works
// without this script.
"use strict";
(function () {
  // PVE's themes (PVEThemeCookie): "crisp" is light, "proxmox-dark" dark, "auto" (or
  // none: the page opened on its own) follows the system (signet.css). The tab passes
  // its theme as ?theme= and in a message; the pages after the first keep it for the
  // session. Runs in <head>, before the page is drawn.
  var THEMES = { "auto": true, "crisp": true, "proxmox-dark": true };
  var root = document.documentElement;
  function theme(t) {
    if (!Object.prototype.hasOwnProperty.call(THEMES, t)) { return; }
    root.setAttribute("data-theme", t);
    try { window.sessionStorage.setItem("signet-theme", t); } catch (e) { /* storage off */ }
  }
  var asked = null;
  try { asked = new URLSearchParams(window.location.search).get("theme"); } catch (e) { /* old browser */ }
  var kept = null;
  try { kept = window.sessionStorage.getItem("signet-theme"); } catch (e) { /* storage off */ }
  theme(asked || kept);

  var framed = window.parent !== window;
  if (framed) {
    // Only the tab that frames this page (CSP frame-ancestors says who may) speaks to
    // it, and only to set the theme.
    window.addEventListener("message", function (e) {
      if (e.source === window.parent && e.data && e.data.signet === "theme") {
        theme(String(e.data.theme));
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (framed) {
      // The tab waits for this to know signetd answered (its help for an unreachable
      // port is shown otherwise). It says nothing secret: the node and the page.
      window.parent.postMessage({
        signet: "ready",
        node: root.getAttribute("data-node") || "",
        page: window.location.pathname
      }, "*");
    }
    var live = document.getElementById("live");
    var state = document.getElementById("live-state");
    if (live && live.dataset.events && window.EventSource) {
      var source = new EventSource(live.dataset.events);
      source.addEventListener(live.dataset.event || "overview", function (e) {
        // The live part only: the page's scroll and its search field stay as they are.
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
})();
