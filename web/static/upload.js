// Upload page: drag-and-drop (files and folders), per-file upload progress, live job status and
// microphone recording. Hand-written and self-served; the form still posts without it.
(function () {
  "use strict";

  const form = document.getElementById("upload-form");
  if (!form || !window.XMLHttpRequest || !window.FormData || !window.serCsrfHeaders) return;

  const cfg = {
    maxFileBytes: Number(form.dataset.maxFileBytes),
    maxFileMb: form.dataset.maxFileMb,
    // Files per request: small groups keep one slow file from holding back the rest and keep the
    // per-file progress estimate close; the server's own cap still applies.
    groupFiles: Math.max(1, Math.min(Number(form.dataset.maxFiles) || 1, 16)),
    groupBytes: 24 * 1048576,
    maxDurationS: Number(form.dataset.maxDurationS),
    extensions: (form.dataset.extensions || "").split(",").filter(Boolean),
    apiJobs: form.dataset.apiJobs,
    apiList: form.dataset.apiList,
    jobPage: form.dataset.jobPage,
    batchPage: form.dataset.batchPage,
  };
  const PARALLEL = 2;
  const POLL_MS = 1500;
  const TERMINAL = ["succeeded", "failed", "rejected"];

  const input = document.getElementById("file-input");
  const zone = document.getElementById("drop-zone");
  const list = document.getElementById("upload-list");
  const message = document.getElementById("upload-message");
  const batches = document.getElementById("upload-batches");
  const pending = [];  // groups of items waiting for a request slot
  let active = 0;
  let pollTimer = null;

  function showMessage(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  // ---- list items -------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function addItem(file) {
    const li = el("li", "upload-item");
    li.dataset.filename = file.name;
    li.appendChild(el("span", "name", file.name));
    const bar = el("progress");
    bar.max = 100;
    bar.value = 0;
    li.appendChild(bar);
    li.appendChild(el("span", "status"));
    list.prepend(li);
    return { li: li, file: file, bar: bar, status: li.querySelector(".status"), jobId: null };
  }

  // The status word first (tests and people read it), then what is known about the result.
  function setStatus(item, status, detail, job) {
    item.li.dataset.status = status;
    const box = item.status;
    box.textContent = "";
    box.appendChild(el("span", "state", status));
    if (job && job.result) {
      box.appendChild(document.createTextNode(" · "));
      box.appendChild(el("span", "emotion", job.result.emotion));
      box.appendChild(el("span", "confidence", " " + Math.round(job.result.confidence * 100) + "%"));
      if (job.result.uncertain) box.appendChild(el("span", "uncertain", " (uncertain)"));
    }
    if (detail) box.appendChild(el("span", "detail", " — " + detail));
    if (item.jobId && TERMINAL.indexOf(status) >= 0) {
      const link = el("a", "job-link", "open job");
      link.href = cfg.jobPage.replace("JOB_ID", item.jobId);
      box.appendChild(document.createTextNode(" "));
      box.appendChild(link);
    }
  }

  // ---- client-side checks -----------------------------------------------------------------

  function extensionOf(name) {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? "" : name.slice(dot).toLowerCase();
  }

  function problemWith(file) {
    if (cfg.extensions.indexOf(extensionOf(file.name)) < 0) {
      return "not an audio file this service reads; accepted: " + cfg.extensions.join(" ");
    }
    if (file.size > cfg.maxFileBytes) {
      return "too large: " + (file.size / 1048576).toFixed(1) + " MiB; the limit is " + cfg.maxFileMb + " MiB";
    }
    if (file.size === 0) return "the file is empty";
    return null;
  }

  // A folder holds more than recordings (notes, spreadsheets, .DS_Store): what is not named like
  // audio is skipped and counted, not listed file by file as refused.
  function acceptFolder(files) {
    const audio = files.filter(function (f) { return cfg.extensions.indexOf(extensionOf(f.name)) >= 0; });
    const skipped = files.length - audio.length;
    const note = skipped ? skipped + " file(s) in the folder are not recordings and were skipped." : "";
    if (audio.length) accept(audio, note);
    else showMessage("No recordings in that folder. " + note);
  }

  function accept(files, note) {
    const items = [];
    let rejected = 0;
    files.forEach(function (file) {
      const item = addItem(file);
      const problem = problemWith(file);
      if (problem) {
        rejected += 1;
        item.li.classList.add("rejected");
        setStatus(item, "rejected", problem);
      } else {
        setStatus(item, "waiting");
        items.push(item);
      }
    });
    const refused = rejected ? rejected + " file(s) not sent: see the reasons in the list." : "";
    showMessage([note || "", refused].filter(Boolean).join(" "));
    for (let i = 0; i < items.length;) {
      const group = [];
      let bytes = 0;
      while (i < items.length && group.length < cfg.groupFiles &&
             (group.length === 0 || bytes + items[i].file.size <= cfg.groupBytes)) {
        bytes += items[i].file.size;
        group.push(items[i]);
        i += 1;
      }
      pending.push(group);
    }
    pump();
  }

  // ---- uploading --------------------------------------------------------------------------

  function pump() {
    while (active < PARALLEL && pending.length) {
      active += 1;
      send(pending.shift());
    }
  }

  // One request carries the group's files in order, so the bytes sent so far fall on the files
  // in that order: each file's share of the progress follows from its offset in the body.
  function spreadProgress(group, fraction) {
    const total = group.reduce(function (sum, item) { return sum + item.file.size; }, 0) || 1;
    let sent = fraction * total;
    group.forEach(function (item) {
      const part = Math.max(0, Math.min(item.file.size, sent));
      item.bar.value = item.file.size ? Math.round(100 * part / item.file.size) : 100;
      sent -= item.file.size;
    });
  }

  function errorText(xhr) {
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (ignored) { /* not JSON: a proxy's page, say */ }
    return xhr.status ? "the server answered " + xhr.status : "the connection failed";
  }

  function finishRequest() {
    active -= 1;
    pump();
  }

  function send(group) {
    const data = new FormData();
    group.forEach(function (item) { data.append("file", item.file, item.file.name); });
    // The options as the plain form would send them (empty fields are left to the server's defaults).
    ["device", "transcribe", "language", "channels", "channel_labels"].forEach(function (name) {
      const field = form.elements.namedItem(name);
      if (field && field.value) data.append(name, field.value);
    });
    const xhr = new XMLHttpRequest();
    xhr.open("POST", cfg.apiJobs);
    const headers = window.serCsrfHeaders();
    Object.keys(headers).forEach(function (k) { xhr.setRequestHeader(k, headers[k]); });
    xhr.setRequestHeader("Accept", "application/json");
    group.forEach(function (item) { setStatus(item, "uploading"); });
    xhr.upload.onprogress = function (ev) {
      if (ev.lengthComputable) spreadProgress(group, ev.loaded / ev.total);
    };
    xhr.onload = function () {
      if (xhr.status === 202) {
        accepted(group, JSON.parse(xhr.responseText));
      } else if (xhr.status === 429) {
        const wait = Math.max(1, Number(xhr.getResponseHeader("Retry-After")) || 5);
        group.forEach(function (item) { setStatus(item, "waiting", "server busy: retrying in " + wait + " s"); });
        setTimeout(function () { pending.unshift(group); pump(); }, wait * 1000);
      } else {
        const why = errorText(xhr);
        group.forEach(function (item) { setStatus(item, "failed", "upload refused: " + why); });
      }
      finishRequest();
    };
    xhr.onerror = function () {
      group.forEach(function (item) { setStatus(item, "failed", "upload failed: the connection was lost"); });
      finishRequest();
    };
    xhr.send(data);
  }

  function accepted(group, body) {
    group.forEach(function (item, i) {
      const job = body.jobs[i];
      item.bar.value = 100;
      item.jobId = job.id;
      item.li.dataset.jobId = job.id;
      setStatus(item, job.status, job.error ? job.error.message : "");
    });
    const link = el("a", "batch-link", "batch " + body.batch_id.slice(0, 8));
    link.href = cfg.batchPage.replace("BATCH_ID", body.batch_id);
    if (batches.hidden) {
      batches.hidden = false;
      batches.appendChild(document.createTextNode("Batch pages: "));
    } else {
      batches.appendChild(document.createTextNode(", "));
    }
    batches.appendChild(link);
    schedulePoll();
  }

  // ---- live status ------------------------------------------------------------------------

  function unfinished() {
    return Array.prototype.filter.call(list.querySelectorAll("li.upload-item[data-job-id]"), function (li) {
      return TERMINAL.indexOf(li.dataset.status) < 0;
    });
  }

  function schedulePoll() {
    if (!pollTimer) pollTimer = setTimeout(poll, POLL_MS);
  }

  function getJson(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("status " + r.status);
      return r.json();
    });
  }

  function applyJob(li, job) {
    const item = { li: li, status: li.querySelector(".status"), jobId: job.id };
    let detail = "";
    if (job.status === "processing" && job.progress) detail = job.progress + "%";
    if (job.status === "failed" && job.error) detail = job.error.message;
    if (li.dataset.status !== job.status || detail) setStatus(item, job.status, detail, job);
  }

  // One list request for up to 100 rows; any id it does not return (an older server without the
  // ``ids`` filter, say) is fetched on its own.
  function poll() {
    pollTimer = null;
    const rows = unfinished().slice(0, 100);
    if (!rows.length) return;
    const ids = rows.map(function (li) { return li.dataset.jobId; });
    const url = cfg.apiList + "?limit=" + ids.length + "&ids=" + ids.join(",");
    getJson(url).then(function (body) {
      const seen = {};
      (body.jobs || []).forEach(function (job) { seen[job.id] = job; });
      return Promise.all(ids.map(function (id) {
        return seen[id] ? Promise.resolve(seen[id]) : getJson(cfg.apiList + "/" + encodeURIComponent(id));
      }));
    }).then(function (jobs) {
      jobs.forEach(function (job, i) { applyJob(rows[i], job); });
    }).catch(function (err) {
      showMessage("Could not refresh the statuses (" + err.message + "); still trying.");
    }).then(function () {
      if (unfinished().length) schedulePoll();
    });
  }

  // ---- drag and drop ----------------------------------------------------------------------

  function readEntry(entry) {
    if (entry.isFile) {
      return new Promise(function (resolve) { entry.file(function (f) { resolve([f]); }, function () { resolve([]); }); });
    }
    if (!entry.isDirectory) return Promise.resolve([]);
    const reader = entry.createReader();
    const all = [];
    // readEntries hands back a directory in pages: call it until it returns nothing.
    return new Promise(function (resolve) {
      function more() {
        reader.readEntries(function (entries) {
          if (!entries.length) {
            Promise.all(all.map(readEntry)).then(function (lists) { resolve([].concat.apply([], lists)); });
            return;
          }
          all.push.apply(all, entries);
          more();
        }, function () { resolve([]); });
      }
      more();
    });
  }

  // Resolves to {files, folder}: folder is true when a directory was among what was dropped.
  function droppedFiles(dt) {
    const items = dt.items ? Array.prototype.slice.call(dt.items) : [];
    const entries = items.map(function (it) { return it.webkitGetAsEntry ? it.webkitGetAsEntry() : null; });
    if (entries.length && entries.every(Boolean)) {
      const folder = entries.some(function (e) { return e.isDirectory; });
      return Promise.all(entries.map(readEntry)).then(function (lists) {
        return {files: [].concat.apply([], lists), folder: folder};
      });
    }
    return Promise.resolve({files: Array.prototype.slice.call(dt.files || []), folder: false});
  }

  ["dragenter", "dragover"].forEach(function (type) {
    zone.addEventListener(type, function (ev) {
      ev.preventDefault();
      zone.classList.add("dragging");
    });
  });
  zone.addEventListener("dragleave", function () { zone.classList.remove("dragging"); });
  zone.addEventListener("drop", function (ev) {
    ev.preventDefault();
    zone.classList.remove("dragging");
    droppedFiles(ev.dataTransfer).then(function (dropped) {
      if (!dropped.files.length) showMessage("Nothing to upload in what was dropped.");
      else if (dropped.folder) acceptFolder(dropped.files);
      else accept(dropped.files);
    });
  });

  const folderInput = document.getElementById("folder-input");
  if (folderInput && "webkitdirectory" in folderInput) {
    folderInput.closest(".folder-pick").hidden = false;
    folderInput.addEventListener("change", function () {
      const files = Array.prototype.slice.call(folderInput.files || []);
      if (files.length) acceptFolder(files);
      folderInput.value = "";
    });
  }

  input.addEventListener("change", function () {
    const files = Array.prototype.slice.call(input.files || []);
    if (files.length) accept(files);
    input.value = "";
  });
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (input.files && input.files.length) input.dispatchEvent(new Event("change"));
  });
  // The script uploads on choice or drop: the button and the "required" only serve the plain form.
  input.required = false;
  const submit = document.getElementById("upload-submit");
  if (submit) submit.hidden = true;
  zone.querySelector(".drop-hint").hidden = false;
  zone.classList.add("active");

  // ---- microphone -------------------------------------------------------------------------

  const recorder = document.getElementById("recorder");
  const startBtn = document.getElementById("record-start");
  const stopBtn = document.getElementById("record-stop");
  const recStatus = document.getElementById("record-status");
  let media = null;
  let clock = null;

  function stamp(date) {
    const p = function (n) { return String(n).padStart(2, "0"); };
    return date.getFullYear() + p(date.getMonth() + 1) + p(date.getDate()) + "-" +
      p(date.getHours()) + p(date.getMinutes()) + p(date.getSeconds());
  }

  function chooseType() {
    const types = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus"];
    for (let i = 0; i < types.length; i += 1) {
      if (MediaRecorder.isTypeSupported(types[i])) return types[i];
    }
    return "";
  }

  function startRecording() {
    startBtn.disabled = true;
    recStatus.textContent = "Asking for the microphone…";
    navigator.mediaDevices.getUserMedia({ audio: true }).then(function (stream) {
      const type = chooseType();
      const rec = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
      const chunks = [];
      const started = Date.now();
      rec.ondataavailable = function (ev) { if (ev.data && ev.data.size) chunks.push(ev.data); };
      rec.onstop = function () {
        clearInterval(clock);
        stream.getTracks().forEach(function (t) { t.stop(); });
        const mime = rec.mimeType || type || "audio/webm";
        const ext = mime.indexOf("ogg") >= 0 ? ".ogg" : ".webm";
        const blob = new Blob(chunks, { type: mime });
        const seconds = ((Date.now() - started) / 1000).toFixed(1);
        recStatus.textContent = "Recorded " + seconds + " s; sending it for analysis.";
        startBtn.disabled = false;
        stopBtn.disabled = true;
        accept([new File([blob], "recording-" + stamp(new Date(started)) + ext, { type: mime })]);
      };
      media = rec;
      rec.start();
      stopBtn.disabled = false;
      clock = setInterval(function () {
        const s = (Date.now() - started) / 1000;
        recStatus.textContent = "Recording… " + s.toFixed(0) + " s";
        if (s >= cfg.maxDurationS) stopRecording();
      }, 250);
      recStatus.textContent = "Recording…";
    }).catch(function (err) {
      startBtn.disabled = false;
      recStatus.textContent = "The microphone is not available: " + (err.message || err.name);
    });
  }

  function stopRecording() {
    if (media && media.state !== "inactive") media.stop();
    media = null;
  }

  recorder.hidden = false;
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder) {
    startBtn.addEventListener("click", startRecording);
    stopBtn.addEventListener("click", stopRecording);
  } else {
    startBtn.disabled = true;
    recStatus.textContent = "Recording needs a browser with MediaRecorder and a secure (HTTPS or localhost) page.";
  }
})();
