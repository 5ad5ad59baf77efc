// dgguf serve's page: POST a streaming request with "canvas": true, draw each `event: canvas` (the whole canvas
// after each denoising step) and append the committed text of the ordinary chunks (text that can no longer
// change). Plain script, no build step, nothing from elsewhere.
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value || sessionStorage.getItem("dgguf_api_key") || "";
  if (key) { h["Authorization"] = "Bearer " + key; sessionStorage.setItem("dgguf_api_key", key); }
  return h;
}

function visible(piece) {
  // control characters and whitespace shown, never interpreted
  return piece.replace(/[\u0000-\u001f\u007f]/g, (c) => c === "\n" ? "\u23ce" : c === "\t" ? "\u21e5" :
    "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0")).replace(/ /g, "\u00b7") || "\u2205";
}

function drawCanvas(ev) {
  const box = $("canvas");
  const n = ev.pieces.length;
  while (box.children.length < n) box.appendChild(document.createElement("span"));
  while (box.children.length > n) box.removeChild(box.lastChild);
  for (let i = 0; i < n; i++) {
    const span = box.children[i];
    const cls = i < ev.pinned ? "committed" : ev.accepted[i] === "1" ? "accepted" : "changing";
    span.className = "tok " + cls;
    span.textContent = visible(ev.pieces[i]);
  }
  $("canvas-info").textContent = `#${ev.canvas + 1} · step ${ev.step} · ${ev.pinned}/${n} final`;
}

function setStatus(text, state) {
  $("status").textContent = text;
  if (state) document.body.dataset.state = state;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const j = await r.json();
    if (!r.ok) { $("model").textContent = j.error ? j.error.message : r.statusText; return; }
    const m = j.data[0];
    $("model").textContent = `${m.id} · canvas ${m.meta.canvas_length} · ctx ${m.meta.ctx}`;
    if (!m.meta.chat_template) $("mode").querySelector('option[value="chat"]').disabled = true;
  } catch (e) { $("model").textContent = String(e); }
}

function body() {
  const b = {stream: true, canvas: true, stream_options: {include_usage: true}};
  const num = (id) => $(id).value === "" ? null : Number($(id).value);
  if (num("max_tokens") !== null) b.max_tokens = num("max_tokens");
  if (num("seed") !== null) b.seed = num("seed");
  if (num("temperature") !== null) b.temperature = num("temperature");
  if (num("steps") !== null) b.max_denoising_steps = num("steps");
  if ($("mode").value === "chat") b.messages = [{role: "user", content: $("prompt").value}];
  else b.prompt = $("prompt").value;
  return b;
}

function handle(event, data, out) {
  if (event === "canvas") { drawCanvas(data); return; }
  if (event === "queue") { setStatus(`queued: ${data.position} ahead`); return; }
  if (event === "start") { setStatus("generating…"); return; }
  if (event === "stats") {
    out.stats = data;
    return;
  }
  if (data.error) throw new Error(data.error.message);
  for (const c of data.choices || []) {
    const piece = c.text !== undefined ? c.text : (c.delta.content || "");
    if (piece) { out.text += piece; $("committed").textContent = out.text; }
    if (c.delta && c.delta.reasoning_content) out.reasoning += c.delta.reasoning_content;
    if (c.delta && c.delta.tool_calls) out.calls.push(...c.delta.tool_calls);
    if (c.finish_reason) out.finish = c.finish_reason;
  }
  if (data.usage) out.usage = data.usage;
}

async function generate(ev) {
  ev.preventDefault();
  if (controller) return;
  controller = new AbortController();
  $("go").disabled = true; $("stop").disabled = false;
  $("committed").textContent = ""; $("canvas").textContent = ""; $("canvas-info").textContent = "";
  setStatus("sending…", "running");
  const out = {text: "", reasoning: "", calls: [], finish: null, usage: null, stats: null};
  const url = $("mode").value === "chat" ? "/v1/chat/completions" : "/v1/completions";
  try {
    const r = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body()),
                                signal: controller.signal});
    if (!r.ok) {
      let msg = r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(`${r.status}: ${msg}`);
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = null, data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;        // a keep-alive comment
        const text = data.join("\n");
        if (text === "[DONE]") continue;
        handle(event, JSON.parse(text), out);
      }
    }
    const s = out.stats;
    const parts = [`done: ${out.finish}`];
    if (out.usage) parts.push(`${out.usage.completion_tokens} tokens`);
    if (s) parts.push(`steps per canvas [${s.steps_per_canvas.join(", ")}]`, `${s.steps} steps`,
                      `${s.tokens_per_s} tok/s`, `seed ${s.seed}`);
    if (out.calls.length) parts.push(`tool calls: ${out.calls.map((c) => c.function.name).join(", ")}`);
    setStatus(parts.join(" · "), "done");
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : String(e.message || e), e.name === "AbortError" ? "done" : "error");
  } finally {
    controller = null;
    $("go").disabled = false; $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("api_key").addEventListener("change", loadModel);
loadModel();
