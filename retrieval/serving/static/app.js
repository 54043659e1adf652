// The search page of `retrieval serve`: plain DOM, no framework, nothing fetched from
// elsewhere. Boxes are placed in percent of each image (style.css, .box), from pixel boxes
// of the full upright image, so the thumbnails can be any size.
"use strict";

let current = null;  // what is being searched: {file} or {id}, plus an optional crop box

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "note";
}

function describeIndex(info) {
  const ext = info.extractor || {};
  const base = (p) => p.split("/").pop();
  const net = ext.onnx ? `ONNX ${base(ext.onnx)}${ext.onnx_output ? " @ " + ext.onnx_output : ""}`
    : `${ext.backbone} (${ext.weights})${ext.layer ? " @ " + ext.layer : ""}`;
  const levels = ((info.search || {}).levels || []).join(",");
  return `${info.images} images, ${info.patches} windows, ${net}, ${ext.patch_mode} levels ${levels}, ${info.index_type}`;
}

async function loadInfo() {
  const r = await api("/api/info");
  const info = await r.json();
  $("info").textContent = describeIndex(info);
  $("info").title = info.path || "";
}

function options() {
  const form = new FormData();
  form.append("k", $("k").value || "10");
  if ($("aggregate").value) form.append("aggregate", $("aggregate").value);
  if ($("levels").value.trim()) form.append("query_levels", $("levels").value.trim());
  if ($("qe").value) form.append("qe", $("qe").value);
  if ($("dba").value) form.append("dba", $("dba").value);
  if ($("rotations").value.trim()) form.append("query_rotations", $("rotations").value.trim());
  if (current && current.box) form.append("box", current.box.join(","));
  return form;
}

async function search() {
  const form = options();
  let url = "/api/query", src;
  if (current.file) {
    form.append("image", current.file, current.file.name || "pasted.png");
    src = current.src;
  } else {
    url = `/api/query/${current.id}`;
    src = `/api/images/${current.id}/thumb`;
  }
  status("searching…");
  $("result").dataset.state = "searching";
  const start = performance.now();
  const r = await api(url, {method: "POST", body: form});
  const body = await r.json().catch(() => ({detail: `HTTP ${r.status}`}));
  if (!r.ok) {
    // The hits of an earlier query must not read as the answer to this one.
    $("hits").replaceChildren();
    $("result").hidden = true;
    $("result").dataset.state = "error";
    status(`${r.status}: ${body.detail}`, true);
    return;
  }
  const result = body.results[0];
  render(result, src);
  status(`${result.hits.length} hits in ${Math.round(performance.now() - start)} ms` +
         (current.box ? " (crop: double-click the query to clear it)" : ""));
  // Another process may have added or removed images since the page loaded.
  loadInfo().catch(() => {});
}

function render(result, src) {
  const hits = $("hits");
  hits.replaceChildren();
  $("query-name").textContent = result.query;
  const W = result.width, H = result.height;
  const qframe = el("div", {class: "frame"}, [el("img", {src, alt: "query"})]);
  result.hits.forEach((hit, i) => {
    qframe.appendChild(el("div", {class: `box c${i % COLOURS}`, style: pct(hit.query_box, W, H), "data-rank": hit.rank}));
  });
  if (current.box) qframe.appendChild(el("div", {class: "box crop", style: pct(current.box, W, H)}));
  const qfig = el("figure", {class: "shot query-shot", title: "drag to search a part of the query"},
    [qframe, el("figcaption", {}, [el("span", {class: "name", text: "query: " + result.query})])]);
  enableCrop(qframe, W, H);
  hits.appendChild(qfig);
  result.hits.forEach((hit, i) => {
    const c = `c${i % COLOURS}`;
    const frame = el("div", {class: "frame"}, [
      el("img", {src: `/api/images/${hit.id}/thumb`, alt: hit.path, loading: "lazy"}),
      el("div", {class: `box ${c}`, style: pct(hit.db_box, hit.width, hit.height)}),
    ]);
    const caption = el("figcaption", {}, [el("span", {class: `swatch ${c}`}), el("b", {text: `#${hit.rank}`}),
      document.createTextNode(` distance ${hit.distance.toFixed(4)}`), el("span", {class: "name", text: hit.path.split("/").pop()})]);
    const reranked = hit.rerank_distance === undefined ? "" : `, re-ranked ${hit.rerank_distance.toFixed(4)}`;
    const fig = el("figure", {class: `shot hit ${c}`, title: `#${hit.rank}  distance ${hit.distance.toFixed(4)}${reranked}\n${hit.path}\nclick to search from this image`,
      "data-id": hit.id, "data-path": hit.path, "data-rank": hit.rank}, [frame, caption]);
    fig.addEventListener("click", () => { current = {id: hit.id}; $("indexed").value = hit.path; search(); });
    fig.addEventListener("mouseenter", () => highlight(qframe, fig, hit.rank));
    fig.addEventListener("mouseleave", () => highlight(qframe, fig, null));
    hits.appendChild(fig);
  });
  $("result").hidden = false;
  $("result").dataset.state = "done";
}

function highlight(qframe, fig, rank) {
  // Hovering a hit leaves only its pair of windows lit on the query.
  fig.classList.toggle("active", rank !== null);
  for (const box of qframe.querySelectorAll(".box[data-rank]")) {
    box.classList.toggle("dim", rank !== null && box.dataset.rank !== String(rank));
  }
}

let drag = null;  // a crop being drawn on the query: {frame, W, H, start, shown}

function cropPoint(ev) {
  const r = drag.frame.getBoundingClientRect();
  const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width), y = Math.min(Math.max(ev.clientY - r.top, 0), r.height);
  return [x / r.width * drag.W, y / r.height * drag.H];
}

function cropBox(ev) {
  const [x, y] = cropPoint(ev), [sx, sy] = drag.start;
  return [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
}

function enableCrop(frame, W, H) {
  frame.addEventListener("mousedown", (ev) => {
    ev.preventDefault();
    drag = {frame, W, H, start: null, shown: el("div", {class: "box crop"})};
    drag.start = cropPoint(ev);
    frame.appendChild(drag.shown);
  });
  frame.addEventListener("dblclick", () => { if (current.box) { current.box = null; search(); } });
}

window.addEventListener("mousemove", (ev) => {
  if (drag) drag.shown.setAttribute("style", pct(cropBox(ev), drag.W, drag.H));
});

window.addEventListener("mouseup", (ev) => {
  if (!drag) return;
  const box = cropBox(ev), {W, H, shown} = drag;
  drag = null;
  // A click without a drag is not a crop; tiny boxes leave the network nothing to see.
  if (box[2] - box[0] < W / 20 || box[3] - box[1] < H / 20) { shown.remove(); return; }
  // Whole pixels: the extractor crops at whole pixels, so the windows it reports then
  // line up exactly with the crop drawn here.
  current.box = box.map((v) => Math.round(v));
  search();
});

function searchFile(file) {
  if (!file) return;
  if (current && current.src) URL.revokeObjectURL(current.src);
  current = {file, src: URL.createObjectURL(file)};
  $("indexed").value = "";
  search();
}

async function searchIndexed(text) {
  text = text.trim();
  if (!text) { status("type the path of an indexed image (as the hits show it) or its id", true); return; }
  let id = text;
  if (!/^\d+$/.test(text)) {
    const r = await api(`/api/lookup?path=${encodeURIComponent(text)}`);
    const body = await r.json();
    if (!r.ok) { status(body.detail, true); return; }
    id = body.id;
  }
  current = {id};
  search();
}

$("file").addEventListener("change", (ev) => searchFile(ev.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  searchFile(ev.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
document.addEventListener("paste", (ev) => {
  const item = [...ev.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) searchFile(item.getAsFile());
});
$("controls").addEventListener("submit", (ev) => {
  // Enter in any field: search the typed indexed image, or re-run the current query with
  // the new options.
  ev.preventDefault();
  if ($("indexed").value.trim() || !current) searchIndexed($("indexed").value);
  else search();
});
loadInfo().catch((err) => status(`cannot reach the server: ${err}`, true));
