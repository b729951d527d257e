"""The Apache metric pair against the nested model: latency and memory on this machine.

    .venv/bin/python bench/metric_pair.py [--pair da3-small] [--process-res 504] [--views 1]

Random-weight snapshots in the official layout (written once under artifacts/): the pair
(`--pair` with DA3METRIC-LARGE, loaded part by part as `Predictor.from_pretrained` does for
`da3-small-metric`) and DA3NESTED-GIANT-LARGE. Each model runs in a fresh process: load
seconds, the median of three predictions after a warm-up, and the process's peak resident
memory (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import IMAGES, REPO, snapshot

CHILD = """
import json, sys, time
from da3_serverless.inference.predictor import Predictor
from da3_serverless.model.checkpoint import load_network, load_pair
folders, views, res = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
if len(folders) == 2:
    preset, network = load_pair(folders)
else:
    preset, network = load_network(folders[0])
predictor = Predictor(network, preset, device="cpu")
loaded = time.perf_counter() - start
predictor.predict(views, process_res=res)
times = []
for _ in range(3):
    start = time.perf_counter()
    predictor.predict(views, process_res=res)
    times.append(time.perf_counter() - start)
# VmHWM, not ru_maxrss: a child's ru_maxrss keeps its parent's high-water mark across exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status")
            if line.startswith("VmHWM")) / 2**20
print(json.dumps({"preset": preset, "load_s": round(loaded, 2),
                  "predict_s": round(sorted(times)[1], 2), "peak_rss_gb": round(peak, 2)}))
"""


def run(folders: list, views: list, process_res: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(folders), json.dumps(views), str(process_res)],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="da3-small", choices=["da3-small", "da3-base"])
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--views", type=int, default=1)
    args = parser.parse_args()
    views = [str(p) for p in sorted(IMAGES.glob("soh-*.png"))[: args.views]]
    pair = [str(snapshot(args.pair)), str(snapshot("da3metric-large", seed=1))]
    nested = [str(snapshot("da3nested-giant-large"))]
    rows = {name: run(folders, views, args.process_res)
            for name, folders in (("pair", pair), ("nested", nested))}  # fmt: skip
    rows["pair_vs_nested"] = {
        "latency": round(rows["pair"]["predict_s"] / rows["nested"]["predict_s"], 3),
        "peak_memory": round(rows["pair"]["peak_rss_gb"] / rows["nested"]["peak_rss_gb"], 3),
    }
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
