"""bf16 against blockwise FP8 training steps in one call (issue 26): `bench/train_step.py` twice
on the same config, data and GPU, the second with `train.fp8=blockwise`.

    python bench/fp8_step.py --json OUT/fp8_step.json [key=value ...]   # CUDA: proxy-h100
    python bench/fp8_step.py --smoke --json OUT/fp8_step.json [...]     # CPU: tiny, a few steps

Writes `bf16_tokens_per_s`, `fp8_tokens_per_s` and their ratio (target: FP8 at least 1.15x),
each run's MFU and peak memory, and each run's full `train_step.json` next to it
(`bf16_step.json`, `fp8_step_run.json`). Extra key=value overrides go to both runs (e.g.
`train.fp8_wgrad=bf16` applies to the FP8 run only in effect: the bf16 run has no FP8 GEMMs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_reserved_gib", "peak_allocated_gib", "plan_estimate_gib",
        "first_loss", "last_loss", "returncode", "wall_seconds")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where fp8_step.json goes (its folder gets both runs' JSON)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny, a few steps (bench/train_step.py --smoke)")
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides for both runs")
    args = ap.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.json))
    # FP8 GEMMs only pay on tiles of real width: the weight-gradient and
    # input-gradient paths come from the config (train.fp8_wgrad / fp8_dgrad)
    runs = {"bf16": [], "fp8": ["train.fp8=blockwise"]}
    result: dict = {}
    ok = True
    for name, extra in runs.items():
        out = os.path.join(folder, "bf16_step.json" if name == "bf16" else "fp8_step_run.json")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--json", out,
               *(["--smoke"] if args.smoke else []), *args.overrides, *extra,
               f"logging.run_dir={os.path.join(folder, 'run_' + name)}"]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        ok &= proc.returncode == 0
        got = json.load(open(out)) if os.path.exists(out) else {}
        result[name] = {k: got.get(k) for k in KEEP}
        result[f"{name}_tokens_per_s"] = got.get("tokens_per_s")
    if result["bf16_tokens_per_s"] and result["fp8_tokens_per_s"]:
        result["fp8_over_bf16"] = result["fp8_tokens_per_s"] / result["bf16_tokens_per_s"]
    result["overrides"] = args.overrides
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result.get(k) for k in ("bf16_tokens_per_s", "fp8_tokens_per_s", "fp8_over_bf16")}))
    return 0 if ok and result.get("fp8_over_bf16") is not None else 1


if __name__ == "__main__":
    sys.exit(main())
