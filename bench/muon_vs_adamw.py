"""AdamW vs Muon on `tiny` with the embedded corpus: same initial weights, same tokens, same
schedule; validation loss along the run (at 250 and 500 steps in the table) and step time.

    python bench/muon_vs_adamw.py --out docs/muon_vs_adamw [--iters 500] [--parallel] [key=value ...]

Makes the initial weights once (`glm52 init-weights`), runs `glm52 pretrain --config
configs/tiny.yaml` once per optimizer from them (`checkpoint.init_from`, no checkpoints), reads
each run's metrics.jsonl, prints one table, writes OUT.json and, when matplotlib is importable,
OUT.png (training loss per logged step and validation loss, both optimizers). `--parallel` runs
the two at once, one thread each (both equally loaded: their step times compare with each other,
not with a run that had the machine alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "muon")


def run_env(threads: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def read(run_dir: Path) -> dict:
    run = json.loads((run_dir / "config.json").read_text())
    tokens_per_step = run["train"]["global_batch_size"] * run["data"]["seq_length"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    # step time from each logged window's throughput, the first window (start-up) left out
    times = [tokens_per_step / r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]
    return {"train": train, "val": dict(val), "step_time_s": statistics.median(times) if times else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/muon_vs_adamw")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--parallel", action="store_true")
    ap.add_argument("--report", metavar="WORKDIR", help="only read the runs of an earlier invocation")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.report:
        return report(Path(args.report), args)
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="muon-bench-"))
    print(f"runs in {work}", flush=True)
    init = work / "init"
    subprocess.run([py, "-m", "glm52_train.cli", "init-weights", "--model", "tiny", "--out", str(init)],
                   cwd=ROOT, env=run_env(None), check=True, capture_output=True)
    procs = {}
    for name in OPTIMIZERS:
        cmd = [py, "-m", "glm52_train.cli", "pretrain", "--config", "configs/tiny.yaml",
               f"optimizer.name={name}", f"train.iters={args.iters}", f"train.eval_interval={args.eval_interval}",
               "checkpoint.enable=false", f"checkpoint.init_from={init}", f"logging.run_dir={work / name}",
               "logging.wandb=disabled", *args.overrides]
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=run_env(1 if args.parallel else None),
                                       stdout=log, stderr=subprocess.STDOUT)
        if not args.parallel:
            procs[name].wait()
    for name, proc in procs.items():
        if proc.wait() != 0:
            print(f"{name} failed: see {work / name}.log", file=sys.stderr)
            return 1
    return report(work, args)


def report(work: Path, args) -> int:
    results = {name: read(work / name) for name in OPTIMIZERS}
    marks = sorted({args.iters // 2, args.iters})
    print(f"| optimizer | " + " | ".join(f"val loss @{m}" for m in marks) + " | step time (s) |")
    print("|---|" + "---|" * len(marks) + "---|")
    for name, r in results.items():
        vals = " | ".join(f"{r['val'].get(m, float('nan')):.4f}" for m in marks)
        print(f"| {name} | {vals} | {r['step_time_s']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"iters": args.iters, "parallel": args.parallel, "overrides": args.overrides, "results": results}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    series = {name: (r["train"], sorted(r["val"].items())) for name, r in results.items()}
    png = out.with_suffix(".png")
    try:
        plot_matplotlib(series, png)
    except ImportError:
        print("matplotlib is not installed: plotted with Pillow")
        plot_pillow(series, png)
    print(f"wrote {png}")
    return 0


COLORS = {"adamw": (31, 119, 180), "muon": (214, 39, 40)}


def plot_matplotlib(series: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (train, val) in series.items():
        color = tuple(c / 255 for c in COLORS[name])
        ax.plot(*zip(*train), color=color, alpha=0.5, label=f"{name} train")
        ax.plot(*zip(*val), "o-", color=color, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title("tiny, embedded corpus: AdamW vs Muon (same init, same tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_pillow(series: dict, png: Path) -> None:
    """The same plot drawn with Pillow: training loss (thin) and validation loss (dots) per step."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 900, 540, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = [pt for train, val in series.values() for pt in train + val]
    x1 = max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    y0, y1 = math.floor(y0 * 2) / 2, math.ceil(y1 * 2) / 2

    def xy(x, y):
        return (left + (w - left - right) * x / x1, top + (h - top - bottom) * (y1 - y) / (y1 - y0))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(int((y1 - y0) * 2) + 1):
        y = y0 + k / 2
        d.line([xy(0, y), xy(x1, y)], fill=(225, 225, 225))
        d.text((8, xy(0, y)[1] - 6), f"{y:.1f}", fill="black")
    for x in range(0, x1 + 1, 50):
        d.text((xy(x, y0)[0] - 8, h - bottom + 6), str(x), fill="black")
    d.text((w // 2 - 20, h - 22), "step", fill="black")
    d.text((left, 12), "tiny, embedded corpus: LM loss, AdamW vs Muon (same init, same tokens); "
           "thin: training, dots: validation", fill="black")
    for i, (name, (train, val)) in enumerate(series.items()):
        color = COLORS[name]
        faded = tuple(int(c + (255 - c) * 0.5) for c in color)
        d.line([xy(*pt) for pt in train], fill=faded, width=1)
        d.line([xy(*pt) for pt in val], fill=color, width=2)
        for pt in val:
            cx, cy = xy(*pt)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        d.text((w - right - 120, top + 10 + 16 * i), name, fill=color)
    img.save(png)


if __name__ == "__main__":
    raise SystemExit(main())
