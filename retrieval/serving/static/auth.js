// The pages of `retrieval serve` (search, duplicates) call the API through `api`.
"use strict";

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
