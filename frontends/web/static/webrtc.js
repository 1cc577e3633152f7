// The avatar as a WebRTC peer (frontends/web/webrtc.py): the page sends its microphone (or the demo
// speech) as its audio track and receives the avatar's video and the same voice back, in step.
// POST /api/offer {sdp, type, avatar} -> {sdp, type, session}. window.rtc holds the connection and
// rtc.stats() (framesDecoded, framesPerSecond, freezeCount, codec, audio samples, each track's
// estimatedPlayoutTimestamp).
"use strict";
const $ = (id) => document.getElementById(id);
const rtc = { pc: null, state: "idle", errors: [], session: null };
window.rtc = rtc;

function fail(msg) {
  rtc.errors.push(String(msg));
  rtc.state = "error";
  const span = document.createElement("span");
  span.className = "err";
  span.textContent = String(msg);
  $("stats").replaceChildren(span);
}

async function loadAvatars() {
  const r = await fetch("/api/avatars");
  const js = await r.json();
  if (!r.ok) return fail(js.error ? js.error.message : r.statusText);
  $("avatar").replaceChildren(...js.avatars.map((a) => new Option(a.name, a.name)));
  if (js.avatars.some((a) => a.name === "demo")) $("avatar").value = "demo";
}

async function demoTrack() {
  // the demo speech, played into a MediaStream as if spoken into a microphone (loops)
  const ctx = new AudioContext();
  const data = await (await fetch("/static/speech.wav")).arrayBuffer();
  const src = ctx.createBufferSource();
  src.buffer = await ctx.decodeAudioData(data);
  src.loop = true;
  const dest = ctx.createMediaStreamDestination();
  src.connect(dest);
  src.start();
  rtc.audioContext = ctx;
  return dest.stream.getAudioTracks()[0];
}

async function start(useMic) {
  stop();
  rtc.state = "connecting";
  rtc.errors = [];
  $("stop").disabled = false;
  try {
    const track = useMic ? (await navigator.mediaDevices.getUserMedia({ audio: true })).getAudioTracks()[0]
                         : await demoTrack();
    rtc.track = track;
    const pc = new RTCPeerConnection();
    rtc.pc = pc;
    pc.addTransceiver(track, { direction: "sendrecv" });            // audio first, video second
    const video = pc.addTransceiver("video", { direction: "recvonly" });
    const want = $("codec").value;
    if (want && video.setCodecPreferences) {
      const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
      video.setCodecPreferences(codecs.filter((c) => c.mimeType === want).concat(codecs.filter((c) => c.mimeType !== want)));
    }
    const remote = new MediaStream();
    pc.ontrack = (ev) => { remote.addTrack(ev.track); $("screen").srcObject = remote; };
    pc.onconnectionstatechange = () => { rtc.state = pc.connectionState; };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((ok) => {                                        // all candidates in the offer
      if (pc.iceGatheringState === "complete") return ok();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && ok();
      setTimeout(ok, 2000);
    });
    const r = await fetch("/api/offer", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", avatar: $("avatar").value }) });
    const js = await r.json();
    if (!r.ok) return fail(`${js.error.code}: ${js.error.message}`);
    rtc.session = js.session;
    await pc.setRemoteDescription(js);
  } catch (e) {
    fail(e);
  }
}

function stop() {
  if (rtc.pc) rtc.pc.close();
  if (rtc.audioContext) rtc.audioContext.close();
  if (rtc.track) rtc.track.stop();                                     // the microphone off
  rtc.track = null;
  rtc.pc = null;
  rtc.audioContext = null;
  rtc.state = "idle";
  $("stop").disabled = true;
}

rtc.stats = async function () {
  const out = { state: rtc.state, errors: rtc.errors, video: {}, audio: {} };
  if (!rtc.pc) return out;
  const report = await rtc.pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    const codec = report.get(s.codecId);
    const o = s.kind === "video" ? out.video : out.audio;
    Object.assign(o, { codec: codec ? codec.mimeType : null, packetsReceived: s.packetsReceived,
      packetsLost: s.packetsLost, jitterBufferDelay: s.jitterBufferDelay,
      jitterBufferEmittedCount: s.jitterBufferEmittedCount,
      estimatedPlayoutTimestamp: s.estimatedPlayoutTimestamp, timestamp: s.timestamp });
    if (s.kind === "video") Object.assign(o, { framesDecoded: s.framesDecoded, framesPerSecond: s.framesPerSecond,
      freezeCount: s.freezeCount, framesDropped: s.framesDropped, width: s.frameWidth, height: s.frameHeight });
    else Object.assign(o, { totalSamplesReceived: s.totalSamplesReceived, audioLevel: s.audioLevel,
      concealedSamples: s.concealedSamples });
  });
  return out;
};

setInterval(async () => {
  if (!rtc.pc) return;
  const s = await rtc.stats();
  $("stats").textContent = `state ${s.state}\nvideo ${s.video.codec} ${s.video.width}x${s.video.height} ` +
    `${s.video.framesPerSecond || 0} frames/s, ${s.video.framesDecoded || 0} decoded, freezes ${s.video.freezeCount || 0}\n` +
    `audio ${s.audio.codec} ${s.audio.totalSamplesReceived || 0} samples received`;
}, 1000);

$("mic").onclick = () => start(true);
$("demo").onclick = () => start(false);
$("stop").onclick = stop;
loadAvatars().catch(fail);
