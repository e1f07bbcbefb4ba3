// duplexd browser demo: microphone → /v1/duplex → speakers, with barge-in.
//
// Plain script, no build step. Audio in: an AudioWorklet captures the microphone in an
// AudioContext running at 24 kHz (the browser resamples the device) and the page sends
// 20 ms pcm16 frames as binary messages [0x01 | pcm]. Audio out: binary frames
// [0x81 | u16 header length | JSON header | pcm16] go into a jitter-buffer worklet; an
// `epoch.advanced` event flushes it at once (barge-in) and frames of older epochs are
// dropped on arrival. Playback acks report what was actually played.
//
// Latency: from the end of the user's speech (the newest voiced microphone frame before
// the turn was handed over: server VAD's speech_stopped, or in duplex mode the model's
// first speak of a reply) to the first assistant sample played; the same start in every
// mode, so the figures compare. Problems (microphone denied, server unreachable, errors)
// show in a banner.
//
// window.duplexStats holds the page's counters (tests read them).
'use strict';

(() => {
  const RATE = 24000;
  const FRAME_MS = 20;
  const ACK_EVERY_MS = 250;
  const VOICE_RMS = 0.01; // a microphone frame at least this loud is the user speaking
  const $ = (id) => document.getElementById(id);

  const stats = {
    connected: false,
    sessionId: null,
    epoch: 0,
    micFramesSent: 0,
    framesReceived: 0,
    framesStale: 0,
    samplesReceived: 0,
    samplesPlayed: 0,
    samplesFlushed: 0,
    flushes: 0,
    underruns: 0,
    acksSent: 0,
    acksCommitted: 0,
    decisions: { listen: 0, speak: 0 },
    responses: { created: 0, completed: 0, cancelled: 0, other: 0 },
    userTranscripts: [],
    assistantTranscripts: [],
    latenciesMs: [],
    turns: [], // per measured turn: {mode, signal, handoverMs (speech end → hand-over), latencyMs}
    banner: null, // the text of the banner now shown
    notice: null, // what the engine says about itself (e.g. echo mode)
    errors: [],
  };
  window.duplexStats = stats;

  let ws = null;
  let ctx = null;
  let micStream = null;
  let captureNode = null;
  let playNode = null;
  let inputRate = RATE;
  let lastVoiceAt = null; // capture time of the newest voiced microphone frame
  let turn = null; // the turn being measured: {mode, signal, speechEndAt, handoverAt}
  let opened = false; // the websocket opened (a close before that is a failed connect)
  let closing = false; // the user asked to disconnect
  const items = new Map(); // assistant item id → {rid, segments: [[startMs, endMs, text]], el, lastAck}
  let lastDecision = 'listen';
  let playing = false;
  let buffered = 0;

  // ------------------------------------------------------------------ UI helpers
  function showBanner(text, kind) {
    stats.banner = text;
    $('banner-text').textContent = text;
    $('banner').className = `banner ${kind || 'error'}`;
    $('banner').hidden = false;
  }

  function clearBanner() {
    stats.banner = null;
    $('banner').hidden = true;
  }

  function micProblem(e) {
    switch (e && e.name) {
      case 'NotAllowedError':
      case 'SecurityError':
        return 'Microphone access was denied. Allow the microphone for this page (the icon in the address bar) and press Connect again.';
      case 'NotFoundError':
      case 'OverconstrainedError':
        return 'No microphone was found. Plug one in and press Connect again.';
      case 'NotReadableError':
        return 'The microphone could not be opened: another application may be using it.';
      case 'AbortError':
        if (String(e.message).includes('worklet')) {
          return 'Could not load the audio code from the server (audio-worklets.js): is the server still running?';
        }
        return `Audio could not start: ${e.message}`;
      default:
        return `Audio could not start: ${e && e.name ? `${e.name}: ` : ''}${e && e.message ? e.message : e}`;
    }
  }

  function handOver(signal) {
    // The user's turn was handed to the assistant: its speech ended at the newest voiced frame.
    const now = performance.now();
    const end = signal === 'send_turn' || lastVoiceAt === null ? now : Math.min(lastVoiceAt, now);
    turn = { mode: $('turn-mode').value, signal, speechEndAt: end, handoverAt: now };
  }

  function log(text, cls) {
    const li = document.createElement('li');
    li.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
    if (cls) li.className = cls;
    const ol = $('log');
    ol.prepend(li);
    while (ol.children.length > 200) ol.lastChild.remove();
  }

  function render() {
    $('epoch').textContent = String(stats.epoch);
    $('buffered').textContent = `${Math.round(buffered * 1000 / RATE)} ms`;
    const ind = $('indicator');
    let state = 'idle';
    if (stats.connected) state = playing || lastDecision === 'speak' ? 'speak' : 'listen';
    ind.className = `indicator ${state}`;
    ind.textContent = { idle: 'idle', listen: 'listening', speak: 'assistant speaking' }[state];
    const shown = { ...stats };
    delete shown.userTranscripts;
    delete shown.assistantTranscripts;
    delete shown.errors;
    delete shown.banner;
    delete shown.notice;
    $('stats').textContent = JSON.stringify(shown, null, 1);
  }

  function line(role, key, text, pending) {
    let li = document.querySelector(`#transcript li[data-key="${CSS.escape(key)}"]`);
    if (!li) {
      li = document.createElement('li');
      li.dataset.key = key;
      li.className = role;
      li.innerHTML = `<span class="who">${role === 'user' ? 'you' : 'assistant'}</span><span class="text"></span>`;
      $('transcript').append(li);
      li.scrollIntoView({ block: 'nearest' });
    }
    li.classList.toggle('pending', !!pending);
    li.querySelector('.text').textContent = text;
    return li;
  }

  function setButtons(connected) {
    $('connect').disabled = connected;
    $('disconnect').disabled = !connected;
    $('interrupt').disabled = !connected;
    $('send-turn').disabled = !connected || $('turn-mode').value !== 'manual';
  }

  // ------------------------------------------------------------------ protocol
  function send(event) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
  }

  function sessionUpdate() {
    // ack_only: the conversation keeps only what was actually played here.
    const session = { turn_mode: $('turn-mode').value, commit_policy: 'ack_only' };
    if (inputRate !== RATE) session.input_audio_format = { encoding: 'pcm16', rate: inputRate };
    send({ type: 'session.update', session });
  }

  function onAudioFrame(buf) {
    const view = new DataView(buf);
    if (view.getUint8(0) !== 0x81) return;
    const n = view.getUint16(1);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 3, n)));
    stats.framesReceived++;
    if (header.epoch < stats.epoch) {
      stats.framesStale++; // a barge-in made it void: never play it
      return;
    }
    const pcm16 = new Int16Array(buf.slice(3 + n));
    let f32 = new Float32Array(pcm16.length);
    for (let i = 0; i < pcm16.length; i++) f32[i] = pcm16[i] / 32768;
    if (ctx.sampleRate !== RATE) f32 = resample(f32, RATE, ctx.sampleRate);
    stats.samplesReceived += pcm16.length;
    let it = items.get(header.item_id);
    if (!it) {
      it = { rid: header.response_id, segments: [], el: null, lastAck: 0, played: 0, heard: '' };
      items.set(header.item_id, it);
    }
    const end = header.start_ms + Math.round(pcm16.length * 1000 / RATE);
    if (header.text) it.segments.push([header.start_ms, end, header.text]);
    buffered += f32.length;
    playNode.port.postMessage(
      { type: 'push', pcm: f32.buffer, item: header.item_id, rid: header.response_id, last: header.end_of_turn },
      [f32.buffer],
    );
  }

  function resample(x, from, to) {
    // Only used when the browser refused a 24 kHz AudioContext: linear is plenty here.
    const out = new Float32Array(Math.round(x.length * to / from));
    const k = from / to;
    for (let i = 0; i < out.length; i++) {
      const p = i * k;
      const j = Math.floor(p);
      const a = x[j] || 0;
      const b = x[Math.min(j + 1, x.length - 1)] || 0;
      out[i] = a + (b - a) * (p - j);
    }
    return out;
  }

  function showPlayed(itemId, it) {
    const ms = Math.round(it.played * 1000 / ctx.sampleRate);
    const text = it.segments.filter((s) => s[0] <= ms).map((s) => s[2]).join('').trim();
    if (text !== it.heard) {
      it.heard = text;
      line('assistant', itemId, text, false);
    }
    return ms;
  }

  function onPlayed(msg) {
    stats.samplesPlayed = msg.totalPlayed;
    stats.underruns = msg.underruns;
    buffered = msg.buffered;
    playing = msg.playing;
    const now = performance.now();
    for (const p of msg.items) {
      const it = items.get(p.item);
      if (!it) continue;
      it.played = p.played;
      const ms = showPlayed(p.item, it);
      // Ack as audio actually plays: throttled, plus once at the end and on a flush.
      if (p.done || msg.final || now - it.lastAck >= ACK_EVERY_MS) {
        if (ms > (it.ackedMs || 0)) {
          send({ type: 'playback.ack', response_id: p.rid, item_id: p.item, played_ms: ms });
          it.ackedMs = ms;
          it.lastAck = now;
          stats.acksSent++;
        }
      }
    }
    render();
  }

  function onEvent(ev) {
    switch (ev.type) {
      case 'session.created': {
        stats.sessionId = ev.session.id;
        log(`session ${ev.session.id} (engine ${ev.engine && ev.engine.name})`);
        const notice = ev.engine && ev.engine.notice;
        stats.notice = notice || null;
        $('notice').textContent = notice || '';
        $('notice').hidden = !notice;
        const down = ((ev.engine && ev.engine.backends) || []).filter((b) => !b.ok);
        if (down.length) {
          showBanner(`${down.map((b) => `${b.name} ${b.url}: ${b.detail}`).join('; ')}. Replies will fail until it is fixed.`, 'warning');
        }
        sessionUpdate();
        break;
      }
      case 'session.updated':
        log(`turn mode ${ev.session.turn_mode}`);
        break;
      case 'response.listen':
      case 'response.speak':
        lastDecision = ev.type === 'response.speak' ? 'speak' : 'listen';
        stats.decisions[lastDecision]++;
        // Duplex: the model's first speak of a reply is its hand-over.
        if (lastDecision === 'speak' && turn === null && $('turn-mode').value === 'duplex') handOver('response.speak');
        break;
      case 'input_audio_buffer.speech_started':
        line('user', ev.item_id, '…', true);
        break;
      case 'input_audio_buffer.speech_stopped':
        handOver('speech_stopped');
        break;
      case 'input_audio_buffer.committed':
        line('user', ev.item_id, '…', true);
        break;
      case 'conversation.item.input_audio_transcription.completed':
        stats.userTranscripts.push(ev.transcript);
        line('user', ev.item_id, ev.transcript || '(no words)', false);
        break;
      case 'conversation.item.added':
        // Duplex mode: a user turn the model heard arrives as an item with its transcript.
        if (ev.item.role === 'user' && ev.item.content && ev.item.content[0] && ev.item.content[0].transcript) {
          line('user', ev.item.id, ev.item.content[0].transcript, false);
        }
        break;
      case 'response.created': {
        stats.responses.created++;
        line('assistant', ev.item.id, '…', true);
        if (!items.has(ev.item.id)) {
          items.set(ev.item.id, { rid: ev.response.id, segments: [], el: null, lastAck: 0, played: 0, heard: '' });
        }
        break;
      }
      case 'response.output_text.delta': {
        const li = line('assistant', ev.item_id, '', false);
        li.querySelector('.text').textContent += ev.delta;
        break;
      }
      case 'response.done': {
        const r = ev.response;
        const bucket = r.status in stats.responses ? r.status : 'other';
        stats.responses[bucket]++;
        stats.assistantTranscripts.push(ev.transcript || '');
        const item = r.output && r.output[0];
        if (item && r.status === 'cancelled') {
          const li = document.querySelector(`#transcript li[data-key="${CSS.escape(item.id)}"]`);
          if (li) li.classList.add('interrupted');
        }
        log(`response ${r.id} ${r.status}${r.reason ? ` (${r.reason})` : ''}`);
        lastDecision = 'listen';
        break;
      }
      case 'epoch.advanced':
        // Everything older is void: flush the jitter buffer now.
        stats.epoch = Math.max(stats.epoch, ev.epoch);
        stats.flushes++;
        playNode.port.postMessage({ type: 'flush' });
        log(`epoch ${ev.epoch} (${ev.reason}): playback flushed`);
        break;
      case 'playback.committed':
        stats.acksCommitted++;
        break;
      case 'error':
        stats.errors.push(ev.error);
        log(`error ${ev.error.code}: ${ev.error.message}`, 'error');
        showBanner(`Server error (${ev.error.code}): ${ev.error.message}`);
        break;
      case 'session.closed':
        log(`session closed: ${ev.reason}`);
        break;
      default:
        break;
    }
    render();
  }

  // ------------------------------------------------------------------ connect / disconnect
  async function connect() {
    setButtons(true);
    clearBanner();
    opened = false;
    closing = false;
    $('conn-state').textContent = 'starting audio…';
    try {
      try {
        ctx = new AudioContext({ sampleRate: RATE, latencyHint: 'interactive' });
      } catch (e) {
        ctx = new AudioContext({ latencyHint: 'interactive' }); // resample in the page instead
      }
      inputRate = ctx.sampleRate;
      await ctx.audioWorklet.addModule('audio-worklets.js');
      micStream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      const src = ctx.createMediaStreamSource(micStream);
      captureNode = new AudioWorkletNode(ctx, 'capture-processor', {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { frameSamples: Math.round(inputRate * FRAME_MS / 1000) },
      });
      playNode = new AudioWorkletNode(ctx, 'playback-processor', {
        numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { prebufferMs: 80, reportMs: 100 },
      });
      src.connect(captureNode);
      captureNode.connect(ctx.destination); // outputs silence; keeps the capture running
      playNode.connect(ctx.destination);
      playNode.port.onmessage = (e) => {
        const m = e.data;
        if (m.type === 'played') onPlayed(m);
        else if (m.type === 'started') {
          if (turn !== null) {
            const ms = Math.round(performance.now() - turn.speechEndAt);
            stats.latenciesMs.push(ms);
            stats.turns.push({
              mode: turn.mode,
              signal: turn.signal,
              handoverMs: Math.round(turn.handoverAt - turn.speechEndAt),
              latencyMs: ms,
            });
            $('latency').textContent = `${ms} ms`;
            turn = null;
          }
        } else if (m.type === 'flushed') {
          stats.samplesFlushed += m.droppedSamples;
          buffered = 0;
          playing = false;
          render();
        }
      };
      await ctx.resume();
    } catch (e) {
      const denied = e && (e.name === 'NotAllowedError' || e.name === 'SecurityError');
      log(`audio setup failed: ${e}`, 'error');
      stats.errors.push({ code: denied ? 'microphone_denied' : 'audio_setup', message: String(e) });
      teardown(denied ? 'microphone denied' : 'audio unavailable');
      showBanner(micProblem(e));
      return;
    }

    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    const key = $('api-key').value.trim();
    const url = `${proto}://${location.host}/v1/duplex${key ? `?api_key=${encodeURIComponent(key)}` : ''}`;
    $('conn-state').textContent = 'connecting…';
    ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      opened = true;
      stats.connected = true;
      $('conn-state').textContent = 'connected';
      log('connected');
      render();
    };
    ws.onmessage = (e) => {
      if (typeof e.data === 'string') onEvent(JSON.parse(e.data));
      else onAudioFrame(e.data);
    };
    ws.onclose = (e) => {
      log(`disconnected (${e.code}${e.reason ? ` ${e.reason}` : ''})`, e.code === 1000 ? '' : 'error');
      const userClosed = closing;
      const wasOpen = opened;
      teardown(wasOpen ? 'disconnected' : 'connection failed');
      if (userClosed) return;
      if (!wasOpen) {
        showBanner(`Could not connect to ${url.split('?')[0]}: is the server running, and is an API key needed?`);
      } else if (e.code === 1001) {
        showBanner('The server is shutting down; the session ended.');
      } else if (e.code !== 1000) {
        showBanner(`The connection was lost (code ${e.code}${e.reason ? `: ${e.reason}` : ''}).`);
      }
    };
    captureNode.port.onmessage = (e) => {
      $('mic-level').style.width = `${Math.min(100, Math.round(e.data.rms * 400))}%`;
      if (e.data.rms >= VOICE_RMS) lastVoiceAt = performance.now();
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      const pcm = new Uint8Array(e.data.pcm);
      const frame = new Uint8Array(pcm.length + 1);
      frame[0] = 0x01;
      frame.set(pcm, 1);
      ws.send(frame);
      stats.micFramesSent++;
    };
  }

  function teardown(state) {
    stats.connected = false;
    turn = null;
    lastVoiceAt = null;
    if (ws) {
      const w = ws;
      ws = null;
      if (w.readyState === WebSocket.OPEN) w.close(1000, 'user closed');
    }
    if (micStream) micStream.getTracks().forEach((t) => t.stop());
    micStream = null;
    if (ctx) ctx.close();
    ctx = null;
    playing = false;
    buffered = 0;
    $('conn-state').textContent = typeof state === 'string' ? state : 'disconnected';
    setButtons(false);
    render();
  }

  // ------------------------------------------------------------------ wiring
  $('controls').addEventListener('submit', (e) => e.preventDefault());
  $('connect').addEventListener('click', connect);
  $('disconnect').addEventListener('click', () => {
    closing = true;
    teardown();
  });
  $('banner-close').addEventListener('click', clearBanner);
  $('turn-mode').addEventListener('change', () => {
    setButtons(stats.connected);
    if (stats.connected) sessionUpdate();
  });
  $('send-turn').addEventListener('click', () => {
    handOver('send_turn');
    send({ type: 'input_audio_buffer.commit' });
    send({ type: 'response.create' });
  });
  $('interrupt').addEventListener('click', () => {
    // The force flag: a (possibly empty) audio frame of kind 0x02 always interrupts; the
    // user asked for silence, so local playback stops without waiting for the server.
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(new Uint8Array([0x02]));
    if (playNode) playNode.port.postMessage({ type: 'flush' });
  });
  const params = new URLSearchParams(location.search);
  if (params.get('mode')) $('turn-mode').value = params.get('mode');
  setButtons(false);
  render();
})();
