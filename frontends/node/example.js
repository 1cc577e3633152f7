'use strict';
// The demo avatar speaks one second of a tone through a live stream; its frames are saved as JPEGs.
//   node example.js tcp://127.0.0.1:5555 [OUT_DIR]
const fs = require('fs');
const { Client } = require('./index');

async function main(endpoint = 'tcp://127.0.0.1:5555', out = 'frames') {
  const client = new Client(endpoint, { timeout: 60 });
  try {
    console.log('engine healthy:', (await client.health()).healthy);
    const stream = await client.openStream('demo', { realtime: true });
    const pcm = Int16Array.from({ length: 16000 }, (_, i) => Math.round(8000 * Math.sin(2 * Math.PI * 220 * i / 16000)));
    for (let i = 0; i < pcm.length; i += 1600) await stream.push(pcm.subarray(i, i + 1600), { end: i + 1600 >= pcm.length });
    fs.mkdirSync(out, { recursive: true });
    let n = 0;
    for await (const f of stream.frames()) { fs.writeFileSync(`${out}/frame_${String(f.number).padStart(4, '0')}.jpg`, f.jpeg); n++; }
    console.log(`${n} frames in ${out}/`);
  } finally { client.close(); }
}
main(...process.argv.slice(2)).catch(e => { console.error(e); process.exit(1); });
