// The page's CSRF token (its <meta name="csrf-token">) as request headers, for the scripts that
// post to the API from a signed-in page: upload.js and live_mic.js. Loaded before them.
(function () {
  "use strict";
  window.serCsrfHeaders = function (extra) {
    const meta = document.querySelector('meta[name="csrf-token"]');
    const token = meta && meta.getAttribute("content");
    return Object.assign(token ? { "X-CSRF-Token": token } : {}, extra || {});
  };
})();
