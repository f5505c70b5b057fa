// Live updates for the dashboard: listens to /live/changes (server-sent events) and, when
// something shown changed, refetches the page and swaps in its live regions ([data-live]).
// At most one refresh per second; open <details> stay open. Pages work without it.
(function () {
  "use strict";
  var source = document.body.getAttribute("data-live-source");
  var indicator = document.getElementById("live-state");
  function show(state, text) {
    if (indicator) {
      indicator.className = "live-state " + state;
      indicator.textContent = text;
    }
  }
  if (!source || !window.EventSource || !window.fetch) {
    return;
  }
  var busy = false;
  var pending = false;
  var timer = null;
  var last = 0;
  var events = new EventSource(source);

  function openDetails() {
    var open = {};
    document.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
    return open;
  }

  function refresh() {
    if (busy) { pending = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        // Read now, not when the fetch started: a confirmation opened meanwhile stays open.
        var open = openDetails();
        document.querySelectorAll("[data-live][id]").forEach(function (region) {
          var next = fresh.getElementById(region.id);
          if (next) { region.replaceWith(document.adoptNode(next)); }
        });
        document.querySelectorAll("details[id]").forEach(function (d) {
          if (Object.prototype.hasOwnProperty.call(open, d.id)) { d.open = open[d.id]; }
        });
        document.title = fresh.title;
        if (!fresh.body.hasAttribute("data-live-source")) {
          // The run is over: nothing more will change.
          events.close();
          show("done", "● up to date");
        }
      })
      .catch(function () { show("off", "○ refresh failed"); })
      .then(function () {
        busy = false;
        last = Date.now();
        if (pending) { pending = false; schedule(); }
      });
  }

  function schedule() {
    if (timer) { return; }
    timer = setTimeout(function () { timer = null; refresh(); }, Math.max(0, 1000 - (Date.now() - last)));
  }

  // Whatever changed between rendering the page and listening (or while reconnecting) was
  // not announced to this page: catch up once when the feed is ready.
  events.addEventListener("ready", function () { show("on", "● live"); schedule(); });
  events.addEventListener("changed", schedule);
  events.onerror = function () { show("off", "○ reconnecting"); };
})();
