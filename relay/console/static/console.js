// Keeps the activity list up to date: every few seconds the same page is asked for its list only.
// Without JavaScript the page still works; reloading it shows new mail.
"use strict";
(function () {
  var list = document.querySelector("[data-live]");
  if (!list) return;
  var openIds = function () {
    return Array.prototype.map.call(list.querySelectorAll("details[open]"), function (d) {
      return d.closest("article").id;
    });
  };
  function refresh() {
    fetch(window.location.href, { headers: { "X-Console-Fragment": "1" }, credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
      .then(function (html) {
        var keepOpen = openIds();
        list.innerHTML = html;
        keepOpen.forEach(function (id) {
          var details = document.querySelector("#" + id + " details");
          if (details) details.open = true;
        });
      })
      .catch(function () { /* the relay may be restarting: try again at the next tick */ })
      .finally(function () { window.setTimeout(refresh, 2000); });
  }
  window.setTimeout(refresh, 2000);
})();
