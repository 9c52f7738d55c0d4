"""The run config: typed sections loaded from YAML, dotted `key=value` overrides, one validate().

    glm52 pretrain --config configs/tiny.yaml train.iters=50 optimizer.lr=1e-3

`model` is a flavor name from `glm52_train.config.MODELS` or a mapping of ModelConfig fields
(with an optional `base:` flavor to start from). Every other section is a dataclass below;
unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from glm52_train.config import MODELS, ConfigError, ModelConfig, closest, field_help, get_model_config
from glm52_train.layout import Layout, layout_problems, recompute_problem


@dataclass
class DataSource:
    path: str  # prefix of PREFIX.bin / PREFIX.idx / PREFIX.json
    weight: float = 1.0  # share of the samples drawn from this dataset (normalised over the blend)


@dataclass
class DataConfig:
    tokenizer: str = "data/tokenizer/tokenizer.json"  # a tokenizers JSON file or its folder
    blend: list[DataSource] = field(default_factory=list)  # datasets made by glm52 prepare-data, each {path, weight}
    split: str = "98,2,0"  # train,validation,test shares of each dataset's documents
    seq_length: int = 4096  # tokens per sample
    packed: bool = False  # several documents per sample, attention kept within each document
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    cache_dir: str | None = None  # where Megatron-Core caches its sample indices


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved schedule; null: 1)
    ep: int = 1  # expert-parallel size
    etp: int | None = None  # tensor-parallel size inside each expert (null: parallel.tp)
    cp: int = 1  # context-parallel size (the sequence split over ranks)
    sp: bool = False  # sequence parallelism over the tensor-parallel ranks (needs tp > 1)
    first_stage_layers: int | None = None  # decoder layers on the first pipeline stage (null: an even split)
    last_stage_layers: int | None = None  # decoder layers on the last pipeline stage (null: an even split)
    # Megatron-Core's pipeline_model_parallel_layout, e.g. "Et|tt|tmL" (E embedding, t decoder
    # layer, m MTP step, L loss; | between stages; PP x VPP stages): instead of the counts above
    layout: str | None = None


@dataclass
class TrainConfig:
    seed: int = 1234  # initialisation and data-order seed
    micro_batch_size: int = 1  # sequences per micro-batch on each data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks and micro-batches
    iters: int = 1000  # optimizer steps of the whole run
    eval_interval: int = 100  # steps between validation passes
    eval_iters: int = 8  # global batches per validation pass
    log_interval: int = 10  # steps between log lines
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # weights and compute (auto: bf16 on GPU, fp32 on CPU)
    # blockwise: DeepSeek-V3's FP8 recipe on torch (glm52_train/model/fp8.py), emulated on CPUs;
    # te-e4m3 / te-hybrid: Transformer Engine's recipes (TE importable on a GPU); null: no FP8
    fp8: Literal["blockwise", "te-e4m3", "te-hybrid"] | None = None
    fp8_dgrad: Literal["fp8", "bf16"] = "fp8"  # train.fp8=blockwise: input-gradient GEMMs in FP8 or unquantised
    fp8_wgrad: Literal["fp8", "bf16"] = "fp8"  # train.fp8=blockwise: weight-gradient GEMMs in FP8 or unquantised
    transformer_engine: Literal["auto", "on", "off"] = "auto"  # auto: TE's layers where importable on a GPU
    clip_grad: float = 1.0  # largest global gradient norm (0: no clipping)
    grad_reduce_in_fp32: bool = True  # false: gradients accumulated and reduced in bf16 (Megatron-Bridge's GLM-5.2 recipes)
    recompute: Literal["full", "selective"] | None = None  # activation recomputation (null: none)
    # selective: Megatron-Core's recompute modules this stack honours (mla_up_proj, mlp, moe, shared_experts)
    recompute_modules: list[str] = field(default_factory=lambda: ["mla_up_proj"])
    freeze: Literal["all_but_indexer"] | None = None  # all_but_indexer: train only the DSA indexers (the dense warm-up)
    max_skipped_steps: int = 10  # consecutive non-finite steps before the run stops
    exit_after_iters: int | None = None  # stop (with a checkpoint) after this many steps of this run
    collective_timeout_minutes: float = 30.0  # a collective waiting longer ends the run, naming the ranks that hung
    override_schedule: bool = False  # resume on this schedule though it differs from the checkpoint's (else refused)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "muon"] = "adamw"  # the optimizer
    lr: float = 3e-4  # peak learning rate, reached at the end of the warm-up
    min_lr: float = 3e-5  # learning rate at the end of the decay
    weight_decay: float = 0.1  # decoupled weight decay (not on norms and biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"  # learning-rate decay after the warm-up
    warmup_iters: int | None = None  # steps of linear warm-up from 0 to lr (null: warmup_fraction of the decay length)
    warmup_fraction: float = 0.1  # warm-up share of the decay length when warmup_iters is null (Megatron-LM's --lr-warmup-fraction)
    decay_iters: int | None = None  # steps of warm-up plus decay (null: train.iters)
    wsd_decay_iters: int | None = None  # the final decay of WSD (default 10% of decay_iters)
    # optimizer.name=muon (glm52_train/training/muon.py): Muon for 2-D hidden matrices, AdamW
    # (lr, betas, eps above) for the rest, one schedule and weight decay for both
    muon_momentum: float = 0.95  # Muon's momentum
    muon_nesterov: bool = True  # Nesterov momentum for Muon
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_ns_coeffs: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])  # Newton-Schulz a, b, c
    muon_rms_scale: float = 0.2  # update = rms_scale * sqrt(max(m, n)) * orth(U): RMS 0.2, like AdamW's
    muon_split_heads: bool = True  # MLA q/kv up-projections orthogonalised per head (GLM-5)


@dataclass
class DSAConfig:
    # dense: pre-DSA pretraining (no indexer work); warmup: dense attention while the indexer
    # learns (with train.freeze); sparse: top-k attention (dense path where top-k covers every key)
    mode: Literal["sparse", "warmup", "dense"] = "sparse"
    loss_coeff: float = 1.0  # weight of the indexer's KL loss
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton on GPU, the PyTorch references on CPU
    deterministic: bool = False  # true: sparse attention backward without atomics (bitwise-reproducible; GPU speed unmeasured)
    indexer_loss: Literal["forward", "dq_pass"] = "forward"  # sparse indexer KL: forward (gathers kv again) or dq_pass (in the attention backward; GPU speed unmeasured)


@dataclass
class MoEConfig:
    aux_loss_coeff: float = 1e-4  # sequence-wise balance loss
    bias_update_rate: float = 1e-3  # aux-loss-free balancing


@dataclass
class MTPConfig:
    loss_scale: float = 0.3  # weight of the multi-token-prediction loss


@dataclass
class CheckpointConfig:
    enable: bool = True  # false: neither resume nor save (benchmarks, smoke runs)
    dir: str | None = None  # default checkpoints/<run name>
    interval: int = 1000  # steps between saves (and one at the end)
    keep_last: int | None = 3  # checkpoints kept, the newest (null: all)
    resume: str | None = "auto"  # auto | none | PATH
    overwrite: bool = False  # with resume none: move an earlier run in dir / run_dir aside (to DIR.old-N), not refuse
    init_from: str | None = None  # weights only: fresh optimizer, schedule and data position
    on_damaged: Literal["stop", "fallback"] = "stop"  # newest checkpoint damaged: stop, or load the newest good one
    async_save: bool = False  # write checkpoints in a forked process while training goes on


@dataclass
class LoggingConfig:
    run_dir: str | None = None  # default runs/<run name>
    name: str | None = None  # names the run's folders and W&B run (default: the config file's name)
    wandb: Literal["offline", "online", "disabled"] = "offline"  # Weights & Biases logging
    wandb_project: str = "glm52"  # W&B project
    wandb_entity: str | None = None  # W&B entity (null: your default)
    tensorboard: bool = False  # also write TensorBoard event files into run_dir
    profile_at: int | None = None  # profile steps profile_at .. +profile_steps-1 (run_dir/profile/)
    profile_steps: int = 3  # steps profiled from logging.profile_at


@dataclass
class RunConfig:
    model: Any = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived ---------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        if isinstance(self.model, ModelConfig):
            return self.model
        if isinstance(self.model, str):
            return get_model_config(self.model)
        if isinstance(self.model, dict):
            fields = dict(self.model)
            base = get_model_config(fields.pop("base")) if "base" in fields else ModelConfig()
            known = set(base.to_dict())
            unknown = sorted(set(fields) - known)
            if unknown:
                meant = closest(unknown[0], known)
                raise ConfigError(_unknown_key(f"model.{unknown[0]}", f"model.{meant}" if meant else None))
            hints = get_type_hints(ModelConfig)
            fields = {k: _coerce(v, hints[k], f"model.{k}") for k, v in fields.items()}
            model = base.replace(**fields)
            changed = [k for k in fields if k != "name" and fields[k] != getattr(base, k)]
            if "base" in self.model and "name" not in fields and changed:  # never called by the flavor's name alone
                model = model.replace(name=modified_name(base.name, {k: fields[k] for k in changed}))
            return model
        raise ConfigError(f"model must be a flavor name or a mapping, got {type(self.model).__name__}.")

    def decay_length(self) -> int:
        """Steps of the learning-rate decay: optimizer.decay_iters, or train.iters."""
        return self.optimizer.decay_iters or self.train.iters

    def warmup_length(self) -> int:
        """Steps of the linear warm-up: optimizer.warmup_iters as given, or (null) the
        optimizer.warmup_fraction of the decay length, rounded down (always below it)."""
        o = self.optimizer
        if o.warmup_iters is not None:
            return o.warmup_iters
        return int(o.warmup_fraction * self.decay_length())

    @property
    def run_name(self) -> str:
        """What the run's folders are named after (checkpoints/NAME, runs/NAME) and W&B calls it:
        `logging.name`, which load_run_config sets to the config file's name without its suffix
        when the file gives none (configs/tiny.yaml -> tiny); for a config built without a file,
        `run-` and 8 hex digits of a hash of what makes the run itself (the fields a resume checks,
        glm52_train.training.identity), so that two such configs share folders only when one may
        resume the other. Never the model's flavor: two runs of one model with other data or
        settings are two runs."""
        if self.logging.name:
            return self.logging.name
        import hashlib
        import json

        from glm52_train.training.identity import identity

        record = json.dumps(identity(self.to_dict()), sort_keys=True, default=str)
        return f"run-{hashlib.sha256(record.encode()).hexdigest()[:8]}"

    def checkpoint_dir(self) -> Path:
        """`checkpoint.dir`, else checkpoints/<run name>."""
        return Path(self.checkpoint.dir or f"checkpoints/{self.run_name}")

    def run_dir(self) -> Path:
        """`logging.run_dir`, else runs/<run name>."""
        return Path(self.logging.run_dir or f"runs/{self.run_name}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = self.model_config().to_dict()
        return out

    def layout(self, world_size: int) -> Layout:
        """The parallel degrees of this run on `world_size` processes."""
        p = self.parallel
        vpp = p.vpp or 1
        if p.layout and p.vpp is None and p.pp >= 1:
            from glm52_train.layout import parse_pipeline

            try:
                vpp = parse_pipeline(self.model_config(), p.layout, p.pp).virtual_pipeline_model_parallel_size
            except ValueError:
                vpp = 1  # validate() names the problem
        return Layout(tp=p.tp, pp=p.pp, vpp=vpp, ep=p.ep, etp=p.etp or p.tp, cp=p.cp,
                      dp=world_size // (p.tp * p.pp * p.cp), sp=p.sp, pipeline=p.layout)

    def use_bf16(self) -> bool:
        """`train.precision` resolved on this machine (auto: bf16 on a GPU, fp32 on a CPU)."""
        if self.train.precision == "auto":
            import torch

            return torch.cuda.is_available()
        return self.train.precision == "bf16"

    def use_transformer_engine(self) -> bool:
        """`train.transformer_engine` resolved on this machine (auto: when importable on a GPU)."""
        import torch

        from glm52_train import compat

        if self.train.transformer_engine == "auto":
            # blockwise FP8 is the project's own linear: auto then means Megatron-Core's local layers
            return (torch.cuda.is_available() and compat.transformer_engine_available()
                    and self.train.fp8 != "blockwise")
        return self.train.transformer_engine == "on"

    # ---- validation ------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "RunConfig":
        model = self.model_config().validate()
        from glm52_train.parallel import world_size_from_env

        world = world_size or world_size_from_env()
        p, t, d = self.parallel, self.train, self.data

        def need(ok: bool, sentence: str) -> None:
            if not ok:
                raise ConfigError(sentence)

        for name in ("tp", "pp", "ep", "cp"):
            need(getattr(p, name) >= 1, f"parallel.{name} must be at least 1.")
        model_parallel = p.tp * p.pp * p.cp
        need(world % model_parallel == 0,
             f"the world size {world} is not divisible by tp x pp x cp = {p.tp} x {p.pp} x {p.cp}.")
        layout = self.layout(world)
        need(not (t.freeze == "all_but_indexer" and self.dsa.mode == "dense"),
             "train.freeze=all_but_indexer trains only the indexers, which dsa.mode=dense leaves unused: "
             "the indexer warm-up is dsa.mode=warmup.")
        need(t.micro_batch_size >= 1 and t.global_batch_size >= 1, "batch sizes must be positive.")
        need(t.global_batch_size % (t.micro_batch_size * layout.dp) == 0,
             f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
             f"micro_batch_size x data-parallel size ({t.micro_batch_size} x {layout.dp}).")
        microbatches = t.global_batch_size // (t.micro_batch_size * layout.dp)
        problems = layout_problems(model, layout, d.seq_length, first_stage_layers=p.first_stage_layers,
                                   last_stage_layers=p.last_stage_layers, microbatches=microbatches)
        need(not problems, f"parallel: {problems[0] if problems else ''}")
        why = recompute_problem(t.recompute, t.recompute_modules if t.recompute == "selective" else [])
        need(why is None, f"train.{why}")
        need(d.seq_length >= 2, "data.seq_length must be at least 2.")
        need(not d.packed or t.micro_batch_size == 1,
             "data.packed needs train.micro_batch_size 1 (each microbatch is one packed sample).")
        need(bool(d.blend), "data.blend lists no datasets.")
        need(all(s.weight > 0 for s in d.blend), "data.blend weights must be positive.")
        need(t.iters >= 1, f"train.iters must be a positive whole number, got {t.iters}.")
        o = self.optimizer
        need(math.isfinite(o.lr) and o.lr > 0, f"optimizer.lr must be a positive number, got {o.lr}.")
        need(math.isfinite(o.min_lr) and 0 <= o.min_lr, f"optimizer.min_lr must be zero or positive, got {o.min_lr}.")
        need(o.decay_iters is None or o.decay_iters >= 1,
             f"optimizer.decay_iters must be a positive whole number or null, got {o.decay_iters}.")
        decay = self.decay_length()
        need(math.isfinite(o.warmup_fraction) and 0 <= o.warmup_fraction < 1,
             f"optimizer.warmup_fraction must be at least 0 and below 1, got {o.warmup_fraction}.")
        need(o.warmup_iters is None or 0 <= o.warmup_iters < decay,
             f"optimizer.warmup_iters ({o.warmup_iters}) must be below the decay length ({decay}, "
             f"optimizer.decay_iters or train.iters); or set it to null for optimizer.warmup_fraction "
             f"({o.warmup_fraction:g}) of the decay length.")
        need(o.name != "muon" or (len(o.muon_ns_coeffs) == 3 and o.muon_ns_steps >= 1 and 0 <= o.muon_momentum < 1
                                  and o.muon_rms_scale > 0),
             "optimizer.muon_ns_coeffs needs 3 numbers, muon_ns_steps at least 1, muon_momentum in [0, 1) "
             "and muon_rms_scale above 0.")
        need(not self.checkpoint.overwrite or self.checkpoint.resume in (None, "none"),
             "--overwrite (checkpoint.overwrite) starts the run over: give it with --resume none.")
        need(self.checkpoint.resume in (None, "auto", "none") or Path(self.checkpoint.resume).exists(),
             f"checkpoint.resume {self.checkpoint.resume!r} is neither auto, none, nor an existing path.")
        need(t.log_interval >= 1 and t.eval_interval >= 1, "log and eval intervals must be at least 1.")
        need(t.collective_timeout_minutes > 0, "train.collective_timeout_minutes must be positive.")
        te = self.use_transformer_engine()
        need(t.transformer_engine != "on" or te,
             "train.transformer_engine=on but Transformer Engine is not importable on a GPU here.")
        need(not (t.fp8 or "").startswith("te-") or te,
             f"train.fp8={t.fp8} is Transformer Engine's recipe, and Transformer Engine is not importable "
             "on a GPU here (train.fp8=blockwise runs without it).")
        need(t.fp8 != "blockwise" or not te,
             "train.fp8=blockwise uses the project's FP8 linears, not Transformer Engine's: set "
             "train.transformer_engine=off or auto, or pick train.fp8=te-e4m3 / te-hybrid.")
        need(t.fp8 == "blockwise" or (t.fp8_dgrad, t.fp8_wgrad) == ("fp8", "fp8"),
             "train.fp8_dgrad and train.fp8_wgrad choose the GEMM paths of train.fp8=blockwise: set "
             "train.fp8=blockwise too, or leave them at fp8.")
        if t.fp8 == "blockwise":
            import torch

            if torch.cuda.is_available():
                from glm52_train.model.fp8 import blockwise_support_problem

                problem = blockwise_support_problem()
                need(problem is None,
                     f"train.fp8=blockwise on a GPU needs torch's blockwise-scaled FP8 matmul "
                     f"(torch.nn.functional.scaled_mm with 1x128/128x128 scales: a torch built with "
                     f"CUDA >= 12.9, e.g. 2.11+cu130, on an sm90 GPU), but {problem}.")
        need(self.logging.profile_at is None or self.logging.profile_at >= 1,
             "logging.profile_at must be a step number (1 or more) or null.")
        need(self.logging.profile_steps >= 1, "logging.profile_steps must be at least 1.")
        return self


# ---- loading -------------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is not None and type(None) in args:  # Optional[X] / X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}.") from None
    if hint is int:
        try:
            number = float(value) if isinstance(value, str) else value  # "1e3" from an override
            whole = int(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be a whole number, got {value!r}.") from None
        if isinstance(value, bool) or whole != number:
            raise ConfigError(f"{where} must be a whole number, got {value!r}.")
        return whole
    if hint is str:
        return str(value)
    return value


def _unknown_key(key: str, meant: str | None) -> str:
    hint = f" (did you mean {meant}?)" if meant else ""
    return f"unknown key {key}{hint}; `glm52 config keys` lists every key."


def _build(cls, data: Any, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping.")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key, prefix = unknown[0], f"{where}." if where else ""
        below = data[key]
        tail = next(iter(below)) if isinstance(below, dict) and len(below) == 1 else None
        meant = closest(key, names)
        section = get_type_hints(cls).get(meant) if meant else None
        if tail and dataclasses.is_dataclass(section) and tail in {f.name for f in dataclasses.fields(section)}:
            key, meant = f"{key}.{tail}", f"{meant}.{tail}"  # `trian.iters` -> `train.iters`
        raise ConfigError(_unknown_key(prefix + key, prefix + meant if meant else None))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        if parts[0] == "model" and len(parts) > 1 and not isinstance(data.get("model"), dict):
            # model.num_layers=6 over the config's flavor (tiny when it names none): a modified flavor
            data["model"] = {"base": data.get("model", RunConfig.model)}
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {key}: {part} is not a section.")
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_scalar(value)
    return data


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({e}).".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections.")
    data = apply_overrides(data, overrides or [])
    if path and isinstance(data.setdefault("logging", {}), dict) and data["logging"].get("name") is None:
        data["logging"]["name"] = Path(path).stem  # the run is named after its file (RunConfig.run_name)
    return _build(RunConfig, data, "")


# ---- documentation: `glm52 config keys`, `glm52 pretrain --help`, `glm52 config show` ------------

def modified_name(base: str, changes: dict) -> str:
    """The name of a flavor with fields changed: `tiny+num_layers=6` (a structured value by its
    field name alone), so that logs, `info` and `config show` never call it by the flavor's name."""
    def part(key, value):
        return key if isinstance(value, (dict, list)) else f"{key}={value}"

    return f"{base}+" + ",".join(part(k, v) for k, v in changes.items())


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is list:
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(inner)) + "}"
        return f"list of {_type_name(inner)}"
    if origin is not None and type(None) in args:
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _default_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


@dataclass
class Key:
    """One run-config key as `glm52 config keys` lists it."""

    name: str
    type: str
    default: str
    help: str


def _section_keys(cls, prefix: str) -> list[Key]:
    hints, docs, out = get_type_hints(cls), field_help(cls), []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        out.append(Key(f"{prefix}{f.name}", _type_name(hints[f.name]), _default_text(default), docs.get(f.name, "")))
    return out


def config_keys() -> list[Key]:
    """Every key of the run config, section by section, then the model's fields (model.*)."""
    keys = [Key("model", "flavor or mapping", _default_text(RunConfig.model),
                f"a flavor ({', '.join(MODELS)}) or a mapping of the model.* fields below, "
                "with base: FLAVOR to start from")]
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _section_keys(hints[f.name], f"{f.name}.")
    keys += _section_keys(ModelConfig, "model.")
    return keys


def format_keys(keys: list[Key] | None = None) -> str:
    """The keys as a table, one line each: name, type, default, meaning."""
    keys = keys if keys is not None else config_keys()
    name_w = max(len(k.name) for k in keys)
    type_w = min(max(len(k.type) for k in keys), 22)
    default_w = min(max(len(k.default) for k in keys), 14)
    lines = [f"  {'KEY':<{name_w}}  {'TYPE':<{type_w}}  {'DEFAULT':<{default_w}}  MEANING"]
    for k in keys:
        if k.name.startswith("model.") and not lines[-1].lstrip().startswith("model."):
            lines.append("  model.*: the model's fields (override a flavor's as model.FIELD=VALUE; the defaults "
                         "are glm52-744b's, where a mapping without base starts)")
        lines.append(f"  {k.name:<{name_w}}  {k.type:<{type_w}}  {k.default:<{default_w}}  {k.help}")
    return "\n".join(lines)


def dump_config(cfg: RunConfig) -> str:
    """The effective config as YAML: what `glm52 pretrain` with the same file and overrides runs."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=1000)
