"use strict";
// The pinsface page: name faces in photos, enrol and forget people; with a library, its People view.
// No framework, no build step.

const KEY = "pinsface-api-key";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// --- API key: asked for once, when the server wants it, and kept for this tab only (sessionStorage).
// Requests refused at the same time (the health line and the people list, at load) share one prompt.
let keyPrompt = null;

function askKey(why) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-why").textContent = why;
  $("key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    const done = (value) => {
      $("key-form").onsubmit = null;
      $("key-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      keyPrompt = null;
      resolve(value);
    };
    $("key-form").onsubmit = (event) => { event.preventDefault(); done($("key-input").value.trim() || null); };
    $("key-cancel").onclick = () => done(null);
    dialog.onclose = () => done(null);
    dialog.showModal();
    $("key-input").focus();
  });
  return keyPrompt;
}

// One request, by XMLHttpRequest: unlike fetch it reports how much of an upload has been sent.
function send(method, url, body, headers, onUpload) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    if (onUpload) {
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) onUpload(e.loaded, e.total); };
      xhr.upload.onload = () => onUpload(1, 1);
    }
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = { code: "bad_response", message: xhr.statusText }; }
      resolve({ status: xhr.status, ok: xhr.status >= 200 && xhr.status < 300, data,
                retryAfter: xhr.getResponseHeader("Retry-After") });
    };
    xhr.onerror = () => reject(new Error("the server could not be reached"));
    xhr.send(body);
  });
}

async function api(method, url, body, onUpload, extraHeaders = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const headers = { ...extraHeaders };
    const key = sessionStorage.getItem(KEY);
    if (key) headers["X-API-Key"] = key;
    const response = await send(method, url, body, headers, onUpload);
    if (response.status === 401 || response.status === 403) {
      if (sessionStorage.getItem(KEY) !== key) continue;  // another request got the key meanwhile
      sessionStorage.removeItem(KEY);
      const why = response.status === 401
        ? "This server needs its API key (pinsface serve prints where it is kept). It is kept for this tab only."
        : "That API key was not accepted. Enter the server's API key.";
      const entered = await askKey(why);
      if (!entered) throw new Error("cancelled: no API key given");
      sessionStorage.setItem(KEY, entered);
      continue;
    }
    if (!response.ok) {
      const data = response.data;
      throw new Error(`${data.message || response.status}${response.retryAfter ? ` (retry in ${response.retryAfter} s)` : ""}`);
    }
    return response.data;
  }
  throw new Error("the API key was not accepted");
}

// --- Health line
async function refreshHealth() {
  try {
    const h = await api("GET", "/v1/health");
    $("health").textContent = `${h.identities} people known · unknown when probability < ${h.thresholds.probability}` +
      ` or distance > ${h.thresholds.distance} · version ${h.version}`;
    if (h.library && $("library").hidden) refreshLibrary();
  } catch (e) {
    $("health").textContent = `Server not reachable: ${e.message}`;
  }
}

// --- Naming faces
const fmt = (x) => Number(x).toFixed(2);
let tipCount = 0;

function faceBox(face, index, width, height) {
  const [x1, y1, x2, y2] = face.box;
  const known = face.identity !== null;
  const name = known ? face.identity : "unknown";
  const detail = `probability ${fmt(face.probability)}, distance ${fmt(face.distance)}` +
    (known ? "" : `, nearest: ${face.best_match}`);
  const tip = el("span", { class: "tip", role: "tooltip", id: `tip-${++tipCount}` });
  tip.append(el("strong", { text: known ? face.identity : `unknown (nearest: ${face.best_match})` }),
    el("br"), `probability ${fmt(face.probability)} · distance ${fmt(face.distance)}`);
  for (const alt of face.alternatives.slice(1)) {
    tip.append(el("br"), `${alt.identity}: p ${fmt(alt.probability)} · d ${fmt(alt.distance)}`);
  }
  const box = el("button", {
    type: "button", class: `face ${known ? "known" : "unknown"}${y1 < 0.08 * height ? " low" : ""}`,
    "aria-label": `Face ${index + 1}: ${name}, ${detail}`, "aria-describedby": tip.id,
    "data-identity": known ? face.identity : "",
    style: {
      left: `${(100 * Math.max(0, x1)) / width}%`, top: `${(100 * Math.max(0, y1)) / height}%`,
      width: `${(100 * (Math.min(width, x2) - Math.max(0, x1))) / width}%`,
      height: `${(100 * (Math.min(height, y2) - Math.max(0, y1))) / height}%`,
    },
  }, el("span", { class: "tag", "aria-hidden": "true", text: known ? face.identity : "unknown?" }), tip);
  return box;
}

function showResult(file, url, result, target) {
  const img = el("img", { src: url, alt: `Photo ${file.name}` });
  const frame = el("div", { class: "frame" }, img);
  const caption = el("figcaption", {}, el("strong", { text: file.name }));
  const figure = el("figure", { class: "photo" }, frame, caption);
  target.append(figure);
  if (result.error) {
    caption.append(el("div", { class: "error-text", text: `Not used: ${result.error.replaceAll("_", " ")}` }));
    return;
  }
  if (!result.faces.length) {
    caption.append(el("div", { class: "muted", text: result.note || "no face found" }));
    return;
  }
  const list = el("ol");
  for (const [i, face] of result.faces.entries()) {
    const known = face.identity !== null;
    list.append(el("li", {}, el("span", {
      class: known ? "who-known" : "who-unknown", text: known ? face.identity : "unknown",
    }), ` (p ${fmt(face.probability)}, d ${fmt(face.distance)}${known ? "" : `, nearest ${face.best_match}`})`));
  }
  caption.append(list);
  const draw = () => {
    for (const [i, face] of result.faces.entries()) {
      frame.append(faceBox(face, i, img.naturalWidth, img.naturalHeight));
    }
  };
  if (img.complete && img.naturalWidth) draw(); else img.addEventListener("load", draw, { once: true });
}

// The photos on show, named again after someone is enrolled or forgotten so that no stale name stays up.
const shown = { files: [], urls: [], seq: 0 };

async function identify(files, why = "") {
  files = [...files];
  if (!files.length) return;
  const seq = ++shown.seq;
  if (files !== shown.files) {
    shown.urls.forEach((u) => URL.revokeObjectURL(u));
    shown.files = files;
    shown.urls = files.map((f) => URL.createObjectURL(f));
  }
  const urls = shown.urls;
  say(`Naming the faces in ${files.length} photo(s)…`);
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  try {
    const data = await api("POST", "/v1/identify", form);
    if (seq !== shown.seq) return;  // a newer request owns the results area
    const target = $("identify-results");
    target.replaceChildren();
    data.results.forEach((result, i) => showResult(files[i], urls[i], result, target));
    const faces = data.results.reduce((n, r) => n + r.faces.length, 0);
    const named = data.results.reduce((n, r) => n + r.faces.filter((f) => f.identity !== null).length, 0);
    say(`${why}${files.length} photo(s): ${faces} face(s) found, ${named} named, ${faces - named} unknown.`);
  } catch (e) {
    if (seq === shown.seq) say(`Could not name the faces: ${e.message}`, true);
  }
}

function renameShown(why) {
  if (shown.files.length) identify(shown.files, why);
}

// --- Enrolment
function clusterPlot(cluster, name) {
  const W = 420, H = 260, pad = 28;
  const pts = [...cluster.faces, ...cluster.neighbours];
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const span = Math.max(x1 - x0, y1 - y0, 1e-6);
  const sx = (x) => pad + ((x - x0) / span) * (W - 2 * pad), sy = (y) => H - pad - ((y - y0) / span) * (H - 2 * pad);
  const newCount = cluster.faces.filter((f) => f.new).length;
  const plot = svg("svg", {
    class: "cluster", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `2-D projection of ${name}'s ${cluster.faces.length} faces (${newCount} new, filled) ` +
      `and the mean faces of the nearest other people: ${cluster.neighbours.map((n) => n.name).join(", ")}`,
  });
  for (const f of cluster.faces) {
    const dot = svg("circle", { cx: sx(f.x), cy: sy(f.y), r: f.new ? 5 : 4, class: f.new ? "new" : "old" });
    dot.append(svg("title", {}, `${f.new ? "new" : "earlier"} face, distance to ${name}'s mean ${fmt(f.distance_to_mean)}`));
    plot.append(dot);
  }
  // The person's name above their faces, clear of the dots.
  const left = Math.min(...cluster.faces.map((f) => sx(f.x)));
  const top = Math.min(...cluster.faces.map((f) => sy(f.y)));
  plot.append(svg("text", { class: "own", x: Math.min(Math.max(left - 6, 4), W - 120), y: Math.max(top - 12, 12) },
    name));
  for (const n of cluster.neighbours) {
    plot.append(svg("rect", { x: sx(n.x) - 5, y: sy(n.y) - 5, width: 10, height: 10, class: "neighbour" }));
    plot.append(svg("text", { x: Math.min(sx(n.x) + 8, W - 90), y: sy(n.y) + 4 }, n.name));
  }
  return plot;
}

async function enrol(event) {
  event.preventDefault();
  const name = $("enrol-name").value.trim();
  const files = [...$("enrol-files").files];
  if (!name) { say("Enter the person's name.", true); $("enrol-name").focus(); return; }
  if (!files.length) { say("Choose photos of that person.", true); $("enrol-files").focus(); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const button = $("enrol-submit");
  button.disabled = true;
  const bar = $("enrol-progress");
  const megabytes = (files.reduce((n, f) => n + f.size, 0) / 1048576).toFixed(1);
  bar.hidden = false;
  bar.value = 0;
  say(`Uploading ${files.length} photo(s) of ${name} (${megabytes} MB)…`);
  const uploaded = (sent, total) => {
    bar.value = sent / total;
    if (sent >= total) {
      bar.removeAttribute("value");  // indeterminate: the server is at work, for how long it cannot say
      say(`Finding ${name}'s face in ${files.length} photo(s)…`);
    }
  };
  try {
    const s = await api("POST", `/v1/identities/${encodeURIComponent(name)}/faces`, form, uploaded);
    const out = $("enrol-result");
    out.dataset.identity = s.identity;
    const newFaces = s.cluster.faces.filter((f) => f.new);
    const dists = newFaces.map((f) => f.distance_to_mean);
    out.replaceChildren(
      el("h3", { text: `${s.new_identity ? "Enrolled" : "Added photos to"} ${s.identity}` }),
      el("p", { text: `${s.faces_used} face(s) used from ${s.photos} photo(s); ${s.identity} now has ${s.faces} ` +
        `face(s); ${s.identities} people known.` }),
      el("div", { class: "thumbs" }, ...files.map((f) => el("img", { src: URL.createObjectURL(f), alt: f.name }))),
      el("p", { class: "muted", text: `How ${s.identity}'s faces cluster: filled dots are the new faces, rings ` +
        "earlier ones, grey squares the nearest other people." + (dists.length ? ` New faces lie ` +
        `${fmt(Math.min(...dists))}–${fmt(Math.max(...dists))} from ${s.identity}'s mean face; the naming ` +
        `threshold is ${fmt(s.cluster.threshold_distance)}.` : "") }),
      clusterPlot(s.cluster, s.identity),
    );
    if (s.duplicates.length) {
      out.append(el("p", { class: "muted", text: `${s.duplicates.length} photo(s) were enrolled before and ` +
        "were not added again." }));
    }
    for (const w of s.warnings) out.prepend(el("p", { class: "warning", role: "alert", text: w.message }));
    say(`Enrolled ${s.identity}.`);
    $("enrol-form").reset();
    await Promise.all([refreshPeople(), refreshHealth()]);
    renameShown(`Enrolled ${s.identity}; named the photos again. `);
  } catch (e) {
    say(`Could not enrol ${name}: ${e.message}`, true);
  } finally {
    button.disabled = false;
    bar.hidden = true;
  }
}

// --- People
let people = [];

function renderPeople() {
  const query = $("people-search").value.trim().toLowerCase();
  const shown = people.filter((p) => p.name.toLowerCase().includes(query));
  $("people-count").textContent = `${shown.length} of ${people.length} people`;
  $("people-list").replaceChildren(...shown.map((p) => el("li", {},
    el("span", { class: "name", text: p.name }),
    el("span", { class: "muted", text: `${p.faces} faces` }),
    el("span", { class: `badge${p.enrolled ? " enrolled" : ""}`, text: p.enrolled ? "enrolled" : "trained" }),
    Object.assign(el("button", { type: "button", class: "secondary", "aria-label": `Forget ${p.name}`,
                                 text: "Forget" }), { onclick: () => forget(p) }),
  )));
}

async function refreshPeople() {
  try {
    people = (await api("GET", "/v1/identities")).identities;
    people.sort((a, b) => a.name.localeCompare(b.name));
    renderPeople();
  } catch (e) {
    $("people-count").textContent = `Could not list people: ${e.message}`;
  }
}

function confirmForget(p) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = `Forget ${p.name}?`;
  $("confirm-text").textContent = `${p.name}'s ${p.faces} faces are removed from the run and nobody will be ` +
    "named as them any more" + ($("library").hidden ? "" : "; in the photo library their faces lose their name " +
    "and descriptors") + ". This cannot be undone.";
  dialog.returnValue = "cancel";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function forget(p) {
  if (!(await confirmForget(p))) { say(`Kept ${p.name}.`); return; }
  say(`Forgetting ${p.name}…`);
  try {
    const s = await api("DELETE", `/v1/identities/${encodeURIComponent(p.name)}`);
    say(`Forgot ${s.identity}; ${s.identities} people known.`);
    const enrolled = $("enrol-result").dataset.identity;
    if (enrolled && enrolled.toLowerCase() === s.identity.toLowerCase()) $("enrol-result").replaceChildren();
    await Promise.all([refreshPeople(), refreshHealth(), $("library").hidden ? null : refreshLibrary()]);
    $("people-search").focus();
    renameShown(`Forgot ${s.identity}; named the photos again. `);
  } catch (e) {
    say(`Could not forget ${p.name}: ${e.message}`, true);
  }
}

// --- Photo library (pinsface serve --db): clusters and people with face thumbnails, naming, merging, moving
// one face, finding a person's photos. Thumbnails come by id from the server, fetched with the key as blobs.
const library = { groups: [], selected: null, urls: new Map(), queue: [], loading: 0 };
const LIB = "/v1/library";

function pumpThumbs() {
  while (library.loading < 6 && library.queue.length) {
    const { url, img } = library.queue.shift();
    library.loading++;
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers["X-API-Key"] = key;
    fetch(url, { headers })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
      .then((blob) => { const u = URL.createObjectURL(blob); library.urls.set(url, u); img.src = u; })
      .catch(() => img.classList.add("broken"))
      .finally(() => { library.loading--; pumpThumbs(); });
  }
}

function thumbImage(url, alt) {
  const img = el("img", { alt });
  if (library.urls.has(url)) img.src = library.urls.get(url);
  else { library.queue.push({ url, img }); pumpThumbs(); }
  return img;
}

const groupTitle = (g) => g.kind === "person" ? g.name : g.kind === "cluster" ? `Cluster ${g.cluster}` : "Not clustered";

function selectFace(id) {
  library.selected = library.selected === id ? null : id;
  for (const b of document.querySelectorAll("#library-groups .thumb")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.face) === library.selected));
  }
  $("face-actions").hidden = library.selected === null;
  $("face-selected").textContent = library.selected === null ? "" : `Face ${library.selected}:`;
}

function groupCard(g) {
  const title = groupTitle(g);
  const thumbs = el("div", { class: "thumbs" }, ...g.face_ids.map((id) => Object.assign(el("button", {
    type: "button", class: "thumb", "data-face": id, "aria-pressed": String(id === library.selected),
    "aria-label": `Face ${id} (${title})`,
  }, thumbImage(`${LIB}/faces/${id}/thumbnail`, "")), { onclick: () => selectFace(id) })));
  const more = g.faces > g.face_ids.length ? el("span", { class: "muted", text: `+${g.faces - g.face_ids.length}` }) : null;
  const card = el("li", { class: `group ${g.kind}`, "data-kind": g.kind, "data-cluster": g.cluster ?? "" },
    el("h3", {}, title, " ", el("span", { class: "muted", text: `${g.faces} face(s)` +
      (g.kind === "person" && g.clusters.length ? ` · cluster ${g.clusters.join(", ")}` : "") })),
    thumbs, more);
  if (g.kind !== "cluster") return card;
  const input = el("input", { "aria-label": `Name for cluster ${g.cluster}`, list: "library-names", maxlength: "100",
                              autocomplete: "off", placeholder: "Name" });
  const nameForm = el("form", { class: "inline" }, input, el("button", { type: "submit", text: "Name" }));
  nameForm.onsubmit = (e) => { e.preventDefault(); nameCluster(g.cluster, input.value.trim()); };
  const targets = library.groups.filter((o) => o.cluster !== null && o.cluster !== g.cluster);
  const select = el("select", { "aria-label": `Merge cluster ${g.cluster} into` },
    el("option", { value: "", text: "Merge into…" }),
    ...targets.map((o) => el("option", { value: o.cluster, text: o.kind === "person" ? `${o.name} (cluster ${o.cluster})` : `Cluster ${o.cluster}` })));
  const mergeForm = el("form", { class: "inline" }, select, el("button", { type: "submit", class: "secondary", text: "Merge" }));
  mergeForm.onsubmit = (e) => { e.preventDefault(); if (select.value) merge(Number(select.value), g.cluster); };
  card.append(el("div", { class: "group-actions" }, nameForm, mergeForm));
  return card;
}

async function refreshLibrary() {
  let data;
  try {
    data = await api("GET", `${LIB}/people?limit=200&per_group=12`);
  } catch (e) {
    say(`Could not list the library: ${e.message}`, true);
    return;
  }
  $("library").hidden = false;
  library.groups = data.groups;
  $("library-summary").textContent = `${data.faces} faces · ${data.people} people named · ${data.clusters} clusters ` +
    "without a name" + (data.total_groups > data.groups.length ? ` (first ${data.groups.length} groups shown)` : "");
  $("library-names").replaceChildren(...data.groups.filter((g) => g.kind === "person").map((g) => el("option", { value: g.name })));
  if (library.selected !== null && !data.groups.some((g) => g.face_ids.includes(library.selected))) selectFace(library.selected);
  $("library-groups").replaceChildren(...data.groups.map(groupCard));
  if (library.lastFind) await showFound(...library.lastFind);
}

async function libraryAction(doing, method, url, body, done) {
  say(doing);
  try {
    const s = await api(method, url, JSON.stringify(body), undefined, { "Content-Type": "application/json" });
    say(done(s));
    if (library.selected !== null) selectFace(library.selected);  // the face has moved: nothing selected now
    await refreshLibrary();
    return s;
  } catch (e) {
    say(`Could not do that: ${e.message}`, true);
    return null;
  }
}

async function nameCluster(cluster, name) {
  if (!name) { say("Enter the person's name.", true); return; }
  const s = await libraryAction(`Naming cluster ${cluster} ${name}…`, "POST", `${LIB}/clusters/${cluster}/name`, { name },
    (r) => `Named cluster ${r.cluster} ${r.name} (${r.faces} faces)` + (r.enrolled ? `; ${r.enrolled.faces_used} enrolled into the run.` : "."));
  if (s && s.enrolled) { await Promise.all([refreshPeople(), refreshHealth()]); renameShown(`Enrolled ${s.name}; named the photos again. `); }
}

function merge(into, other) {
  return libraryAction(`Merging cluster ${other} into ${into}…`, "POST", `${LIB}/clusters/${into}/merge`, { other },
    (r) => `Merged cluster ${r.merged} into cluster ${r.cluster}.`);
}

function moveFace(name) {
  const face = library.selected;
  return libraryAction(`Moving face ${face}…`, "POST", `${LIB}/faces/${face}/move`, { name: name || null },
    (r) => `Moved face ${r.face} to ${r.name || "a new cluster"} (cluster ${r.cluster}).`);
}

function unassignFace() {
  const face = library.selected;
  return libraryAction(`Unassigning face ${face}…`, "POST", `${LIB}/faces/${face}/unassign`, {},
    (r) => `Face ${r.face} is in no cluster now.`);
}

function findPhotos(event) {
  event.preventDefault();
  library.lastFind = [$("find-name").value.trim(), $("find-with").value.trim()];
  return showFound(...library.lastFind);
}

// The photos of a person, shown again after every change to the library so that no stale answer stays up.
async function showFound(name, other) {
  const query = new URLSearchParams({ name });
  if (other) query.append("with", other);
  try {
    const data = await api("GET", `${LIB}/photos?${query}`);
    $("find-count").textContent = `${data.count} photo(s) of ${name}${other ? ` with ${other}` : ""}` +
      (data.count > data.photos.length ? ` (first ${data.photos.length} shown)` : "");
    $("find-results").replaceChildren(...data.photos.map((p) => {
      const [w, h] = p.size;
      const frame = el("div", { class: "frame" }, thumbImage(`${LIB}/photos/${p.photo_id}/thumbnail`, `Photo ${p.source}`));
      for (const f of p.faces) {
        const [x1, y1, x2, y2] = f.box;
        frame.append(el("span", { class: "libbox", "data-face": f.id, title: `${f.person} (face ${f.id})`, style: {
          left: `${(100 * Math.max(0, x1)) / w}%`, top: `${(100 * Math.max(0, y1)) / h}%`,
          width: `${(100 * (Math.min(w, x2) - Math.max(0, x1))) / w}%`, height: `${(100 * (Math.min(h, y2) - Math.max(0, y1))) / h}%`,
        } }, el("span", { class: "tag", text: f.person })));
      }
      return el("figure", { class: "photo found" }, frame, el("figcaption", { text: p.source }));
    }));
  } catch (e) {
    say(`Could not find the photos: ${e.message}`, true);
  }
}

// --- Wiring
function setup() {
  $("identify-files").addEventListener("change", (e) => identify(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); identify(e.dataTransfer.files); });
  $("enrol-form").addEventListener("submit", enrol);
  $("people-search").addEventListener("input", renderPeople);
  $("key-button").addEventListener("click", async () => {
    const entered = await askKey("Enter the server's API key. It is kept for this browser tab only.");
    if (entered) { sessionStorage.setItem(KEY, entered); say("API key set for this tab."); }
  });
  $("find-form").addEventListener("submit", findPhotos);
  $("face-new-cluster").addEventListener("click", () => moveFace(null));
  $("face-move").addEventListener("click", () => {
    const name = $("face-person").value.trim();
    if (name) moveFace(name); else say("Enter the person to move the face to.", true);
  });
  $("face-unassign").addEventListener("click", unassignFace);
  refreshHealth();
  refreshPeople();
}

document.addEventListener("DOMContentLoaded", setup);
