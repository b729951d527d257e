// Playground: send one photo or several views of one scene to POST /runsync; show each view's
// colorised depth with confidence and sky overlays and the depth under the cursor, the scene
// (the returned scene_glb, loaded by three.js's GLTFLoader: points and one frustum per camera),
// and a download for every returned output. The API key stays in its input field and this tab's
// sessionStorage (gone when the tab closes) and goes out as the X-API-Key header; a running
// request can be cancelled (the server cancels a job whose client went away). `window.__playground` holds the last request, response and scene
// (for tests and the curious).
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";

const $ = (id) => document.getElementById(id);
const STEM = "da3";
// Output name -> the file name suffix, as the Python client's `save_all` writes it (never a name
// the server chose): per view "da3.<suffix>" (one view) or "da3.view<i>.<suffix>"; the scene
// outputs "da3.<suffix>".
const VIEW_FILES = {
  depth: "depth.png", preview: "preview.png", confidence: "confidence.png", sky_mask: "sky.png",
  depth_npy: "depth.npy", pointcloud: "ply", confidence_npy: "confidence.npy",
  depth_exr: "depth.exr", depth_mm_png: "depth_mm.png",
};
const SCENE_FILES = {
  scene_ply: "scene.ply", scene_glb: "glb", colmap: "colmap.zip", gaussians_ply: "gaussians.ply",
};
// Optional outputs offered as downloads: [name, label, what the model needs (see /models)]; the
// whole scene's first, as the request asks for them.
const EXTRAS = [
  ["scene_ply", "the scene's points (PLY)", "camera"],
  ["colmap", "COLMAP model (zip)", "camera"],
  ["gaussians_ply", "3D Gaussians (3DGS PLY)", "gaussians"],
  ["depth_exr", "float32 depth (OpenEXR)", null],
  ["depth_npy", "float32 depth (.npy)", null],
  ["depth_mm_png", "millimetres (16-bit PNG)", "meters"],
  ["confidence_npy", "float32 confidence (.npy)", "confidence"],
  ["pointcloud", "each view's points (PLY)", "camera"],
];
const UNITS = { m: "m", relative: "rel.", pose_units: "pose units" };
// /models's `availability` -> the menu's words (an unavailable model is refused by the server).
const AVAILABILITY = {
  available: "", downloadable: " (downloads on first use)", unavailable: " (not on this server)",
};
// The preview's colours span these percentiles of each view's depth (api/encoding.py).
const LEGEND_PERCENTILES = [0.02, 0.98];
const KEY_STORAGE = "da3-api-key";
// What each need means, for the tooltip of an output the chosen model cannot give.
const NEEDS = {
  camera: "a camera", confidence: "confidence", meters: "meters",
  gaussians: "the 3D-Gaussian head (DA3-GIANT, DA3NESTED-GIANT-LARGE)",
};

const state = {
  models: new Map(), // model_id -> its /models row
  photos: [], // {name, dataUri}
  request: null, // the last request body sent
  response: null, // its response
  views: [], // per view of the response: its fields
  depths: [], // per view: Promise of {width, height, values: Float32Array}
  selected: 0,
  scene: null, // {objects, points, cameras: [names]} of the loaded scene_glb
  running: null, // the AbortController of the request in flight
};
window.__playground = state;
let viewer = null;

function element(tag, properties) {
  return Object.assign(document.createElement(tag), properties);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// An error for a person at a browser: one sentence, no server paths, no code names.
function readable(message) {
  const first = String(message).split("\n")[0].replace(/(^|[\s(])\/[^\s/,;:)]+\/[^\s,;:)]*/g, "$1…");
  return /[.!?]$/.test(first) ? first : `${first}.`;
}

// A response warning without advice on server settings (a browser user cannot change them).
function forBrowser(warning) {
  const text = warning.replace(/MAX_RESPONSE_BYTES \((\d+) bytes\)/, "the response size limit");
  const clauses = text.split("; ").filter((clause) => !/\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b/.test(clause));
  return clauses.join("; ");
}

// ---- models and options -------------------------------------------------------------------

async function loadModels() {
  const response = await fetch("/models");
  for (const model of await response.json()) {
    state.models.set(model.model_id, model);
    const availability = model.availability || "available";
    const label = `${model.short_name}${model.metric ? " (metric)" : ""}`;
    const option = new Option(`${label}${AVAILABILITY[availability] || ""}`, model.model_id);
    option.dataset.availability = availability;
    option.selected = Boolean(model.default);
    $("model").append(option);
  }
  modelChanged();
}

function currentModel() {
  return state.models.get($("model").value) || {};
}

// Show the license, ask for meters only from models that can give them, offer the outputs
// this model can give.
function modelChanged() {
  const model = currentModel();
  $("license").textContent = model.license ? `License: ${model.license}` : "";
  const meters = Boolean(model.metric || model.needs_focal_length);
  $("metric").checked = meters;
  $("metric").disabled = !meters;
  updateExtras();
}

function can(need, model) {
  if (need === "meters") return Boolean(model.metric || model.needs_focal_length) && $("metric").checked;
  return need === null || Boolean(model[need]);
}

function buildExtras() {
  for (const [name, label, need] of EXTRAS) {
    const box = element("input", { type: "checkbox", value: name });
    box.dataset.need = need || "";
    const row = document.createElement("label");
    row.className = "inline";
    row.append(box, ` ${label}`);
    $("extras").append(row);
  }
}

function updateExtras() {
  const model = currentModel();
  for (const box of $("extras").querySelectorAll("input")) {
    box.disabled = !can(box.dataset.need || null, model);
    const need = NEEDS[box.dataset.need] || box.dataset.need;
    box.parentElement.title = box.disabled ? `needs a model with ${need}` : "";
  }
}

// ---- photos -------------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, dataUri: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function choosePhotos(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/") || file.type === "");
  if (!images.length) return;
  state.photos = await Promise.all(images.map(readFile));
  state.response = null;
  state.views = [];
  state.depths = [];
  renderThumbnails();
  selectView(0);
  clearResult();
  $("run").disabled = false;
  const kib = Math.round(images.reduce((sum, file) => sum + file.size, 0) / 1024);
  const what = images.length === 1 ? images[0].name : `${images.length} views of one scene`;
  setStatus(`${what} (${kib} KiB) ready`);
}

function renderThumbnails() {
  const list = $("views");
  list.replaceChildren();
  state.photos.forEach((photo, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.view = String(index);
    const image = element("img", { src: photo.dataUri, alt: `view ${index}` });
    const caption = element("span", { textContent: `${index}: ${photo.name}` });
    button.append(image, caption);
    button.addEventListener("click", () => selectView(index));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  });
  list.classList.toggle("filled", state.photos.length > 0);
}

function setFrame(frame, filled, hint) {
  frame.classList.toggle("filled", filled);
  if (hint) frame.dataset.hint = hint;
}

// ---- one request ----------------------------------------------------------------------------

function buildRequest() {
  const model = currentModel();
  // The response budget fills in the order requested: the scene first (it counts once, a view's
  // outputs once per view), then what the depth view shows, then the per-view downloads.
  const boxes = $("extras").querySelectorAll("input:checked:not(:disabled)");
  const chosen = [...boxes].map((box) => box.value);
  const scene = chosen.filter((name) => name in SCENE_FILES);
  const outputs = ["depth", ...(model.camera ? ["scene_glb"] : []), ...scene, "preview"];
  if (model.confidence) outputs.push("confidence");
  if (model.sky) outputs.push("sky_mask");
  outputs.push(...chosen.filter((name) => !(name in SCENE_FILES)));
  return {
    images: state.photos.map((photo) => ({ base64: photo.dataUri })),
    model_id: $("model").value || undefined,
    process_res: Number($("process-res").value),
    output_metric: $("metric").checked,
    use_ray_pose: $("ray-pose").checked,
    outputs,
    max_points: Number($("max-points").value),
    conf_percentile: Number($("conf-percentile").value),
  };
}

async function run(event) {
  event.preventDefault();
  if (!state.photos.length) return;
  const body = buildRequest();
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  document.body.dataset.state = "running";
  $("run").disabled = true;
  $("cancel").hidden = false;
  setStatus("running…");
  state.running = new AbortController();
  try {
    state.request = body;
    const response = await fetch("/runsync", {
      method: "POST", headers, body: JSON.stringify(body), signal: state.running.signal,
    });
    const result = await response.json();
    if (!response.ok) throw new Error((result.error || {}).message || response.statusText);
    await show(result);
    document.body.dataset.state = "done";
  } catch (error) {
    const cancelled = error.name === "AbortError";
    document.body.dataset.state = cancelled ? "cancelled" : "error";
    setStatus(cancelled ? "Cancelled." : readable(error.message || error), !cancelled);
  } finally {
    state.running = null;
    $("run").disabled = false;
    $("cancel").hidden = true;
  }
}

// Closing the connection cancels the job on the server (it stops at its next check).
function cancel() {
  if (state.running) state.running.abort();
}

function clearResult() {
  state.scene = null;
  $("downloads").replaceChildren();
  $("downloads").classList.remove("filled");
  clearScene();
  setFrame($("cloud"), false, "The 3D scene shows here once estimated");
  for (const name of ["points", "objects", "cameras"]) delete $("cloud").dataset[name];
}

async function show(result) {
  clearResult();
  state.response = result;
  state.views = result.views || [result];
  state.depths = state.views.map(() => null);
  selectView(Math.min(state.selected, state.views.length - 1));
  renderDownloads(result);
  const unit = UNITS[result.units] || result.units;
  const total = result.timings_ms ? ` in ${Math.round(result.timings_ms.total)} ms` : "";
  const points = (result.scene ? `, ${result.scene.points} scene points` : "")
    + (result.gaussians ? `, ${result.gaussians.points} Gaussians` : "");
  const notes = (result.warnings || []).map(forBrowser).filter(Boolean);
  const warnings = notes.length ? ` (${notes.join("; ")})` : "";
  const range = `${result.min_depth.toFixed(2)}–${result.max_depth.toFixed(2)} ${unit}`;
  setStatus(`${result.model_id}: ${state.views.length} view(s), depth ${range}${points}${total}${warnings}`);
  await showScene(result);
}

// ---- the depth view ---------------------------------------------------------------------------

function selectView(index) {
  state.selected = index;
  for (const button of $("views").querySelectorAll("button")) {
    button.classList.toggle("selected", Number(button.dataset.view) === index);
  }
  const photo = state.photos[index];
  if (photo) $("input").src = photo.dataUri;
  setFrame($("input-frame"), Boolean(photo));
  const view = state.views[index];
  const preview = view && view.preview && view.preview.base64;
  if (preview) $("depth").src = `data:image/png;base64,${preview}`;
  const hint = view && !preview ? "The preview was stored, not sent: see Downloads" : null;
  setFrame($("depth-frame"), Boolean(preview), hint || "The depth map shows here once estimated");
  for (const radio of document.querySelectorAll("input[name=overlay]")) {
    radio.disabled = radio.value !== "none" && !(view && view[radio.value] && view[radio.value].base64);
    if (radio.disabled && radio.checked) $("overlays").querySelector("[value=none]").checked = true;
  }
  showOverlay();
  $("readout").textContent = view ? "hover over the map" : "";
  if (view && !state.depths[index]) {
    state.depths[index] = viewDepth(view).catch((error) => {
      $("readout").textContent = `no depth readout: ${error.message || error}`;
      return null;
    });
  }
  showLegend(index);
}

// The colour legend of the selected view: the depths its preview's colours span (the 2nd and
// 98th percentiles, as the server colours it), near to far, in the response's units.
async function showLegend(index) {
  $("legend").hidden = true;
  const depth = state.depths[index] && await state.depths[index];
  if (!depth || index !== state.selected || !state.views[index].preview) return;
  const step = Math.max(1, Math.floor(depth.values.length / 200_000));
  const sample = depth.values.filter((value, i) => i % step === 0 && Number.isFinite(value));
  sample.sort();
  const [near, far] = LEGEND_PERCENTILES.map((q) => sample[Math.floor(q * (sample.length - 1))]);
  const unit = UNITS[state.response.units] || state.response.units;
  $("legend-near").textContent = `near ${near.toFixed(2)} ${unit}`;
  $("legend-far").textContent = `far ${far.toFixed(2)} ${unit}`;
  $("legend").dataset.near = String(near);
  $("legend").dataset.far = String(far);
  $("legend").hidden = false;
}

function showOverlay() {
  const name = document.querySelector("input[name=overlay]:checked").value;
  const view = state.views[state.selected];
  const entry = name !== "none" && view ? view[name] : null;
  $("overlay").hidden = !(entry && entry.base64);
  if (entry && entry.base64) $("overlay").src = `data:image/png;base64,${entry.base64}`;
  $("depth-frame").dataset.overlay = entry ? name : "none";
}

// The view's depth from its 16-bit PNG (always sent first), decoded linearly: depth = min +
// v (max - min) / 65535, off by at most half a step; depth_npy is a download only.
async function viewDepth(view) {
  if (!view.image_base64) throw new Error("the depth map was stored, not sent");
  const png = await decodePng16(base64Bytes(view.image_base64));
  const step = (view.max_depth - view.min_depth) / 65535;
  const values = Float32Array.from(png.values, (v) => view.min_depth + v * step);
  return { height: png.height, width: png.width, values };
}

async function hover(event) {
  const index = state.selected;
  const depth = state.depths[index] && await state.depths[index];
  if (!depth || index !== state.selected) return;
  const box = $("depth").getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * depth.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * depth.height);
  if (x < 0 || y < 0 || x >= depth.width || y >= depth.height) return;
  const value = depth.values[y * depth.width + x];
  const unit = UNITS[state.response.units] || state.response.units;
  $("readout").textContent = `view ${index} (${x}, ${y}) ${value.toFixed(3)} ${unit}`;
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// A 16-bit grayscale, non-interlaced PNG (the depth map) -> {width, height, values: Uint16Array}.
// Browsers' canvases give 8 bits per channel only, so the scanlines are inflated
// (DecompressionStream) and unfiltered here.
async function decodePng16(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const data = [];
  let header = null;
  for (let at = 8; at < bytes.length; ) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const body = bytes.subarray(at + 8, at + 8 + length);
    if (type === "IHDR") {
      header = { width: view.getUint32(at + 8), height: view.getUint32(at + 12),
                 bits: body[8], color: body[9], interlace: body[12] };
    }
    if (type === "IDAT") data.push(body);
    if (type === "IEND") break;
    at += 12 + length;
  }
  if (!header || header.bits !== 16 || header.color !== 0 || header.interlace !== 0) {
    throw new Error("the depth map is not a 16-bit grayscale PNG");
  }
  const stream = new Blob(data).stream().pipeThrough(new DecompressionStream("deflate"));
  const raw = new Uint8Array(await new Response(stream).arrayBuffer());
  const { width, height } = header;
  const stride = width * 2;
  const values = new Uint16Array(width * height);
  let previous = new Uint8Array(stride);
  for (let y = 0; y < height; y++) {
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    unfilter(raw[y * (stride + 1)], line, previous, 2);
    for (let x = 0; x < width; x++) values[y * width + x] = (line[2 * x] << 8) | line[2 * x + 1];
    previous = line;
  }
  return { width, height, values };
}

// Undo one scanline's PNG filter in place (`bpp` bytes per pixel; `up` is the line above).
function unfilter(filter, line, up, bpp) {
  for (let i = 0; i < line.length; i++) {
    const a = i >= bpp ? line[i - bpp] : 0;
    const b = up[i];
    const c = i >= bpp ? up[i - bpp] : 0;
    let predictor = 0;
    if (filter === 1) predictor = a;
    else if (filter === 2) predictor = b;
    else if (filter === 3) predictor = (a + b) >> 1;
    else if (filter === 4) {
      const p = a + b - c;
      const [pa, pb, pc] = [Math.abs(p - a), Math.abs(p - b), Math.abs(p - c)];
      predictor = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
    } else if (filter !== 0) throw new Error(`unknown PNG filter ${filter}`);
    line[i] = (line[i] + predictor) & 0xff;
  }
}

// ---- downloads --------------------------------------------------------------------------------

// Every returned output: {output, view (null for the scene), file, base64 | path | url, media}.
function outputEntries(result) {
  const views = result.views || [result];
  const entries = [];
  views.forEach((view, index) => {
    const name = views.length === 1 ? STEM : `${STEM}.view${index}`;
    entries.push({
      output: "depth", view: index, file: `${name}.${VIEW_FILES.depth}`, media: "image/png",
      base64: view.image_base64, path: view.file_path, url: view.file_url,
    });
    for (const [output, suffix] of Object.entries(VIEW_FILES)) {
      if (output === "depth" || !view[output]) continue;
      entries.push({ output, view: index, file: `${name}.${suffix}`, ...placed(view[output]) });
    }
  });
  for (const [output, suffix] of Object.entries(SCENE_FILES)) {
    if (!result[output]) continue;
    entries.push({ output, view: null, file: `${STEM}.${suffix}`, ...placed(result[output]) });
  }
  return entries;
}

function placed(entry) {
  return { base64: entry.base64, path: entry.path, url: entry.url, media: entry.media_type };
}

function renderDownloads(result) {
  const list = $("downloads");
  for (const entry of outputEntries(result)) {
    const item = document.createElement("li");
    item.dataset.output = entry.output;
    item.dataset.view = entry.view === null ? "scene" : String(entry.view);
    item.dataset.file = entry.file;
    const label = entry.view === null ? entry.output : `${entry.output} (view ${entry.view})`;
    item.append(element("span", { className: "name", textContent: label }));
    if (entry.base64) {
      const button = element("button", { type: "button", textContent: `Download ${entry.file}` });
      button.title = `${Math.round((entry.base64.length * 3) / 4 / 1024)} KiB`;
      button.addEventListener("click", () => download(entry));
      item.append(button);
    } else {
      item.append(storedLink(entry));
    }
    list.append(item);
  }
  list.classList.toggle("filled", list.children.length > 0);
}

// An output the server stored instead of sending: a download by its URL (this server's signed
// link, or a bucket's), else its path.
function storedLink(entry) {
  const where = document.createElement("span");
  where.className = "stored";
  if (entry.url && /^https?:\/\//.test(entry.url)) {
    const here = new URL(entry.url).origin === location.origin;
    const link = element("a", { href: entry.url, textContent: `Download ${entry.file}`,
                                rel: "noopener noreferrer", className: "download" });
    if (here) link.download = entry.file;
    else link.target = "_blank";
    where.append(here ? "stored on the server: " : "stored in the bucket: ", link);
  } else {
    where.append("stored on the server: ", element("code", { textContent: entry.path || "(nowhere)" }));
  }
  return where;
}

function download(entry) {
  const type = entry.media || "application/octet-stream";
  const blob = new Blob([base64Bytes(entry.base64)], { type });
  const url = URL.createObjectURL(blob);
  const link = element("a", { href: url, download: entry.file });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// ---- the 3D scene -------------------------------------------------------------------------------

async function showScene(result) {
  const glb = result.scene_glb;
  if (!glb || !glb.base64) {
    const model = currentModel();
    const hint = glb ? "scene_glb was stored, not sent: see Downloads"
      : `${model.short_name || "this model"} predicts no camera, so there is no 3D scene: ` +
        "pick a model with a camera";
    setFrame($("cloud"), false, hint);
    return;
  }
  const bytes = base64Bytes(glb.base64);
  const gltf = await new GLTFLoader().parseAsync(bytes.buffer, "");
  const v = getViewer();
  v.content = gltf.scene;
  v.scene.add(gltf.scene);
  const objects = [];
  gltf.scene.traverse((object) => { if (object.isPoints || object.isLine) objects.push(object); });
  let points = null;
  for (const object of objects) {
    if (object.isPoints) {
      points = object;
      object.material.size = 2;
    } else {
      object.material.color.set(0xffa040);
    }
  }
  const count = points ? points.geometry.attributes.position.count : 0;
  const cameras = objects.filter((object) => object.isLine).map((object) => object.name);
  state.scene = { objects: objects.length, points: count, cameras };
  const counts = { objects: objects.length, points: count, cameras: cameras.length };
  for (const [name, value] of Object.entries(counts)) $("cloud").dataset[name] = String(value);
  setFrame($("cloud"), true);
  frameScene(v, points, result);
}

// Orbit around the scene's centre (the median point), starting behind the first camera.
function frameScene(v, points, result) {
  const center = new THREE.Vector3();
  let radius = 1;
  if (points) {
    const position = points.geometry.attributes.position;
    const step = Math.max(1, Math.floor(position.count / 5000));
    const axes = [[], [], []];
    for (let i = 0; i < position.count; i += step) {
      axes[0].push(position.getX(i)); axes[1].push(position.getY(i)); axes[2].push(position.getZ(i));
    }
    center.set(...axes.map((values) => values.sort((a, b) => a - b)[values.length >> 1]));
    const distances = axes[0].map((_, i) =>
      Math.hypot(axes[0][i] - center.x, axes[1][i] - center.y, axes[2][i] - center.z));
    radius = Math.max(distances.sort((a, b) => a - b)[Math.floor(distances.length * 0.95)] || 1, 1e-6);
  }
  const eye = firstCamera(result);
  const away = eye.clone().sub(center);
  if (away.length() < radius * 0.1) away.set(0, 0, radius);
  v.camera.position.copy(center).add(away.multiplyScalar(1.5));
  v.camera.near = radius / 1000;
  v.camera.far = radius * 100 + away.length();
  v.camera.updateProjectionMatrix();
  v.controls.target.copy(center);
  v.controls.update();
}

// The first view's camera centre (-Rᵀt) in glTF's axes, diag(1, -1, -1) · C.
function firstCamera(result) {
  const E = result.extrinsics;
  if (!E) return new THREE.Vector3();
  const c = [0, 1, 2].map((j) => -(E[0][j] * E[0][3] + E[1][j] * E[1][3] + E[2][j] * E[2][3]));
  return new THREE.Vector3(c[0], -c[1], -c[2]);
}

function clearScene() {
  if (!viewer || !viewer.content) return;
  viewer.scene.remove(viewer.content);
  viewer.content.traverse((object) => {
    if (object.geometry) object.geometry.dispose();
    if (object.material) object.material.dispose();
  });
  viewer.content = null;
}

function getViewer() {
  if (viewer) return viewer;
  const container = $("cloud");
  const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(window.devicePixelRatio);
  renderer.setSize(container.clientWidth, container.clientHeight);
  container.append(renderer.domElement);
  const camera = new THREE.PerspectiveCamera(60, container.clientWidth / container.clientHeight);
  const scene = new THREE.Scene();
  const controls = new OrbitControls(camera, renderer.domElement);
  renderer.setAnimationLoop(() => {
    controls.update();
    renderer.render(scene, camera);
  });
  new ResizeObserver(() => {
    renderer.setSize(container.clientWidth, container.clientHeight);
    camera.aspect = container.clientWidth / container.clientHeight;
    camera.updateProjectionMatrix();
  }).observe(container);
  viewer = { renderer, camera, scene, controls, content: null };
  return viewer;
}

// ---- wiring -------------------------------------------------------------------------------------

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choosePhotos(event.dataTransfer.files);
  });
  $("file").addEventListener("change", () => choosePhotos($("file").files));
}

function keepKey() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value));
}

buildExtras();
setupDrop();
keepKey();
$("cancel").addEventListener("click", cancel);
$("model").addEventListener("change", modelChanged);
$("metric").addEventListener("change", updateExtras);
$("controls").addEventListener("submit", run);
$("depth-frame").addEventListener("mousemove", hover);
for (const radio of $("overlays").querySelectorAll("input")) {
  radio.addEventListener("change", showOverlay);
}
loadModels().catch((error) => setStatus(readable(`could not load the model list: ${error}`), true));
