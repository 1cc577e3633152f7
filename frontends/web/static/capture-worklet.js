// AudioWorklet processor: mixes its input down to mono and posts blocks of 2048 samples
// (at the AudioContext's rate) to the main thread, which resamples them to 16 kHz.
class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(2048);
    this.n = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const frames = input[0].length;
      const scale = 1 / input.length;
      for (let i = 0; i < frames; i++) {
        let s = 0;
        for (let c = 0; c < input.length; c++) s += input[c][i];
        this.block[this.n++] = s * scale;
        if (this.n === this.block.length) {
          this.port.postMessage(this.block);
          this.block = new Float32Array(2048);
          this.n = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor('pcm-capture', PcmCapture);
