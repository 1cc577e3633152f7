'use strict';
// Node.js client for the lipsync-engine protocol, version 1 (docs/protocol.md is the authority).
// One DEALER socket; requests are pipelined and matched to replies by id; stream events are routed
// to their stream. Errors from the engine are EngineError (code, message); no reply in time is
// EngineTimeout.
const fs = require('fs');
const zmq = require('zeromq');

const VERSION = 1;
const DTYPES = { float32: [Float32Array, 4], int16: [Int16Array, 2], uint8: [Uint8Array, 1] };

class EngineError extends Error {
  constructor(code, message, id) { super(`${code}: ${message}`); this.name = 'EngineError'; this.code = code; this.engineMessage = message; this.id = id; }
}
class EngineTimeout extends Error {
  constructor(seconds, what) { super(`timeout: ${what} within ${seconds} s`); this.name = 'EngineTimeout'; }
}

/** The public or secret Z85 key of a zmq.auth certificate file (`public-key = "..."`). */
function readKey(path, which) {
  const m = fs.readFileSync(path, 'utf8').match(new RegExp(`${which}-key\\s*=\\s*"([^"]{40})"`));
  if (!m) throw new Error(`${path}: no ${which}-key in it (a zmq.auth certificate file is expected)`);
  return m[1];
}

/** Little-endian bytes of a typed array (every platform Node runs on is little-endian). */
function bytesOf(arr) { return Buffer.from(arr.buffer, arr.byteOffset, arr.byteLength); }

class Reply {
  constructor(header, frames) {
    Object.assign(this, { id: header.id, status: header.status, result: header.result || {}, error: header.error || null,
      event: header.event || null, stream: header.stream || null, header });
    this.buffers = [];                       // [{desc, data}], one per binary frame (jpeg descriptors repeat)
    let i = 0;
    for (const d of header.buffers || []) for (let k = 0; k < (d.count || 1); k++) this.buffers.push({ desc: d, data: frames[i++] });
  }
  get ok() { return this.status === 'ok'; }
}

class Client {
  /**
   * @param {string} endpoint  e.g. "tcp://127.0.0.1:5555"
   * @param {{timeout?: number, serverKey?: string, clientKey?: string}} opts  timeout in seconds (default 120);
   *   CURVE: serverKey = the engine's public key file (NAME.key), clientKey = this client's secret key file (NAME.key_secret)
   */
  constructor(endpoint, opts = {}) {
    this.timeout = opts.timeout ?? 120;
    this.sock = new zmq.Dealer({ linger: 0, sendTimeout: this.timeout * 1000 });
    if (opts.serverKey || opts.clientKey) {
      if (!(opts.serverKey && opts.clientKey)) throw new Error('CURVE needs both serverKey and clientKey');
      this.sock.curveServerKey = readKey(opts.serverKey, 'public');
      this.sock.curvePublicKey = readKey(opts.clientKey, 'public');
      this.sock.curveSecretKey = readKey(opts.clientKey, 'secret');
    }
    this.sock.connect(endpoint);
    this.nextId = 1;
    this.waiting = new Map();                // id -> {resolve, reject, timer}
    this.streams = new Map();                // stream id -> Stream
    this.closed = false;
    this.reader = this._read();
  }

  async _read() {
    try {
      for await (const frames of this.sock) {
        let header;
        try { header = JSON.parse(frames[0].toString('utf8')); } catch { continue; }
        const reply = new Reply(header, frames.slice(1));
        if (reply.event) { const s = this.streams.get(reply.stream); if (s) s._event(reply); continue; }
        const w = this.waiting.get(reply.id);
        if (w) { this.waiting.delete(reply.id); clearTimeout(w.timer); w.resolve(reply); }
      }
    } catch (e) {
      if (!this.closed) for (const w of this.waiting.values()) w.reject(e);
    }
  }

  /** Send a request; resolves with its Reply (ok or error), rejects with EngineTimeout. */
  async submit(method, params = {}, buffers = []) {
    const id = this.nextId++;
    const header = { v: VERSION, id, method, params, buffers: buffers.map(b => ({ name: b.name, dtype: b.dtype, shape: b.shape })) };
    const done = new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.waiting.delete(id); reject(new EngineTimeout(this.timeout, `no reply to ${method}`)); }, this.timeout * 1000);
      this.waiting.set(id, { resolve, reject, timer });
    });
    try {
      await this.sock.send([JSON.stringify(header), ...buffers.map(b => bytesOf(b.data))]);
    } catch (e) {
      const w = this.waiting.get(id); this.waiting.delete(id); if (w) clearTimeout(w.timer);
      throw e.code === 'EAGAIN' ? new EngineTimeout(this.timeout, 'the request could not be sent (no connection to the engine)') : e;
    }
    return done;
  }

  /** submit, then throw EngineError for an error reply. */
  async call(method, params = {}, buffers = []) {
    const r = await this.submit(method, params, buffers);
    if (!r.ok) throw new EngineError(r.error.code, r.error.message, r.id);
    return r;
  }

  static _batch(audioFeatures, batchSize, visualFrames) {
    const per = 32 * 16 * 16;
    if (audioFeatures.length !== batchSize * per) throw new Error(`audioFeatures: ${audioFeatures.length} floats, expected ${batchSize} x 32 x 16 x 16`);
    const b = [{ name: 'audio_features', dtype: 'float32', shape: [batchSize, 32, 16, 16], data: audioFeatures }];
    if (visualFrames) b.push({ name: 'visual_frames', dtype: 'float32', shape: [batchSize, ...visualFrames.shape], data: visualFrames.data });
    return b;
  }

  /** Finished JPEG frames: {result, frames: Buffer[]} */
  async composite(model, audioFeatures, batchSize, { startFrame = 0, wrap, visualFrames } = {}) {
    const params = { model, batch_size: batchSize, start_frame: startFrame, ...(wrap ? { wrap } : {}) };
    const r = await this.call('composite', params, Client._batch(audioFeatures, batchSize, visualFrames));
    return { result: r.result, frames: r.buffers.map(b => b.data) };
  }

  /** The network's output: {result, output: Float32Array, shape} */
  async infer(model, audioFeatures, batchSize, { startFrame = 0, wrap, visualFrames } = {}) {
    const params = { model, batch_size: batchSize, start_frame: startFrame, ...(wrap ? { wrap } : {}) };
    const r = await this.call('infer', params, Client._batch(audioFeatures, batchSize, visualFrames));
    const { desc, data } = r.buffers[0];
    const copy = Buffer.from(data);           // aligned for the Float32Array view
    return { result: r.result, shape: desc.shape, output: new Float32Array(copy.buffer, copy.byteOffset, copy.byteLength / 4) };
  }

  async health() { return (await this.call('health')).result; }
  async models() { return (await this.call('models')).result.models; }
  async load(model) { return (await this.call('load', { model })).result; }
  async unload(model) { return (await this.call('unload', { model })).result; }

  /** A live stream: push PCM (Int16Array or Float32Array at 16 kHz), read frames as they come. */
  async openStream(model, { realtime = true, startFrame = 0, wrap, idleFrames = true } = {}) {
    const params = { model, realtime, start_frame: startFrame, idle_frames: idleFrames, ...(wrap ? { wrap } : {}) };
    const r = await this.call('stream_open', params);
    const s = new Stream(this, r.result);
    this.streams.set(s.id, s);
    return s;
  }

  close() {
    this.closed = true;
    for (const w of this.waiting.values()) { clearTimeout(w.timer); w.reject(new Error('client closed')); }
    this.waiting.clear();
    this.sock.close();
  }
}

class Stream {
  constructor(client, info) {
    this.client = client; this.info = info; this.id = info.stream;
    this.queue = []; this.wakers = []; this.ended = false; this.error = null;
    this.record = null;                      // an array: every event Reply is kept there too (conformance)
    this.busyRetries = 0;                    // pushes sent again after busy (back-pressure)
  }

  _event(reply) {
    if (this.record) this.record.push(reply);
    if (reply.event === 'frame') this.queue.push({ number: reply.result.frame, jpeg: reply.buffers[0].data, ...reply.result });
    else { this.ended = true; if (reply.event === 'stream_error') this.error = new EngineError(reply.error.code, reply.error.message); this.client.streams.delete(this.id); }
    for (const w of this.wakers.splice(0)) w();
  }

  /** Send a chunk; on `busy` (audio too far ahead: back-pressure) wait for frames and send it again. */
  async push(pcm, { end = false } = {}) {
    const dtype = pcm instanceof Int16Array ? 'int16' : 'float32';
    const buffers = [{ name: 'pcm', dtype, shape: [pcm.length], data: pcm }];
    const deadline = Date.now() + this.client.timeout * 1000;
    for (;;) {
      const r = await this.client.submit('stream_audio', { stream: this.id, end }, buffers);
      if (r.ok) return r.result;
      if (r.error.code !== 'busy' || Date.now() > deadline) throw new EngineError(r.error.code, r.error.message, r.id);
      this.busyRetries++;
      await new Promise(res => setTimeout(res, 100));
    }
  }

  /** Frames as they arrive, until stream_end (throws the stream's error on stream_error). */
  async *frames() {
    for (;;) {
      while (this.queue.length) yield this.queue.shift();
      if (this.ended) { if (this.error) throw this.error; return; }
      await new Promise((res, rej) => {
        const t = setTimeout(() => rej(new EngineTimeout(this.client.timeout, `no frame of stream ${this.id}`)), this.client.timeout * 1000);
        this.wakers.push(() => { clearTimeout(t); res(); });
      });
    }
  }

  /** Barge-in: the engine drops audio and frames not yet sent; idle frames follow until audio comes. */
  async flush() { return (await this.client.call('stream_flush', { stream: this.id })).result; }

  async close() { this.client.streams.delete(this.id); return (await this.client.call('stream_close', { stream: this.id })).result; }
}

module.exports = { Client, Stream, Reply, EngineError, EngineTimeout, readKey, VERSION, DTYPES };
