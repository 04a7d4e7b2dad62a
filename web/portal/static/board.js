// The line board: replace the board with each version the server sends (server-sent events).
"use strict";
(function () {
  const board = document.getElementById("board");
  const status = document.getElementById("board-status");
  if (!board || !window.EventSource) return;
  const source = new EventSource("/board/events?version=" + encodeURIComponent(board.dataset.version || "0"));
  source.addEventListener("board", function (event) {
    const update = JSON.parse(event.data);
    board.innerHTML = update.html;  // HTML the portal rendered with autoescaping, never text from the page
    board.dataset.version = String(update.version);
    status.textContent = "updated " + new Date().toLocaleTimeString();
  });
  source.onerror = function () { status.textContent = "reconnecting..."; };
})();
