"""What blockwise FP8 costs in accuracy: `tiny` trained N steps with `train.fp8=blockwise` and
without, from the same initial weights (same seed), same data, same precision elsewhere.

    python bench/fp8_accuracy.py --steps 100 --json OUT.json [key=value ...]

On a CPU the FP8 GEMMs are emulated (the same quantisation, dequantised operands in an fp32
matmul) and everything else runs in `train.precision` (auto: fp32 on a CPU, bf16 on a GPU;
bf16 on this 2-core CPU is ~10x slower, 100 steps would take hours): the difference measured is
what FP8 quantisation of the GEMM operands costs.
Prints one table (loss at every logged step, both runs, the relative difference) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(name: str, steps: int, out_dir: str, extra: list[str]):
    """Launch one run; returns (process, metrics path, start time)."""
    run_dir = os.path.join(out_dir, name)
    overrides = [f"train.iters={steps}", "optimizer.warmup_iters=10", "train.log_interval=10",
                 f"train.eval_interval={steps}", "checkpoint.enable=false", "logging.wandb=disabled",
                 f"logging.run_dir={run_dir}", *extra]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", "configs/tiny.yaml", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.DEVNULL)
    return proc, metrics, time.time()


def finish(proc, metrics: str, began: float) -> tuple[dict[int, float], float]:
    if proc.wait() != 0:
        raise SystemExit(f"a run failed (exit {proc.returncode}); its metrics: {metrics}")
    wall = time.time() - began
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out-dir", default="runs/fp8-accuracy")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides for both runs")
    args = ap.parse_args(argv)
    extra = list(args.overrides)
    # the two runs side by side (their losses do not depend on each other; the walls do)
    runs = [start("base", args.steps, args.out_dir, extra),
            start("fp8", args.steps, args.out_dir, extra + ["train.fp8=blockwise"])]
    (base, base_wall), (fp8, fp8_wall) = [finish(*r) for r in runs]
    print(f"{'step':>6} {'base loss':>10} {'fp8 loss':>10} {'rel diff':>9}")
    table = []
    for step in sorted(base):
        rel = (fp8[step] - base[step]) / base[step]
        table.append(dict(step=step, base=base[step], fp8=fp8[step], rel_diff=rel))
        print(f"{step:>6} {base[step]:>10.4f} {fp8[step]:>10.4f} {rel:>+9.2%}")
    last = table[-1]
    print(f"after {last['step']} steps: FP8 loss {last['fp8']:.4f} vs {last['base']:.4f} ({last['rel_diff']:+.2%}); "
          f"wall {fp8_wall:.0f} s vs {base_wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, overrides=extra, table=table, wall_seconds=dict(base=base_wall, fp8=fp8_wall)),
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
