// Reads the GLB at argv[2] as its users' tools do and prints one JSON object: Khronos' glTF
// validator's report (counts and messages) and the cameras three.js's GLTFLoader (the
// playground's vendored copy) builds, with their world and projection matrices.
import { readFileSync } from "node:fs";
import { register } from "node:module";
import validator from "gltf-validator";

register("./three_hooks.mjs", import.meta.url);
const { GLTFLoader } = await import(
  "../../src/da3_serverless/static/vendor/three/addons/loaders/GLTFLoader.js"
);

const bytes = new Uint8Array(readFileSync(process.argv[2]));
const report = await validator.validateBytes(bytes);
const gltf = await new GLTFLoader().parseAsync(bytes.buffer, "");
gltf.scene.updateMatrixWorld(true);
const cameras = gltf.cameras.map((camera) => ({
  name: camera.name,
  type: camera.type,
  fov: camera.fov,
  aspect: camera.aspect,
  near: camera.near,
  extras: camera.userData,
  matrixWorld: camera.matrixWorld.elements,
  projectionMatrix: camera.projectionMatrix.elements,
}));
const issues = report.issues;
console.log(JSON.stringify({
  validator: {
    errors: issues.numErrors,
    warnings: issues.numWarnings,
    messages: issues.messages.map((m) => `${m.severity} ${m.code} ${m.pointer}: ${m.message}`),
  },
  cameras,
}));
