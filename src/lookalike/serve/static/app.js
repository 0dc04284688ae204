// The search page: upload or drop an image, show the top matches, click one to search by it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { objectUrl: null, pending: null };
const DROP_PROMPT = $("drop-text").textContent;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function releaseObjectUrl(keep = null) {
  if (state.objectUrl && state.objectUrl !== keep) {
    URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
  }
}

function showQuery(src) {
  releaseObjectUrl(src);
  $("query-image").src = src;
  $("query-image").hidden = false;
  $("drop-text").hidden = true;
}

// The drop zone without a picture: after a rejected upload, or a file the browser cannot preview
// (which would otherwise show as a broken-image icon).
function clearQuery(text = DROP_PROMPT) {
  releaseObjectUrl();
  $("query-image").hidden = true;
  $("query-image").removeAttribute("src");
  $("drop-text").textContent = text;
  $("drop-text").hidden = false;
}

// The box shows what is asked for: a count out of range is put back to the one sent.
function params() {
  const asked = parseInt($("top").value, 10);
  const top = Number.isNaN(asked) ? 15 : Math.max(1, Math.min(100, asked));
  $("top").value = String(top);
  const floor = Math.max(0, Math.min(100, parseInt($("floor").value, 10) || 0));
  return { top, attribute: $("attribute").value, minProbability: floor / 100 };
}

async function answer(response) {
  const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

async function searchFile(file) {
  const url = URL.createObjectURL(file);
  showQuery(url);
  state.objectUrl = url;
  state.last = { file };
  const { top, attribute, minProbability } = params();
  const form = new FormData();
  form.append("image", file);
  form.append("top", String(top));
  if (attribute) form.append("attribute", attribute);
  if (minProbability > 0) form.append("min_probability", String(minProbability));
  if ((await run((signal) => fetch("/search", { method: "POST", body: form, signal }))) === false) {
    clearQuery();
    state.last = null;
  }
}

async function searchById(id) {
  showQuery(`/images/${id}`);
  state.last = { id };
  const { top, attribute, minProbability } = params();
  const query = new URLSearchParams({ top: String(top) });
  if (attribute) query.set("attribute", attribute);
  if (minProbability > 0) query.set("min_probability", String(minProbability));
  await run((signal) => fetch(`/images/${id}/similar?${query}`, { signal }));
}

// Only the newest search may draw: starting one cancels the one before, whose answer could otherwise
// arrive later and overwrite it (e.g. changing "top" re-runs the last search just as a result is clicked).
// Says whether the search succeeded (null when a newer one took over).
async function run(request) {
  if (state.pending) state.pending.abort();
  const pending = new AbortController();
  state.pending = pending;
  setStatus("searching…");
  try {
    const body = await answer(await request(pending.signal));
    if (state.pending !== pending) return null;
    render(body.results);
    const n = body.results.length;
    setStatus(`${n} ${n === 1 ? "match" : "matches"} in ${Math.round(body.took_ms)} ms`);
    return true;
  } catch (err) {
    if (state.pending !== pending) return null;
    render([]);
    setStatus(err.message, true);
    return false;
  }
}

// In place of a thumbnail the server no longer has (its file was removed or changed since indexing),
// which would otherwise show as a broken-image icon.
function missingPicture() {
  const box = document.createElement("div");
  box.className = "missing";
  box.textContent = "image no longer available on the server";
  return box;
}

function render(results) {
  const list = $("results");
  list.replaceChildren();
  for (const r of results) {
    const item = document.createElement("li");
    item.dataset.id = r.id;
    const button = document.createElement("button");
    button.title = `Search with ${r.name}`;
    button.addEventListener("click", () => searchById(r.id));
    const img = document.createElement("img");
    img.src = r.thumbnail_url;
    img.alt = r.name;
    img.loading = "lazy";
    img.addEventListener("error", () => img.replaceWith(missingPicture()), { once: true });
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.name;
    name.title = r.name;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(r.probability * 100).toFixed(1)}%`;
    const score = document.createElement("div");
    score.className = "score";
    for (const [label, value] of [
      ["p(same)", `${(r.probability * 100).toFixed(1)}%`],
      ["distance", r.distance.toFixed(3)],
      ["attribute", r.attribute ?? "—"],
    ]) {
      const b = document.createElement("b");
      b.textContent = label;
      const span = document.createElement("span");
      span.textContent = value;
      score.append(b, span);
    }
    button.append(img, bar, name, score);
    item.append(button);
    list.append(item);
  }
}

async function loadCatalog() {
  try {
    const info = await answer(await fetch("/catalog"));
    $("catalog-info").textContent = `${info.images} images · ${info.distance}`;
    for (const [name, count] of Object.entries(info.attributes)) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = `${name} (${count})`;
      $("attribute").append(option);
    }
  } catch (err) {
    $("catalog-info").textContent = `catalog unavailable: ${err.message}`;
  }
}

function rerun() {
  if (!state.last) return;
  if (state.last.file) searchFile(state.last.file);
  else searchById(state.last.id);
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => e.target.files[0] && searchFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && $("file").click());
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) searchFile(file);
  });
  $("query-image").addEventListener("error", () => {
    if ($("query-image").hidden) return;
    clearQuery(state.last && state.last.id !== undefined ? "This catalog image is no longer available on the server" : "No preview of this file in the browser");
  });
  $("attribute").addEventListener("change", rerun);
  $("top").addEventListener("change", rerun);
  $("floor").addEventListener("input", () => { $("floor-value").textContent = `${$("floor").value}%`; });
  $("floor").addEventListener("change", rerun);
  loadCatalog();
}

init();
