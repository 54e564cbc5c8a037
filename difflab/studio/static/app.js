// difflab studio's page: plain JavaScript over the JSON API (see /docs). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { runs: {}, samplers: [], adapters: [], maxAdapters: 4, job: null, chainJob: null, log: [] };
const DEFAULT_SAMPLER = "dpmpp-2m", DEFAULT_STEPS = "20";  // a teacher's defaults (runs/diffusion.py), the menus' first values
const LAST_RESULT = "difflab-studio-result";  // localStorage: the id of the last job whose result the page showed
window.studioLog = state.log;  // what the page showed, in order (the browser tests read it)

function showError(message) {
  const e = $("error");
  e.textContent = message ? String(message).split("\n")[0] : "";
  e.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    showError("the studio server is not reachable");
    throw e;
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const message = body?.error || `${response.status} ${response.statusText}`;
    showError(message);
    throw new Error(message);
  }
  showError("");
  return body;
}

// The last guard: a failure nobody caught is shown in the error line, never left to the console.
window.addEventListener("unhandledrejection", (e) => { showError(e.reason?.message || String(e.reason)); e.preventDefault(); });

const post = (path, data) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });

// ------------------------------------------------------------------ panels

function showPanel(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.panel === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `panel-${name}`;
  if (name === "history") loadHistory().catch(() => {});
  if (name === "runs") loadRunDetail().catch(() => {});
}
for (const b of document.querySelectorAll("nav button")) b.onclick = () => showPanel(b.dataset.panel);

// ------------------------------------------------------------------ runs

async function loadRuns() {
  const data = await api("/api/runs");
  const select = $("run-select"), body = $("runs-table").querySelector("tbody");
  select.innerHTML = "";
  body.innerHTML = "";
  $("sr-run").innerHTML = "";
  state.maxAdapters = data.max_adapters ?? state.maxAdapters;
  state.samplers = data.samplers;
  for (const r of data.runs) {
    state.runs[r.name] = r;
    const row = body.insertRow();
    row.dataset.run = r.name;
    for (const v of [r.name, r.kind || "", r.dataset || "", (r.conditions || []).join(", "), (r.parameters || 0).toLocaleString(),
                     `${r.steps_trained ?? ""} / ${r.steps_planned ?? ""}`]) row.insertCell().textContent = v;
    row.onclick = () => {  // any run's detail (its curve, a shipped model's card); one that samples is chosen too
      if (r.generates) { select.value = r.name; onRunChange(); }
      state.detailRun = r.name;
      loadRunDetail().catch(() => {});
    };
    if (r.generates) select.add(new Option(r.name + (r.shipped ? " (shipped)" : ""), r.name));
    if (r.super_resolution) {
      const [, H, W] = r.shape;
      $("sr-run").add(new Option(`${r.name}: ${W / r.factor}x${H / r.factor} to ${W}x${H}`, r.name));
    }
  }
  for (const s of data.spacings) $("spacing").add(new Option(s, s));
  onRunChange();
}

function onRunChange() {
  const r = state.runs[$("run-select").value];
  if (!r) return;
  state.detailRun = r.name;
  for (const e of document.querySelectorAll(".text-only")) e.hidden = !r.text;
  for (const e of document.querySelectorAll(".class-only")) e.hidden = !r.classes;
  const cls = $("class_label");
  cls.innerHTML = '<option value="">(none)</option>';
  for (let k = 0; k < (r.classes || 0); k++) cls.add(new Option(String(k), String(k)));
  const methods = r.latent ? ["dps"] : ["replace", "repaint", "ddrm", "dps"];
  $("method").innerHTML = "";
  for (const m of methods) $("method").add(new Option(m, m));
  for (const row of $("runs-table").querySelectorAll("tbody tr")) row.classList.toggle("selected", row.dataset.run === r.name);
  state.adapters = r.adapters || [];  // the LoRA runs trained over this run's weights (the API matches fingerprints)
  $("lora-rows").hidden = !state.adapters.length;
  setAdapters([]);
  setSamplerMenu(r);
}
$("run-select").onchange = onRunChange;

function setSamplerMenu(r) {
  // A distilled student samples with its own sampler and steps: the menu shows them (from the run's info) and the
  // page sends none, so the API gives the job the run's own (run.default_sampling); steps left empty mean its own.
  // Any other run offers every sampler, starting from the teacher's defaults when it follows a student. Every run's
  // guidance starts at its own (a shipped model's best recorded scale), unless it was changed meanwhile.
  const own = r.kind === "distilled", menu = $("sampler"), guidance = $("guidance").value;
  if (own || menu.dataset.own !== "false") {
    menu.innerHTML = "";
    if (own) menu.add(new Option("(the run's own)", ""));
    else for (const s of state.samplers) menu.add(new Option(s, s));
    menu.value = own ? "" : DEFAULT_SAMPLER;
    $("steps").value = own ? "" : DEFAULT_STEPS;
    $("steps").placeholder = "";
  }
  menu.dataset.own = String(own);
  menu.disabled = $("spacing").disabled = own;
  if (own) $("spacing").value = "";
  api(`/api/runs/${encodeURIComponent(r.name)}`).then((d) => {
    if (!d.sampling || $("run-select").value !== r.name) return;
    if (d.guidance !== null && $("guidance").value === guidance) {
      $("guidance").value = String(d.guidance);
      state.log.push(`own guidance ${r.name} ${d.guidance}`);
    }
    if (!own) return;
    menu.options[0].text = `${d.sampling.sampler} (the run's own)`;
    $("steps").placeholder = `${d.sampling.steps} (its own)`;
    state.log.push(`own sampling ${r.name} ${d.sampling.sampler} ${d.sampling.steps}`);
  }).catch(() => {});
}

let detailTimer = null;
async function loadRunDetail() {
  clearTimeout(detailTimer);
  const name = state.detailRun || $("run-select").value;
  if (!name || $("panel-runs").hidden) return;
  for (const row of $("runs-table").querySelectorAll("tbody tr")) row.classList.toggle("selected", row.dataset.run === name);
  const d = await api(`/api/runs/${encodeURIComponent(name)}`);
  // another run chosen meanwhile: its own request draws it (a slower answer for this one must not overwrite it)
  if (name !== (state.detailRun || $("run-select").value)) return;
  $("run-title").textContent = `${d.name}: ${d.kind}, ${d.dataset}, ${d.steps_trained} of ${d.steps_planned} steps`;
  $("loss-chart").hidden = !d.metrics.length && Boolean(d.card);  // a shipped model keeps no curve: its card says more
  drawCurve($("loss-chart"), d.metrics, d.evals || []);
  if (d.pictures.includes("samples.png")) $("run-samples").src = `/api/runs/${encodeURIComponent(name)}/pictures/samples.png?s=${d.steps_trained}`;
  else $("run-samples").removeAttribute("src");  // hidden (style.css) rather than a broken picture
  showCard(d.card);
  if (d.steps_trained < d.steps_planned) detailTimer = setTimeout(() => loadRunDetail().catch(() => {}), 5000);  // still training: a live chart
}

function showCard(card) {
  // A shipped model's card: what it is, its measured figures, the commands that trained it (its recipe.json).
  const box = $("run-card");
  box.hidden = !card;
  if (!card) return;
  $("card-what").textContent = card.what || "";
  const minutes = card.train_seconds ? `, trained in ${Math.round(card.train_seconds / 60)} min` : "";
  $("card-steps").textContent = `${card.steps} steps${minutes}`;
  const figures = $("card-figures").querySelector("tbody");
  figures.innerHTML = "";
  const figure = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
  for (const [k, v] of Object.entries(card.figures || {})) {
    const row = figures.insertRow();
    row.insertCell().textContent = k;
    // a table of figures (per phrasing, say): its entries, "name value; ..."
    row.insertCell().textContent =
      v && typeof v === "object" ? Object.entries(v).map(([a, b]) => `${a} ${figure(b)}`).join("; ") : figure(v);
  }
  $("card-commands").textContent = (card.commands || []).map((c) => `$ ${c}`).join("\n");
  $("card-note").textContent = card.note || "";
  state.log.push(`card ${Object.keys(card.figures || {}).length} figures`);
}

function drawCurve(canvas, rows, evals = []) {
  const g = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 30;
  g.clearRect(0, 0, W, H);
  g.strokeStyle = "#999"; g.strokeRect(pad, 5, W - pad - 5, H - pad - 5);
  if (!rows.length) { g.fillText("no metrics yet", pad + 10, 20); return; }
  const logs = rows.map((r) => Math.log10(Math.max(r.loss, 1e-8)));
  const lo = Math.min(...logs), hi = Math.max(...logs), s0 = rows[0].step, s1 = rows[rows.length - 1].step;
  const x = (s) => pad + (W - pad - 5) * (s1 > s0 ? (s - s0) / (s1 - s0) : 0);
  const y = (v) => 5 + (H - pad - 10) * (hi > lo ? (hi - v) / (hi - lo) : 0.5);
  g.strokeStyle = "#335"; g.beginPath();
  rows.forEach((r, i) => (i ? g.lineTo : g.moveTo).call(g, x(r.step), y(logs[i])));
  g.stroke();
  g.fillStyle = "#333";
  let label = `loss ${rows[rows.length - 1].loss.toPrecision(3)} at step ${s1} (log scale)`;
  if (evals.length) {
    // --eval-every's score on its own scale (orange), the best checkpoint starred
    const v = evals.map((e) => e.value), elo = Math.min(...v), ehi = Math.max(...v);
    const ey = (u) => 5 + (H - pad - 10) * (ehi > elo ? (ehi - u) / (ehi - elo) : 0.5);
    g.strokeStyle = "#d60"; g.beginPath();
    evals.forEach((e, i) => (i ? g.lineTo : g.moveTo).call(g, x(e.step), ey(e.value)));
    g.stroke();
    const last = evals[evals.length - 1], best = evals.find((e) => e.step === last.best_step) || last;
    g.fillStyle = "#d60"; g.fillText("*", x(best.step) - 3, ey(best.value) + 4);
    label += `; ${last.metric.toUpperCase()} ${last.value.toPrecision(3)}, best ${best.value.toPrecision(3)} at step ${best.step}`;
    g.fillStyle = "#333";
    state.log.push(`evals ${evals.length} best ${best.step}`);
  }
  g.fillText(label, pad + 5, H - 8);
}

// ------------------------------------------------------------------ generate, the queue

function settings() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const r = state.runs[$("run-select").value] || {};
  const lo = num("interval_lo"), hi = num("interval_hi");
  return {
    run: $("run-select").value,
    prompt: r.text ? $("prompt").value || null : null,
    negative_prompt: r.text ? $("negative_prompt").value || null : null,
    class_label: r.classes ? num("class_label") : null,
    guidance: num("guidance") ?? 1,
    interval: lo !== null && hi !== null ? [lo, hi] : null,
    rescale: num("rescale") || null,
    sampler: $("sampler").value || null,  // none: the run's own
    spacing: $("spacing").value || null,
    steps: num("steps"),
    eta: num("eta"),
    seed: $("random-seed").checked ? null : num("seed"),
    batch: num("batch") ?? 1,
    lora: adapters(),
  };
}

// ------------------------------------------------------------------ LoRA adapters: up to state.maxAdapters rows

function adapters() {
  // The rows with an adapter chosen -> [[adapter run, strength], ...], or null.
  const rows = [...document.querySelectorAll(".lora-row")].filter((row) => row.querySelector(".lora").value);
  const chosen = rows.map((row) => {
    const v = row.querySelector(".lora-strength").value;
    return [row.querySelector(".lora").value, v === "" ? 1 : Number(v)];
  });
  return chosen.length ? chosen : null;
}

function addAdapterRow(name = "", strength = 1) {
  if (document.querySelectorAll(".lora-row").length >= state.maxAdapters) return;
  const row = document.createElement("span");
  row.className = "lora-row";
  const select = document.createElement("select"), input = document.createElement("input"), remove = document.createElement("button");
  select.className = "lora";
  select.add(new Option("(none)", ""));
  for (const a of state.adapters) select.add(new Option(a, a));
  select.value = name;
  input.className = "lora-strength"; input.type = "number"; input.step = "0.1"; input.min = "-4"; input.max = "4"; input.value = strength;
  remove.className = "lora-remove"; remove.type = "button"; remove.textContent = "\u00d7"; remove.title = "remove this adapter";
  remove.onclick = () => { row.remove(); if (!document.querySelector(".lora-row")) addAdapterRow(); updateAdapterRows(); };
  row.append("LoRA ", select, " strength ", input, " ", remove);
  $("lora-add").before(row);
  updateAdapterRows();
}

function updateAdapterRows() {
  $("lora-add").disabled = document.querySelectorAll(".lora-row").length >= state.maxAdapters;
}

function setAdapters(list) {
  // Rows for [[adapter, strength], ...] (one empty row when none); an adapter not trained over the chosen run is said.
  for (const row of document.querySelectorAll(".lora-row")) row.remove();
  const fits = list.filter(([name]) => state.adapters.includes(name));
  for (const [name, strength] of fits.length ? fits : [["", 1]]) addAdapterRow(name, strength);
  const other = list.find(([name]) => !state.adapters.includes(name));
  if (other) showError(`the LoRA adapter ${other[0]} was not trained over ${$("run-select").value}'s weights: left out`);
}
$("lora-add").onclick = () => addAdapterRow();

function useSettings(s) {
  const set = (id, v) => { if ($(id)) $(id).value = v ?? ""; };
  if (s.kind === "upscale") {  // a super-resolution run's settings: the Edit panel's
    if (state.runs[s.run]?.super_resolution) set("sr-run", s.run);
    set("noise-level", s.noise_level ?? 0); set("edit-steps", s.steps); set("seed", s.seed);
    if (!$("sampler").disabled) set("sampler", s.sampler);
    $("random-seed").checked = false;
    showPanel("edit");
    return;
  }
  if (s.run && state.runs[s.run]?.generates) { $("run-select").value = s.run; onRunChange(); }
  set("prompt", s.prompt); set("negative_prompt", s.negative_prompt); set("class_label", s.class_label);
  set("guidance", s.guidance ?? 1); set("rescale", s.rescale ?? 0); set("steps", s.steps); set("eta", s.eta);
  set("interval_lo", s.interval?.[0]); set("interval_hi", s.interval?.[1]);
  if (s.sampler && !$("sampler").disabled) set("sampler", s.sampler);  // a student's menu holds its own alone
  set("spacing", s.spacing); set("seed", s.seed); set("batch", s.batch ?? 1);
  setAdapters(s.lora || []);
  $("random-seed").checked = false;
  showPanel("generate");
}

const FINISHED = ["done", "cancelled", "failed", "interrupted"];

function follow(job, onUpdate) {
  // Server-Sent Events: every state of the job in order (each step, each preview), from its first, until it ends. A stream that stops before the
  // job's end (a dropped connection, a server that closed it) is not the end: the job is asked for once, and
  // followed again while it still runs. Resolves to its finished state, or null when the server is gone.
  return new Promise((resolve) => {
    const open = () => {
      const source = new EventSource(`/api/jobs/${job.id}/events`);
      source.onmessage = (e) => {
        const j = JSON.parse(e.data);
        onUpdate(j);
        if (FINISHED.includes(j.status)) { source.close(); resolve(j); }
      };
      source.onerror = async () => {
        source.close();
        let j;
        try { j = await api(`/api/jobs/${job.id}`); } catch (e) { resolve(null); return; }  // said in the error line
        if (FINISHED.includes(j.status)) { onUpdate(j); resolve(j); } else setTimeout(open, 200);
      };
    };
    open();
  });
}

async function generate() {
  const job = await post("/api/generate", settings());
  if (!$("random-seed").checked) $("seed").value = job.settings.seed;
  refreshQueue().catch(() => {});
  if (state.job && !FINISHED.includes(state.job.status)) return;  // queued behind the one shown
  watch(job).catch(() => {});
}

async function watch(job) {
  state.job = job;
  $("cancel").disabled = false;
  $("progress").value = 0;
  let previews = 0, status = null;
  const end = await follow(job, (j) => {
    state.job = j;
    $("progress").value = j.steps ? j.step / j.steps : 0;
    $("job-status").textContent = `${j.status} ${j.step}/${j.steps}`;
    if (j.previews > previews && j.status === "running") {
      previews = j.previews;
      $("preview").src = `/api/jobs/${j.id}/preview.png?n=${previews}`;
      state.log.push(`preview ${j.id} ${previews}`);
    }
    if (j.status !== status) { status = j.status; refreshQueue().catch(() => {}); }  // every step is an event too
  });
  $("cancel").disabled = true;
  if (end?.status === "done") {
    $("progress").value = 1;
    showResult(end);
    state.log.push(`final ${end.id}`);
  } else if (end?.status === "failed") {
    showError(end.error);
  }
  try {
    await refreshQueue();
    const next = (await api("/api/jobs")).jobs.find((j) => j.kind === "generate" && ["queued", "running"].includes(j.status));
    if (next) watch(next).catch(() => {});
  } catch (e) { /* shown in the error line */ }
}

function showResult(job) {
  // A done generate job's grid and images; remembered, so a reload shows it again (restoreResult).
  $("result").src = `/api/jobs/${job.id}/images/grid.png`;
  $("results").innerHTML = "";
  for (let i = 0; i < job.images; i++) {
    const img = document.createElement("img");
    img.src = `/api/jobs/${job.id}/images/${i}.png`;
    $("results").append(img);
  }
  try { localStorage.setItem(LAST_RESULT, job.id); } catch (e) { /* storage off: nothing to restore later */ }
}

async function restoreResult() {
  // The last result shown before a reload (or a restart: an old job is read from the history), if it still exists.
  let id = null;
  try { id = localStorage.getItem(LAST_RESULT); } catch (e) { return; }
  if (!id || !/^[0-9a-f]{16}$/.test(id)) return;
  let job = null;
  try {
    const response = await fetch(`/api/jobs/${id}`);
    job = response.ok ? await response.json() : null;
  } catch (e) { return; }  // the server is gone: the queue's request says so
  if (job?.status !== "done" || !job.images || $("result").getAttribute("src")) return;  // a newer one is shown already
  showResult(job);
  state.log.push(`restored ${job.id}`);
}

async function refreshQueue() {
  const { jobs } = await api("/api/jobs");
  const list = $("queue");
  list.innerHTML = "";
  for (const j of jobs.slice(-20)) {
    const li = document.createElement("li");
    li.dataset.id = j.id;
    li.className = j.status;
    li.textContent = `${j.kind} ${j.run} seed ${j.settings.seed}: ${j.status} `;
    if (["queued", "running"].includes(j.status)) {
      const b = document.createElement("button");
      b.textContent = "cancel"; b.className = "cancel";
      b.onclick = () => post(`/api/jobs/${j.id}/cancel`, {}).then(refreshQueue).catch(() => {});
      li.append(b);
    }
    list.append(li);
  }
}

$("generate").onclick = () => generate().catch(() => {});
$("cancel").onclick = () => state.job && post(`/api/jobs/${state.job.id}/cancel`, {}).catch(() => {});

// ------------------------------------------------------------------ edit: upload, paint a mask, inpaint

const edit = { image: null, data: null, painting: false, job: null };
const maskCanvas = $("edit-mask"), imageCanvas = $("edit-image");

$("edit-file").onchange = () => {
  const file = $("edit-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      edit.image = img;  // the image and its data change together, once it is decoded
      edit.data = reader.result;
      const g = imageCanvas.getContext("2d");
      g.imageSmoothingEnabled = false;
      g.clearRect(0, 0, 256, 256);
      g.drawImage(img, 0, 0, 256, 256);
      clearMask();
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
};

function clearMask() { maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height); }
$("clear-mask").onclick = clearMask;

function paint(e) {
  const rect = maskCanvas.getBoundingClientRect();
  const x = (e.clientX - rect.left) * maskCanvas.width / rect.width, y = (e.clientY - rect.top) * maskCanvas.height / rect.height;
  const g = maskCanvas.getContext("2d");
  g.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  g.fillStyle = "#f00";
  g.beginPath(); g.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI); g.fill();
}
maskCanvas.onpointerdown = (e) => { edit.painting = true; maskCanvas.setPointerCapture(e.pointerId); paint(e); };
maskCanvas.onpointermove = (e) => { if (edit.painting) paint(e); };
maskCanvas.onpointerup = () => { edit.painting = false; };

function maskPng() {
  // The painted canvas -> a mask of the image's own size: a pixel is filled in when any of its cell is painted.
  const W = edit.image.naturalWidth, H = edit.image.naturalHeight;
  const painted = maskCanvas.getContext("2d").getImageData(0, 0, maskCanvas.width, maskCanvas.height).data;
  const out = document.createElement("canvas");
  out.width = W; out.height = H;
  const g = out.getContext("2d"), pixels = g.createImageData(W, H);
  for (let py = 0; py < maskCanvas.height; py++) {
    for (let px = 0; px < maskCanvas.width; px++) {
      if (painted[4 * (py * maskCanvas.width + px) + 3] === 0) continue;
      const i = Math.floor(py * H / maskCanvas.height) * W + Math.floor(px * W / maskCanvas.width);
      pixels.data.fill(255, 4 * i, 4 * i + 3);
    }
  }
  for (let i = 3; i < pixels.data.length; i += 4) pixels.data[i] = 255;
  g.putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

$("inpaint").onclick = async () => {
  if (!edit.image) { showError("upload an image first"); return; }
  const s = settings();
  const body = { run: s.run, prompt: s.prompt, class_label: s.class_label, guidance: s.guidance, seed: s.seed, lora: s.lora,
                 steps: Number($("edit-steps").value), method: $("method").value, image: edit.data, mask: maskPng() };
  const end = await runJob("/api/inpaint", body, true);
  if (end) { $("edit-result").src = `/api/jobs/${end.id}/images/0.png`; state.log.push(`inpainted ${end.id}`); }
};

async function runJob(path, body, editPanel = false) {
  // Queue a job and wait for its end; null (and the error shown, unless it was cancelled) unless it is done.
  // An Edit panel job shows its live previews in the panel's result, its progress, and its Cancel button stops it.
  const job = await post(path, body).catch(() => null);
  if (!job) return null;
  let previews = 0;
  if (editPanel) { edit.job = job; $("edit-cancel").disabled = false; }
  const end = await follow(job, (j) => {
    if (!editPanel) return;
    $("edit-status").textContent = `${j.kind} ${j.status} ${j.step}/${j.steps}`;
    if (j.previews > previews && j.status === "running") {
      previews = j.previews;
      $("edit-result").src = `/api/jobs/${j.id}/preview.png?n=${previews}`;
      state.log.push(`edit preview ${j.id} ${previews}`);
    }
  });
  if (editPanel) $("edit-cancel").disabled = true;
  if (end?.status === "cancelled") { state.log.push(`cancelled ${end.id}`); return null; }
  if (end?.status !== "done") { if (end) showError(end.error || end.status); return null; }
  return end;
}
$("edit-cancel").onclick = () => edit.job && post(`/api/jobs/${edit.job.id}/cancel`, {}).catch(() => {});

function readFile(input) {
  return new Promise((resolve) => {
    const file = input.files[0];
    if (!file) { showError("choose an image first"); resolve(null); return; }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
}

$("img2img").onclick = async () => {
  if (!edit.image) { showError("upload an image first"); return; }
  const s = settings();
  delete s.batch;
  const end = await runJob("/api/img2img", { ...s, sampler: "ddim", steps: Number($("edit-steps").value), image: edit.data,
                                              strength: Number($("strength").value) }, true);
  if (end) { $("edit-result").src = `/api/jobs/${end.id}/images/0.png`; state.log.push(`img2img ${end.id}`); }
};

$("interpolate").onclick = async () => {
  const b = await readFile($("edit-file-b"));
  if (!edit.image || !b) { showError("upload two images (image and second image)"); return; }
  const s = settings();
  const end = await runJob("/api/interpolate", { run: s.run, prompt: s.prompt, class_label: s.class_label, seed: s.seed, lora: s.lora,
    steps: Number($("edit-steps").value), frames: Number($("frames").value), method: $("interp-method").value, image: edit.data, image_b: b },
    true);
  if (end) { $("edit-result").src = `/api/jobs/${end.id}/images/grid.png`; state.log.push(`interpolated ${end.id}`); }
};

$("upscale").onclick = async () => {
  // The uploaded image is the low-resolution input: the SR run's size divided by its factor.
  if (!edit.image) { showError("upload a low-resolution image first"); return; }
  if (!$("sr-run").value) { showError("no super-resolution run in this folder (train one with --cond low-res --factor K)"); return; }
  const s = settings();
  const end = await runJob("/api/upscale", { run: $("sr-run").value, image: edit.data, noise_level: Number($("noise-level").value),
                                              sampler: s.sampler, steps: Number($("edit-steps").value), seed: s.seed }, true);
  if (end) { $("edit-result").src = `/api/jobs/${end.id}/images/0.png`; state.log.push(`upscaled ${end.id}`); }
};

// ------------------------------------------------------------------ chain explorer

$("sweep-run").onclick = async () => {
  const s = settings();
  delete s.batch; delete s.guidance;
  const scales = $("sweep-scales").value.split(/[ ,]+/).filter((v) => v !== "").map(Number);
  const end = await runJob("/api/sweep", { ...s, scales });
  if (end) { $("sweep-result").src = `/api/jobs/${end.id}/images/grid.png`; state.log.push(`sweep ${end.id}`); }
};

$("forward-run").onclick = async () => {
  const image = await readFile($("forward-file"));
  if (!image) return;
  const s = settings();
  const end = await runJob("/api/forward", { run: s.run, image, steps: s.steps, seed: s.seed });
  if (end) { showChainJob(end, "the image x<sub>0</sub>"); state.log.push(`forward ${end.id}`); }
};

$("chain-run").onclick = async () => {
  const s = settings();
  delete s.batch;
  const end = await runJob("/api/chain", s);
  if (end) { showChainJob(end, "predicted x<sub>0</sub>"); state.log.push(`chain ${end.id}`); }
};

function showChainJob(end, caption) {
  $("chain-x0-caption").innerHTML = caption;
  state.chainJob = end;
  const slider = $("chain-slider");
  slider.max = end.chain.positions - 1;
  slider.value = 0;
  slider.disabled = false;
  showChain();
}

function showChain() {
  const j = state.chainJob, k = Number($("chain-slider").value);
  $("chain-xt").src = `/api/jobs/${j.id}/chain/${k}/x_t.png`;
  $("chain-x0").src = `/api/jobs/${j.id}/chain/${k}/x0.png`;
  $("chain-t").textContent = `step ${k} of ${j.chain.positions - 1}, t = ${j.chain.t[k].toFixed(1)}`;
}
$("chain-slider").oninput = showChain;

// ------------------------------------------------------------------ history, PNG settings

async function loadHistory() {
  const q = encodeURIComponent($("history-search").value);
  const { jobs } = await api(`/api/history?q=${q}&limit=60`);
  const list = $("history-list");
  list.innerHTML = "";
  for (const j of jobs.filter((j) => j.kind !== "chain")) {
    const item = document.createElement("div");
    item.className = "history-item";
    item.dataset.id = j.id;
    const img = document.createElement("img");
    img.src = `/api/jobs/${j.id}/images/grid.png`;
    img.className = "thumb";
    const s = j.settings;
    const text = document.createElement("div");
    text.textContent = `${j.kind} ${j.run}: ${s.prompt ? JSON.stringify(s.prompt) : s.class_label !== undefined ? "class " + s.class_label : ""} seed ${s.seed}, ${s.sampler || s.method} ${s.steps}`;
    item.append(img, text);
    if (j.kind === "generate") {
      const use = document.createElement("button");
      use.textContent = "use these settings"; use.className = "use";
      use.onclick = () => useSettings(s);
      item.append(use);
    }
    list.append(item);
  }
}
$("history-search").oninput = () => loadHistory().catch(() => {});

async function dropped(file) {
  const form = new FormData();
  form.append("file", file);
  const data = await api("/api/parameters", { method: "POST", body: form });
  if (!data.same_weights) showError("these settings were made with other weights than the run's current ones");
  useSettings(data.settings);
  state.log.push("parameters restored");
}
$("param-file").onchange = () => $("param-file").files[0] && dropped($("param-file").files[0]).catch(() => {});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  if (e.target === maskCanvas || !e.dataTransfer.files.length) return;
  e.preventDefault();
  dropped(e.dataTransfer.files[0]).catch(() => {});
});

loadRuns().then(restoreResult).then(refreshQueue).then(async () => {
  const running = (await api("/api/jobs")).jobs.find((j) => j.kind === "generate" && ["queued", "running"].includes(j.status));
  if (running) watch(running).catch(() => {});  // the queue survives a page reload
}).catch(() => {});
