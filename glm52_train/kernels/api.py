"""Public DSA kernel API: Triton on CUDA tensors, the PyTorch reference elsewhere.

Every function takes `impl`: "auto" (Triton on CUDA, reference otherwise), "triton" (on CPU
tensors this runs Triton's interpreter: slow, for tests at tiny sizes) or "reference".

Layouts are Megatron's (sequence first) and are documented in `reference.py`. Positions:
`q_pos` defaults to arange(sq) + (sk - sq) and `k_pos` to arange(sk); key j is visible to
query i iff k_pos[j] <= q_pos[i] and, when given, k_doc[j] == q_doc[i]. The Triton path needs
the keys ordered by (document, position) (packed sequences and context-parallel all-gathered
keys are) and checks it unless `validate=False`.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import weakref

import torch
from torch.autograd.profiler import record_function

from glm52_train.kernels import reference

_TRITON_MODULES = ("indexer", "sparse_mla", "indexer_loss", "fp8_quant")


def _patch_interpreter() -> None:
    """Two fixes to Triton 3.6's CPU interpreter (used by the CPU tests only):
    - it converts scalars to Python ints with int(ndarray of shape (1,)), which NumPy >= 2.3
      rejects ("only 0-dimensional arrays can be converted"), so loops with run-time bounds
      fail: convert through the single element instead;
    - its tl.dot multiplies the raw uint16 storage of bf16 operands: widen them to fp32 first."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_glm52_patched", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), d, *args, **kwargs)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter._glm52_patched = True


def enable_interpreter() -> None:
    """Run the Triton kernels in Triton's CPU interpreter (tests, tiny sizes).

    Triton decides between compiling and interpreting when a function is decorated, and its
    own library (tl.sum, tl.max, ...) is decorated when triton is first imported: so
    TRITON_INTERPRET=1 must be set before anything imports triton (the CPU tests run the
    interpreter in a fresh subprocess for this reason). Our kernel modules imported before
    are reloaded."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    if type(tl.standard.max).__name__ != "InterpretedFunction":
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; the interpreter "
                           "needs it set before the first `import triton` (use a fresh process)")
    _patch_interpreter()
    for name in _TRITON_MODULES:
        mod = sys.modules.get(f"glm52_train.kernels.{name}")
        kernel = _first_kernel(mod) if mod is not None else None
        if kernel is not None and type(kernel).__name__ != "InterpretedFunction":
            importlib.reload(mod)


def _first_kernel(mod):
    for value in vars(mod).values():
        if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
            return value
    return None


def _triton(name: str, t: torch.Tensor, impl: str):
    """The Triton module `name` if this call should use Triton, else None."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be auto, triton or reference, not {impl!r}")
    if impl == "reference" or (impl == "auto" and not t.is_cuda):
        return None
    if not t.is_cuda:
        enable_interpreter()
    return importlib.import_module(f"glm52_train.kernels.{name}")


def _labelled(part: str):
    """Name the calls of a function in torch.profiler traces (`glm52::<part>`; see
    glm52_train/training/profile.py). Costs a few microseconds per call."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with record_function("glm52::" + part):
                return fn(*args, **kwargs)
        return inner
    return wrap


def _ranges(mod_indexer, sq, sk, device, q_pos, k_pos, q_doc, k_doc, validate):
    return mod_indexer.visible_ranges(sq, sk, device, q_pos, k_pos, q_doc, k_doc, validate=validate)


@_labelled("indexer")
def indexer_topk(q, k, w, topk: int, q_pos=None, k_pos=None, q_doc=None, k_doc=None, *,
                 impl: str = "auto", validate: bool = True, budget_bytes: int = 1 << 30) -> torch.Tensor:
    """Top-`topk` visible keys per query by lightning-indexer score.

    q [sq, b, H, D], k [sk, b, D], w [sq, b, H] -> [b, sq, topk] int32, -1 where a query has
    fewer than `topk` visible keys; the order within a row is unspecified. `budget_bytes`
    bounds the Triton path's score buffer."""
    mod = _triton("indexer", q, impl)
    if mod is None:
        return reference.indexer_topk(q, k, w, topk, q_pos, k_pos, q_doc, k_doc).to(torch.int32)
    lo, hi = _ranges(mod, q.shape[0], k.shape[0], q.device, q_pos, k_pos, q_doc, k_doc, validate)
    return mod.indexer_topk_triton(q, k, w, topk, lo, hi, budget_bytes=budget_bytes)


# id(idx) -> (weak reference to idx, its version, key block, InvertedSelection); an entry
# goes when its idx tensor is freed (weakref.finalize).
_INVERSES: dict = {}


def inverted_selection(idx: torch.Tensor, num_keys: int, block: int = 16):
    """`sparse_mla.invert_selection(idx, num_keys, block)`, built once per idx tensor.

    The IndexShare layers attend with the very tensor the full layer selected (passed from
    layer to layer), so the first backward that needs the key-major view builds it and the
    others reuse it; it is freed with the indices. A memo of a pure function of idx: a tensor
    modified in place since (its version changed) is inverted again."""
    key = id(idx)
    hit = _INVERSES.get(key)
    if hit is not None and hit[0]() is idx and hit[1] == idx._version and hit[2] == block \
            and hit[3].num_keys == num_keys:
        return hit[3]
    mod = importlib.import_module("glm52_train.kernels.sparse_mla")
    inverse = mod.invert_selection(idx.to(torch.int32), num_keys, block)
    if hit is None:
        weakref.finalize(idx, _INVERSES.pop, key, None)
    _INVERSES[key] = (weakref.ref(idx), idx._version, block, inverse)
    return inverse


@_labelled("sparse attention")
def sparse_mla(q, kv, idx, scale: float, v_dim: int = 512, *, impl: str = "auto",
               return_lse: bool = False, fwd_cfg: dict | None = None, bwd_cfg: dict | None = None):
    """Sparse MQA attention on the latent (autograd). q [sq, b, n, d], kv [sk, b, d], idx
    [b, sq, topk] (-1 = none) -> out [sq, b, n, v_dim]; with `return_lse`, also the
    log-sum-exp [b, n, sq] (fp32, no gradient) that `indexer_kl_loss(lse=...)` can reuse.

    `bwd_cfg={"atomic": False}`: the Triton backward computes dkv key-major over the inverted
    selection (`inverted_selection`, shared by every call with the same idx tensor) without
    floating-point atomics, so two backward passes give bitwise-equal gradients; the default
    (atomic) scatters dkv with fp32 atomic adds in no fixed order. The reference path is
    deterministic on CPU either way."""
    mod = _triton("sparse_mla", q, impl)
    if mod is None:
        out, lse = reference.sparse_mla(q, kv, idx, scale, v_dim)
        lse = lse.detach().float() if q.dtype != torch.float64 else lse.detach()
    else:
        inverse = None
        if bwd_cfg is not None and bwd_cfg.get("atomic", True) is False:
            block = bwd_cfg.get("BKEY", 16)
            sk = kv.shape[0]
            inverse = lambda: inverted_selection(idx, sk, block)  # noqa: E731 (built in backward)
        out, lse = mod.SparseMLAFunction.apply(q, kv, idx, scale, v_dim, fwd_cfg, bwd_cfg, inverse)
    return (out, lse) if return_lse else out


@_labelled("indexer loss")
def mla_lse(q, kv, idx, scale: float, q_pos=None, k_pos=None, q_doc=None, k_doc=None, *,
            v_dim: int = 512, impl: str = "auto", validate: bool = True) -> torch.Tensor:
    """Log-sum-exp of the main attention's scores per head, [b, n, sq] fp32: over idx[i]
    (sparse) or over every visible key (idx None: dense warm-up), blockwise on the Triton path.
    `v_dim` only splits the channels for the kernel (v_dim and d - v_dim powers of two)."""
    mod = _triton("indexer_loss", q, impl)
    if mod is None:
        return reference.mla_lse(q, kv, idx, scale, q_pos, k_pos, q_doc, k_doc)
    ranges = None
    if idx is None:
        ranges = _ranges(importlib.import_module("glm52_train.kernels.indexer"), q.shape[0],
                         kv.shape[0], q.device, q_pos, k_pos, q_doc, k_doc, validate)
    return mod.mla_lse_triton(q, kv, idx, scale, ranges, v_dim)


@_labelled("indexer loss")
def indexer_kl_loss(iq, ik, iw, q, kv, idx, scale: float, v_dim: int = 512, q_pos=None, k_pos=None,
                    q_doc=None, k_doc=None, *, lse: torch.Tensor | None = None, impl: str = "auto",
                    validate: bool = True) -> torch.Tensor:
    """Scalar mean over queries of KL(p || softmax(I)) on each query's key set.

    p: the main attention's probabilities averaged over heads (recomputed from q, kv and the
    log-sum-exp, no gradient); I: the indexer scores from iq [sq, b, H, D], ik [sk, b, D],
    iw [sq, b, H]. Key set: idx[i] (sparse training) or all visible keys (idx None: dense
    warm-up). `lse` ([b, n, sq], over the same key set, e.g. from `sparse_mla(...,
    return_lse=True)`) skips its recomputation. Gradients reach iq, ik and iw only. `v_dim`
    is accepted for symmetry with `sparse_mla`; scores use all channels of q and kv."""
    mod = _triton("indexer_loss", iq, impl)
    if mod is None:
        return reference.indexer_kl_loss(iq, ik, iw, q, kv, idx, scale, v_dim, q_pos, k_pos, q_doc, k_doc)
    ranges = None
    if idx is None:
        ranges = _ranges(importlib.import_module("glm52_train.kernels.indexer"), iq.shape[0],
                         ik.shape[0], iq.device, q_pos, k_pos, q_doc, k_doc, validate)
    return mod.IndexerKLLoss.apply(iq, ik, iw, q.detach(), kv.detach(), idx, scale, ranges, lse, v_dim)


@_labelled("indexer loss")
def indexer_kl_from_probs(iq, ik, iw, idx, head_probs, num_heads: int, *, impl: str = "auto") -> torch.Tensor:
    """The sparse `indexer_kl_loss` with its target already computed: `head_probs` [b, sq,
    topk] fp32 holds the attention probabilities summed over `num_heads` heads per top-k slot,
    as the sparse attention's dq pass writes them (`sparse_mla.sparse_mla_bwd(...,
    head_probs=)`), so kv is not gathered a second time. Gradients reach iq, ik, iw only. The
    model computes this KL inside `sparse_mla_indexer_kl`'s backward (`dsa.indexer_loss:
    dq_pass`; docs/kernels.md, section 4)."""
    mod = _triton("indexer_loss", iq, impl)
    if mod is None:
        return reference.indexer_kl_from_probs(iq, ik, iw, idx, head_probs, num_heads)
    return mod.IndexerKLFromProbs.apply(iq, ik, iw, idx, head_probs, num_heads)


class _SparseMLAIndexerKL(torch.autograd.Function):
    """`sparse_mla_indexer_kl`: the sparse attention forward; in backward dq, dkv, the dq pass's
    head probabilities and the indexer KL with its gradients (see there)."""

    @staticmethod
    def forward(ctx, q, kv, idx, iq, ik, iw, scale, v_dim, num_heads, loss_weight, reduce_probs, on_loss,
                mod, bwd_cfg, inverse):
        if mod is None:
            with torch.no_grad():
                out, lse = reference.sparse_mla(q, kv, idx, scale, v_dim)
        else:
            out, lse = mod.sparse_mla_fwd(q, kv, idx, scale, v_dim)
        ctx.save_for_backward(q, kv, idx, out, lse, iq, ik, iw)
        ctx.scale, ctx.v_dim, ctx.num_heads, ctx.mod = scale, v_dim, num_heads, mod
        ctx.loss_weight, ctx.reduce_probs, ctx.on_loss = loss_weight, reduce_probs, on_loss
        ctx.bwd_cfg, ctx.inverse = bwd_cfg, inverse
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, idx, out, lse, iq, ik, iw = ctx.saved_tensors
        mod, scale, v_dim = ctx.mod, ctx.scale, ctx.v_dim
        with record_function("glm52::sparse attention"):
            if mod is None:  # the reference: recompute the forward's graph, then the dq pass's sums
                with torch.enable_grad():
                    qd, kvd = q.detach().requires_grad_(), kv.detach().requires_grad_()
                    dq, dkv = torch.autograd.grad(reference.sparse_mla(qd, kvd, idx, scale, v_dim)[0], (qd, kvd),
                                                  dout)
                probs = reference.sparse_mla_head_probs(q, kv, idx, scale, lse)
            else:
                probs = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
                inverse = ctx.inverse() if callable(ctx.inverse) else ctx.inverse
                dq, dkv = mod.sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, v_dim, ctx.bwd_cfg, inverse,
                                             head_probs=probs)
        if ctx.reduce_probs is not None:
            probs = ctx.reduce_probs(probs)
        with record_function("glm52::indexer loss"):
            if mod is None:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (iq, ik, iw)]
                    loss = reference.indexer_kl_from_probs(*leaves, idx, probs, ctx.num_heads)
                    diq, dik, diw = torch.autograd.grad(loss, leaves)
            else:
                kl = importlib.import_module("glm52_train.kernels.indexer_loss")
                loss, diq, dik, diw = kl.indexer_kl_from_probs(iq, ik, iw, idx, probs, ctx.num_heads)
        if ctx.on_loss is not None:
            ctx.on_loss(loss.detach())
        weight = 1.0 if ctx.loss_weight is None else ctx.loss_weight()
        grads = tuple((g * weight).to(t.dtype) for g, t in zip((diq, dik, diw), (iq, ik, iw)))
        return (dq, dkv, None, *grads) + (None,) * 9


@_labelled("sparse attention")
def sparse_mla_indexer_kl(q, kv, idx, iq, ik, iw, scale: float, v_dim: int = 512, *, num_heads: int | None = None,
                          loss_weight=None, reduce_probs=None, on_loss=None, impl: str = "auto",
                          bwd_cfg: dict | None = None) -> torch.Tensor:
    """`sparse_mla` whose backward also computes the indexer's sparse KL loss from the dq
    pass's probabilities (docs/kernels.md, section 4): kv is gathered once per pass, not a
    second time for the loss, and the query heads are not gathered under tensor parallelism.

    Forward: out [sq, b, n, v_dim] exactly as `sparse_mla(q, kv, idx, scale, v_dim)`; no loss
    yet. Backward: dq and dkv as `sparse_mla`'s; the dq pass also writes `head_probs` [b, sq,
    topk] fp32, the attention probabilities summed over the n local heads per top-k slot (4 *
    topk bytes per query, kept from the dq pass to the KL; the reference computes them from q,
    kv and lse); `reduce_probs(head_probs)`, when given, returns the sum over all `num_heads`
    heads (an all-reduce over the tensor-parallel ranks); then `indexer_kl_from_probs(iq, ik,
    iw, idx, head_probs, num_heads)` and its gradients, which reach iq, ik and iw as if
    `loss_weight() * KL` had been added to the objective (`loss_weight` is called in backward;
    None: 1). `on_loss(kl)` receives the KL's value (a detached scalar), once per backward.
    `num_heads` defaults to q's head count. The dkv backward follows `bwd_cfg` as in
    `sparse_mla` (`{"atomic": False}`: key-major, deterministic)."""
    mod = _triton("sparse_mla", q, impl)
    inverse = None
    if mod is not None and bwd_cfg is not None and bwd_cfg.get("atomic", True) is False:
        block, sk = bwd_cfg.get("BKEY", 16), kv.shape[0]
        inverse = lambda: inverted_selection(idx, sk, block)  # noqa: E731 (built in backward)
    if mod is not None:
        _triton("indexer_loss", q, impl)  # (imported and, on CPU tensors, interpreted likewise)
    return _SparseMLAIndexerKL.apply(q, kv, idx, iq, ik, iw, scale, v_dim, num_heads or q.shape[2], loss_weight,
                                     reduce_probs, on_loss, mod, bwd_cfg, inverse)
