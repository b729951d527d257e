// Resolves the bare specifier "three" (what the vendored GLTFLoader imports) to the playground's
// vendored three.js, as the page's import map does in the browser.
const THREE = new URL("../../src/da3_serverless/static/vendor/three/three.module.js", import.meta.url);

export async function resolve(specifier, context, next) {
  if (specifier === "three") return { url: THREE.href, shortCircuit: true };
  return next(specifier, context);
}
