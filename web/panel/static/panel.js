// The operator panel: tiles replaced with each version the station sends (server-sent events); buttons,
// answers and scans posted without leaving the page; a keyboard-wedge scanner's codes taken wherever
// the page has the focus.
"use strict";
(function () {
  const panel = document.getElementById("panel");
  const status = document.getElementById("status");
  const scanForm = document.getElementById("scan");
  if (!panel) return;
  let pending = null;  // a version that arrived while the operator was typing an answer

  function typing() {
    const el = document.activeElement;
    return el && el.tagName === "INPUT" && panel.contains(el) && el.value !== "";
  }

  function show(update) {
    if (typing()) { pending = update; return; }
    pending = null;
    panel.innerHTML = update.html;  // HTML the station rendered with autoescaping, never text from the page
    panel.dataset.version = String(update.version);
  }

  function tell(text, refused) {
    status.textContent = text;
    status.classList.toggle("refused", !!refused);
  }

  if (window.EventSource) {
    const source = new EventSource("/events?version=" + encodeURIComponent(panel.dataset.version || "0"));
    source.addEventListener("tiles", function (event) { show(JSON.parse(event.data)); });
    source.onopen = function () { tell("live", false); };
    source.onerror = function () { tell("station not reachable: reconnecting…", true); };
  }

  async function post(action, data) {
    try {
      const response = await fetch(action, { method: "POST", body: data, headers: { "Accept": "application/json" },
                                             credentials: "same-origin" });
      const answer = await response.json().catch(function () { return { taken: false, said: response.statusText }; });
      const said = answer.said || answer.error || "";
      tell(said, !answer.taken);
    } catch (err) {
      tell("station not reachable: " + err, true);
    }
    if (pending && !typing()) show(pending);
  }

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    event.preventDefault();
    const data = new FormData(form);
    // The tiles pushed by the station are the same for every screen: the token is this page's.
    if (scanForm) data.set("csrf", scanForm.elements.namedItem("csrf").value);
    for (const input of form.querySelectorAll("input[type=text]")) { input.value = ""; input.blur(); }
    post(form.getAttribute("action"), data);
  });

  // A keyboard-wedge scanner types its code and Enter into whatever has the focus: with no field
  // focused, the keys are gathered here and the code is posted as a scan.
  let typed = "";
  document.addEventListener("keydown", function (event) {
    const el = document.activeElement;
    if (el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA")) return;
    if (event.ctrlKey || event.altKey || event.metaKey) return;
    if (event.key === "Enter") {
      if (typed && scanForm) {
        const data = new FormData(scanForm);
        data.set("code", typed);
        post("/scan", data);
      }
      typed = "";
      event.preventDefault();
    } else if (event.key.length === 1) {
      typed = (typed + event.key).slice(-200);
    } else if (event.key === "Escape") {
      typed = "";
    }
  });
})();
