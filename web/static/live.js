// Live status of jobs still running, without reloading the page; plus the job page's small behaviours.
// Polls GET /api/v1/jobs?ids=... for rows (tr.job-row) and status badges ([data-live-job]) whose
// data-status is queued or processing, and updates them in place. Served by the app; no dependencies.
(function () {
  "use strict";

  var ACTIVE = { queued: true, processing: true };
  var INTERVAL_MS = 1500;
  var MAX_IDS = 100;
  var script = document.currentScript;
  var api = (script && script.dataset.api) || "/api/v1/jobs";
  var emoji = {};
  try {
    emoji = JSON.parse((script && script.dataset.emoji) || "{}");
  } catch (e) { /* no emoji given: labels are shown without them */ }

  function watched() {
    return Array.prototype.slice.call(document.querySelectorAll("tr.job-row, [data-live-job]"));
  }

  function text(tag, cls, content) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    el.textContent = content;
    return el;
  }

  function emotionLabel(cell, result) {
    cell.textContent = "";
    if (!result) { cell.appendChild(text("span", "none", "–")); return; }
    // The colour comes from the emo-* class in style.css, as on the server-rendered rows.
    var label = text("span", "emo emo-" + result.emotion, " " + result.emotion);
    label.insertBefore(text("span", "emoji", emoji[result.emotion] || ""), label.firstChild);
    cell.appendChild(label);
    if (result.uncertain) {
      var mark = text("span", "uncertain", "uncertain");
      mark.title = "Confidence is below the model's reliability threshold: treat this label with care.";
      cell.appendChild(document.createTextNode(" "));
      cell.appendChild(mark);
    }
  }

  // A conversation's speakers under the job's emotion, as _jobs.html draws them.
  function speakers(cell, result) {
    var channels = (result && result.channels) || [];
    var conversation = result && result.conversation;
    if (channels.length < 2 && !(conversation && conversation.escalation)) { return; }
    var box = text("small", "speakers", "");
    channels.forEach(function (ch) {
      var item = text("span", "speaker", ch.label + " ");
      item.dataset.label = ch.label;
      item.dataset.emotion = ch.emotion || "";
      if (ch.emotion) {
        var label = text("span", "emo emo-" + ch.emotion, " " + ch.emotion);
        label.insertBefore(text("span", "emoji", emoji[ch.emotion] || ""), label.firstChild);
        item.appendChild(label);
      } else {
        item.appendChild(text("span", "none", "–"));
      }
      box.appendChild(item);
    });
    if (conversation && conversation.escalation) {
      var flag = text("span", "escalation-flag", "⚠ escalation");
      flag.title = "The customer ends clearly more negative than they started.";
      box.appendChild(flag);
    }
    cell.appendChild(box);
  }

  // Bars are SVG rectangles sized by their width attribute (the pages allow no inline styles).
  function setWidth(rect, percent) {
    if (rect) { rect.setAttribute("width", Math.max(0, Math.min(100, percent)).toFixed(1) + "%"); }
  }

  function updateRow(row, job) {
    var result = job.result;
    row.dataset.status = job.status;
    row.dataset.emotion = result ? result.emotion : "";
    var status = row.querySelector(".status");
    if (status) { status.textContent = job.status; }
    var emotion = row.querySelector(".emotion");
    if (emotion) {
      emotionLabel(emotion, result);
      speakers(emotion, result);
    }
    var bar = row.querySelector(".confbar");
    if (bar && result) {
      bar.dataset.confidence = String(result.confidence);
      setWidth(bar.querySelector(".fill"), 100 * result.confidence);
      var num = row.querySelector(".confnum");
      if (num) { num.textContent = Math.round(100 * result.confidence) + "%"; }
    }
    var duration = row.querySelector(".duration");
    if (duration && job.duration_s) { duration.textContent = job.duration_s.toFixed(1) + " s"; }
    var transcript = row.querySelector(".transcript");
    var t = result && result.transcript;
    if (transcript && t && t.status === "succeeded" && t.text) {
      transcript.textContent = t.text.length > 80 ? t.text.slice(0, 79) + "…" : t.text;
    }
  }

  function updateBadge(el, job) {
    var before = el.dataset.status;
    el.dataset.status = job.status;
    el.textContent = job.status;
    // The job page shows much more once a job ends: load it again then (once).
    if (ACTIVE[before] && !ACTIVE[job.status]) { window.location.reload(); }
  }

  // Batch page: progress bar, done count and emotion distribution follow the rows.
  function updateBatch() {
    var progress = document.getElementById("batch-progress");
    if (!progress) { return; }
    var rows = document.querySelectorAll("#batch-table tr.job-row");
    var done = 0, counts = {}, statuses = {};
    Array.prototype.forEach.call(rows, function (row) {
      if (!ACTIVE[row.dataset.status]) { done += 1; }
      statuses[row.dataset.status] = (statuses[row.dataset.status] || 0) + 1;
      if (row.dataset.emotion) { counts[row.dataset.emotion] = (counts[row.dataset.emotion] || 0) + 1; }
    });
    progress.value = done;
    var doneText = document.getElementById("batch-done");
    if (doneText) { doneText.textContent = done + " done"; }
    document.querySelectorAll(".count[data-status]").forEach(function (el) {
      el.textContent = el.dataset.status + " " + (statuses[el.dataset.status] || 0);
    });
    var bars = document.querySelectorAll("#batch-distribution .bar");
    var top = 1;
    Object.keys(counts).forEach(function (k) { top = Math.max(top, counts[k]); });
    Array.prototype.forEach.call(bars, function (bar) {
      var n = counts[bar.dataset.emotion] || 0;
      bar.dataset.count = String(n);
      setWidth(bar.querySelector(".fill"), 100 * n / top);
      bar.querySelector(".value").textContent = String(n);
    });
  }

  function poll() {
    var active = watched().filter(function (el) { return ACTIVE[el.dataset.status]; });
    if (!active.length) { return; }
    var ids = [];
    active.forEach(function (el) {
      if (ids.indexOf(el.dataset.jobId) < 0 && ids.length < MAX_IDS) { ids.push(el.dataset.jobId); }
    });
    var url = api + "?limit=" + ids.length + "&ids=" + ids.join(",");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (!body) { return; }
        var byId = {};
        body.jobs.forEach(function (job) { byId[job.id] = job; });
        active.forEach(function (el) {
          var job = byId[el.dataset.jobId];
          if (!job || job.status === el.dataset.status && el.tagName !== "TR") { return; }
          if (el.tagName === "TR") { updateRow(el, job); } else { updateBadge(el, job); }
        });
        updateBatch();
      })
      .catch(function () { /* offline for a moment: the next tick tries again */ })
      .then(function () { window.setTimeout(poll, INTERVAL_MS); });
  }

  // Delete with confirmation: the server asks again on a page of its own when scripts are off.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
      var field = form.querySelector("input[name=confirm]");
      if (field) { field.value = "yes"; }
    });
  });

  // The job page's time axis: click (or Enter on) a band, an escalation mark, a word or a transcript line
  // to play from its start; a playhead on each lane follows the player.
  var player = document.getElementById("player");
  var axis = document.getElementById("axis");
  var span = axis ? parseFloat(axis.dataset.duration) : 0;

  function playFrom(event) {
    var target = event.target.closest ? event.target.closest("[data-start]") : null;
    if (!target || !player) { return; }
    if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") { return; }
    event.preventDefault();
    player.currentTime = parseFloat(target.dataset.start);
    var started = player.play();
    // A second click before the first one's playback began rejects the first: nothing to report.
    if (started && started.catch) { started.catch(function () { /* superseded or refused by the browser */ }); }
  }

  [axis, document.getElementById("conversation-transcript")].forEach(function (area) {
    if (!area) { return; }
    area.addEventListener("click", playFrom);
    area.addEventListener("keydown", playFrom);
  });

  if (player && axis && span > 0) {
    var heads = axis.querySelectorAll(".playhead");
    player.addEventListener("timeupdate", function () {
      var x = (100 * Math.min(1, Math.max(0, player.currentTime / span))).toFixed(3) + "%";
      axis.dataset.played = "true";
      heads.forEach(function (line) { line.setAttribute("x1", x); line.setAttribute("x2", x); });
    });
  }

  window.setTimeout(poll, INTERVAL_MS);
}());
