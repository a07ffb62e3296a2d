// Reports how the page was loaded, into the DOM, so a headless browser's
// --dump-dom shows it: the protocol of the navigation (h2 over TLS, or
// http/1.1), whether style.css applied, whether logo.png decoded, and the
// text of a file with a UTF-8 name fetched by its percent-encoded URL.
"use strict";

function show(id, text) {
  document.getElementById(id).textContent = text;
}

const navigation = performance.getEntriesByType("navigation")[0];
show("protocol", navigation ? navigation.nextHopProtocol : "unknown");

const border = getComputedStyle(document.getElementById("report")).borderTopStyle;
show("stylesheet", border === "dashed" ? "applied" : "not applied (" + border + ")");

window.addEventListener("load", () => {
  const logo = document.getElementById("logo");
  show("image", logo.complete && logo.naturalWidth > 0
    ? "loaded " + logo.naturalWidth + "x" + logo.naturalHeight : "not loaded");
});

fetch("h%C3%A9llo%20w%C3%B6rld.txt")
  .then((response) => response.ok ? response.text() : "HTTP " + response.status)
  .then((text) => show("utf8-file", text.trim()))
  .catch((error) => show("utf8-file", "failed: " + error));
