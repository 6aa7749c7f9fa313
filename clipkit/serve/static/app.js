// The search page of `clipkit index serve`: plain JavaScript over the JSON API (docs/serve.md), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let last = null; // the last answer, for the JSON download

function settings() {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const params = new URLSearchParams({ k: $("k").value, mode: mode });
  if ($("dedup-on").checked) params.set("dedup", $("dedup").value);
  return params;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function run(request, label, link) {
  status("Searching " + label + " ...");
  let answer;
  try {
    const response = await fetch(request.url, request.init);
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
  } catch (err) {
    status(err.message, true);
    return;
  }
  last = answer;
  if (link) history.replaceState(null, "", "?" + link.toString());
  show(answer);
}

function searchText() {
  const text = $("q").value.trim();
  if (!text) { status("Type some words, or search by an image.", true); return; }
  const params = settings();
  params.set("text", text);
  const link = settings();
  link.set("q", text);
  run({ url: "/api/search?" + params }, JSON.stringify(text), link);
}

function searchRow(row) {
  const params = settings();
  params.set("row", row);
  run({ url: "/api/search?" + params }, "like row " + row, params);
}

function searchImage(file) {
  if (!file) return;
  const type = file.type || "application/octet-stream";
  run({ url: "/api/search?" + settings(), init: { method: "POST", body: file, headers: { "Content-Type": type } } },
      "by " + file.name, null);
}

function show(answer) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const hit of answer.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.row = hit.image_row;
    card.dataset.key = hit.key;
    const img = document.createElement("img");
    img.src = hit.image;
    img.alt = hit.captions.join(" | ");
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.className = "caption";
    caption.textContent = hit.captions.join(" | ");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "#" + hit.rank + "  score " + hit.score.toFixed(3) + "  row " + hit.image_row;
    const more = document.createElement("button");
    more.className = "more";
    more.type = "button";
    more.textContent = "More like this";
    more.addEventListener("click", () => searchRow(hit.image_row));
    card.append(img, caption, score, more);
    grid.append(card);
  }
  $("download").disabled = answer.hits.length === 0;
  const dedup = answer.dedup ? ", near-duplicates (cosine >= " + answer.dedup + ") hidden" : "";
  status(answer.hits.length + " results for " + answer.query + " in " + answer.mode + " mode" + dedup + ".");
}

function download() {
  if (!last) return;
  const blob = new Blob([JSON.stringify(last, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "clipkit-results.json";
  a.click();
  URL.revokeObjectURL(a.href);
}

async function init() {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchText(); });
  $("file").addEventListener("change", (e) => searchImage(e.target.files[0]));
  $("download").addEventListener("click", download);
  // Drag and drop anywhere on the page.
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });
  let info = { modes: ["image"] };
  try {
    info = await (await fetch("/api/info")).json();
    $("info").textContent = info.count + " images, " + info.dim + "-d, " + (info.factory || "") + ", model " + (info.model || "none");
  } catch (err) {
    status("The server does not answer: " + err.message, true);
  }
  $("mode-box").hidden = !(info.modes || []).includes("caption");
  // Deep links: /?q=a+cat&k=20&mode=caption&dedup=0.95 (or row=N) open with the search run.
  const url = new URLSearchParams(location.search);
  if (url.has("k")) {
    const k = url.get("k");
    if (![...$("k").options].some((o) => o.value === k)) $("k").append(new Option(k, k));
    $("k").value = k;
  }
  if (url.get("mode") === "caption" && !$("mode-box").hidden) document.querySelector("input[value=caption]").checked = true;
  if (url.has("dedup")) { $("dedup-on").checked = true; $("dedup").value = url.get("dedup"); }
  if (url.has("q")) { $("q").value = url.get("q"); searchText(); }
  else if (url.has("row")) searchRow(url.get("row"));
  document.body.dataset.ready = "1";
}

init();
