"""Muon (`optimizer.name: muon`), the optimizer GLM-4.5 and GLM-5 were pretrained with, plugged
into Megatron-Core 0.16.1 at its seams.

Which parameter gets what (`param_role`):
- Muon: the 2-D weight matrices of attention (MLA's down- and up-projections and output
  projection, the DSA indexer's query and key projections), the dense MLP, the shared expert,
  every routed expert (each its own matrix; Megatron-Core's SequentialMLP keeps them apart, and
  a stacked GroupedMLP weight is refused), and the MTP layer's `eh_proj`.
- AdamW: the input embedding and the output head (one row per token: orthogonalising them
  couples tokens), every norm and bias (1-D), the MoE router (its rows score experts; an
  orthogonal update would force equal-norm changes on every expert's score; its expert bias is
  a buffer moved by the aux-loss-free rule, not by an optimizer), and the DSA indexer's
  `weights_proj` (index_heads x hidden: a per-head gate of rank <= index_heads whose row norms
  are the heads' weights, which an orthogonalised update would equalise).
- MLA's `linear_q_up_proj` and `linear_kv_up_proj` are orthogonalised per head ("Muon split",
  GLM-5): the [heads * rows_per_head, in] matrix is viewed as [heads, rows_per_head, in] and each
  block goes through Newton-Schulz alone. Tensor parallelism splits these by whole heads, so each
  TP rank orthogonalises its own heads: the same numbers, no communication.

The step of one Muon matrix W (m x n) with gradient G: B <- mu B + G (momentum buffer);
U = G + mu B (Nesterov) or B; O = NS5(U) (the quintic Newton-Schulz iteration, coefficients
(3.4445, -4.7750, 2.0315), U normalised by its Frobenius norm first); W <- W (1 - lr wd) -
lr * rms_scale * sqrt(max(m, n)) * O. An orthogonal m x n matrix has RMS 1/sqrt(max(m, n)), so
the update's RMS is `rms_scale` (0.2, Moonlight's match to AdamW's typical update RMS) and the
AdamW learning-rate schedule and weight decay carry over.

Distribution (what each rank holds). Megatron-Core's DDP all-reduces the gradients (instead of
the distributed optimizer's reduce-scatter), and `LayerWiseDistributedOptimizer` (upstream, the
seam used here) gives every parameter one owner among the data-parallel ranks (dense parameters
over DP x CP, experts over the expert-data-parallel group; sorted by size and dealt out
ping-pong, so whole matrices are balanced) and all-gathers the updated weights after the step.
A rank holds the momentum buffer (Muon) or the two Adam moments (AdamW), and under bf16 the fp32
master copy, of the parameters it owns only: the distributed optimizer's 1/DP saving, by whole
matrices. A matrix split by tensor parallelism (`partition_dim`) is all-gathered over its TP
group (experts: the expert-TP group), orthogonalised whole on every rank of that group, and each
rank keeps its slice: Newton-Schulz commutes with permuting rows or columns, so the gathered
order (e.g. the interleaved gate/up halves of a TP-split SwiGLU fc1) gives the same numbers as
the unsharded matrix. Pipeline stages hold disjoint layers and need nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.optimizer import FP32Optimizer
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from glm52_train.config import ConfigError, ModelConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)
PER_HEAD = ("linear_q_up_proj.weight", "linear_kv_up_proj.weight")


def newton_schulz(g: torch.Tensor, steps: int = 5, coeffs=NS_COEFFS, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of g ([..., m, n],
    batched over leading dimensions), in g's dtype."""
    a, b, c = coeffs
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + eps)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


@dataclass(frozen=True)
class Role:
    """How the optimizer treats one parameter: `muon` or `adamw`, the label its update RMS is
    logged under, the rows of one head for per-head orthogonalisation, and whether it is an
    expert weight (whose TP group is the expert-TP group)."""

    kind: str
    label: str
    head_rows: int | None = None
    expert: bool = False


def param_role(name: str, param: torch.Tensor, model_cfg: ModelConfig, split_heads: bool = True) -> Role:
    local_expert = ".mlp.experts." in name
    if local_expert and name.endswith(("experts.weight1", "experts.weight2")):
        raise ConfigError(f"optimizer.name=muon needs one matrix per expert; {name} stacks the experts "
                          "(Megatron-Core's GroupedMLP). Use the per-expert experts of the default spec.")
    adamw = (param.dim() != 2 or "embedding" in name or name.startswith("output_layer")
             or ".router." in name or "weights_proj" in name)
    if adamw:
        return Role("adamw", "adamw")
    if split_heads and name.endswith(PER_HEAD[0]):
        return Role("muon", "muon_attention", head_rows=model_cfg.qk_nope_dim + model_cfg.qk_rope_dim)
    if split_heads and name.endswith(PER_HEAD[1]):
        return Role("muon", "muon_attention", head_rows=model_cfg.qk_nope_dim + model_cfg.v_head_dim)
    if local_expert:
        return Role("muon", "muon_experts", expert=True)
    if ".self_attention." in name:
        return Role("muon", "muon_attention")
    return Role("muon", "muon_mlp")


class MuonAdamW(torch.optim.Optimizer):
    """One torch optimizer for both kinds of group: Muon groups (`muon: True`) and AdamW groups.
    The update count lives in each group (`step`); per parameter it keeps `momentum_buffer`
    (Muon) or `exp_avg`, `exp_avg_sq` (AdamW). It sees only the parameters this data-parallel
    rank owns (LayerWiseDistributedOptimizer trims the groups); the TP gathers inside `step`
    are collectives of the TP group, whose ranks own the same parameters."""

    def __init__(self, groups: list[dict], *, betas, eps, momentum, nesterov, ns_steps, ns_coeffs, rms_scale):
        defaults = dict(lr=0.0, weight_decay=0.0, betas=tuple(betas), eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=tuple(ns_coeffs), rms_scale=rms_scale,
                        step=0)
        super().__init__(groups, defaults)
        self.update_sq: dict[str, list[float]] = {}

    def init_state(self) -> None:
        """Zero state for every parameter (before loading a checkpoint into it)."""
        for group in self.param_groups:
            for p in group["params"]:
                if len(self.state[p]) == 0:
                    if group["muon"]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    else:
                        self.state[p]["exp_avg"] = torch.zeros_like(p)
                        self.state[p]["exp_avg_sq"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        self.update_sq = {}
        for group in self.param_groups:
            group["step"] += 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self._muon(p, group) if group["muon"] else self._adamw(p, group)
                if param_is_not_tensor_parallel_duplicate(p):
                    acc = self.update_sq.setdefault(group["label"], [0.0, 0])
                    acc[0] += float(update.double().square().sum())
                    acc[1] += update.numel()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])

    def _adamw(self, p, group) -> torch.Tensor:
        state, (b1, b2), t = self.state[p], group["betas"], group["step"]
        if not state:
            self.init_state()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])

    def _muon(self, p, group) -> torch.Tensor:
        if not self.state[p]:
            self.init_state()
        buf, mu = self.state[p]["momentum_buffer"], group["momentum"]
        buf.mul_(mu).add_(p.grad)
        u = p.grad + mu * buf if group["nesterov"] else buf
        return orthogonal_update(u, p, group)


def orthogonal_update(u: torch.Tensor, p: torch.Tensor, group: dict) -> torch.Tensor:
    """rms_scale * sqrt(max(m, n)) * NS(u) for this rank's part of the matrix: per head, or on
    the TP-gathered whole matrix, sliced back."""
    steps, coeffs, scale = group["ns_steps"], group["ns_coeffs"], group["rms_scale"]
    if group["head_rows"]:
        blocks = u.reshape(-1, group["head_rows"], u.shape[-1])
        o = newton_schulz(blocks, steps, coeffs) * (scale * math.sqrt(max(blocks.shape[-2:])))
        return o.reshape(u.shape)
    tp_group = (parallel_state.get_expert_tensor_parallel_group() if group["expert"]
                else parallel_state.get_tensor_model_parallel_group())
    tp = torch.distributed.get_world_size(tp_group)
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return newton_schulz(u, steps, coeffs) * (scale * math.sqrt(max(u.shape)))
    dim = p.partition_dim
    pieces = [torch.empty_like(u) for _ in range(tp)]
    torch.distributed.all_gather(pieces, u.contiguous(), group=tp_group)
    full = torch.cat(pieces, dim=dim)
    o = newton_schulz(full, steps, coeffs) * (scale * math.sqrt(max(full.shape)))
    return o.chunk(tp, dim=dim)[torch.distributed.get_rank(tp_group)].contiguous()


def param_groups(chunks, model_cfg: ModelConfig, split_heads: bool = True) -> list[dict]:
    """The parameter groups: one per (role, expert-parallel, weight decay), the same list on every
    rank (empty where a pipeline stage has no such parameter): Megatron-Core's layer-wise
    checkpointing gathers group metadata by position across ranks. Weight decay follows
    Megatron-Core's convention: none on biases and 1-D parameters."""
    q_rows = model_cfg.qk_nope_dim + model_cfg.qk_rope_dim
    kv_rows = model_cfg.qk_nope_dim + model_cfg.v_head_dim
    roles = [(Role("adamw", "adamw"), False, 1.0), (Role("adamw", "adamw"), False, 0.0),
             (Role("muon", "muon_attention"), False, 1.0),
             (Role("muon", "muon_attention", head_rows=q_rows), False, 1.0),
             (Role("muon", "muon_attention", head_rows=kv_rows), False, 1.0),
             (Role("muon", "muon_mlp"), False, 1.0),
             (Role("muon", "muon_experts", expert=True), False, 1.0),
             (Role("muon", "muon_experts", expert=True), True, 1.0)]
    by_key = {key: dict(params=[], muon=key[0].kind == "muon", label=key[0].label, head_rows=key[0].head_rows,
                        expert=key[0].expert, is_expert_parallel=key[1], wd_mult=key[2], lr_mult=1.0,
                        is_decoupled_lr=False, default_config=True)
              for key in roles}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            name = name.replace("module.", "")
            role = param_role(name, p, model_cfg, split_heads)
            is_ep = not getattr(p, "allreduce", True)
            wd_mult = 0.0 if (name.endswith(".bias") or p.dim() == 1) else 1.0
            by_key[(role, is_ep, wd_mult)]["params"].append(p)
    return list(by_key.values())


LABELS = ("adamw", "muon_attention", "muon_experts", "muon_mlp")


class MuonDistributedOptimizer(LayerWiseDistributedOptimizer):
    """Megatron-Core's layer-wise distributed optimizer around one MuonAdamW, with the update
    RMS per parameter group and a checkpoint that is only layer-wise where it is sharded."""

    @property
    def inner(self) -> MuonAdamW:
        return self.chained_optimizers[0].optimizer

    def update_rms(self) -> dict:
        """The last step's update RMS per label (before the learning rate): a collective over
        every rank (each counts the parameters it owns, TP duplicates once)."""
        labels = LABELS
        local = self.inner.update_sq
        sums = torch.tensor([[local.get(k, [0.0, 0])[0], local.get(k, [0.0, 0])[1]] for k in labels],
                            dtype=torch.float64, device=_device())
        torch.distributed.all_reduce(sums)
        return {f"update_rms/{k}": math.sqrt(s / n) for k, (s, n) in zip(labels, sums.tolist()) if n > 0}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        """This rank's owned parameters' state as tensors named by parameter (replica 0 on the
        owner when sharded, so any layout loads them); the groups are not saved (a run keeps its
        own: `load_from`). Upstream's version assumes the bf16 wrapper's layout."""
        sub = self.chained_optimizers[0]
        sd = sub.sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        if self.dp_cp_params_list is not None or self.expt_dp_params_list is not None:
            for sh in nested_values(sd):
                if hasattr(sh, "replica_id"):
                    sh.replica_id = 0 if isinstance(sh.replica_id, int) else (*sh.replica_id[:-1], 0)
        opt = sd["optimizer"] if "optimizer" in sd else sd
        opt["param_groups"] = LocalNonpersistentObject(opt["param_groups"])
        if not opt["state"]:
            opt["state"] = LocalNonpersistentObject(opt["state"])
        if "fp32_from_fp16_params" in sd:  # bf16: lists per group, empty ones not saved
            sd["fp32_from_fp16_params"] = {i: g if g else LocalNonpersistentObject(g)
                                           for i, g in enumerate(sd["fp32_from_fp16_params"])}
        return sd

    @torch.no_grad()
    def allgather_params(self) -> None:
        """The owners' updated weights to every rank of their group: one all-gather per group,
        each rank's flat share padded to the largest (gloo needs equal sizes)."""
        for params_list, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                                   (self.expt_dp_params_list, self.pg_collection.expt_dp)):
            if not params_list:
                continue
            rank = torch.distributed.get_rank(group)
            sizes = [sum(p.numel() for p in params) for params in params_list]
            ref = next(p for params in params_list for p in params)
            flat = torch.zeros(max(sizes), dtype=ref.dtype, device=ref.device)
            if params_list[rank]:
                flat[:sizes[rank]] = _flatten_dense_tensors([p.data for p in params_list[rank]])
            out = [torch.empty_like(flat) for _ in params_list]
            torch.distributed.all_gather(out, flat, group=group)
            for i, (buf, params) in enumerate(zip(out, params_list)):
                if i == rank or not params:
                    continue
                for new, p in zip(_unflatten_dense_tensors(buf[:sizes[i]], params), params):
                    p.data.copy_(new)

    def load_from(self, loaded: dict, step: float) -> None:
        """Per-parameter state from a checkpoint; the groups (hyperparameters, which parameters
        this rank owns) stay this run's own, with the saved update count."""
        sub = self.chained_optimizers[0]
        saved = loaded.get("optimizer", loaded)
        own = self.inner.state_dict()
        for group in own["param_groups"]:
            group["step"] = int(step)
        state = saved["state"] if isinstance(saved["state"], dict) else {}
        state = {k: v for k, v in state.items() if v}
        self.inner.load_state_dict({"state": state, "param_groups": own["param_groups"]})
        masters = loaded.get("fp32_from_fp16_params")
        if masters is not None and hasattr(sub, "fp32_from_float16_groups"):
            groups = [v for _, v in sorted(masters.items())] if isinstance(masters, dict) else masters
            for current, saved_group in zip(sub.fp32_from_float16_groups, groups):
                for c, s in zip(current, saved_group if isinstance(saved_group, list) else []):
                    c.data.copy_(s)

    def update_count(self) -> int:
        return max((g["step"] for g in self.param_groups), default=0)


def _device():
    from glm52_train import compat

    return compat.default_device()


def build_muon_optimizer(cfg, chunks, model_cfg: ModelConfig, opt_config) -> MuonDistributedOptimizer:
    """MuonAdamW over every trainable parameter, wrapped for Megatron-Core (FP32Optimizer;
    LayerWiseDistributedOptimizer adds the bf16 master copies after sharding)."""
    o = cfg.optimizer
    inner = MuonAdamW(
        param_groups(chunks, model_cfg, o.muon_split_heads),
        betas=(o.beta1, o.beta2), eps=o.eps, momentum=o.muon_momentum, nesterov=o.muon_nesterov,
        ns_steps=o.muon_ns_steps, ns_coeffs=o.muon_ns_coeffs, rms_scale=o.muon_rms_scale,
    )

    def init_state(opt, config=None):
        opt.init_state()

    bf16 = opt_config.bf16
    opt_config.bf16 = False  # FP32Optimizer here; LayerWise wraps the owned part in Float16
    wrapped = FP32Optimizer(inner, opt_config, init_state)
    opt_config.bf16 = bf16
    return MuonDistributedOptimizer([wrapped], opt_config, ProcessGroupCollection.use_mpu_process_groups(),
                                    init_state_fn_list=[init_state])
