// Live microphone: while recording, every few seconds of audio (cut at a pause) is sent as a job of
// one live session (a batch created with live=true; later chunks go in with its batch_id), and the
// results are drawn on a running timeline as they arrive. Hand-written, self-served, no dependencies.
//
// The audio is captured with the Web Audio API at 16 kHz (the models' rate) and each chunk is sent as a
// 16-bit PCM WAV: every chunk is a complete file (MediaRecorder's timeslices are not: only the first
// carries the WebM header), and cutting is sample-exact, so the chunks tile the session with no gap.
(function () {
  "use strict";

  const form = document.getElementById("upload-form");
  const section = document.getElementById("live");
  if (!form || !section || !window.fetch || !window.FormData || !window.serCsrfHeaders) return;
  const AudioCtx = window.AudioContext || window.webkitAudioContext;
  const startBtn = document.getElementById("live-start");
  const stopBtn = document.getElementById("live-stop");
  const status = document.getElementById("live-status");
  const current = document.getElementById("live-current");
  const batchLink = document.getElementById("live-batch");
  const timeline = document.getElementById("live-timeline");
  const SVG = "http://www.w3.org/2000/svg";

  const RATE = 16000;
  const MIN_S = 2.0;  // no cut before this much audio (the service refuses very short recordings) ...
  const TARGET_S = 3.0;  // ... from here, cut at the first pause ...
  const MAX_S = 4.0;  // ... and cut here whatever is being said
  const QUIET_RMS = 0.01;  // a 4096-sample block under about -40 dBFS is a pause
  const POLL_MS = 400;
  const TERMINAL = { succeeded: true, failed: true };

  const apiJobs = form.dataset.apiJobs;
  const apiList = form.dataset.apiList;
  const batchPage = form.dataset.batchPage;

  let session = null;  // { ctx, stream, node, blocks, samples, offset, batchId, sending, chunks, timer }

  function wav(samples) {
    // RIFF/WAVE, PCM 16-bit mono at RATE.
    const buf = new ArrayBuffer(44 + samples.length * 2);
    const v = new DataView(buf);
    const str = function (at, s) { for (let i = 0; i < s.length; i += 1) v.setUint8(at + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
    str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, RATE, true); v.setUint32(28, RATE * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    str(36, "data"); v.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i += 1) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return new Blob([buf], { type: "audio/wav" });
  }

  function rms(block) {
    let sum = 0;
    for (let i = 0; i < block.length; i += 1) sum += block[i] * block[i];
    return Math.sqrt(sum / Math.max(1, block.length));
  }

  // ---- the timeline -------------------------------------------------------------------------

  function total() {
    return session ? session.offset + session.samples / RATE : 0;
  }

  function redraw() {
    if (!session) return;
    const end = Math.max(total(), 1);
    session.chunks.forEach(function (c) {
      c.rect.setAttribute("x", (100 * c.start / end).toFixed(3) + "%");
      c.rect.setAttribute("width", Math.max(0.2, 100 * c.duration / end - 0.15).toFixed(3) + "%");
    });
  }

  function addChunk(start, duration) {
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("class", "segment pending");
    rect.setAttribute("role", "listitem");
    rect.setAttribute("y", "0");
    rect.setAttribute("height", "100%");
    rect.setAttribute("rx", "3");
    const title = document.createElementNS(SVG, "title");
    title.textContent = start.toFixed(1) + "–" + (start + duration).toFixed(1) + " s: analysing";
    rect.appendChild(title);
    timeline.appendChild(rect);
    const chunk = { start: start, duration: duration, rect: rect, title: title, jobId: null, status: "uploading",
                    cutAt: performance.now() };
    session.chunks.push(chunk);
    redraw();
    return chunk;
  }

  function showResult(chunk, job) {
    chunk.status = job.status;
    // From the chunk's end (its cut) to its result on screen: what a speaker waits for.
    if (TERMINAL[job.status]) chunk.rect.dataset.latencyMs = String(Math.round(performance.now() - chunk.cutAt));
    const range = chunk.start.toFixed(1) + "–" + (chunk.start + chunk.duration).toFixed(1) + " s: ";
    if (job.status === "succeeded" && job.result) {
      const emotion = job.result.emotion;
      chunk.rect.setAttribute("class", "segment done emo-" + emotion);
      chunk.rect.dataset.emotion = emotion;
      chunk.title.textContent = range + emotion + " " + Math.round(job.result.confidence * 100) + "%" +
        (job.result.uncertain ? " (uncertain)" : "");
      current.className = "label emo emo-" + emotion;
      current.textContent = emotion + (job.result.uncertain ? " (uncertain)" : "");
    } else if (job.status === "failed") {
      chunk.rect.setAttribute("class", "segment done none");
      chunk.rect.dataset.emotion = "";
      chunk.title.textContent = range + (job.error ? job.error.message : "not analysed");
    }
  }

  // ---- sending and polling ------------------------------------------------------------------

  function send(chunk, samples) {
    // One request at a time, in order: the first creates the session, the others need its id.
    session.sending = session.sending.then(function () {
      const data = new FormData();
      const name = "live-" + String(session.chunks.indexOf(chunk) + 1).padStart(4, "0") + ".wav";
      data.append("file", wav(samples), name);
      if (session.batchId) {
        data.append("batch_id", session.batchId);
      } else {
        data.append("live", "true");
        const device = form.querySelector('select[name="device"]');
        if (device) data.append("device", device.value);
      }
      const headers = window.serCsrfHeaders({ Accept: "application/json" });
      return fetch(apiJobs, { method: "POST", body: data, headers: headers, credentials: "same-origin" })
        .then(function (r) {
          return r.json().then(function (body) {
            if (r.status !== 202) throw new Error((body.error && body.error.message) || ("status " + r.status));
            return body;
          });
        })
        .then(function (body) {
          if (!session) return;
          if (!session.batchId) {
            session.batchId = body.batch_id;
            batchLink.href = batchPage.replace("BATCH_ID", body.batch_id);
            batchLink.hidden = false;
            section.dataset.batchId = body.batch_id;
          }
          chunk.jobId = body.jobs[0].id;
          chunk.rect.dataset.jobId = chunk.jobId;
          chunk.status = body.jobs[0].status;
          if (TERMINAL[chunk.status]) showResult(chunk, body.jobs[0]);
        })
        .catch(function (err) {
          chunk.status = "failed";
          chunk.rect.setAttribute("class", "segment done none");
          chunk.title.textContent = "not sent: " + err.message;
          status.textContent = "A chunk could not be sent: " + err.message;
        });
    });
  }

  function poll() {
    if (!session) return;
    const waiting = session.chunks.filter(function (c) { return c.jobId && !TERMINAL[c.status]; });
    const next = function () { if (session) session.timer = setTimeout(poll, POLL_MS); };
    if (!waiting.length) { next(); return; }
    const url = apiList + "?ids=" + waiting.map(function (c) { return c.jobId; }).join(",");
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : { jobs: [] }; })
      .then(function (body) {
        const byId = {};
        (body.jobs || []).forEach(function (j) { byId[j.id] = j; });
        waiting.forEach(function (c) { if (byId[c.jobId]) showResult(c, byId[c.jobId]); });
      })
      .catch(function () { /* a missed poll is retried at the next tick */ })
      .then(next);
  }

  // ---- capture ------------------------------------------------------------------------------

  function cut(force) {
    if (!session || !session.samples) return;
    const seconds = session.samples / RATE;
    if (!force && seconds < MIN_S) return;
    const samples = new Float32Array(session.samples);
    let at = 0;
    session.blocks.forEach(function (b) { samples.set(b, at); at += b.length; });
    const chunk = addChunk(session.offset, seconds);
    session.offset += seconds;
    session.blocks = [];
    session.samples = 0;
    if (seconds >= 0.5) send(chunk, samples);  // a stop right after a cut leaves a sliver: not worth a job
    else chunk.rect.remove();
  }

  function onAudio(ev) {
    if (!session) return;
    const block = new Float32Array(ev.inputBuffer.getChannelData(0));
    session.blocks.push(block);
    session.samples += block.length;
    const seconds = session.samples / RATE;
    if (seconds >= MAX_S || (seconds >= TARGET_S && rms(block) < QUIET_RMS)) cut(false);
    redraw();
    status.textContent = "Listening… " + total().toFixed(0) + " s, " + session.chunks.length + " chunk(s) sent.";
  }

  function start() {
    startBtn.disabled = true;
    status.textContent = "Asking for the microphone…";
    navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } }).then(function (stream) {
      const ctx = new AudioCtx({ sampleRate: RATE });
      if (ctx.state === "suspended") ctx.resume();  // created after the click's promise: may start paused
      const source = ctx.createMediaStreamSource(stream);
      // ScriptProcessorNode is deprecated in favour of AudioWorklet, but it needs no module file and
      // still works in every browser; 4096 samples is 256 ms at 16 kHz.
      const node = ctx.createScriptProcessor(4096, 1, 1);
      node.onaudioprocess = onAudio;
      source.connect(node);
      node.connect(ctx.destination);  // a processor only runs while connected to the output
      timeline.textContent = "";
      current.className = "label none";
      current.textContent = "–";
      batchLink.hidden = true;
      delete section.dataset.batchId;
      session = { ctx: ctx, stream: stream, node: node, blocks: [], samples: 0, offset: 0, batchId: null,
                  sending: Promise.resolve(), chunks: [], timer: null };
      section.dataset.state = "live";
      session.timer = setTimeout(poll, POLL_MS);
      stopBtn.disabled = false;
      status.textContent = "Listening…";
    }).catch(function (err) {
      startBtn.disabled = false;
      status.textContent = "The microphone is not available: " + (err.message || err.name);
    });
  }

  function stop() {
    if (!session) return;
    const s = session;
    cut(true);
    s.node.disconnect();
    s.stream.getTracks().forEach(function (t) { t.stop(); });
    s.ctx.close();
    stopBtn.disabled = true;
    startBtn.disabled = false;
    status.textContent = "Stopped after " + s.offset.toFixed(0) + " s; the last results are on their way.";
    // Keep polling until every sent chunk has its result, then let go of the session.
    s.sending.then(function () {
      const finish = function () {
        const open = s.chunks.some(function (c) { return c.jobId && !TERMINAL[c.status]; });
        if (open) { setTimeout(finish, POLL_MS); return; }
        clearTimeout(s.timer);
        session = null;
        section.dataset.state = "stopped";
        status.textContent = "Stopped: " + s.chunks.length + " chunk(s) in the session's batch.";
      };
      finish();
    });
  }

  section.hidden = false;
  if (AudioCtx && navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
    startBtn.addEventListener("click", start);
    stopBtn.addEventListener("click", stop);
  } else {
    startBtn.disabled = true;
    status.textContent = "Live analysis needs a browser with Web Audio and a secure (HTTPS or localhost) page.";
  }
})();
