// lipsync-engine browser player: streams 16 kHz mono PCM to the gateway (/ws) and shows the
// frames it gets back in sync with the audio. No build step, no dependencies.
//
// Sync: the audio is sent as it is "spoken" (a WAV file paced by a timer, or the microphone);
// the engine answers frame k (media time k * 40 ms) about half a second later. When frame 0
// arrives the page starts playing the audio JITTER_S later, at AudioContext time playStart.
// From then on the clock is  t = audioCtx.currentTime - outputLatency - playStart  (the media time
// being heard) and frame k is drawn once t >= k * 0.040; when several are due only the newest is
// drawn (the others count as dropped). Frames therefore wait in a small jitter buffer of decoded
// ImageBitmaps. If the AudioContext clock does not run (no audio device), performance.now() is
// the clock instead (player.clockSource says which).
'use strict';

(() => {
  const SR = 16000;              // engine input rate
  const FPS = 25;
  const SAMPLES_PER_FRAME = SR / FPS;
  const CHUNK = 1280;            // 80 ms of audio per WebSocket message
  const JITTER_S = 0.15;         // playback starts this long after frame 0 arrives
  const MAX_BUFFERED = 150;      // decoded frames kept at most

  const $ = (id) => document.getElementById(id);
  const canvas = $('screen');
  const ctx2d = canvas.getContext('2d', { willReadFrequently: true });

  // -- counters and figures the page shows (and tests read) ------------------------------------
  const player = {
    state: 'idle', source: null, clockSource: null, streamInfo: null, ended: false,
    framesReceived: 0, framesShown: 0, framesDropped: 0, outOfOrder: 0,
    firstFrame: null, lastFrame: -1, lastShownFrame: -1, idleFrames: 0,
    lastFrameHash: null, distinctHashes: 0,
    fps: 0, latencyMs: null, latencyAvgMs: null, lateMs: null, maxLateMs: 0, syncMs: null,
    audioSentS: 0, errors: [], log: [],
    start: (kind) => start(kind),
    stop: () => stop('stopped'),
    canvasHash,
  };
  window.player = player;
  const hashes = new Set();
  const recvTimes = [];

  function logLine(text, isError) {
    player.log.push(text);
    const div = document.createElement('div');
    div.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
    if (isError) div.className = 'err';
    const box = $('log');
    box.appendChild(div);
    while (box.childNodes.length > 100) box.removeChild(box.firstChild);
    box.scrollTop = box.scrollHeight;
  }

  function fnv1a(bytes) {
    let h = 0x811c9dc5;
    for (let i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193);
    }
    return (h >>> 0).toString(16).padStart(8, '0');
  }

  // A hash of what the canvas shows now (every 7th pixel).
  function canvasHash() {
    const { width, height } = canvas;
    const data = ctx2d.getImageData(0, 0, width, height).data;
    let h = 0x811c9dc5;
    for (let i = 0; i < data.length; i += 28) {
      h ^= data[i] ^ (data[i + 1] << 8) ^ (data[i + 2] << 16);
      h = Math.imul(h, 0x01000193);
    }
    return (h >>> 0).toString(16).padStart(8, '0');
  }

  function resetCounters() {
    Object.assign(player, {
      clockSource: null, streamInfo: null, ended: false,
      framesReceived: 0, framesShown: 0, framesDropped: 0, outOfOrder: 0,
      firstFrame: null, lastFrame: -1, lastShownFrame: -1, idleFrames: 0,
      lastFrameHash: null, distinctHashes: 0,
      fps: 0, latencyMs: null, latencyAvgMs: null, lateMs: null, maxLateMs: 0, syncMs: null,
      audioSentS: 0, errors: [],
    });
    hashes.clear();
    recvTimes.length = 0;
  }

  function setState(s) {
    player.state = s;
    $('stat-state').textContent = s;
    const busy = !['idle', 'ended', 'error', 'stopped', 'closed'].includes(s);
    $('stop').disabled = !busy;
  }

  // -- audio -------------------------------------------------------------------------------------
  let audioCtx = null;
  async function getAudioCtx() {
    if (!audioCtx) audioCtx = new (window.AudioContext || window.webkitAudioContext)();
    if (audioCtx.state !== 'running') {
      try { await Promise.race([audioCtx.resume(), new Promise((r) => setTimeout(r, 500))]); } catch (e) { /* */ }
    }
    return audioCtx;
  }

  // Any audio file the browser decodes -> { pcm: Float32Array 16 kHz mono, play: AudioBuffer }.
  async function decodeToMono16k(arrayBuffer) {
    const ac = await getAudioCtx();
    const buf = await ac.decodeAudioData(arrayBuffer);
    const n = Math.max(1, Math.ceil(buf.duration * SR));
    const off = new OfflineAudioContext(1, n, SR);   // mono destination: channels are mixed down
    const src = off.createBufferSource();
    src.buffer = buf;
    src.connect(off.destination);
    src.start();
    const rendered = await off.startRendering();
    return { pcm: rendered.getChannelData(0), play: buf };
  }

  // Streaming windowed-sinc resampler (mic rate -> 16 kHz), state kept across blocks.
  class Resampler {
    constructor(from, to) {
      this.ratio = from / to;
      this.pass = from === to;
      this.fc = Math.min(1, to / from);
      this.half = Math.ceil(8 / this.fc);
      this.buf = new Float32Array(this.half);      // zeros before the first sample
      this.base = -this.half;                       // input index of buf[0]
      this.m = 0;                                    // next output index
    }

    push(x) {
      if (this.pass) return Float32Array.from(x);
      const joined = new Float32Array(this.buf.length + x.length);
      joined.set(this.buf);
      joined.set(x, this.buf.length);
      const out = [];
      const { half, fc, ratio } = this;
      const end = this.base + joined.length;        // one past the last input index held
      for (;;) {
        const t = this.m * ratio;
        const j0 = Math.floor(t);
        if (j0 + half >= end) break;
        let acc = 0;
        let wsum = 0;
        for (let j = j0 - half + 1; j <= j0 + half; j++) {
          const d = t - j;
          const w = 0.42 + 0.5 * Math.cos(Math.PI * d / half) + 0.08 * Math.cos(2 * Math.PI * d / half);
          const a = fc * d;
          const h = fc * (a === 0 ? 1 : Math.sin(Math.PI * a) / (Math.PI * a)) * w;
          acc += joined[j - this.base] * h;
          wsum += h;
        }
        out.push(acc / wsum);
        this.m++;
      }
      const keepFrom = Math.floor(this.m * ratio) - half + 1;
      const cut = Math.max(0, keepFrom - this.base);
      this.buf = joined.slice(cut);
      this.base += cut;
      return Float32Array.from(out);
    }
  }

  // A WAV (or any decodable) file, sent in 80 ms chunks as it would be spoken.
  class FileSource {
    constructor(pcm, playBuffer) { this.pcm = pcm; this.playBuffer = playBuffer; this.timer = null; this.node = null; }

    start(onChunk, onEnd) {
      const t0 = performance.now();
      let sent = 0;
      const pcm = this.pcm;
      const pump = () => {
        const spoken = Math.min(pcm.length, Math.floor((performance.now() - t0) / 1000 * SR));
        while (sent < pcm.length && (sent + CHUNK <= spoken || spoken === pcm.length)) {
          const end = Math.min(sent + CHUNK, pcm.length);
          onChunk(pcm.slice(sent, end));
          sent = end;
        }
        if (sent >= pcm.length) {
          clearInterval(this.timer);
          this.timer = null;
          onEnd();
        }
      };
      this.timer = setInterval(pump, 20);
    }

    // Play the original decoded audio with its first sample at AudioContext time `when`.
    play(ac, when) {
      const node = ac.createBufferSource();
      node.buffer = this.playBuffer;
      node.connect(ac.destination);
      node.start(Math.max(when, ac.currentTime));
      this.node = node;
    }

    stop(keepAudio) {
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
      if (this.node && !keepAudio) try { this.node.stop(); } catch (e) { /* */ }
      this.node = null;
    }
  }

  // The microphone: AudioWorklet (ScriptProcessor where there is none), resampled to 16 kHz.
  class MicSource {
    constructor(ac, monitor) {
      this.ac = ac; this.monitor = monitor; this.chunks = []; this.nodes = []; this.playAt = null;
      this.pending = new Float32Array(0); this.sentSamples = 0; this.onChunk = null;
    }

    async init() {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error('no microphone API here (the page needs https or localhost)');
      }
      this.media = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      const ac = this.ac;
      this.resampler = new Resampler(ac.sampleRate, SR);
      this.src = ac.createMediaStreamSource(this.media);
      this.sink = ac.createGain();
      this.sink.gain.value = 0;
      this.sink.connect(ac.destination);
      if (ac.audioWorklet && window.AudioWorkletNode) {
        await ac.audioWorklet.addModule('/static/capture-worklet.js');
        this.node = new AudioWorkletNode(ac, 'pcm-capture', { numberOfOutputs: 1, outputChannelCount: [1] });
        this.node.port.onmessage = (e) => this.feed(e.data);
      } else {
        this.node = ac.createScriptProcessor(2048, 1, 1);
        this.node.onaudioprocess = (e) => this.feed(e.inputBuffer.getChannelData(0));
      }
      this.src.connect(this.node);
      this.node.connect(this.sink);                 // keeps the node pulled, silently
    }

    feed(block) {
      if (!this.onChunk) return;
      const y = this.resampler.push(block);
      const joined = new Float32Array(this.pending.length + y.length);
      joined.set(this.pending);
      joined.set(y, this.pending.length);
      let i = 0;
      for (; i + CHUNK <= joined.length; i += CHUNK) this.emit(joined.slice(i, i + CHUNK));
      this.pending = joined.slice(i);
    }

    emit(chunk) {
      const offset = this.sentSamples;
      this.sentSamples += chunk.length;
      this.onChunk(chunk);
      if (this.monitor) {
        this.chunks.push([offset, chunk]);
        this.scheduleMonitor();
      }
    }

    start(onChunk, onEnd) { this.onChunk = onChunk; this.onEnd = onEnd; }

    // Monitor (optional): the mic's own 16 kHz audio, delayed to line up with the frames.
    play(ac, when) { this.playAt = when; this.scheduleMonitor(); }

    scheduleMonitor() {
      if (this.playAt === null) return;
      const ac = this.ac;
      for (const [offset, chunk] of this.chunks) {
        const at = this.playAt + offset / SR;
        if (at < ac.currentTime) continue;
        const b = ac.createBuffer(1, chunk.length, SR);
        b.copyToChannel(chunk, 0);
        const n = ac.createBufferSource();
        n.buffer = b;
        n.connect(ac.destination);
        n.start(at);
      }
      this.chunks = [];
    }

    finish() {                                       // stop capturing, send what is left, then end
      if (this.onChunk && this.pending.length) this.emit(this.pending);
      this.pending = new Float32Array(0);
      const onEnd = this.onEnd;
      this.release();
      if (onEnd) onEnd();
    }

    release() {
      this.onChunk = null;
      this.onEnd = null;
      try { this.src && this.src.disconnect(); } catch (e) { /* */ }
      try { this.node && this.node.disconnect(); } catch (e) { /* */ }
      try { this.sink && this.sink.disconnect(); } catch (e) { /* */ }
      if (this.media) this.media.getTracks().forEach((t) => t.stop());
      this.media = null;
    }

    stop() { this.release(); }
  }

  // -- one streaming session ---------------------------------------------------------------------
  let sess = null;

  class Session {
    constructor(kind, source, avatar) {
      this.kind = kind;
      this.source = source;
      this.avatar = avatar;
      this.ws = null;
      this.sentLog = [];            // [end sample, performance.now()] per chunk sent
      this.sentSamples = 0;
      this.latencyIdx = 0;
      this.decoded = new Map();      // frame number -> ImageBitmap (the jitter buffer)
      this.pendingDecodes = 0;
      this.playStart = null;         // clock time of media time 0
      this.clock = null;
      this.audioEnded = false;
      this.gatewayEnded = false;
      this.closed = false;
    }

    open() {
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(`${proto}//${location.host}/ws`);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      ws.onopen = () => {
        setState('opening');
        ws.send(JSON.stringify({ type: 'open', avatar: this.avatar, realtime: true, format: 'f32' }));
      };
      ws.onmessage = (ev) => {
        if (this.closed) return;
        if (typeof ev.data === 'string') this.onText(JSON.parse(ev.data));
        else this.onFrame(ev.data);
      };
      ws.onerror = () => { if (!this.closed) this.fail('websocket', 'WebSocket error'); };
      ws.onclose = () => {
        if (!this.closed && !this.gatewayEnded) this.fail('closed', 'the gateway closed the connection');
      };
    }

    onText(msg) {
      if (msg.type === 'opened') {
        player.streamInfo = msg.stream;
        const { width, height } = msg.stream;
        if (width && height && (canvas.width !== width || canvas.height !== height)) {
          canvas.width = width;
          canvas.height = height;
        }
        logLine(`stream ${msg.stream.stream} on ${msg.stream.model}: ${width}x${height}, look-ahead ` +
                `${msg.stream.lookahead_ms} ms`);
        this.t0Perf = performance.now();
        this.t0Ctx = audioCtx ? audioCtx.currentTime : 0;
        setState('streaming');
        this.source.start((pcm) => this.sendChunk(pcm), () => this.sendEnd());
      } else if (msg.type === 'end') {
        this.gatewayEnded = true;
        logLine(`stream ended: ${msg.frames} frames`);
        setState('draining');
      } else if (msg.type === 'error') {
        this.fail(msg.code, msg.message);
      }
    }

    sendChunk(pcm) {
      if (this.closed || this.ws.readyState !== WebSocket.OPEN) return;
      this.ws.send(pcm);
      this.sentSamples += pcm.length;
      this.sentLog.push([this.sentSamples, performance.now()]);
      player.audioSentS = this.sentSamples / SR;
    }

    sendEnd() {
      if (this.closed || this.audioEnded || this.ws.readyState !== WebSocket.OPEN) return;
      this.audioEnded = true;
      this.ws.send(JSON.stringify({ type: 'end' }));
    }

    onFrame(data) {
      const now = performance.now();
      const view = new DataView(data);
      const n = view.getUint32(0, true);
      const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, n)));
      const jpeg = new Uint8Array(data, 4 + n);
      const k = meta.frame;

      player.framesReceived++;
      if (player.firstFrame === null) player.firstFrame = k;
      if (k !== player.lastFrame + 1) player.outOfOrder++;
      player.lastFrame = k;
      if (meta.idle) player.idleFrames++;
      player.lateMs = meta.late_ms;
      player.maxLateMs = Math.max(player.maxLateMs, meta.late_ms);
      const h = fnv1a(jpeg);
      player.lastFrameHash = h;
      if (hashes.size < 100000) hashes.add(h);
      player.distinctHashes = hashes.size;
      recvTimes.push(now);

      // latency: now - when the chunk holding the end of this frame's audio was sent
      const need = Math.min((k + 1) * SAMPLES_PER_FRAME, this.sentSamples);
      while (this.latencyIdx < this.sentLog.length - 1 && this.sentLog[this.latencyIdx][0] < need) this.latencyIdx++;
      if (this.sentLog.length) {
        const lat = now - this.sentLog[this.latencyIdx][1];
        player.latencyMs = lat;
        player.latencyAvgMs = player.latencyAvgMs === null ? lat : 0.9 * player.latencyAvgMs + 0.1 * lat;
      }

      if (this.playStart === null) this.startPlayback();
      if (k <= player.lastShownFrame) {              // too late to be shown
        player.framesDropped++;
        return;
      }
      this.pendingDecodes++;
      createImageBitmap(new Blob([jpeg], { type: 'image/jpeg' })).then((bmp) => {
        this.pendingDecodes--;
        if (this.closed || k <= player.lastShownFrame) {
          bmp.close();
          player.framesDropped++;
          return;
        }
        this.decoded.set(k, bmp);
        if (this.decoded.size > MAX_BUFFERED) {      // the clock is stuck: keep the newest
          const oldest = Math.min(...this.decoded.keys());
          this.decoded.get(oldest).close();
          this.decoded.delete(oldest);
          player.framesDropped++;
        }
        tick();
      }, (err) => {
        this.pendingDecodes--;
        player.framesDropped++;
        logLine(`frame ${k}: cannot decode the JPEG (${err})`, true);
      });
    }

    // Frame 0 is here: start the audio JITTER_S from now and run the display on its clock.
    startPlayback() {
      const ac = audioCtx;
      const perfElapsed = (performance.now() - this.t0Perf) / 1000;
      const ctxElapsed = ac ? ac.currentTime - this.t0Ctx : 0;
      const audioRuns = ac && ac.state === 'running' && perfElapsed > 0.1 && ctxElapsed > 0.5 * perfElapsed;
      if (audioRuns) {
        const outLat = ac.outputLatency || ac.baseLatency || 0;
        this.clock = () => ac.currentTime - outLat;
        this.playStart = ac.currentTime + JITTER_S;
        player.clockSource = 'audio';
      } else {
        this.clock = () => performance.now() / 1000;
        this.playStart = performance.now() / 1000 + JITTER_S;
        player.clockSource = 'system';
      }
      $('stat-clock').textContent = player.clockSource;
      if (ac) this.source.play(ac, ac.currentTime + JITTER_S);
    }

    // Draw the newest decoded frame that is due; older ones are dropped.
    show() {
      if (this.playStart === null || this.decoded.size === 0) return;
      const t = this.clock() - this.playStart;
      const due = Math.floor(t * FPS + 1e-6);
      let best = -1;
      for (const k of this.decoded.keys()) if (k <= due && k > best) best = k;
      if (best < 0) return;
      for (const [k, bmp] of this.decoded) {
        if (k < best) {
          bmp.close();
          this.decoded.delete(k);
          player.framesDropped++;
        }
      }
      const bmp = this.decoded.get(best);
      this.decoded.delete(best);
      ctx2d.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      bmp.close();
      player.framesShown++;
      player.lastShownFrame = best;
      player.syncMs = (t - best / FPS) * 1000;
    }

    finishedDraining() {
      return this.gatewayEnded && this.decoded.size === 0 && this.pendingDecodes === 0;
    }

    fail(code, message) {
      player.errors.push({ code, message });
      logLine(`error ${code}: ${message}`, true);
      this.close();
      setState('error');
    }

    close(keepAudio) {                              // keepAudio: the end, let the sound finish
      if (this.closed) return;
      this.closed = true;
      this.source.stop(keepAudio);
      for (const bmp of this.decoded.values()) bmp.close();
      this.decoded.clear();
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close();
    }
  }

  function tick() {
    if (!sess || sess.closed) return;
    sess.show();
    if (sess.finishedDraining()) {
      player.ended = true;
      logLine(`done: ${player.framesShown} shown, ${player.framesDropped} dropped`);
      sess.close(true);
      setState('ended');
    }
  }

  function loop() {
    tick();
    requestAnimationFrame(loop);
  }
  requestAnimationFrame(loop);
  setInterval(tick, 10);                             // also when animation frames are throttled

  function updateFigures() {
    const now = performance.now();
    while (recvTimes.length && now - recvTimes[0] > 2000) recvTimes.shift();
    player.fps = recvTimes.length >= 2 ? (recvTimes.length - 1) * 1000 / (recvTimes[recvTimes.length - 1] - recvTimes[0]) : 0;
    const fmt = (v, d = 0) => (v === null || v === undefined ? '-' : v.toFixed(d));
    $('stat-fps').textContent = player.fps.toFixed(1);
    $('stat-latency').textContent = player.latencyMs === null ? '-' : `${fmt(player.latencyMs)} (avg ${fmt(player.latencyAvgMs)})`;
    $('stat-late').textContent = player.lateMs === null ? '-' : `${fmt(player.lateMs, 1)} (max ${fmt(player.maxLateMs, 1)})`;
    $('stat-sync').textContent = fmt(player.syncMs);
    $('stat-received').textContent = player.framesReceived;
    $('stat-shown').textContent = player.framesShown;
    $('stat-dropped').textContent = player.framesDropped;
    $('stat-audio').textContent = player.audioSentS.toFixed(1);
  }
  setInterval(updateFigures, 250);

  // -- controls ----------------------------------------------------------------------------------
  function stop(why) {
    if (!sess) return;
    const s = sess;
    sess = null;
    if (s.source instanceof MicSource && !s.closed && !s.audioEnded && s.ws && s.ws.readyState === WebSocket.OPEN) {
      // the microphone: end the audio and let the remaining frames come (drain)
      sess = s;
      s.source.finish();
      return;
    }
    s.close();
    setState(why);
  }

  async function start(kind) {
    if (sess) {
      sess.close();
      sess = null;
    }
    const avatar = $('avatar').value;
    if (!avatar) {
      logLine('no avatar selected', true);
      return;
    }
    resetCounters();
    player.source = kind;
    setState('loading');
    try {
      const ac = await getAudioCtx();
      let source;
      if (kind === 'demo') {
        const r = await fetch('/static/speech.wav');
        if (!r.ok) throw new Error(`GET /static/speech.wav: ${r.status}`);
        const { pcm, play } = await decodeToMono16k(await r.arrayBuffer());
        source = new FileSource(pcm, play);
        logLine(`demo speech: ${(pcm.length / SR).toFixed(2)} s`);
      } else if (kind === 'file') {
        const f = $('file').files[0];
        if (!f) throw new Error('choose a WAV file first');
        const { pcm, play } = await decodeToMono16k(await f.arrayBuffer());
        source = new FileSource(pcm, play);
        logLine(`${f.name}: ${(pcm.length / SR).toFixed(2)} s`);
      } else if (kind === 'mic') {
        source = new MicSource(ac, $('monitor').checked);
        await source.init();
        logLine(`microphone at ${ac.sampleRate} Hz, resampled to 16 kHz; press stop to end`);
      } else {
        throw new Error(`unknown source ${kind}`);
      }
      sess = new Session(kind, source, avatar);
      sess.open();
    } catch (e) {
      player.errors.push({ code: 'source', message: String(e) });
      logLine(`cannot start: ${e}`, true);
      setState('error');
    }
  }

  async function loadAvatars() {
    const sel = $('avatar');
    const previous = sel.value;
    try {
      const r = await fetch('/api/avatars');
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : r.status);
      sel.innerHTML = '';
      for (const a of body.avatars) {
        const o = document.createElement('option');
        o.value = a.name;
        o.textContent = `${a.name}${a.loaded ? ' (loaded)' : ''}`;
        sel.appendChild(o);
      }
      const names = body.avatars.map((a) => a.name);
      sel.value = names.includes(previous) ? previous : (names.includes('demo') ? 'demo' : (names[0] || ''));
      player.avatars = names;
    } catch (e) {
      sel.innerHTML = '<option value="">(engine unreachable)</option>';
      logLine(`avatars: ${e}`, true);
    }
  }

  $('refresh').onclick = loadAvatars;
  $('demo').onclick = () => start('demo');
  $('file').onchange = () => { $('play-file').disabled = !$('file').files.length; };
  $('play-file').onclick = () => start('file');
  $('mic').onclick = () => start('mic');
  $('stop').onclick = () => stop('stopped');
  loadAvatars();
})();
