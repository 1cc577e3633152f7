'use strict';
// Conformance runner for this client (docs/conformance/README.md): every step a client library
// sends (not marked "raw") goes through Client.submit; replies and stream events are checked.
//   node conformance.js tcp://127.0.0.1:5555 ../../docs/conformance/*.json
const fs = require('fs');
const path = require('path');
const { Client, Stream } = require('./index');

function substitute(obj, names) {
  if (typeof obj === 'string' && obj.startsWith('$') && obj.slice(1) in names) return names[obj.slice(1)];
  if (Array.isArray(obj)) return obj.map(v => substitute(v, names));
  if (obj && typeof obj === 'object') return Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, substitute(v, names)]));
  return obj;
}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const SIZES = { float32: 4, int16: 2, uint8: 1 };
const isJpeg = b => b.length > 4 && b[0] === 0xff && b[1] === 0xd8 && b[b.length - 2] === 0xff && b[b.length - 1] === 0xd9;

function checkReply(r, expect) {
  const bad = []; const want = (c, what) => { if (!c) bad.push(what); };
  const h = r.header;
  want((h.v ?? null) === (expect.v ?? 1), `v ${h.v}`);
  want(h.status === expect.status, `status ${h.status}, expected ${expect.status}` + (h.error ? ` (${JSON.stringify(h.error)})` : ''));
  if (expect.status === 'error') {
    want(h.error && h.error.code === expect.code, `code ${h.error && h.error.code}, expected ${expect.code}`);
    want(h.error && typeof h.error.message === 'string' && h.error.message, 'error without a message');
    want(!('result' in h) && !('buffers' in h) && r.buffers.length === 0, 'an error reply with result, buffers or frames');
    return bad;
  }
  const result = h.result || {};
  for (const k of expect.result_keys || []) want(k in result, `result lacks ${k}`);
  for (const [k, v] of Object.entries(expect.result || {})) want(same(result[k], v), `result[${k}] = ${JSON.stringify(result[k])}, expected ${JSON.stringify(v)}`);
  const descs = h.buffers || [];
  if (expect.buffers) {
    want(descs.length === expect.buffers.length, `${descs.length} descriptors, expected ${expect.buffers.length}`);
    expect.buffers.forEach((e, i) => { for (const [k, v] of Object.entries(e)) want(same(descs[i] && descs[i][k], v), `buffer ${i}: ${k} = ${JSON.stringify(descs[i] && descs[i][k])}, expected ${JSON.stringify(v)}`); });
  }
  for (const { desc, data } of r.buffers) {
    if (data === undefined) { bad.push('fewer binary frames than the descriptors say'); break; }
    if (desc.dtype === 'jpeg') want(isJpeg(data), 'a jpeg frame that is not a JPEG');
    else want(data.length === desc.shape.reduce((a, b) => a * b, SIZES[desc.dtype]), `frame of ${data.length} bytes for shape ${desc.shape}`);
  }
  if ('frames' in expect) want(1 + r.buffers.length === expect.frames, `${1 + r.buffers.length} parts, expected ${expect.frames}`);
  return bad;
}

function checkEvents(events, ev) {
  const bad = []; const names = events.map(e => e.event);
  for (const [name, n] of Object.entries(ev.count || {})) { const got = names.filter(x => x === name).length; if (got !== n) bad.push(`${got} ${name} events, expected ${n}`); }
  if (ev.last && names[names.length - 1] !== ev.last) bad.push(`last event ${names[names.length - 1]}, expected ${ev.last}`);
  const frames = events.filter(e => e.event === 'frame');
  if (ev.numbers === 'frame' && !same(frames.map(f => f.result.frame), frames.map((_, i) => i))) bad.push('frame numbers not 0, 1, 2, ...');
  for (const f of frames) if (f.id !== null || f.stream !== ev.stream || f.buffers.length !== 1 || !isJpeg(f.buffers[0].data)) { bad.push('a frame event without id null, its stream and one JPEG'); break; }
  return bad;
}

async function step(client, st, names) {
  const sent = substitute(st.send, names);
  const head = sent[0].json;
  const buffers = (head.buffers || []).map((d, i) => {
    const f = sent[i + 1].fill;
    const data = new ({ float32: Float32Array, int16: Int16Array, uint8: Uint8Array })[f.dtype](f.count).fill(f.value);
    return { ...d, data };
  });
  const expect = substitute(st.expect, names);
  const r = await client.submit(head.method, head.params || {}, buffers);
  const bad = checkReply(r, expect);
  for (const [name, key] of Object.entries(st.capture || {})) {
    names[name] = r.result[key];
    if (head.method === 'stream_open' && r.ok) { const s = new Stream(client, r.result); s.record = []; client.streams.set(s.id, s); }
  }
  if (st.events && !bad.length) {
    const ev = substitute(st.events, names);
    const s = client.streams.get(ev.stream) || [...client.streams.values()].find(x => x.id === ev.stream);
    const record = s ? s.record : [];
    const deadline = Date.now() + 60000;
    while (!(record.length && ['stream_end', 'stream_error'].includes(record[record.length - 1].event)) && Date.now() < deadline) {
      await new Promise(res => setTimeout(res, 20));
    }
    bad.push(...checkEvents(record, ev));
  }
  return bad;
}

async function run(endpoint, files) {
  const failures = []; let skipped = 0;
  for (const file of files) {
    const t = JSON.parse(fs.readFileSync(file, 'utf8'));
    if (!t.steps) continue;                  // conditions.json: a table, not a conversation
    const client = new Client(endpoint, { timeout: 60 }); const names = {};
    try {
      for (const [i, st] of t.steps.entries()) {
        if (st.raw) { skipped++; continue; }
        for (const b of await step(client, st, names)) failures.push(`${path.basename(file)} step ${i}: ${b}`);
      }
    } finally { client.close(); }
  }
  return { failures, skipped };
}

if (require.main === module) {
  const [endpoint, ...files] = process.argv.slice(2);
  if (!endpoint || !files.length) { console.error('usage: node conformance.js ENDPOINT TRANSCRIPT.json ...'); process.exit(2); }
  const transcripts = files.filter(f => !f.endsWith('conditions.json'));
  run(endpoint, transcripts).then(({ failures, skipped }) => {
    console.log(failures.length ? failures.join('\n') : `all ${transcripts.length} transcripts passed (${skipped} raw steps skipped)`);
    process.exit(failures.length ? 1 : 0);
  }, e => { console.error(e); process.exit(1); });
}
module.exports = { run };
