"""The real training step on one GPU: throughput, MFU, peak memory against `glm52 plan`, and
where the step time goes.

    python bench/train_step.py --json OUT.json [--config configs/proxy_h100.yaml] [key=value ...]
    python bench/train_step.py --smoke          # CPU: tiny, a few steps, the same code path

Runs `glm52 pretrain` (the command users run, in a subprocess) with the config's profiling
window, then reads the run's `metrics.jsonl` and `profile/breakdown_rank0.json`:
- tokens/s, model TFLOP/s and MFU: the median over the logged steps after the warm-up and
  before the profiled steps (FLOPs per token as `glm52 info` counts them; peak 989 dense bf16
  TFLOP/s on an H100);
- peak memory (reserved by the allocator, and allocated) next to `glm52 plan`'s estimate for
  the same model, sequence, micro-batch and layout (one GPU, no recomputation);
- the profile: milliseconds per step for attention, indexer, experts, dispatch, optimizer, ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/proxy_h100.yaml")
    ap.add_argument("--json", default=None)
    ap.add_argument("--warmup", type=int, default=3, help="logged steps left out of the throughput median")
    ap.add_argument("--smoke", action="store_true", help="tiny on the CPU: a few steps, the same code path")
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = ap.parse_args(argv)

    overrides = list(args.overrides)
    if args.smoke:
        args.config = "configs/tiny.yaml"
        overrides = ["train.iters=6", "optimizer.warmup_iters=1", "train.log_interval=1", "train.eval_interval=1000",
                     "checkpoint.enable=false", "logging.wandb=disabled", "logging.profile_at=5",
                     "logging.profile_steps=2", "logging.run_dir=runs/train-step-smoke"] + overrides
        args.warmup = 1

    from glm52_train.run_config import load_run_config

    cfg = load_run_config(args.config, overrides)
    run_dir = str(cfg.run_dir())
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)  # this run's records only
    cmd = [sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", args.config, *overrides]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.time() - start
    result: dict = dict(command=" ".join(cmd[1:]), returncode=proc.returncode, wall_seconds=wall,
                        model=cfg.model_config().name, seq_len=cfg.data.seq_length, dsa_mode=cfg.dsa.mode,
                        global_batch=cfg.train.global_batch_size, micro_batch=cfg.train.micro_batch_size)
    result.update(_environment())
    records = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    result["steps"] = records
    result.update(_throughput(records, cfg, args.warmup))
    result.update(_memory(records, cfg))
    breakdown_path = os.path.join(run_dir, "profile", "breakdown_rank0.json")
    if os.path.exists(breakdown_path):
        with open(breakdown_path) as f:
            result["profile"] = json.load(f)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if proc.returncode == 0 else 1


def _environment() -> dict:
    import torch

    env = dict(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _throughput(records: list[dict], cfg, warmup: int) -> dict:
    profile_from = cfg.logging.profile_at or 10**9
    clean = [r for r in records if r.get("tokens_per_s") and warmup < r["step"] < profile_from]
    if not clean:
        return {}
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    out = dict(
        throughput_steps=[r["step"] for r in clean],
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in clean),
        tflops_per_gpu=statistics.median(r["tflops_per_gpu"] for r in clean),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
    )
    mfu = [r["mfu"] for r in clean if r.get("mfu") is not None]
    out["mfu"] = statistics.median(mfu) if mfu else None
    return out


def _memory(records: list[dict], cfg) -> dict:
    from glm52_train.plan import GiB, estimate

    model = cfg.model_config()
    p = cfg.parallel
    layout = cfg.layout(p.tp * p.pp * p.cp)  # one data-parallel replica, as on the one GPU
    micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    selective = cfg.train.recompute == "selective"
    est = estimate(model, layout, cfg.data.seq_length, 80.0, cfg.train.micro_batch_size,
                   num_microbatches=micro, recompute=cfg.train.recompute or "none",
                   recompute_modules=cfg.train.recompute_modules if selective else (), optimizer=cfg.optimizer.name,
                   first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers,
                   fp8=cfg.train.fp8 == "blockwise", dsa_deterministic=cfg.dsa.deterministic,
                   dsa_indexer_loss=cfg.dsa.indexer_loss)
    out = dict(plan_estimate_gib=est.total / GiB,
               plan_parts_gib={k: v / GiB for k, v in est.to_dict().items() if isinstance(v, float)})
    peaks = [r["peak_reserved_gib"] for r in records if r.get("peak_reserved_gib") is not None]
    if peaks:
        out["peak_reserved_gib"] = max(peaks)
        out["peak_allocated_gib"] = max(r.get("peak_allocated_gib") or 0 for r in records)
        out["plan_over_measured"] = out["plan_estimate_gib"] / out["peak_reserved_gib"]
    return out


def _print(r: dict) -> None:
    print(f"\n# {r.get('model')} seq {r.get('seq_len')} global batch {r.get('global_batch')} on "
          f"{r.get('device', 'cpu')} (torch {r.get('torch')}, triton {r.get('triton')}); exit {r['returncode']}")
    if "tokens_per_s" in r:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        print(f"tokens/s {r['tokens_per_s']:,.0f} | model TFLOP/s {r['tflops_per_gpu']:.1f} | MFU {mfu} | "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    if "peak_reserved_gib" in r:
        print(f"peak memory {r['peak_reserved_gib']:.1f} GiB reserved ({r['peak_allocated_gib']:.1f} allocated); "
              f"plan {r['plan_estimate_gib']:.1f} GiB (plan / measured {r['plan_over_measured']:.2f})")
    else:
        print(f"plan {r['plan_estimate_gib']:.1f} GiB (no GPU: nothing measured)")
    if "profile" in r:
        from glm52_train.training.profile import format_breakdown

        print(format_breakdown(r["profile"]))


if __name__ == "__main__":
    sys.exit(main())
