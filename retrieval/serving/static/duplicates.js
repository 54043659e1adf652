// The duplicates view of `retrieval serve`: the groups of GET /api/duplicates, drawn as
// `retrieval duplicates --html` draws them (the first image, then each member with the
// matched pair of windows in its colour on both), from the server's thumbnails.
"use strict";

function shot(image, boxes, caption, classes) {
  const frame = el("div", {class: "frame"}, [el("img", {src: `/api/images/${image.id}/thumb`, alt: image.path, loading: "lazy"})]);
  for (const [c, box] of boxes) frame.appendChild(el("div", {class: `box c${c}`, style: pct(box, image.width, image.height)}));
  return el("figure", {class: `shot ${classes}`, title: `${image.path}\ndistance ${image.distance.toFixed(4)}`},
    [frame, el("figcaption", {}, caption)]);
}

async function load() {
  const params = new URLSearchParams({min_size: $("min-size").value || "2"});
  if ($("max-distance").value) params.set("max_distance", $("max-distance").value);
  $("status").textContent = "finding groups…";
  $("status").className = "note";
  const r = await api(`/api/duplicates?${params}`);
  const body = await r.json().catch(() => ({detail: `HTTP ${r.status}`}));
  if (!r.ok) {
    $("status").textContent = `${r.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
    $("status").className = "error";
    return;
  }
  const groups = $("groups");
  groups.replaceChildren();
  body.groups.forEach((group, n) => {
    const [first, ...rest] = group.images;
    const row = el("div", {class: "row"});
    row.appendChild(shot(first, rest.map((m, i) => [i % COLOURS, m.first_box]),
      [el("b", {text: "first"}), el("span", {class: "name", text: first.path.split("/").pop()})], "query-shot"));
    rest.forEach((m, i) => row.appendChild(shot(m, [[i % COLOURS, m.box]],
      [el("span", {class: `swatch c${i % COLOURS}`}), document.createTextNode(`distance ${m.distance.toFixed(4)}`),
       el("span", {class: "name", text: m.path.split("/").pop()})], `hit c${i % COLOURS}`)));
    groups.appendChild(el("section", {class: "query group"}, [el("h2", {text: `group ${n + 1}: ${group.images.length} images`}), row]));
  });
  $("max-distance").placeholder = `index default (${body.max_distance.toFixed(3)})`;
  $("status").textContent = `${body.groups.length} groups in ${body.images} images, max distance ${body.max_distance.toFixed(4)} ` +
    `(${body.max_distance_rule}), ${body.seconds.toFixed(1)} s`;
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); load(); });
load();
