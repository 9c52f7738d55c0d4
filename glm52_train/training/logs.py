"""Run logging: a console progress line, `metrics.jsonl`, Weights & Biases and TensorBoard.

Only the last rank of the pipeline's first data-parallel replica (global rank world-1 when
the last stage holds it) writes; `RunLogger.log` is a no-op elsewhere. `metrics.jsonl` holds one
JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`, ...) for tools and tests that do
not read W&B; on resume, records past the resumed step are dropped so the file stays one run.
A run that starts at step 0 never writes into an earlier run's files: when the run folder holds
metrics or a W&B run id, that run's files move to `RUN_DIR.old-N/` first (saying so), and the new
run gets a new W&B id.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from glm52_train.training.identity import RUN_FILES, set_aside


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Messages print from construction on; metrics are logged once `start` has opened the run
    directory at the step the run starts from (known after resuming)."""

    def __init__(self, cfg, active: bool) -> None:
        self.cfg = cfg
        self.active = active
        self.run_dir = cfg.run_dir()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.tb = None

    def start(self, start_step: int, config_dict: dict) -> None:
        self.start_time = time.time()
        self.start_step = start_step
        if not self.active:
            return
        if start_step == 0:
            if any((self.run_dir / name).exists() for name in ("metrics.jsonl", "wandb_run_id")):
                moved = set_aside(self.run_dir, RUN_FILES)
                self.message(f"{self.run_dir} held an earlier run's metrics and this run starts at step 0: "
                             f"moved them to {moved}")
        else:
            self._truncate_after(start_step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
        if self.cfg.logging.wandb != "disabled":
            self.wandb = self._init_wandb(self.cfg, self.run_dir, config_dict)
        if self.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        self.metrics_path.write_text("".join(k + "\n" for k in kept))

    def _init_wandb(self, cfg, run_dir: Path, config_dict: dict):
        wandb_dir = run_dir / "wandb-files"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(var, str(wandb_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=cfg.logging.wandb_project,
            entity=cfg.logging.wandb_entity,
            name=cfg.run_name,
            id=run_id,
            resume="allow",
            mode=cfg.logging.wandb,
            dir=str(wandb_dir),
            config=config_dict,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, step: int, total_steps: int, metrics: dict, wandb_extra: dict | None = None) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({**metrics, **(wandb_extra or {})}, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        print(self._progress_line(step, total_steps, metrics), flush=True)

    def _progress_line(self, step: int, total: int, m: dict) -> str:
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 1)
        eta = elapsed / done * max(total - step, 0)
        parts = [f"step {step:>6}/{total}"]
        if m.get("loss") is not None:
            parts.append(f"loss {m['loss']:.4f}")
        if m.get("val_loss") is not None:
            parts.append(f"val {m['val_loss']:.4f}")
        if m.get("lr") is not None:
            parts.append(f"lr {m['lr']:.2e}")
        if m.get("grad_norm") is not None:
            parts.append(f"gnorm {m['grad_norm']:.3f}")
        if m.get("tokens_per_s") is not None:
            parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if m.get("tflops_per_gpu"):
            parts.append(_flops_rate(m["tflops_per_gpu"]))
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def message(self, text: str) -> None:
        if self.active:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _flops_rate(tflops: float) -> str:
    """TFLOP/s where it reads as a number (GPUs); GFLOP/s below 1 TFLOP/s (CPUs)."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1.0 else f"{tflops * 1e3:.1f} GFLOP/s"


def run_header(cfg, model_cfg, world: int, device: str, run_dir: Path, checkpoint_dir: Path | None) -> str:
    """What the run is, before its first step: model, parameters, layout, data, tokens per step,
    where checkpoints and metrics go."""
    from glm52_train.model.info import model_info

    info = model_info(model_cfg, cfg.data.seq_length, cfg.dsa.mode)
    precision = "bf16" if cfg.use_bf16() else "fp32"
    mtp = f", MTP {info.mtp_params / 1e6:,.2f}M" if info.mtp_params else ""
    data = []
    for source in cfg.data.blend:
        try:
            tokens = json.loads(Path(source.path + ".json").read_text())["tokens"]
            size = f"{tokens / 1e6:,.1f}M tokens"
        except (OSError, ValueError, KeyError):
            size = "size unknown"
        weight = f", weight {source.weight:g}" if len(cfg.data.blend) > 1 else ""
        data.append(f"{source.path} ({size}{weight})")
    t = cfg.train
    saves = (f"{checkpoint_dir} (every {cfg.checkpoint.interval} steps, at the end and on SIGTERM/SIGUSR1/Ctrl-C)"
             if checkpoint_dir is not None else "none (checkpoint.enable: false)")
    return "\n".join([
        f"model     {model_cfg.name}: {info.total_params / 1e6:,.2f}M parameters "
        f"({info.active_params / 1e6:,.2f}M active per token{mtp}), {precision} on {device}",
        f"layout    {cfg.layout(world).describe()} on {world} process{'es' if world > 1 else ''}",
        f"data      {'; '.join(data)}",
        f"per step  {t.global_batch_size * cfg.data.seq_length:,} tokens (global batch {t.global_batch_size} "
        f"x {cfg.data.seq_length}), {t.iters} steps, {_warmup(cfg)}",
        f"saves     {saves}",
        f"metrics   {run_dir / 'metrics.jsonl'}"
        + ("" if cfg.logging.wandb == "disabled" else f", W&B {cfg.logging.wandb} in {run_dir / 'wandb-files'}"),
    ])


def _warmup(cfg) -> str:
    """The warm-up in words: given, or the fraction of the decay length it was computed from."""
    steps, o = cfg.warmup_length(), cfg.optimizer
    if o.warmup_iters is not None:
        return f"warm-up {steps} steps"
    return f"warm-up {steps} steps ({o.warmup_fraction * 100:g}% of {cfg.decay_length()}, optimizer.warmup_fraction)"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Dense BF16 peak per GPU (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0}


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
