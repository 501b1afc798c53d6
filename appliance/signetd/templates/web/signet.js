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
    if (!Object.prototype.hasOwnProperty.call(THEMES, t)) { return false; }
    root.setAttribute("data-theme", t);
    try { window.sessionStorage.setItem("signet-theme", t); } catch (e) { /* storage off */ }
    return true;
  }
  var asked = null;
  try { asked = new URLSearchParams(window.location.search).get("theme"); } catch (e) { /* old browser */ }
  var kept = null;
  try { kept = window.sessionStorage.getItem("signet-theme"); } catch (e) { /* storage off */ }
  if (!theme(asked)) { theme(kept); }

  var framed = window.parent !== window;
  // This page asks for a PVE login: the browser has none for this address.
  var needsLogin = root.getAttribute("data-login") === "needed";
  var handedOver = false;
  // The PVE tab's ticket: when this page asks for a login, or shows another PVE user
  // than the tab's (a login handed over before the user changed).
  function logIn(ticket) {
    if (handedOver || typeof ticket !== "string" || !ticket) { return; }
    handedOver = true;
    // signetd has the local PVE API check it and keeps it for this frame; a page of
    // another origin could not send this header.
    window.fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/x-www-form-urlencoded", "X-Signet-Login": "1" },
      body: "ticket=" + encodeURIComponent(ticket)
    }).then(function (r) {
      if (r.ok) {
        window.location.reload();
        return null;
      }
      return r.text().then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var said = page.querySelector(".verdict");
        var here = document.querySelector(".verdict");
        if (said && here) { here.innerHTML = said.innerHTML; }
      });
    }).catch(function () { /* the page says to log in already */ });
  }
  if (framed) {
    // Only the tab that frames this page (CSP frame-ancestors says who may) speaks to
    // it: PVE's theme, and the PVE login when this page asked for one.
    window.addEventListener("message", function (e) {
      if (e.source !== window.parent || !e.data) { return; }
      if (e.data.signet === "theme") { theme(String(e.data.theme)); }
      if (e.data.signet === "login") { logIn(e.data.ticket); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (framed) {
      // The tab waits for this to know signetd answered (its help for an unreachable
      // port is shown otherwise). It says nothing secret: the node, the page, the
      // PVE user it shows, and whether it wants a PVE login.
      window.parent.postMessage({
        signet: "ready",
        node: root.getAttribute("data-node") || "",
        page: window.location.pathname,
        user: root.getAttribute("data-user") || "",
        login: needsLogin
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
