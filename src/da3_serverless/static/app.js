// Playground: send one image to POST /runsync, show the colorised depth, the depth under the
// cursor (from the float32 depth_npy output) and a point cloud unprojected with the intrinsics.
// The API key lives only in its input field and goes out as the X-API-Key header.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

const $ = (id) => document.getElementById(id);
const MAX_POINTS = 120000;
let imageDataUri = null;
let depth = null; // {width, height, values: Float32Array, units}
let viewer = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModels() {
  const response = await fetch("/models");
  const models = await response.json();
  for (const model of models) {
    const option = new Option(`${model.short_name}${model.metric ? " (metric)" : ""}`, model.model_id);
    option.dataset.license = model.license;
    option.dataset.meters = String(model.metric || model.needs_focal_length);
    option.selected = Boolean(model.default);
    $("model").append(option);
  }
  modelChanged();
}

// Show the license, and ask for meters only from models that can give them.
function modelChanged() {
  const option = $("model").selectedOptions[0];
  if (!option) return;
  $("license").textContent = `License: ${option.dataset.license}`;
  $("metric").checked = option.dataset.meters === "true";
  $("metric").disabled = option.dataset.meters !== "true";
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    imageDataUri = reader.result;
    $("input").src = imageDataUri;
    $("run").disabled = false;
    setStatus(`${file.name} (${Math.round(file.size / 1024)} KiB) ready`);
  };
  reader.readAsDataURL(file);
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// A little-endian float32 2-D .npy file (what the depth_npy output is) -> {shape, values}.
function parseNpy(bytes) {
  const view = new DataView(bytes.buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const offset = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(offset, offset + headerLength));
  if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) {
    throw new Error(`unexpected depth_npy layout: ${header}`);
  }
  const shape = header.match(/'shape': \((\d+), (\d+)\)/).slice(1, 3).map(Number);
  const start = offset + headerLength;
  const values = new Float32Array(bytes.buffer.slice(start, start + shape[0] * shape[1] * 4));
  return { shape, values };
}

async function run(event) {
  event.preventDefault();
  if (!imageDataUri) return;
  const body = {
    image_base64: imageDataUri,
    model_id: $("model").value || undefined,
    process_res: Number($("process-res").value),
    output_metric: $("metric").checked,
    use_ray_pose: $("ray-pose").checked,
    outputs: ["depth", "preview", "depth_npy"],
  };
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  document.body.dataset.state = "running";
  $("run").disabled = true;
  setStatus("running…");
  try {
    const response = await fetch("/runsync", { method: "POST", headers, body: JSON.stringify(body) });
    const result = await response.json();
    if (!response.ok) {
      const error = result.error || {};
      throw new Error(`${error.code || response.status}: ${error.message || response.statusText}`);
    }
    show(result);
    document.body.dataset.state = "done";
  } catch (error) {
    document.body.dataset.state = "error";
    setStatus(String(error.message || error), true);
  } finally {
    $("run").disabled = false;
  }
}

function show(result) {
  const npy = parseNpy(base64Bytes(result.depth_npy.base64));
  depth = { height: npy.shape[0], width: npy.shape[1], values: npy.values, units: result.units };
  $("depth").src = `data:image/png;base64,${result.preview.base64}`;
  const unit = result.units === "m" ? "m" : "(relative)";
  const total = result.timings_ms ? ` in ${Math.round(result.timings_ms.total)} ms` : "";
  setStatus(`${result.model_id}: ${result.width}×${result.height}, depth ` +
            `${result.min_depth.toFixed(2)}–${result.max_depth.toFixed(2)} ${unit}${total}`);
  drawCloud(result);
}

function hover(event) {
  if (!depth) return;
  const box = $("depth").getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * depth.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * depth.height);
  if (x < 0 || y < 0 || x >= depth.width || y >= depth.height) return;
  const value = depth.values[y * depth.width + x];
  $("readout").textContent = `(${x}, ${y}) ${value.toFixed(3)} ${depth.units === "m" ? "m" : "rel."}`;
}

// Pixel colors of the input at the depth map's size, to color the points.
function inputPixels(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage($("input"), 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

function drawCloud(result) {
  const { width, height, values } = depth;
  // Without predicted intrinsics (mono/metric models) assume a ~60° horizontal field of view.
  const K = result.intrinsics || [[width * 0.87, 0, width / 2], [0, width * 0.87, height / 2], [0, 0, 1]];
  const [fx, cx, fy, cy] = [K[0][0], K[0][2], K[1][1], K[1][2]];
  const stride = Math.max(1, Math.ceil(Math.sqrt((width * height) / MAX_POINTS)));
  const rgba = inputPixels(width, height);
  const positions = [];
  const colors = [];
  for (let v = 0; v < height; v += stride) {
    for (let u = 0; u < width; u += stride) {
      const d = values[v * width + u];
      if (!(d > 0) || !Number.isFinite(d)) continue;
      // Camera frame (x right, y down, z forward) -> three.js (y up, looking down -z).
      positions.push(((u - cx) * d) / fx, -((v - cy) * d) / fy, -d);
      const i = (v * width + u) * 4;
      colors.push(rgba[i] / 255, rgba[i + 1] / 255, rgba[i + 2] / 255);
    }
  }
  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute("position", new THREE.Float32BufferAttribute(positions, 3));
  geometry.setAttribute("color", new THREE.Float32BufferAttribute(colors, 3));
  geometry.computeBoundingSphere();
  const v = getViewer();
  if (v.points) {
    v.scene.remove(v.points);
    v.points.geometry.dispose();
  }
  const material = new THREE.PointsMaterial({ size: 2, vertexColors: true, sizeAttenuation: false });
  v.points = new THREE.Points(geometry, material);
  v.scene.add(v.points);
  const sphere = geometry.boundingSphere;
  v.controls.target.copy(sphere.center);
  v.camera.position.set(0, 0, 0);
  v.camera.near = sphere.radius / 1000;
  v.camera.far = sphere.radius * 20;
  v.camera.updateProjectionMatrix();
  v.controls.update();
  $("cloud").dataset.points = String(positions.length / 3);
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
  viewer = { renderer, camera, scene, controls, points: null };
  return viewer;
}

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) readFile(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) readFile($("file").files[0]); });
}

setupDrop();
$("model").addEventListener("change", modelChanged);
$("controls").addEventListener("submit", run);
$("depth").addEventListener("mousemove", hover);
loadModels().catch((error) => setStatus(`could not load the model list: ${error}`, true));
