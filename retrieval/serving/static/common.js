// What the pages of `retrieval serve` (search, duplicates) share: drawing boxes in percent
// of an image, building elements, and `api`, which calls the API (proving the token once).
"use strict";

const COLOURS = 10;  // classes c0..c9 of style.css
const $ = (id) => document.getElementById(id);

function pct(box, w, h) {
  const [x0, y0, x1, y1] = box;
  return `left:${100 * x0 / w}%;top:${100 * y0 / h}%;width:${100 * (x1 - x0) / w}%;height:${100 * (y1 - y0) / h}%`;
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

// A server started with --token answers 401 until the page proves the token once: it then
// sets an HttpOnly cookie, which every later request (the <img> thumbnails included) carries.
let proving = null;

async function proveToken() {
  let note = "This server needs its access token (retrieval serve --token).";
  for (;;) {
    const token = window.prompt(note);
    if (token === null) throw new Error("no token given; reload the page to enter it");
    const r = await fetch("/api/session", {method: "POST", headers: {Authorization: `Bearer ${token.trim()}`}});
    if (r.ok) return;
    note = "That token was refused; enter the token the server was started with.";
  }
}

async function api(url, init = {}) {
  let r = await fetch(url, init);
  if (r.status === 401) {
    proving = proving || proveToken().finally(() => { proving = null; });
    await proving;
    r = await fetch(url, init);
  }
  return r;
}
