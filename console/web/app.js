// MatrixInfer console UI: a small client of the REST API (/api). No build step, no downloads.
"use strict";

const main = document.getElementById("main");
const state = { timer: null, page: 0, wizard: {} };

// The bearer token: from the URL (#token=..., what the local stack prints) or the sign-in form.
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/");
  }
})();

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + (sessionStorage.getItem("token") || "") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* plain text */ }
  if (!r.ok) {
    const err = new Error((data && data.error && data.error.message) || text);
    err.fields = (data && data.error && data.error.fields) || [];
    if (r.status === 401) signIn("The console refused the token: " + err.message);
    throw err;
  }
  return data;
}

function show(html) {
  main.innerHTML = html;
  const h = main.querySelector("h1");
  if (h) { h.tabIndex = -1; h.focus(); }
}

function showError(el, err) {
  el.textContent = err.message + (err.fields && err.fields.length ? "\n" + err.fields.map((f) => `${f.path}: ${f.message}`).join("\n") : "");
}

function signIn(problem) {
  stop();
  state.page += 1;
  show(`<h1>Sign in</h1>${problem ? `<p class="error" role="alert">${esc(problem)}</p>` : ""}
  <form id="signin"><div class="field"><label for="token">Bearer token</label>
  <input id="token" name="token" type="password" autocomplete="off" required></div>
  <div class="actions"><button type="submit">Sign in</button></div></form>`);
  document.getElementById("signin").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("token", document.getElementById("token").value.trim());
    if (location.hash === "#/") route(); else location.hash = "#/"; // hashchange routes
  });
}

function stop() { if (state.timer) { clearInterval(state.timer); state.timer = null; } }

// Poll `render` every `ms` while the page that asked is still the one shown (a page left while
// its first render was in flight must not install its timer over the next page's).
function poll(page, render, ms) {
  if (page === state.page) state.timer = setInterval(() => (page === state.page ? render() : null), ms);
}

// ---- deployments list (live status: polled)
async function listPage() {
  const page = state.page;
  show(`<h1>Deployments</h1><div id="list">Loading…</div>
  <div class="actions"><a href="#/deploy">Deploy a model</a></div>`);
  const render = async () => {
    const el = document.getElementById("list");
    if (!el) return;
    try {
      const items = await api("GET", "/api/deployments");
      el.innerHTML = items.length ? `<table><caption class="explain">Refreshes every 2 seconds</caption>
        <thead><tr><th scope="col">Name</th><th scope="col">Status</th><th scope="col">Backends</th><th scope="col">Ready pods</th></tr></thead><tbody>` +
        items.map((d) => `<tr><td><a href="#/d/${esc(d.name)}">${esc(d.name)}</a></td>
          <td><span class="phase ${esc(d.phase)}">${esc(d.phase)}</span></td>
          <td>${d.backends.map((b) => esc(b.name + " (" + b.type + ")")).join(", ")}</td>
          <td>${d.backends.reduce((n, b) => n + b.pods.filter((p) => p.ready).length, 0)}</td></tr>`).join("") +
        "</tbody></table>" : "<p>No deployments yet.</p>";
    } catch (err) { showError(el, err); el.className = "error"; }
  };
  await render();
  poll(page, render, 2000);
}

// ---- deploy wizard: model -> engine and GPU shape -> options -> YAML preview -> deploy
async function deployPage() {
  const w = (state.wizard = {});
  show(`<h1>Deploy a model</h1>
  <form id="step-model"><fieldset><legend>1. Model</legend>
    <div class="field"><label for="model">Model from the catalog</label><select id="model" required></select></div>
    <div class="field"><label for="contextLength">Context length (tokens)</label><input id="contextLength" type="number" min="1" value="8192"></div>
    <div class="field"><label for="concurrency">Concurrent sequences</label><input id="concurrency" type="number" min="1" value="16"></div>
    <div class="actions"><button type="submit" id="to-engine">Next: engine and GPUs</button></div>
  </fieldset></form>
  <div id="step-engine"></div><div id="step-options"></div><div id="step-preview"></div>
  <p id="wizard-error" class="error" role="alert"></p>`);
  const errEl = document.getElementById("wizard-error");
  document.getElementById("step-model").addEventListener("submit", async (e) => {
    e.preventDefault(); errEl.textContent = "";
    w.model = document.getElementById("model").value;
    w.contextLength = Number(document.getElementById("contextLength").value);
    const q = new URLSearchParams({ model: w.model, contextLength: w.contextLength, concurrency: document.getElementById("concurrency").value });
    try { w.rec = await api("GET", "/api/recommendations?" + q); } catch (err) { return showError(errEl, err); }
    engineStep(w);
  });
  try {
    const models = await api("GET", "/api/models");
    document.getElementById("model").innerHTML = models.catalog.map((m) =>
      `<option value="${esc(m.id)}">${esc(m.id)} — ${m.paramsB}B, ${esc(m.architecture)}, ${m.contextLength} ctx, ${esc(m.license)}${m.lora ? ", LoRA" : ""}</option>`).join("");
    w.catalog = Object.fromEntries(models.catalog.map((m) => [m.id, m]));
  } catch (err) { return showError(errEl, err); }
}

function engineStep(w) {
  const el = document.getElementById("step-engine");
  const opts = w.rec.options;
  el.innerHTML = `<form id="engine-form"><fieldset><legend>2. Engine and GPU shape</legend>
    ${opts.length ? "" : "<p>No GPU nodes found in the cluster.</p>"}
    <table><thead><tr><th scope="col">Choose</th><th scope="col">Engine</th><th scope="col">GPU</th><th scope="col">GPUs</th><th scope="col">Cost / hour</th><th scope="col">Memory</th></tr></thead><tbody>
    ${opts.map((o, i) => `<tr class="${o.fits ? "" : "nofit"}">
      <td><input type="radio" name="option" id="opt-${i}" value="${i}" ${o.fits ? "" : "disabled"} ${w.rec.best && o === opts[0] && o.fits ? "checked" : ""}>
        <label for="opt-${i}">${esc(o.engine)} on ${esc(o.gpu)} x${o.tensorParallel}</label></td>
      <td>${esc(o.backendType)}</td><td>${esc(o.gpu)}</td><td>${o.tensorParallel}</td>
      <td>${o.hourlyCost == null ? "unknown" : o.hourlyCost.toFixed(2) + " " + esc(o.currency)}</td>
      <td>${o.fits ? "fits" : esc(o.reasons.join("; "))}<div class="explain">${esc(o.memory.explanation)}</div></td></tr>`).join("")}
    </tbody></table>
    <div class="actions"><button type="submit" id="to-options">Next: options</button></div></fieldset></form>`;
  document.getElementById("engine-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const picked = document.querySelector("input[name=option]:checked");
    if (!picked) { document.getElementById("wizard-error").textContent = "Choose an engine and GPU shape that fits."; return; }
    w.option = opts[Number(picked.value)];
    optionsStep(w);
  });
  el.querySelector("legend").scrollIntoView();
}

function optionsStep(w) {
  const el = document.getElementById("step-options");
  const base = w.model.split("/").pop().toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
  el.innerHTML = `<form id="options-form"><fieldset><legend>3. Options</legend>
    <div class="field"><label for="name">Deployment name (requests use it as model)</label><input id="name" required value="${esc(base)}"></div>
    <div class="field"><label for="replicas">Replicas</label><input id="replicas" type="number" min="0" value="1"></div>
    <div class="field"><label for="maxReplicas">Most replicas (autoscaling; empty: fixed)</label><input id="maxReplicas" type="number" min="1"></div>
    <div class="actions"><button type="submit" id="to-preview">Next: preview</button></div></fieldset></form>`;
  document.getElementById("options-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const errEl = document.getElementById("wizard-error"); errEl.textContent = "";
    const max = document.getElementById("maxReplicas").value;
    w.form = {
      name: document.getElementById("name").value.trim(),
      modelURI: "hf://" + w.model,
      backendType: w.option.backendType,
      gpus: w.option.tensorParallel,
      gpuProduct: w.option.gpu,
      replicas: Number(document.getElementById("replicas").value),
      contextLength: w.contextLength,
    };
    if (max) w.form.maxReplicas = Number(max);
    try { w.preview = await api("POST", "/api/deployments?dryRun=true", { form: w.form }); } catch (err) { return showError(errEl, err); }
    previewStep(w);
  });
}

function previewStep(w) {
  const el = document.getElementById("step-preview");
  el.innerHTML = `<fieldset><legend>4. Model YAML</legend>
    <label for="yaml">The Model the console will create (you may edit it)</label>
    <textarea id="yaml" rows="18" cols="90" spellcheck="false">${esc(w.preview.yaml)}</textarea>
    <div class="actions"><button type="button" id="deploy">Deploy</button></div></fieldset>`;
  document.getElementById("deploy").addEventListener("click", async () => {
    const errEl = document.getElementById("wizard-error"); errEl.textContent = "";
    try {
      const d = await api("POST", "/api/deployments", { yaml: document.getElementById("yaml").value });
      location.hash = "#/d/" + encodeURIComponent(d.name);
    } catch (err) { showError(errEl, err); }
  });
  document.getElementById("yaml").focus();
}

// ---- one deployment: backends, pods, events, logs, metrics, chat
async function deploymentPage(name) {
  const page = state.page;
  show(`<h1>Deployment ${esc(name)}</h1><div id="detail">Loading…</div>
  <h2>Logs</h2><div class="field"><label for="log-pod">Pod</label><select id="log-pod"></select></div>
  <div class="actions"><button type="button" class="secondary" id="load-logs">Show logs</button></div><pre id="logs" aria-label="pod log"></pre>
  <h2>Metrics</h2><div id="metrics" class="explain">Loading…</div>
  <h2>Chat</h2><form id="chat-form"><div class="field"><label for="prompt">Message</label><textarea id="prompt" rows="3" required></textarea></div>
  <div class="actions"><button type="submit">Send</button></div></form><div id="chat" class="chat-log" aria-live="polite"></div>
  <div class="actions"><button type="button" class="danger" id="delete">Delete deployment</button></div>
  <p id="page-error" class="error" role="alert"></p>`);
  const errEl = document.getElementById("page-error");
  let pods = [];
  const history = []; // the gateway's counters at each poll: the charts' rates
  const render = async () => {
    const el = document.getElementById("detail");
    if (!el) return;
    try {
      const d = await api("GET", "/api/deployments/" + encodeURIComponent(name));
      el.innerHTML = `<p>Status: <span class="phase ${esc(d.phase)}">${esc(d.phase)}</span> ${esc(d.message)}</p>
        <h2>Backends</h2><table><thead><tr><th scope="col">Backend</th><th scope="col">Engine</th><th scope="col">Weights</th><th scope="col">Ready replicas</th></tr></thead><tbody>
        ${d.backends.map((b) => `<tr><td>${esc(b.name)}</td><td>${esc(b.type)}</td><td>${esc(b.modelURI)}</td><td>${b.readyReplicas ?? 0} / ${b.replicas ?? 0}</td></tr>`).join("")}</tbody></table>
        <h2>Pods</h2>${table(["Pod", "Phase", "Ready", "IP", "Node"], d.backends.flatMap((b) => b.pods).map((p) => [p.name, p.phase, p.ready ? "yes" : "no", p.ip, p.node]))}
        <h2>Events</h2>${table(["Time", "Type", "Reason", "Object", "Message"], d.events.map((e) => [e.lastTimestamp, e.type, e.reason, e.object, e.message]))}`;
      const names = d.backends.flatMap((b) => b.pods).map((p) => p.name);
      if (names.join() !== pods.join()) {
        pods = names;
        document.getElementById("log-pod").innerHTML = names.map((n) => `<option>${esc(n)}</option>`).join("");
      }
    } catch (err) { showError(errEl, err); }
    api("GET", `/api/deployments/${encodeURIComponent(name)}/metrics`).then((m) => {
      const el2 = document.getElementById("metrics");
      if (!el2) return;
      const now = Date.now() / 1000, prev = history[history.length - 1];
      history.push({ t: now, requests: m.requests, tokens: m.outputTokens,
        rps: prev ? Math.max(0, (m.requests - prev.requests) / (now - prev.t)) : 0,
        tps: prev ? Math.max(0, (m.outputTokens - prev.tokens) / (now - prev.t)) : 0 });
      if (history.length > 60) history.shift();
      el2.innerHTML = `<p>requests ${m.requests}, errors ${m.errors}, mean TTFT ${m.ttftSecondsMean == null ? "–" : (m.ttftSecondsMean * 1000).toFixed(0) + " ms"}, output tokens ${m.outputTokens}, mean tokens/s ${m.outputTokensPerSecondMean == null ? "–" : m.outputTokensPerSecondMean.toFixed(1)}</p>` +
        chart(history.map((h) => h.rps), "requests per second") + chart(history.map((h) => h.tps), "output tokens per second");
    }).catch((err) => { const el2 = document.getElementById("metrics"); if (el2) el2.textContent = err.message; });
  };
  // the controls work from the moment they are shown, not after the first render
  document.getElementById("load-logs").addEventListener("click", () => streamLogs(name));
  document.getElementById("chat-form").addEventListener("submit", (e) => { e.preventDefault(); chat(name); });
  document.getElementById("delete").addEventListener("click", async () => {
    if (!confirm(`Delete deployment ${name}?`)) return;
    try { await api("DELETE", "/api/deployments/" + encodeURIComponent(name)); location.hash = "#/"; } catch (err) { showError(errEl, err); }
  });
  await render();
  poll(page, render, 3000);
}

// A small line chart (SVG) of `values`, newest right, with its last value in the caption.
function chart(values, label) {
  const w = 320, h = 60, max = Math.max(1e-9, ...values);
  const pts = values.map((v, i) => `${(i * w) / Math.max(1, values.length - 1)},${h - (v / max) * (h - 4) - 2}`).join(" ");
  const last = values.length ? values[values.length - 1] : 0;
  return `<figure class="chart"><svg role="img" aria-label="${esc(label)}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">
    <rect width="${w}" height="${h}" fill="#fff" stroke="#d0d4da"/><polyline fill="none" stroke="#1b2a41" stroke-width="2" points="${pts}"/></svg>
    <figcaption>${esc(label)}: ${last.toFixed(2)} (last ${values.length} polls)</figcaption></figure>`;
}

function table(head, rows) {
  if (!rows.length) return "<p>None.</p>";
  return `<table><thead><tr>${head.map((h) => `<th scope="col">${esc(h)}</th>`).join("")}</tr></thead><tbody>` +
    rows.map((r) => `<tr>${r.map((c) => `<td>${esc(c)}</td>`).join("")}</tr>`).join("") + "</tbody></table>";
}

async function streamLogs(name) {
  const out = document.getElementById("logs");
  out.textContent = "";
  const pod = document.getElementById("log-pod").value;
  const q = new URLSearchParams({ follow: "true", tailLines: "500" });
  if (pod) q.set("pod", pod);
  const r = await fetch(`/api/deployments/${encodeURIComponent(name)}/logs?` + q, { headers: { Authorization: "Bearer " + sessionStorage.getItem("token") } });
  if (!r.ok) { out.textContent = (await r.json()).error.message; return; }
  const reader = r.body.getReader(); const dec = new TextDecoder();
  for (;;) { const { value, done } = await reader.read(); if (done) break; out.textContent += dec.decode(value, { stream: true }); out.scrollTop = out.scrollHeight; }
}

async function chat(name) {
  const out = document.getElementById("chat");
  const prompt = document.getElementById("prompt").value;
  out.textContent = "you: " + prompt + "\n" + name + ": ";
  const r = await fetch(`/api/deployments/${encodeURIComponent(name)}/chat`, {
    method: "POST",
    headers: { Authorization: "Bearer " + sessionStorage.getItem("token"), "Content-Type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: prompt }] }),
  });
  if (!r.ok) { out.textContent += "\n" + (await r.json()).error.message; return; }
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
  for (;;) {
    const { value, done } = await reader.read(); if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = ev.replace(/^data: ?/, "");
      if (data === "[DONE]") return;
      try { const delta = JSON.parse(data).choices[0]?.delta?.content; if (delta) out.textContent += delta; } catch (e) { /* keep-alive */ }
    }
  }
}

// ---- runtimes
async function runtimesPage() {
  show(`<h1>Runtimes</h1><div id="rt">Loading…</div>`);
  const el = document.getElementById("rt");
  try {
    const rts = await api("GET", "/api/runtimes");
    el.innerHTML = table(["Engine", "Backend type", "Description", "Features", "Needs"],
      rts.map((r) => [r.name, r.backendType, r.description, r.features.join(", "), r.requires.join("; ")]));
  } catch (err) { showError(el, err); }
}

function route() {
  stop();
  state.page += 1;
  if (!sessionStorage.getItem("token")) return signIn();
  const h = location.hash.replace(/^#/, "") || "/";
  if (h === "/deploy") return deployPage();
  if (h === "/runtimes") return runtimesPage();
  if (h.startsWith("/d/")) return deploymentPage(decodeURIComponent(h.slice(3)));
  return listPage();
}

window.addEventListener("hashchange", route);
route();
