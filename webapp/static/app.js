// The captioning page: sends the chosen images and decoding settings to POST /api/caption and shows the
// captions and the sparse mask's kept prefix positions. Text from the server or from file names is only
// ever inserted as text (textContent), never as HTML.
"use strict";

const state = { info: null, examples: [], selection: [], request: 0 }; // selection: [{name, blob, url}]
const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  return response.json();
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = false;
}

function hideMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

async function init() {
  try {
    state.info = await getJSON("/api/info");
  } catch (err) {
    showMessage(`Cannot reach the captioning server (${err.message}). Is app.py running?`);
    return;
  }
  const info = state.info;
  $("model-info").textContent = `Model ${info.checkpoint} on ${info.device} (${info.precision}); ` +
    `sparse mask: ${info.sparse_mask ? "yes" : "no"}`;
  $("limits").textContent = `up to ${info.max_images} images, ${megabytes(info.max_upload_bytes)} per request`;
  document.querySelector(`input[name=method][value=${info.default_beams > 1 ? "beam" : "greedy"}]`).checked = true;
  $("beams").value = info.default_beams;
  $("beams").max = info.max_beams;
  $("num-captions").value = info.default_beams;
  $("num-captions").max = info.max_captions;
  describeMask();
  updateFields();
  wireEvents();
  await loadExamples();
}

function wireEvents() {
  $("files").addEventListener("change", () => {
    choose(Array.from($("files").files).map((file) => ({ name: file.name, blob: file })));
    $("files").value = ""; // choosing the same file again must fire "change" again
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(Array.from(event.dataTransfer.files).map((file) => ({ name: file.name, blob: file })));
  });
  for (const radio of document.querySelectorAll("input[name=method]")) radio.addEventListener("change", updateFields);
  $("run").addEventListener("click", run);
  $("all-examples").addEventListener("click", () => chooseExamples(state.examples));
  $("tab-captions").addEventListener("click", () => showTab("captions"));
  $("tab-mask").addEventListener("click", () => showTab("mask"));
}

function showTab(name) {
  for (const tab of ["captions", "mask"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
}

function currentMethod() {
  return document.querySelector("input[name=method]:checked").value;
}

function updateFields() {
  const method = currentMethod();
  for (const label of document.querySelectorAll(".fields label")) {
    label.classList.toggle("off", !label.dataset.for.split(" ").includes(method));
  }
}

async function loadExamples() {
  const { examples } = await getJSON("/api/examples");
  state.examples = examples;
  const box = $("examples");
  for (const name of examples) {
    const button = element("button");
    button.type = "button";
    button.title = `Caption ${name}`;
    const image = element("img");
    image.src = `/examples/${encodeURIComponent(name)}`;
    image.alt = name;
    button.append(image);
    button.addEventListener("click", () => chooseExamples([name]));
    box.append(button);
  }
  $("all-examples").hidden = examples.length < 2;
}

async function chooseExamples(names) {
  try {
    const blobs = await Promise.all(names.map(async (name) => {
      const response = await fetch(`/examples/${encodeURIComponent(name)}`);
      if (!response.ok) throw new Error(`example ${name}: ${response.status}`);
      return { name, blob: await response.blob() };
    }));
    choose(blobs);
  } catch (err) {
    showMessage(`Cannot load the example: ${err.message}`);
  }
}

function choose(items) {
  for (const item of state.selection) URL.revokeObjectURL(item.url);
  state.selection = items.map((item) => ({ ...item, url: URL.createObjectURL(item.blob) }));
  $("run").disabled = state.selection.length === 0;
  if (state.selection.length) run();
}

function limitProblem(items) {
  const info = state.info;
  if (items.length > info.max_images) {
    return `${items.length} images chosen: at most ${info.max_images} per request (app.py --max_images).`;
  }
  const total = items.reduce((sum, item) => sum + item.blob.size, 0);
  if (total > info.max_upload_bytes) {
    return `The chosen files total ${megabytes(total)}: the limit is ${megabytes(info.max_upload_bytes)} ` +
      "per request (app.py --max_upload_mb).";
  }
  return null;
}

function settingsForm() {
  const form = new FormData();
  const method = currentMethod();
  form.append("method", method);
  form.append("beams", $("beams").value);
  form.append("num_captions", method === "greedy" ? "1" : $("num-captions").value);
  form.append("temperature", $("temperature").value);
  form.append("top_p", $("top-p").value);
  form.append("seed", $("seed").value);
  return form;
}

function describeSettings(form) {
  const method = form.get("method");
  if (method === "greedy") return "greedy";
  if (method === "beam") return `beam search, ${form.get("beams")} beams`;
  const seed = form.get("seed") ? `, seed ${form.get("seed")}` : "";
  return `sampling, temperature ${form.get("temperature")}, top-p ${form.get("top_p")}${seed}`;
}

async function run() {
  const items = state.selection;
  if (!items.length) return;
  const problem = limitProblem(items);
  if (problem) {
    showMessage(problem);
    return;
  }
  const form = settingsForm();
  for (const item of items) form.append("images", item.blob, item.name);
  const request = ++state.request; // a newer request makes this one's answer stale
  hideMessage();
  $("run").disabled = true;
  $("status").textContent = `Captioning ${plural(items.length, "image")}…`;
  try {
    const response = await fetch("/api/caption", { method: "POST", body: form });
    const reply = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (request !== state.request) return;
    if (!response.ok) {
      showMessage(reply.error || `the server answered ${response.status}`);
      $("status").textContent = "";
      return;
    }
    render(items, reply, describeSettings(form));
  } catch (err) {
    if (request !== state.request) return;
    showMessage(`The server did not answer (is app.py still running?): ${err.message}`);
    $("status").textContent = "";
  } finally {
    if (request === state.request) $("run").disabled = state.selection.length === 0;
  }
}

function render(items, reply, settings) {
  const failed = reply.results.filter((result) => result.error).length;
  const done = reply.results.length - failed;
  $("status").textContent = `${plural(done, "image")} captioned in ${reply.seconds} s (${settings}).`;
  if (failed) showMessage(`${failed} of ${plural(reply.results.length, "file")} could not be read: see below.`);
  $("captions").replaceChildren(...reply.results.map((result, i) => captionCard(items[i], result)));
  const masks = reply.results.map((result, i) => [items[i], result]).filter(([, result]) => result.kept);
  $("mask").replaceChildren($("mask-about"), ...masks.map(([item, result]) => maskCard(item, result)));
}

function captionCard(item, result) {
  const card = element("article", "card");
  card.dataset.name = result.name;
  const image = element(result.error ? "div" : "img", "thumb");
  if (!result.error) {
    image.src = item.url;
    image.alt = result.name;
  }
  const body = element("div");
  body.append(element("h3", "name", result.name));
  if (result.error) {
    body.append(element("p", "error", result.error));
  } else {
    const list = element("ol", "captions");
    for (const caption of result.captions) {
      const row = element("li");
      const score = element("span", "score", caption.score.toFixed(3));
      score.title = "summed token log-probability / length ** length_penalty";
      row.append(element("span", "caption", caption.text), score);
      list.append(row);
    }
    body.append(list);
  }
  card.append(image, body);
  return card;
}

function describeMask() {
  const info = state.info;
  const cells = info.grid ? ` (the mean token, then the ${info.grid} x ${info.grid} grid cells)` : "";
  $("mask-about").textContent = info.sparse_mask
    ? `The sparse mask chooses, per image, which of the ${info.prefix_length} prefix positions${cells} GPT-2 ` +
      `may read. Shaded cells were dropped; the image is shown as the encoder sees it, resized to ` +
      `${info.image_size} x ${info.image_size} without keeping its aspect.`
    : `This model has no sparse mask: GPT-2 reads all ${info.prefix_length} prefix positions${cells}.`;
}

function maskCard(item, result) {
  const info = state.info;
  const kept = result.kept;
  const card = element("article", "card mask-card");
  card.dataset.name = result.name;
  const body = element("div");
  body.append(element("h3", "name", result.name));
  if (info.grid) {
    const view = element("div", "mask-view");
    const image = element("img");
    image.src = item.url;
    image.alt = result.name;
    const grid = element("div", "grid");
    grid.style.setProperty("--grid", info.grid);
    kept.slice(1).forEach((keep, i) => {
      const cell = element("div", `cell ${keep ? "kept" : "dropped"}`);
      cell.title = `row ${Math.floor(i / info.grid) + 1}, column ${(i % info.grid) + 1}: ${keep ? "kept" : "dropped"}`;
      grid.append(cell);
    });
    view.append(image, grid);
    card.append(view);
    const mean = element("p", "mean-token", "Mean token (the whole image): ");
    mean.append(element("span", `badge ${kept[0] ? "kept" : "dropped"}`, kept[0] ? "kept" : "dropped"));
    body.append(mean);
  } else {
    const strip = element("div", "strip");
    kept.forEach((keep, i) => {
      const cell = element("div", `cell ${keep ? "kept" : "dropped"}`);
      cell.title = `position ${i}: ${keep ? "kept" : "dropped"}`;
      strip.append(cell);
    });
    card.append(strip);
  }
  const count = kept.filter(Boolean).length;
  body.append(element("p", "kept-count", `GPT-2 reads ${count} of ${kept.length} prefix positions.`));
  card.append(body);
  return card;
}

document.addEventListener("DOMContentLoaded", init);
