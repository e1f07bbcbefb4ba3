// AudioWorklet processors of the duplexd browser demo (loaded with audioWorklet.addModule).
//
// capture-processor:  microphone → pcm16 frames (posted to the page, which sends them).
// playback-processor: a jitter buffer of assistant audio. It starts a reply only once a
//   little audio is queued (so network jitter does not become clicks), plays it out
//   sample by sample, is flushed at once on barge-in, and reports how much of each item
//   was *actually played* so the page can send playback acks.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frame = options.processorOptions.frameSamples;
    this.buf = new Int16Array(this.frame);
    this.n = 0;
    this.energy = 0;
    this.energyN = 0;
  }

  process(inputs, outputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        const s = Math.max(-1, Math.min(1, ch[i]));
        this.energy += s * s;
        this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.n === this.frame) {
          const rms = Math.sqrt(this.energy / this.frame);
          this.port.postMessage({ pcm: this.buf.buffer, rms }, [this.buf.buffer]);
          this.buf = new Int16Array(this.frame);
          this.n = 0;
          this.energy = 0;
        }
      }
    }
    // Silence out: the node stays connected (so it keeps running) without echoing the mic.
    for (const out of outputs[0] || []) out.fill(0);
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.prebuffer = Math.round((o.prebufferMs || 80) * sampleRate / 1000);
    this.reportEvery = Math.round((o.reportMs || 100) * sampleRate / 1000);
    this.queue = []; // {pcm: Float32Array, off, item, rid, last}
    this.buffered = 0;
    this.playing = false;
    this.items = new Map(); // item id → {rid, played, ended, started}
    this.sinceReport = 0;
    this.totalPlayed = 0;
    this.underruns = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === 'push') {
      const pcm = new Float32Array(msg.pcm);
      this.queue.push({ pcm, off: 0, item: msg.item, rid: msg.rid, last: msg.last });
      this.buffered += pcm.length;
      if (!this.items.has(msg.item)) this.items.set(msg.item, { rid: msg.rid, played: 0, ended: false, started: false });
      if (msg.last) this.items.get(msg.item).ended = true;
    } else if (msg.type === 'flush') {
      // Barge-in: everything queued is stale. Report what was played, drop the rest.
      const dropped = this.buffered;
      this.queue = [];
      this.buffered = 0;
      this.playing = false;
      this.report(true);
      this.items.clear();
      this.port.postMessage({ type: 'flushed', droppedSamples: dropped });
    }
  }

  report(final) {
    const items = [];
    for (const [item, st] of this.items) {
      if (st.played > 0) items.push({ item, rid: st.rid, played: st.played, done: st.ended && !this.hasQueued(item) });
    }
    this.port.postMessage({
      type: 'played', items, final: !!final, totalPlayed: this.totalPlayed, buffered: this.buffered,
      playing: this.playing, underruns: this.underruns,
    });
    for (const [item, st] of this.items) {
      if (st.ended && !this.hasQueued(item)) this.items.delete(item); // reported done once
    }
    this.sinceReport = 0;
  }

  hasQueued(item) {
    return this.queue.some((c) => c.item === item);
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    if (!this.playing && this.buffered > 0) {
      const head = this.queue[0];
      const st = head && this.items.get(head.item);
      // Start when enough is queued, or when the whole (short) reply is here.
      if (this.buffered >= this.prebuffer || (st && st.ended)) this.playing = true;
    }
    while (this.playing && i < out.length && this.queue.length) {
      const c = this.queue[0];
      const n = Math.min(out.length - i, c.pcm.length - c.off);
      out.set(c.pcm.subarray(c.off, c.off + n), i);
      c.off += n;
      i += n;
      this.buffered -= n;
      this.totalPlayed += n;
      const st = this.items.get(c.item);
      if (st) {
        if (!st.started) {
          st.started = true;
          this.port.postMessage({ type: 'started', item: c.item, rid: c.rid, frame: currentFrame });
        }
        st.played += n;
      }
      if (c.off >= c.pcm.length) {
        this.queue.shift();
        if (c.last) this.report(false); // the end of an item is acked promptly
      }
    }
    if (i < out.length) {
      out.fill(0, i);
      if (this.playing && this.queue.length === 0) {
        this.playing = false; // ran dry: re-buffer before going on
        const anyOpen = [...this.items.values()].some((s) => !s.ended);
        if (anyOpen) this.underruns++;
      }
    }
    for (let ch = 1; ch < outputs[0].length; ch++) outputs[0][ch].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= this.reportEvery) this.report(false);
    return true;
  }
}

registerProcessor('capture-processor', CaptureProcessor);
registerProcessor('playback-processor', PlaybackProcessor);
