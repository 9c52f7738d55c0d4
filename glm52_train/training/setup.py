"""Build what a run trains: model chunks wrapped in Megatron-Core DDP, the distributed
optimizer, the learning-rate schedule and the data, from a validated RunConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from glm52_train import compat, parallel
from glm52_train.config import ConfigError, ModelConfig
from glm52_train.data.loader import build_datasets, check_data, check_splits, dataloader, read_documents
from glm52_train.data.tokenizer import Tokenizer
from glm52_train.model.build import build_model, transformer_config
from glm52_train.run_config import RunConfig
from glm52_train.training.identity import make_scheduler, schedule_of
from glm52_train.training.metrics import ExpertLoad


@dataclass
class TrainingParts:
    """What `build` makes for a run: this rank's model chunks (one per virtual pipeline stage)
    in DDP, their optimizer and LR schedule, and the expert-load record the grad hook fills."""

    model_cfg: ModelConfig
    tokenizer: Tokenizer
    chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    expert_load: ExpertLoad
    num_microbatches: int


def build(cfg: RunConfig) -> TrainingParts:
    """Process groups, then the model, optimizer and schedule of this rank (the data's files are
    checked against the model first)."""
    check_host_memory(cfg)
    parallel.initialize(cfg.parallel, seed=cfg.train.seed, timeout_minutes=cfg.train.collective_timeout_minutes)
    model_cfg = cfg.model_config()
    tokenizer = Tokenizer(cfg.data.tokenizer)
    check_training_data(cfg, model_cfg, tokenizer)
    chunks, config = build_model_chunks(model_cfg, cfg, cfg.data.seq_length)
    if cfg.train.freeze == "all_but_indexer":
        freeze_all_but_indexer(chunks)
    if cfg.dsa.mode == "dense":
        freeze_indexer(chunks)
    bf16 = cfg.use_bf16()
    chunks = wrap_ddp(chunks, config, bf16, distributed_optimizer=cfg.optimizer.name != "muon",
                      grad_reduce_in_fp32=cfg.train.grad_reduce_in_fp32)
    expert_load = ExpertLoad(chunks)
    optimizer, scheduler, _ = build_optimizer(cfg, chunks, config, bf16, expert_load)
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    return TrainingParts(model_cfg, tokenizer, chunks, optimizer, scheduler, expert_load, num_microbatches)


def check_run(cfg: RunConfig) -> int:
    """What `pretrain` refuses before it joins a process group, without one: the config for the
    WORLD_SIZE processes of the launch, the host memory of the LOCAL_WORLD_SIZE ones on this
    machine, the tokenizer, every dataset of the blend and the start (check_start). Returns the
    world size checked."""
    world = parallel.world_size_from_env()
    cfg.validate(world)
    check_host_memory(cfg)
    check_training_data(cfg, cfg.model_config(), Tokenizer(cfg.data.tokenizer))
    from glm52_train.training.checkpointer import check_start

    check_start(cfg)  # the resume (another run's checkpoint, a changed schedule) or --resume none over a run
    return world


def check_training_data(cfg: RunConfig, model_cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """The blend's files (check_data), and a data.split leaving each dataset training documents."""
    metas = check_data(cfg, model_cfg, tokenizer)
    check_splits(cfg, {source.path: meta["documents"] for source, meta in zip(cfg.data.blend, metas)})


def available_host_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(cfg: RunConfig) -> None:
    """On a machine without GPUs the model, its gradients, optimizer state and activations live in
    host memory: refuse a run that cannot fit, with `glm52 plan`'s estimate, before the
    out-of-memory killer ends it halfway through building the model."""
    if compat.cuda_available():
        return
    available = available_host_memory()
    if available is None:
        return
    from glm52_train.plan import GiB, estimate

    world = parallel.world_size_from_env()
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes on this machine
    t = cfg.train
    layout = cfg.layout(world)
    est = estimate(cfg.model_config(), layout, cfg.data.seq_length, float("inf"), t.micro_batch_size,
                   num_microbatches=t.global_batch_size // (t.micro_batch_size * layout.dp),
                   recompute=t.recompute == "full", fp8=t.fp8 == "blockwise")
    per_process = est.total - est.fixed  # the fixed reserve is CUDA's context and NCCL's buffers
    if per_process * here > available:
        model = cfg.model_config().name
        raise ConfigError(
            f"model {model!r} needs about {per_process / GiB:,.1f} GiB per process on this machine without "
            f"a GPU ({here} process{'es' if here > 1 else ''}: {per_process * here / GiB:,.1f} GiB; glm52 plan's "
            f"estimate under {layout.describe()}: weights {est.weights / GiB:,.1f}, gradients "
            f"{est.gradients / GiB:,.1f}, optimizer {est.optimizer / GiB:,.1f}, activations "
            f"{(est.activations + est.dsa_buffers + est.logits) / GiB:,.1f}), but only "
            f"{available / GiB:,.1f} GiB is available; train it on GPUs (glm52 plan --model {model}) "
            f"or pick a smaller model."
        )


class Data:
    """The training batches from `consumed_samples` on, and the validation split (sized for every
    evaluation of the run), each read from its start by `validation()`."""

    def __init__(self, cfg: RunConfig, parts: TrainingParts, consumed_samples: int) -> None:
        gbs = cfg.train.global_batch_size
        evals = cfg.train.iters // cfg.train.eval_interval + 1
        self.micro_batch_size, self.num_chunks = cfg.train.micro_batch_size, len(parts.chunks)
        from glm52_train.training import faults

        faults.hang_in_setup()  # GLM52_FAULT_HANG_IN_SETUP (tests); nothing when unset
        paths = [s.path for s in cfg.data.blend]
        self.note = check_splits(cfg, {p: read_documents(p) for p in paths})  # validation skipped, or None
        train, self.valid = build_datasets(cfg, parts.tokenizer, cfg.train.iters * gbs, evals * cfg.train.eval_iters * gbs)
        self.train = self._iterators(train, consumed_samples, cfg.data.num_workers)

    def validation(self):
        return self._iterators(self.valid, 0)

    def _iterators(self, dataset, consumed: int, workers: int = 0):
        """One iterator per model chunk: each virtual pipeline stage reads every microbatch."""
        its = [iter(dataloader(dataset, consumed, self.micro_batch_size, workers)) for _ in range(self.num_chunks)]
        return its[0] if len(its) == 1 else its


def build_model_chunks(model_cfg: ModelConfig, run: RunConfig, run_seq_length: int | None = None):
    """The model chunks of this rank (one per virtual pipeline stage), on its device, unwrapped."""
    config = transformer_config(model_cfg, run)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        chunk = build_model(
            model_cfg,
            run,
            config=config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        chunk.relay_seq_length = run_seq_length // config.context_parallel_size if run_seq_length else None
        chunks.append(chunk.to(compat.default_device()))
    return chunks, config


def freeze_all_but_indexer(chunks) -> int:
    """DSA dense warm-up: only the lightning indexers learn. Returns the trainable count."""
    trainable = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(".indexer." in name)
            trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ConfigError("train.freeze=all_but_indexer leaves nothing to train: the model has no indexer.")
    return trainable


def freeze_indexer(chunks) -> None:
    """dsa.mode=dense: the indexers do no work; kept out of the optimizer (no weight decay
    either), they reach the checkpoints as initialised, for the warm-up stage to train."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".indexer." in name:
                param.requires_grad_(False)


def wrap_ddp(chunks, config, bf16: bool, distributed_optimizer: bool = True, grad_reduce_in_fp32: bool = True):
    """Megatron-Core DDP: gradients reduce-scattered for the distributed optimizer (AdamW), or
    all-reduced for Muon, whose layer-wise sharding needs each owner's whole matrices. With
    `grad_reduce_in_fp32` false the gradient buffers (and their reduction) are in the parameters'
    dtype (bf16 under bf16 precision), as `train.grad_reduce_in_fp32: false` asks."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if bf16 else chunk
        wrapped.append(DistributedDataParallel(config, ddp_config, module, disable_bucketing=i > 0))
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def build_optimizer(cfg: RunConfig, chunks, config, bf16: bool, expert_load: ExpertLoad | None = None):
    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=cfg.train.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.name != "muon",
    )
    if o.name == "muon":
        from glm52_train.training.muon import build_muon_optimizer

        optimizer = build_muon_optimizer(cfg, chunks, cfg.model_config(), opt_config)
    else:
        optimizer = get_megatron_optimizer(opt_config, chunks)
    scheduler = make_scheduler(optimizer, schedule_of(cfg.to_dict()), o.weight_decay)
    # Megatron-Core's schedules call these through the model config.
    config.finalize_model_grads_func = (finalize_model_grads if expert_load is None
                                        else expert_load.around(finalize_model_grads))
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return optimizer, scheduler, opt_config
