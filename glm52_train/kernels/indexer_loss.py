"""The DSA indexer's KL loss, blockwise in Triton (no S x S buffer), and the main attention's
log-sum-exp (the "dense LSE helper").

For query i with key set J_i (the selected top-k in sparse training, every visible key in
the dense warm-up):

    p_ij  = (1/n) sum_h exp(scale * q_ih . kv_j - lse_ih)            (target, no gradient)
    I_ij  = sum_g iw_ig relu(iq_ig . ik_j)                           (indexer scores)
    loss  = mean_i [ sum_j p_ij (log p_ij - I_ij) + logsumexp_j I_ij ]
    dL/dI_ij = (softmax_j(I_i)_j - p_ij) / N

One program per query token runs two passes over J_i: pass A computes logsumexp_j I_ij (and,
if not given, the attention lse per head); pass B recomputes p and I, accumulates the loss
and, when gradients are wanted, applies dL/dI through the ReLU: diw and diq stay in
registers, dik is scattered with fp32 atomic adds. The gradients are computed eagerly in the
forward (the loss is a leaf of the graph whose only consumer is backward) and scaled by the
incoming gradient in backward: this saves a third pass over q and kv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm52_train.kernels.common import LOG2E, empty, launch


@triton.jit
def _keys(IDX_ROW, lo, hi, t, BK: tl.constexpr, SPARSE: tl.constexpr, topk):
    offs = t + tl.arange(0, BK)
    if SPARSE:
        j = tl.load(IDX_ROW + offs, mask=offs < topk, other=-1)
        valid = j >= 0
    else:
        j = lo + offs
        valid = j < hi
    return tl.where(valid, j, 0).to(tl.int64), valid


@triton.jit
def _attn_scores(q_a, q_b, KV_ROW, valid, DA: tl.constexpr, DB: tl.constexpr):
    """[H, BK] raw scores q . kv_j of the gathered keys."""
    da = tl.arange(0, DA)
    db = tl.arange(0, DB)
    k_a = tl.load(KV_ROW[:, None] + da[None, :], mask=valid[:, None], other=0.0)
    k_b = tl.load(KV_ROW[:, None] + DA + db[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q_a, tl.trans(k_a))
    return tl.dot(q_b, tl.trans(k_b), s)


@triton.jit
def _kl_kernel(
    IQ, IK, IW, Q, KV, IDX, LO, HI, LSE_IN, LSE_OUT, LOSS, DIQ, DIK, DIW,
    topk, scale_log2, grad_scale,
    s_iqs, s_iqb, s_iqh, s_iks, s_ikb, s_iws, s_iwb, s_iwh,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_ib, s_is, s_lb, s_lh, s_lossb,
    s_diks, s_dikb,
    H: tl.constexpr, HP: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    IH: tl.constexpr, ID: tl.constexpr, BK: tl.constexpr,
    SPARSE: tl.constexpr, HAVE_LSE: tl.constexpr, LOSS_PASS: tl.constexpr, GRAD: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, HP)  # heads padded to 16 for tl.dot; rows h >= H are masked zeros
    hm = h < H
    da = tl.arange(0, DA)
    db = tl.arange(0, DB)
    g = tl.arange(0, IH)
    e = tl.arange(0, ID)
    if SPARSE:
        lo = 0
        hi = 0
        n_keys = topk
    else:
        lo = tl.load(LO + i)
        hi = tl.load(HI + i)
        n_keys = hi - lo
    idx_row = IDX + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is
    q_row = Q + i.to(tl.int64) * s_qs + b * s_qb + h[:, None] * s_qh
    q_a = tl.load(q_row + da[None, :], mask=hm[:, None], other=0.0)
    q_b = tl.load(q_row + DA + db[None, :], mask=hm[:, None], other=0.0)
    lse_ptr = b.to(tl.int64) * s_lb + h * s_lh + i
    if LOSS_PASS:
        iq = tl.load(IQ + i.to(tl.int64) * s_iqs + b * s_iqb + g[:, None] * s_iqh + e[None, :])
        iw = tl.load(IW + i.to(tl.int64) * s_iws + b * s_iwb + g * s_iwh)

    # Pass A: logsumexp of the indexer scores (log2 domain) and, if needed, the attention lse.
    m_i = -float("inf")
    l_i = 0.0
    m_a = tl.full([HP], float("-inf"), tl.float32)
    l_a = tl.zeros([HP], tl.float32)
    for t in range(0, n_keys, BK):
        j, valid = _keys(idx_row, lo, hi, t, BK, SPARSE, topk)
        if not HAVE_LSE:
            s = _attn_scores(q_a, q_b, KV + j * s_ks + b * s_kb, valid, DA, DB)
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_a = l_a * tl.exp2(m_a - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_a = m_new
        if LOSS_PASS:
            ik = tl.load(IK + j[:, None] * s_iks + b * s_ikb + e[None, :], mask=valid[:, None], other=0.0)
            si = tl.dot(iq, tl.trans(ik))
            sc = tl.sum(tl.maximum(si, 0.0) * iw[:, None], 0) * 1.4426950408889634
            sc = tl.where(valid, sc, float("-inf"))
            mi_new = tl.maximum(m_i, tl.max(sc, 0))
            mi_safe = tl.where(mi_new == float("-inf"), 0.0, mi_new)
            l_i = l_i * tl.exp2(m_i - mi_safe) + tl.sum(tl.exp2(sc - mi_safe), 0)
            m_i = mi_new
    if HAVE_LSE:
        lse2 = tl.load(LSE_IN + lse_ptr, mask=hm, other=0.0) * 1.4426950408889634
    else:
        empty = l_a == 0.0
        lse2 = tl.where(empty, float("-inf"), m_a + tl.log2(tl.where(empty, 1.0, l_a)))
        tl.store(LSE_OUT + lse_ptr, lse2 * 0.6931471805599453, mask=hm)

    if LOSS_PASS:
        # Pass B: target p, loss, and dL/dI pushed through the ReLU into iq, ik, iw.
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        lse_i2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        kl = tl.zeros([BK], tl.float32)
        diq = tl.zeros([IH, ID], tl.float32)
        diw = tl.zeros([IH], tl.float32)
        for t in range(0, n_keys, BK):
            j, valid = _keys(idx_row, lo, hi, t, BK, SPARSE, topk)
            s = _attn_scores(q_a, q_b, KV + j * s_ks + b * s_kb, valid, DA, DB)
            p = tl.sum(tl.where(hm[:, None], tl.exp2(s * scale_log2 - lse2[:, None]), 0.0), 0) / H
            p = tl.where(valid, p, 0.0)
            ik = tl.load(IK + j[:, None] * s_iks + b * s_ikb + e[None, :], mask=valid[:, None], other=0.0)
            si = tl.dot(iq, tl.trans(ik))
            relu = tl.maximum(si, 0.0)
            log2_q = tl.sum(relu * iw[:, None], 0) * 1.4426950408889634 - lse_i2
            kl += tl.where(p > 0.0, p * (tl.log2(tl.where(p > 0.0, p, 1.0)) - log2_q), 0.0)
            if GRAD:
                dI = tl.where(valid, (tl.exp2(log2_q) - p) * grad_scale, 0.0)
                diw += tl.sum(relu * dI[None, :], 1)
                ds = tl.where(si > 0.0, iw[:, None] * dI[None, :], 0.0).to(ik.dtype)
                diq = tl.dot(ds, ik, diq)
                dik = tl.dot(tl.trans(ds), iq)
                tl.atomic_add(DIK + j[:, None] * s_diks + b * s_dikb + e[None, :], dik,
                              mask=valid[:, None], sem="relaxed")
        tl.store(LOSS + b.to(tl.int64) * s_lossb + i, tl.sum(kl, 0) * 0.6931471805599453)
        if GRAD:
            tl.store(DIQ + i.to(tl.int64) * s_iqs + b * s_iqb + g[:, None] * s_iqh + e[None, :], diq)
            tl.store(DIW + i.to(tl.int64) * s_iws + b * s_iwb + g * s_iwh, diw)


@triton.jit
def _kl_probs_kernel(
    IQ, IK, IW, IDX, PSUM, LOSS, DIQ, DIK, DIW, topk, inv_heads, grad_scale,
    s_iqs, s_iqb, s_iqh, s_iks, s_ikb, s_iws, s_iwb, s_iwh, s_ib, s_is, s_lossb, s_diks, s_dikb,
    IH: tl.constexpr, ID: tl.constexpr, BK: tl.constexpr,
):
    """The sparse KL loss and its gradients for one query from the attention probabilities the
    dq pass summed over heads (PSUM, laid out like IDX): only the indexer rows are gathered."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.arange(0, IH)
    e = tl.arange(0, ID)
    idx_row = IDX + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is
    p_row = PSUM + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is
    iq = tl.load(IQ + i.to(tl.int64) * s_iqs + b * s_iqb + g[:, None] * s_iqh + e[None, :])
    iw = tl.load(IW + i.to(tl.int64) * s_iws + b * s_iwb + g * s_iwh)
    m_i = -float("inf")
    l_i = 0.0
    for t in range(0, topk, BK):
        j, valid = _keys(idx_row, 0, 0, t, BK, True, topk)
        ik = tl.load(IK + j[:, None] * s_iks + b * s_ikb + e[None, :], mask=valid[:, None], other=0.0)
        sc = tl.sum(tl.maximum(tl.dot(iq, tl.trans(ik)), 0.0) * iw[:, None], 0) * 1.4426950408889634
        sc = tl.where(valid, sc, float("-inf"))
        mi_new = tl.maximum(m_i, tl.max(sc, 0))
        mi_safe = tl.where(mi_new == float("-inf"), 0.0, mi_new)
        l_i = l_i * tl.exp2(m_i - mi_safe) + tl.sum(tl.exp2(sc - mi_safe), 0)
        m_i = mi_new
    lse_i2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    kl = tl.zeros([BK], tl.float32)
    diq = tl.zeros([IH, ID], tl.float32)
    diw = tl.zeros([IH], tl.float32)
    for t in range(0, topk, BK):
        offs = t + tl.arange(0, BK)
        j, valid = _keys(idx_row, 0, 0, t, BK, True, topk)
        p = tl.where(valid, tl.load(p_row + offs, mask=offs < topk, other=0.0) * inv_heads, 0.0)
        ik = tl.load(IK + j[:, None] * s_iks + b * s_ikb + e[None, :], mask=valid[:, None], other=0.0)
        si = tl.dot(iq, tl.trans(ik))
        relu = tl.maximum(si, 0.0)
        log2_q = tl.sum(relu * iw[:, None], 0) * 1.4426950408889634 - lse_i2
        kl += tl.where(p > 0.0, p * (tl.log2(tl.where(p > 0.0, p, 1.0)) - log2_q), 0.0)
        dI = tl.where(valid, (tl.exp2(log2_q) - p) * grad_scale, 0.0)
        diw += tl.sum(relu * dI[None, :], 1)
        ds = tl.where(si > 0.0, iw[:, None] * dI[None, :], 0.0).to(ik.dtype)
        diq = tl.dot(ds, ik, diq)
        tl.atomic_add(DIK + j[:, None] * s_diks + b * s_dikb + e[None, :], tl.dot(tl.trans(ds), iq),
                      mask=valid[:, None], sem="relaxed")
    tl.store(LOSS + b.to(tl.int64) * s_lossb + i, tl.sum(kl, 0) * 0.6931471805599453)
    tl.store(DIQ + i.to(tl.int64) * s_iqs + b * s_iqb + g[:, None] * s_iqh + e[None, :], diq)
    tl.store(DIW + i.to(tl.int64) * s_iws + b * s_iwb + g * s_iwh, diw)


# 4 warps: every product has M = 64 heads (or 32 indexer heads), one warpgroup; BK = 32 keys
# keeps q (72 KB) plus two stages of gathered kv rows (36 KB each) in shared memory.
KL_CFG = dict(BK=32, num_warps=4, num_stages=2)


def _launch(iq, ik, iw, q, kv, idx, scale, ranges, lse, v_dim, loss_pass, grad, cfg=None):
    c = dict(KL_CFG, **(cfg or {}))
    sq, b, n, d = q.shape
    da, dbb = v_dim, d - v_dim
    for name, v in (("heads", n), ("v_dim", da), ("rope dim", dbb)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} = {v} must be a power of two for the Triton kernel")
    dev = q.device
    sparse = idx is not None
    if sparse:
        idx = idx.to(torch.int32).contiguous()
        topk = idx.shape[-1]
        lo = hi = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        idx = torch.zeros(1, 1, 1, dtype=torch.int32, device=dev)
        topk = 0
        lo, hi = (r.to(device=dev, dtype=torch.int32).contiguous() for r in ranges)
    lse_out = empty((b, n, sq), torch.float32, dev)
    lse_in = lse_out if lse is None else lse.float().contiguous()
    if iq is None:  # lse only
        ih, idim = 16, 16
        iq = torch.zeros(1, 1, ih, idim, dtype=q.dtype, device=dev)
        ik = torch.zeros(1, 1, idim, dtype=q.dtype, device=dev)
        iw = torch.zeros(1, 1, ih, dtype=torch.float32, device=dev)
    else:
        ih, idim = iq.shape[2], iq.shape[3]
        # small tensors: contiguous copies let diq / diw share their strides
        iq, ik, iw = iq.contiguous(), ik.contiguous(), iw.float().contiguous()
    loss = empty((b, sq), torch.float32, dev)
    diq = empty(iq.shape, torch.float32, dev) if grad else loss
    dik = torch.zeros(ik.shape, dtype=torch.float32, device=dev) if grad else loss
    diw = empty(iw.shape, torch.float32, dev) if grad else loss
    if sq and b:
        args = (
            iq, ik, iw, q, kv, idx, lo, hi, lse_in, lse_out, loss, diq, dik, diw,
            topk, scale * LOG2E, 1.0 / (sq * b),
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
            iw.stride(0), iw.stride(1), iw.stride(2),
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            idx.stride(0), idx.stride(1), lse_in.stride(0), lse_in.stride(1), loss.stride(0),
            dik.stride(0) if grad else 0, dik.stride(1) if grad else 0,
        )
        meta = dict(H=n, HP=max(16, n), DA=da, DB=dbb, IH=ih, ID=idim, SPARSE=sparse, HAVE_LSE=lse is not None,
                    LOSS_PASS=loss_pass, GRAD=grad)
        tuned = dict(BK=c["BK"], num_warps=c["num_warps"], num_stages=c["num_stages"])
        fallbacks = [tuned, dict(tuned, num_stages=1), dict(tuned, BK=16, num_stages=1)]
        launch(_kl_kernel, (sq, b), args, meta, fallbacks)
    return lse_out, loss, diq, dik, diw


def mla_lse_triton(q, kv, idx, scale: float, ranges=None, v_dim: int = 512, cfg: dict | None = None):
    """Attention log-sum-exp per head [b, n, sq]: over idx (sparse) or the visible ranges."""
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("q and kv need a contiguous last dimension")
    return _launch(None, None, None, q, kv, idx, scale, ranges, None, v_dim, False, False, cfg)[0]


class IndexerKLLoss(torch.autograd.Function):
    """Scalar KL loss of the indexer; gradients for iq, ik, iw (computed eagerly in forward)."""

    @staticmethod
    def forward(ctx, iq, ik, iw, q, kv, idx, scale, ranges, lse, v_dim=512, cfg=None):
        for t in (iq, ik, q, kv):
            if t.stride(-1) != 1:
                raise ValueError("inputs need a contiguous last dimension")
        grad = any(ctx.needs_input_grad[:3])
        _, loss, diq, dik, diw = _launch(iq, ik, iw, q, kv, idx, scale, ranges, lse, v_dim, True, grad, cfg)
        if grad:
            ctx.save_for_backward(diq, dik, diw)
        ctx.dtypes = (iq.dtype, ik.dtype, iw.dtype)
        return loss.sum() / loss.numel()

    @staticmethod
    def backward(ctx, dloss):
        diq, dik, diw = ctx.saved_tensors
        tq, tk, tw = ctx.dtypes
        return ((diq * dloss).to(tq), (dik * dloss).to(tk), (diw * dloss).to(tw),
                None, None, None, None, None, None, None, None)


def indexer_kl_from_probs(iq, ik, iw, idx, head_probs, num_heads: int, cfg: dict | None = None):
    """(loss, diq, dik, diw): the sparse indexer KL loss with its target taken from
    `head_probs` [b, sq, topk] fp32, the attention probabilities summed over `num_heads` heads
    per top-k slot (`sparse_mla.sparse_mla_bwd(..., head_probs=)` fills it; under tensor
    parallelism sum the ranks' before calling). Gathers the indexer keys only, not kv (see
    docs/kernels.md, section 4). Gradients are of the mean loss, fp32."""
    c = dict(KL_CFG, **(cfg or {}))
    sq, b, ih, idim = iq.shape
    dev = iq.device
    idx = idx.to(torch.int32).contiguous()
    if head_probs.shape != idx.shape or head_probs.dtype != torch.float32:
        raise ValueError(f"head_probs must be fp32 of idx's shape {tuple(idx.shape)}")
    head_probs = head_probs.contiguous()
    iq, ik, iw = iq.contiguous(), ik.contiguous(), iw.float().contiguous()
    loss = empty((b, sq), torch.float32, dev)
    diq = empty(iq.shape, torch.float32, dev)
    dik = torch.zeros(ik.shape, dtype=torch.float32, device=dev)
    diw = empty(iw.shape, torch.float32, dev)
    if sq and b:
        args = (iq, ik, iw, idx, head_probs, loss, diq, dik, diw, idx.shape[-1], 1.0 / num_heads, 1.0 / (sq * b),
                iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
                iw.stride(0), iw.stride(1), iw.stride(2), idx.stride(0), idx.stride(1), loss.stride(0),
                dik.stride(0), dik.stride(1))
        tuned = dict(BK=c["BK"], num_warps=c["num_warps"], num_stages=c["num_stages"])
        launch(_kl_probs_kernel, (sq, b), args, dict(IH=ih, ID=idim),
               [tuned, dict(tuned, num_stages=1), dict(tuned, BK=16, num_stages=1)])
    return loss.sum() / max(1, loss.numel()), diq, dik, diw


class IndexerKLFromProbs(torch.autograd.Function):
    """`indexer_kl_from_probs` as a scalar with gradients for iq, ik, iw (computed eagerly)."""

    @staticmethod
    def forward(ctx, iq, ik, iw, idx, head_probs, num_heads, cfg=None):
        loss, diq, dik, diw = indexer_kl_from_probs(iq, ik, iw, idx, head_probs, num_heads, cfg)
        ctx.save_for_backward(diq, dik, diw)
        ctx.dtypes = (iq.dtype, ik.dtype, iw.dtype)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        diq, dik, diw = ctx.saved_tensors
        tq, tk, tw = ctx.dtypes
        return (diq * dloss).to(tq), (dik * dloss).to(tk), (diw * dloss).to(tw), None, None, None, None
