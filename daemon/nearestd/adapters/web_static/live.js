// nearestd web view: keeps an open page current over Server-Sent Events, no reload.
// The server sends {"svg": {markKey: markup}, "html": {region: markup}, "version": v};
// markup comes from the daemon, already escaped; an empty string removes the mark.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-events");
  var badge = document.getElementById("live");
  if (!url || !window.EventSource) {
    return;
  }
  var version = body.getAttribute("data-version") || "";
  var SVG_NS = "http://www.w3.org/2000/svg";

  function setLive(on) {
    if (badge) {
      badge.textContent = on ? "live" : "live: reconnecting";
      badge.setAttribute("data-live", on ? "on" : "off");
    }
  }

  function svgNode(markup) {
    var doc = new DOMParser().parseFromString(
      '<svg xmlns="' + SVG_NS + '">' + markup + "</svg>", "image/svg+xml");
    var node = doc.documentElement.firstElementChild;
    return node ? document.importNode(node, true) : null;
  }

  function htmlNode(markup) {
    var t = document.createElement("template");
    t.innerHTML = markup;
    return t.content.firstElementChild;
  }

  function apply(msg) {
    var layer = document.getElementById("devices");
    Object.keys(msg.svg || {}).forEach(function (key) {
      if (!layer) {
        return;
      }
      var old = layer.querySelector('[data-key="' + CSS.escape(key) + '"]');
      var markup = msg.svg[key];
      if (!markup) {
        if (old) {
          old.remove();
        }
        return;
      }
      var fresh = svgNode(markup);
      if (!fresh) {
        return;
      }
      if (old) {
        old.replaceWith(fresh);
      } else {
        layer.appendChild(fresh);
      }
    });
    Object.keys(msg.html || {}).forEach(function (name) {
      var old = document.querySelector('[data-region="' + CSS.escape(name) + '"]');
      var fresh = old && htmlNode(msg.html[name]);
      if (fresh) {
        old.replaceWith(fresh);
      }
    });
    if (msg.version) {
      version = msg.version;
      body.setAttribute("data-version", version);
    }
    body.setAttribute("data-updates", String(Number(body.getAttribute("data-updates") || 0) + 1));
  }

  var source = new EventSource(url + (url.indexOf("?") < 0 ? "?" : "&") + "v=" +
    encodeURIComponent(version));
  source.addEventListener("open", function () { setLive(true); });
  source.addEventListener("error", function () { setLive(false); });
  source.addEventListener("regions", function (e) { apply(JSON.parse(e.data)); });
})();
