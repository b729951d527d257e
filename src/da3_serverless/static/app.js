// Playground: send one photo or several views of one scene to POST /runsync; show each view's
// colorised depth with confidence and sky overlays and the depth under the cursor, the scene
// (the returned scene_glb, loaded by three.js's GLTFLoader: points and one frustum per camera),
// and a download for every returned output. The API key stays in its input field and this tab's
// sessionStorage (gone when the tab closes) and goes out as the X-API-Key header; a running
// request can be cancelled (the server cancels a job whose client went away). A video, or a zip
// of frames, goes as a sequence job through POST /run, its progress polled on GET /status
// (frames done, chunk); then its preview_video plays and its camera trajectory (the trajectory
// zip's TUM poses) is drawn as a line beside the scene_ply points. `window.__playground` holds
// the last request, response and scene, `window.__trajectoryPoints` the trajectory line's
// vertices in the 3D scene (for tests and the curious).
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
// A sequence's outputs -> "da3.<suffix>", as the Python client's `VideoResult.save_all` names them.
const SEQUENCE_FILES = {
  trajectory: "trajectory.zip", depth_frames: "depth_frames.zip", depth_video: "depth_video.mkv",
  preview_video: "preview_video.webm",
};
// What a sequence asks for: the camera path, the depth to play, the scene's points.
const VIDEO_OUTPUTS = ["trajectory", "preview_video", "scene_ply"];
const POLL_MS = 250; // between two GET /status of a running sequence job
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
// The preview's colours span these percentiles of each view's depth (exports/encoding.py).
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
  sequence: null, // {name, dataUri, field} of a chosen video or zip of frames (then no photos)
  job: null, // the id of the sequence job in flight
  progress: [], // every progress line shown while the last sequence job ran
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
  const sequence = [...files].find((file) => file.type.startsWith("video/") || isZip(file));
  if (sequence) return chooseSequence(sequence);
  const images = [...files].filter((file) => file.type.startsWith("image/") || file.type === "");
  if (!images.length) return;
  state.photos = await Promise.all(images.map(readFile));
  state.sequence = null;
  inputChosen();
  const kib = Math.round(images.reduce((sum, file) => sum + file.size, 0) / 1024);
  const what = images.length === 1 ? images[0].name : `${images.length} views of one scene`;
  setStatus(`${what} (${kib} KiB) ready`);
}

// A new input (photos, a video, a zip of frames) was chosen: forget the last answer, show it.
function inputChosen() {
  state.response = null;
  state.views = [];
  state.depths = [];
  renderThumbnails();
  selectView(0);
  clearResult();
  $("run").disabled = false;
}

function isZip(file) {
  return /zip/.test(file.type) || file.name.toLowerCase().endsWith(".zip");
}

// A video goes as video_base64, a zip of frames (in name order) as frames_zip_base64.
async function chooseSequence(file) {
  const zip = isZip(file);
  state.sequence = { ...(await readFile(file)), field: zip ? "frames_zip_base64" : "video_base64" };
  state.photos = [];
  inputChosen();
  const what = zip ? "a zip of frames" : "a video";
  setStatus(`${file.name} (${Math.round(file.size / 1024)} KiB) ready: ${what}, sent as a sequence`);
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

function keyHeaders() {
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  return headers;
}

async function run(event) {
  event.preventDefault();
  if (!state.photos.length && !state.sequence) return;
  const body = state.sequence ? buildSequenceRequest() : buildRequest();
  const headers = keyHeaders();
  document.body.dataset.state = "running";
  $("run").disabled = true;
  $("cancel").hidden = false;
  setStatus("running…");
  state.running = new AbortController();
  try {
    state.request = body;
    if (state.sequence) {
      await showSequence(await runJob(body, headers, state.running.signal));
    } else {
      const response = await fetch("/runsync", {
        method: "POST", headers, body: JSON.stringify(body), signal: state.running.signal,
      });
      const result = await response.json();
      if (!response.ok) throw new Error((result.error || {}).message || response.statusText);
      await show(result);
    }
    document.body.dataset.state = "done";
  } catch (error) {
    const cancelled = error.name === "AbortError";
    document.body.dataset.state = cancelled ? "cancelled" : "error";
    setStatus(cancelled ? "Cancelled." : readable(error.message || error), !cancelled);
  } finally {
    state.running = null;
    state.job = null;
    $("run").disabled = false;
    $("cancel").hidden = true;
  }
}

// Closing the connection cancels a /runsync job on the server (it stops at its next check); a
// sequence job is cancelled by POST /cancel/<id>.
function cancel() {
  if (state.job) fetch(`/cancel/${state.job}`, { method: "POST", headers: keyHeaders() });
  if (state.running) state.running.abort();
}

function clearResult() {
  state.scene = null;
  $("downloads").replaceChildren();
  $("downloads").classList.remove("filled");
  clearScene();
  setFrame($("cloud"), false, "The 3D scene shows here once estimated");
  for (const name of ["points", "objects", "cameras"]) delete $("cloud").dataset[name];
  $("preview-video").removeAttribute("src");
  setFrame($("video-frame"), false, "A video's depth plays here once estimated");
  window.__trajectoryPoints = null;
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

// ---- a video or a zip of frames: one sequence job through /run and /status ---------------------

function buildSequenceRequest() {
  const chunk = Number($("chunk-size").value);
  return {
    [state.sequence.field]: state.sequence.dataUri,
    fps: Number($("fps").value),
    max_frames: Number($("max-frames").value),
    chunk_size: chunk || undefined,
    model_id: $("model").value || undefined,
    process_res: Number($("process-res").value),
    output_metric: $("metric").checked,
    use_ray_pose: $("ray-pose").checked,
    outputs: VIDEO_OUTPUTS,
    max_points: Number($("max-points").value),
    conf_percentile: Number($("conf-percentile").value),
  };
}

// Queue the job, then poll its status, showing each chunk's progress, until it ends: its output.
async function runJob(body, headers, signal) {
  state.progress = [];
  const response = await fetch("/run", { method: "POST", headers, body: JSON.stringify(body), signal });
  const queued = await response.json();
  if (!response.ok) throw new Error((queued.error || {}).message || response.statusText);
  state.job = queued.id;
  setStatus("queued…");
  for (;;) {
    const answer = await fetch(`/status/${queued.id}`, { headers, signal });
    const job = await answer.json();
    if (!answer.ok) throw new Error((job.error || {}).message || answer.statusText);
    if (job.status === "COMPLETED") return job.output;
    if (job.error) throw new Error(JSON.parse(job.error).message || job.status);
    if (job.status === "IN_PROGRESS" && job.output) showProgress(job.output);
    await pause(POLL_MS, signal);
  }
}

function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("cancelled", "AbortError"));
    }, { once: true });
  });
}

// One chunk's summary (sequence/pipeline.py): frames done of those planned (a video that
// declares no length has no percent, and its planned count is only a cap), the chunk's index.
function progressText(summary) {
  const of = summary.percent === null ? "" : ` of ${summary.frames_planned}`;
  return `${summary.frames_done}${of} frames done (chunk ${summary.chunk})…`;
}

function showProgress(summary) {
  const text = progressText(summary);
  if (state.progress[state.progress.length - 1] !== text) state.progress.push(text);
  setStatus(text);
}

async function showSequence(result) {
  clearResult();
  state.response = result;
  state.views = [];
  renderDownloads(result);
  const { frames, chunks } = result.sequence;
  const unit = UNITS[result.units] || result.units;
  const range = `${result.min_depth.toFixed(2)}–${result.max_depth.toFixed(2)} ${unit}`;
  const notes = (result.warnings || []).map(forBrowser).filter(Boolean);
  const warnings = notes.length ? ` (${notes.join("; ")})` : "";
  const total = result.timings_ms ? ` in ${Math.round(result.timings_ms.total)} ms` : "";
  setStatus(`${result.model_id}: ${frames} frames in ${chunks.length} chunk(s), depth ${range}` +
            `${total}${warnings}`);
  showPreviewVideo(result.preview_video);
  await showTrajectory(result);
}

function showPreviewVideo(entry) {
  const source = entry && (entry.base64
    ? URL.createObjectURL(new Blob([base64Bytes(entry.base64)], { type: "video/webm" }))
    : entry.url);
  if (source) $("preview-video").src = source;
  setFrame($("video-frame"), Boolean(source), "The depth video was stored, not sent: see Downloads");
}

// The camera centres (the TUM file's tx ty tz) as a line, and the scene_ply points, both turned
// from OpenCV's axes into three.js's (y up, z towards the viewer): diag(1, -1, -1).
async function showTrajectory(result) {
  const entry = result.trajectory;
  if (!entry || !entry.base64) {
    setFrame($("cloud"), false, "The trajectory was stored, not sent: see Downloads");
    return;
  }
  const tum = new TextDecoder().decode(await unzip(base64Bytes(entry.base64), "trajectory.tum"));
  const centres = tum.split("\n").filter((line) => line && !line.startsWith("#"))
    .map((line) => line.trim().split(/\s+/).slice(1, 4).map(Number));
  const path = new Float32Array(centres.flatMap(([x, y, z]) => [x, -y, -z]));
  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute("position", new THREE.BufferAttribute(path, 3));
  const line = new THREE.Line(geometry, new THREE.LineBasicMaterial({ color: 0xffa040 }));
  line.name = "trajectory";
  const group = new THREE.Group();
  group.add(line);
  const cloud = result.scene_ply && result.scene_ply.base64
    ? plyPoints(base64Bytes(result.scene_ply.base64)) : null;
  if (cloud) group.add(cloud);
  const v = getViewer();
  v.content = group;
  v.scene.add(group);
  // The line's vertices as the scene holds them, for tests: [[x, y, z], ...] in three.js's axes.
  const drawn = v.scene.getObjectByName("trajectory").geometry.attributes.position.array;
  window.__trajectoryPoints = centres.map((_, i) => [...drawn.subarray(3 * i, 3 * i + 3)]);
  const count = cloud ? cloud.geometry.attributes.position.count : 0;
  state.scene = { objects: group.children.length, points: count, cameras: centres.length };
  for (const [name, value] of Object.entries(state.scene)) $("cloud").dataset[name] = String(value);
  setFrame($("cloud"), true);
  const [x, y, z] = centres[0] || [0, 0, 0];
  frameScene(v, cloud || line, new THREE.Vector3(x, -y, -z));
}

// One file of a zip (stored or deflated), found by its central directory.
async function unzip(bytes, wanted) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let end = bytes.length - 22;
  while (end >= 0 && view.getUint32(end, true) !== 0x06054b50) end--;
  if (end < 0) throw new Error("the trajectory is not a zip file");
  let at = view.getUint32(end + 16, true);
  for (let i = 0; i < view.getUint16(end + 10, true); i++) {
    const [method, size] = [view.getUint16(at + 10, true), view.getUint32(at + 20, true)];
    const [nameLength, extra, comment] = [28, 30, 32].map((offset) => view.getUint16(at + offset, true));
    const name = new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLength));
    if (name === wanted) {
      const local = view.getUint32(at + 42, true);
      const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
      const data = bytes.subarray(start, start + size);
      if (method === 0) return data;
      const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
      return new Uint8Array(await new Response(stream).arrayBuffer());
    }
    at += 46 + nameLength + extra + comment;
  }
  throw new Error(`the zip holds no ${wanted}`);
}

// The scene PLY the server writes (exports/ply.py: binary little-endian float x y z, uchar
// red green blue, float confidence; 19 bytes a vertex) as coloured three.js points.
const PLY_VERTEX = "property float x\nproperty float y\nproperty float z\nproperty uchar red\n" +
  "property uchar green\nproperty uchar blue\nproperty float confidence\nend_header\n";
function plyPoints(bytes) {
  const header = new TextDecoder().decode(bytes.subarray(0, Math.min(bytes.length, 4096)));
  const count = Number((/element vertex (\d+)\n/.exec(header) || [])[1]);
  const start = header.indexOf(PLY_VERTEX) + PLY_VERTEX.length;
  if (!header.includes("binary_little_endian") || !(count >= 0) || start < PLY_VERTEX.length) {
    throw new Error("the scene PLY is not in the server's layout");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset + start, count * 19);
  const positions = new Float32Array(count * 3);
  const colors = new Float32Array(count * 3);
  for (let i = 0; i < count; i++) {
    const at = i * 19;
    positions.set([view.getFloat32(at, true), -view.getFloat32(at + 4, true),
                   -view.getFloat32(at + 8, true)], i * 3);
    colors.set([view.getUint8(at + 12) / 255, view.getUint8(at + 13) / 255,
                view.getUint8(at + 14) / 255], i * 3);
  }
  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute("position", new THREE.BufferAttribute(positions, 3));
  geometry.setAttribute("color", new THREE.BufferAttribute(colors, 3));
  const material = new THREE.PointsMaterial({ size: 2, sizeAttenuation: false, vertexColors: true });
  return Object.assign(new THREE.Points(geometry, material), { name: "scene_ply" });
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
  const views = result.sequence ? [] : result.views || [result];
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
  for (const [output, suffix] of Object.entries({ ...SCENE_FILES, ...SEQUENCE_FILES })) {
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
  frameScene(v, points, firstCamera(result));
}

// Orbit around the scene's centre (the median point of `points`, any object with a position
// attribute), starting behind `eye` (the first camera's centre).
function frameScene(v, points, eye) {
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
