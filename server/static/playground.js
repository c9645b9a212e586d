// unmask playground: streams /v1/chat/completions with stream_options.include_steps and draws every denoising step.
// No dependencies, no requests outside this server.
"use strict";

const KEY_STORE = "unmask-api-key";
const MAX_RUNS = 2;
const $ = (id) => document.getElementById(id);

const app = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  model: null,
  defaults: {},
  special: { eos_token_id: null, stop_token_ids: [] },
  runs: [],
  running: null,
  counter: 0,
};

function authHeaders(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (app.key) h.Authorization = "Bearer " + app.key;
  return h;
}

// ---- model, defaults and API key ---------------------------------------------------------------------------
async function loadModel() {
  let resp;
  try {
    resp = await fetch("v1/models", { headers: authHeaders(false) });
  } catch (e) {
    $("model-info").textContent = "cannot reach the server: " + e;
    return;
  }
  if (resp.status === 401) {
    showKeyForm(app.key ? "that key was refused" : "");
    return;
  }
  if (!resp.ok) {
    $("model-info").textContent = "GET /v1/models failed: " + resp.status + " " + (await errorText(resp));
    return;
  }
  const card = (await resp.json()).data[0];
  app.model = card.id;
  app.defaults = card.diffusion_defaults || {};
  app.special = Object.assign(app.special, card.special_tokens || {});
  $("model-info").textContent = `${card.id} · ${card.family} · context ${card.max_model_len} tokens`;
  $("key-form").hidden = true;
  applyDefaults();
  document.body.dataset.ready = "true";
}

function showKeyForm(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("model-info").textContent = "API key needed";
  $("api-key").focus();
}

function applyDefaults() {
  const d = app.defaults;
  const set = (id, v) => { $(id).value = v === null || v === undefined ? "" : String(v); };
  set("max_tokens", d.max_tokens);
  set("steps", d.steps);
  $("steps").placeholder = d.steps_per_block ? `${d.steps_per_block} per block` : "";  // block diffusion: unset steps
  set("block_length", d.block_length);
  set("remasking", d.remasking || "low_confidence");
  set("threshold", d.threshold);
  set("cache", d.cache || "none");
  set("temperature", d.temperature ?? 0);
  set("seed", d.seed);
}

// An empty numeric field means "the model's default": nothing is sent for it (null), never an error.
function readSettings() {
  const blank = (id) => $(id).value.trim() === "";
  const int = (id, min) => {
    if (blank(id)) return null;
    const v = Number($(id).value);
    if (!Number.isInteger(v) || v < min) throw new Error(`${id} must be an integer ≥ ${min} (or empty: the default)`);
    return v;
  };
  const s = {
    max_tokens: int("max_tokens", 1), steps: int("steps", 1), block_length: int("block_length", 1),
    remasking: $("remasking").value, cache: $("cache").value,
    temperature: blank("temperature") ? null : Number($("temperature").value),
    threshold: blank("threshold") ? null : Number($("threshold").value),
    seed: int("seed", -(2 ** 53)),
  };
  s.structured_outputs = readConstraint();
  if (s.threshold !== null && !(s.threshold > 0 && s.threshold <= 1)) throw new Error("threshold must be in (0, 1]");
  if (s.temperature !== null && !(s.temperature >= 0)) throw new Error("temperature must be ≥ 0");
  return s;
}

function readConstraint() {
  // the output constraint box -> the request's structured_outputs (null: unconstrained)
  const kind = $("constraint-kind").value, text = $("constraint").value;
  if (!kind) return null;
  if (!text.trim()) throw new Error(`type the ${kind} of the output constraint`);
  if (kind === "json") {
    try { return { json: JSON.parse(text) }; } catch (e) { throw new Error(`JSON schema: ${e.message}`); }
  }
  if (kind === "choice") return { choice: text.split("\n").filter((x) => x !== "") };
  return { [kind]: text };
}

function summary(s) {
  const or = (v, d) => (v === null || v === undefined ? d : v);
  return [`max_tokens ${or(s.max_tokens, "default")}`, `steps ${or(s.steps, "default")}`,
    `block ${or(s.block_length, "default")}`, s.remasking, `cache ${s.cache}`, `threshold ${s.threshold ?? "off"}`,
    `T ${or(s.temperature, "default")}`, `seed ${s.seed ?? "random"}`,
    ...(s.structured_outputs ? [`constrained: ${Object.keys(s.structured_outputs)[0]}`] : [])].join(" · ");
}

// The key typed into the key field is the key, whether or not "Use key" was pressed: adopt it, and fetch the model
// and its defaults with it (once a key works the form hides and the settings fill in).
async function adoptTypedKey() {
  const typed = $("api-key").value.trim();
  if (!typed || typed === app.key) return;
  app.key = typed;
  sessionStorage.setItem(KEY_STORE, app.key);
  await loadModel();
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return resp.statusText;
  }
}

// ---- runs ----------------------------------------------------------------------------------------------------
function newRun(settings, message, beside) {
  const keep = beside && app.runs.length ? [app.runs[app.runs.length - 1]] : [];
  for (const r of app.runs) if (!keep.includes(r)) r.el.remove();
  const el = $("run-template").content.firstElementChild.cloneNode(true);
  const run = {
    settings, message, el, label: "Run " + ++app.counter, events: [], shown: 0, cum: [],
    stepOf: [], tokenId: [], piece: [], edits: [], length: 0, content: "", finish: null, diffusion: null,
    t0: 0, tEnd: 0, streamDone: false, pumping: false, status: "running", error: null,
    playback: Number($("playback").value), controller: new AbortController(),
  };
  el.querySelector(".run-title").textContent = run.label;
  const mode = $("raw").checked ? "raw prompt · " : "";
  el.querySelector(".run-settings").textContent = `“${message}” · ${mode}${summary(settings)}`;
  el.querySelector(".close").addEventListener("click", () => removeRun(run));
  el.querySelector(".slider").addEventListener("input", (e) => showFrame(run, Number(e.target.value)));
  app.runs = [...keep, run];
  $("runs").appendChild(el);
  resize(run, settings.max_tokens);
  return run;
}

function removeRun(run) {
  if (app.running === run) run.controller.abort();
  run.el.remove();
  app.runs = app.runs.filter((r) => r !== run);
}

function resize(run, n) {
  run.length = n;
  run.stepOf = new Array(n).fill(0);
  run.tokenId = new Array(n).fill(null);
  run.piece = new Array(n).fill(null);
  run.edits = Array.from({ length: n }, () => []);  // token editing: [step, id, piece] replacements, in order
  const canvas = run.el.querySelector(".canvas");
  canvas.replaceChildren();
  for (let i = 0; i < n; i++) {
    const c = document.createElement("span");
    c.className = "cell masked";
    c.dataset.pos = String(i);
    c.textContent = "░";
    canvas.appendChild(c);
  }
}

function hue(step, total) {
  const f = total > 1 ? (step - 1) / (total - 1) : 0;
  return `hsl(${Math.round(220 - 200 * f)} 75% 78%)`;
}

// The token at position i after step k: its commit, then the edits made up to step k (token editing).
function tokenAt(run, i, k) {
  let t = { id: run.tokenId[i], piece: run.piece[i], edited: false };
  for (const [s, id, piece] of run.edits[i]) if (s <= k) t = { id, piece, edited: true };
  return t;
}

function cellText(run, i, k) {
  const { id, piece: p } = tokenAt(run, i, k);
  if (id === app.special.eos_token_id) return "·";
  if ((app.special.stop_token_ids || []).includes(id)) return "■";
  if (p === null) return String(id);
  const shown = p.replace(/\n/g, "↵").trim();
  return shown === "" ? "␣" : shown;
}

// Draw the canvas as it was after step k (0 = before the first step).
function showFrame(run, k) {
  // colours span the run's steps: the requested count while streaming, the actual count once all have arrived
  const total = run.streamDone ? run.events.length : Math.max(run.settings.steps, run.events.length);
  const block = k > 0 ? run.events[k - 1].block : null;
  const cells = run.el.querySelector(".canvas").children;
  for (let i = 0; i < run.length; i++) {
    const c = cells[i];
    const s = run.stepOf[i];
    const committed = s > 0 && s <= k;
    const { id, piece, edited } = tokenAt(run, i, k);
    const special = committed && (id === app.special.eos_token_id || (app.special.stop_token_ids || []).includes(id));
    c.className = "cell" + (committed ? "" : " masked") + (special ? " special" : "") + (edited ? " edited" : "") +
      (committed && s === k ? " fresh" : "") + (block && i >= block[0] && i < block[1] ? " in-block" : "");
    c.textContent = committed ? cellText(run, i, k) : "░";
    c.style.background = committed ? hue(s, total) : "";
    c.dataset.step = committed ? String(s) : "";
    c.title = committed ? `position ${i} · step ${s}${edited ? " (edited since)" : ""} · token ${id} ${JSON.stringify(piece)}`
      : `position ${i} · masked`;
  }
  showStats(run, k);
  const slider = run.el.querySelector(".slider");
  if (!slider.disabled) slider.value = String(k);
  run.el.querySelector(".slider-label").textContent = run.streamDone ? `step ${k} / ${run.events.length}` : "";
  run.el.dataset.frame = String(k);
  run.el.querySelector(".legend-last").textContent = `step ${total}`;
}

function showStats(run, k) {
  const q = (cls) => run.el.querySelector(cls);
  const ev = k > 0 ? run.events[k - 1] : null;
  const done = run.cum[k - 1] || 0;
  const elapsed = ev ? (ev.t - run.t0) / 1000 : 0;
  q(".s-step").textContent = String(k);
  q(".s-of").textContent = run.streamDone ? ` / ${run.events.length}` : "";
  q(".s-tpf").textContent = k ? (done / k).toFixed(2) : "–";
  q(".s-elapsed").textContent = elapsed.toFixed(2) + " s";
  q(".s-tps").textContent = elapsed > 0 ? (done / elapsed).toFixed(1) : "–";
}

function setStatus(run, status, text) {
  run.status = status;
  run.el.dataset.status = status;
  run.el.querySelector(".s-status").textContent = text || status;
}

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Show the received steps one by one (one per animation frame live, or one per `playback` ms in slow motion).
async function pump(run) {
  if (run.pumping) return;
  run.pumping = true;
  while (run.shown < run.events.length) {
    run.shown += 1;
    showFrame(run, run.shown);
    await (run.playback > 0 ? sleep(run.playback) : nextFrame());
  }
  run.pumping = false;
  if (run.streamDone) finishRun(run);
}

function finishRun(run) {
  if (run.status !== "running") return;
  const slider = run.el.querySelector(".slider");
  slider.max = String(run.events.length);
  slider.disabled = false;
  showFrame(run, run.events.length);
  run.el.querySelector(".answer").textContent = run.content;
  const elapsed = ((run.tEnd || performance.now()) - run.t0) / 1000;
  if (run.error === "stopped") {
    setStatus(run, "stopped", `stopped after ${elapsed.toFixed(2)} s`);
    return;
  }
  if (run.error) {
    setStatus(run, "error", "error");
    run.el.querySelector(".run-error").textContent = run.error;
    return;
  }
  const d = run.diffusion;
  const tpf = d ? ` · ${d.tokens_per_forward.toFixed(2)} tokens/forward` : "";
  setStatus(run, "done", `done (${run.finish || "?"}) in ${elapsed.toFixed(2)} s${tpf}`);
}

function onStep(run, step) {
  if (step.length !== run.length) resize(run, step.length);
  const t = performance.now();
  run.events.push({ step: step.step, block: step.block, t });
  run.cum.push((run.cum[run.cum.length - 1] || 0) + step.positions.length);
  step.positions.forEach((p, j) => {
    run.stepOf[p] = step.step;
    run.tokenId[p] = step.token_ids[j];
    run.piece[p] = step.tokens ? step.tokens[j] : null;
  });
  (step.edited_positions || []).forEach((p, j) => {  // token editing: a committed token replaced in this step
    run.edits[p].push([step.step, step.edited_token_ids[j], step.edited_tokens ? step.edited_tokens[j] : null]);
  });
  pump(run);
}

function onChunk(run, obj) {
  if (obj.error) {
    run.error = obj.error.message || JSON.stringify(obj.error);
    return;
  }
  for (const ch of obj.choices || []) {
    if (ch.diffusion_step) onStep(run, ch.diffusion_step);
    if (ch.delta && ch.delta.content) run.content += ch.delta.content;
    if (typeof ch.text === "string") run.content += ch.text;
    if (ch.finish_reason) run.finish = ch.finish_reason;
    if (ch.diffusion) run.diffusion = ch.diffusion;
  }
}

async function generate(beside) {
  $("form-error").textContent = "";
  await adoptTypedKey();
  if (!app.model) await loadModel();  // the defaults were never fetched (no key until now, or the server was down)
  let settings;
  try {
    settings = readSettings();
  } catch (e) {
    $("form-error").textContent = e.message;
    return;
  }
  const message = $("message").value.trim();
  if (!message) {
    $("form-error").textContent = "type a message";
    return;
  }
  const raw = $("raw").checked;  // raw: /v1/completions with the text as the prompt (models without a chat template)
  const run = newRun(settings, message, beside);
  const body = { stream: true, stream_options: { include_steps: true, include_usage: true } };
  if (raw) body.prompt = message;
  else body.messages = [{ role: "user", content: message }];
  if (app.model) body.model = app.model;
  for (const [k, v] of Object.entries(settings)) if (v !== null) body[k] = v;
  app.running = run;
  setBusy(true);
  run.t0 = performance.now();
  try {
    const resp = await fetch(raw ? "v1/completions" : "v1/chat/completions", { method: "POST", headers: authHeaders(true),
      body: JSON.stringify(body), signal: run.controller.signal });
    if (!resp.ok) {
      run.error = `${resp.status}: ${await errorText(resp)}`;
      if (resp.status === 401) showKeyForm("the server refused the key");
    } else {
      await readStream(run, resp);
    }
  } catch (e) {
    run.error = e.name === "AbortError" ? "stopped" : String(e);
  } finally {
    run.tEnd = performance.now();
    run.streamDone = true;
    app.running = null;
    setBusy(false);
    if (!run.pumping) finishRun(run);
  }
}

async function readStream(run, resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onChunk(run, JSON.parse(payload));
      }
    }
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("compare").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- wiring --------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("settings").addEventListener("submit", (e) => { e.preventDefault(); generate(false); });
  $("compare").addEventListener("click", () => generate(true));
  $("stop").addEventListener("click", () => { if (app.running) app.running.controller.abort(); });
  $("defaults").addEventListener("click", applyDefaults);
  $("constraint-kind").addEventListener("change", () => { $("constraint").disabled = !$("constraint-kind").value; });
  $("playback").addEventListener("change", () => {
    for (const r of app.runs) r.playback = Number($("playback").value);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    app.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, app.key);
    loadModel();
  });
  $("api-key").addEventListener("change", adoptTypedKey);  // typed, then focus moved on: no button needed
  loadModel();
});
