"""The restricted head's trie policy (flowkern/head.py is the PyTorch twin), one program per
(b, t) row: log π and its gradient from hidden[b, t] and the rows of W (and b) at the
children of s_t, all read through their strides; no other row of W is read.

Forward: z_c = Σ_k W[c, k] hidden[b, t, k] (+ b_c) for a block of children at a time (a
block of children × a block of H per step), folded into the online log-sum-exp of
flowkern/kernels/policy.py; log π_t = z_x − lse_t.
Backward: z recomputed per block of children, ∂z_c = g_t ([c = x] − exp(z_c − lse_t));
dh_t = Σ_c ∂z_c W_c is accumulated by the row's own program, while dW_c += ∂z_c h and
db_c += ∂z_c go by atomic adds into float32 (float64) accumulators that hold only the rows
of the tokens the batch's states have as children, since many rows share a child (the
order of those additions, and so their rounding, varies from run to run on a GPU).  Rows
after a trajectory's end read nothing and get 0.
"""

import torch
import triton
import triton.language as tl

from flowkern.eager import used_rows
from flowkern.head import on_rows, touched_tokens
from flowkern.kernels.policy import _children, _lse_finish, _lse_step, _row
from flowkern.policy import compute_dtype

MAX_CHILD_BLOCK = 64  # children per step
MAX_BLOCK_H = 128  # hidden units per step


@triton.jit
def _child_block(z, first, end, edge_tokens_ptr, h_row, stride_hh, weight_ptr, stride_wv, stride_wh, bias_ptr,
                 hidden_size, HAS_BIAS: tl.constexpr, CHILD_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    """The block of children on edges first .. first + CHILD_BLOCK − 1 (below `end`): their
    tokens, which are valid, and z (zeros on entry) + their logits, −inf where not valid."""
    edge = first + tl.arange(0, CHILD_BLOCK)
    valid = edge < end
    column = tl.load(edge_tokens_ptr + edge, mask=valid, other=0).to(tl.int64)
    for k_first in range(0, hidden_size, BLOCK_H):
        k = k_first + tl.arange(0, BLOCK_H)
        h = tl.load(h_row + k * stride_hh, mask=k < hidden_size, other=0.0).to(z.dtype)
        w = tl.load(weight_ptr + column[:, None] * stride_wv + k[None, :] * stride_wh,
                    mask=valid[:, None] & (k < hidden_size)[None, :], other=0.0).to(z.dtype)
        z += tl.sum(w * h[None, :], 1)
    if HAS_BIAS:
        z += tl.load(bias_ptr + column, mask=valid, other=0.0).to(z.dtype)
    return column, valid, tl.where(valid, z, float("-inf"))


@triton.jit
def _head_log_probs_kernel(hidden_ptr, stride_hb, stride_ht, stride_hh, weight_ptr, stride_wv, stride_wh, bias_ptr,
                           tokens_ptr, stride_tb, stride_tt, nodes_ptr, length_ptr, offsets_ptr, edge_tokens_ptr,
                           log_pf_ptr, lse_ptr, steps, hidden_size, HAS_BIAS: tl.constexpr,
                           CHILD_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    b, t, used = _row(length_ptr, steps)
    h_row = hidden_ptr + b * stride_hb + t * stride_ht
    acc = lse_ptr.dtype.element_ty
    token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt, mask=used, other=-1).to(tl.int64)
    peak = tl.full((CHILD_BLOCK,), float("-inf"), acc)
    total = tl.zeros((CHILD_BLOCK,), acc)
    taken = tl.zeros((CHILD_BLOCK,), acc)
    start, end = _children(nodes_ptr, offsets_ptr, b, t, steps, used)
    for first in range(start, end, CHILD_BLOCK):
        column, valid, z = _child_block(tl.zeros((CHILD_BLOCK,), acc), first, end, edge_tokens_ptr, h_row, stride_hh,
                                        weight_ptr, stride_wv, stride_wh, bias_ptr, hidden_size, HAS_BIAS, CHILD_BLOCK,
                                        BLOCK_H)
        peak, total = _lse_step(peak, total, z)
        taken += tl.where(valid & (column == token), z, 0.0)
    lse = _lse_finish(peak, total, used)
    here = b * steps + t
    tl.store(lse_ptr + here, lse)
    tl.store(log_pf_ptr + here, tl.where(used, tl.sum(taken, 0) - lse, 0.0))


@triton.jit
def _head_grad_kernel(hidden_ptr, stride_hb, stride_ht, stride_hh, weight_ptr, stride_wv, stride_wh, bias_ptr,
                      tokens_ptr, stride_tb, stride_tt, nodes_ptr, length_ptr, offsets_ptr, edge_tokens_ptr, lse_ptr,
                      coefficient_ptr, slot_ptr, dh_ptr, dw_ptr, db_ptr, steps, hidden_size, HAS_BIAS: tl.constexpr,
                      WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, CHILD_BLOCK: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    b, t, used = _row(length_ptr, steps)
    h_row = hidden_ptr + b * stride_hb + t * stride_ht
    acc = lse_ptr.dtype.element_ty
    here = b * steps + t
    lse = tl.load(lse_ptr + here, mask=used, other=0.0)
    coefficient = tl.load(coefficient_ptr + here, mask=used, other=0.0)
    token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt, mask=used, other=-1).to(tl.int64)
    start, end = _children(nodes_ptr, offsets_ptr, b, t, steps, used)
    for first in range(start, end, CHILD_BLOCK):
        column, valid, z = _child_block(tl.zeros((CHILD_BLOCK,), acc), first, end, edge_tokens_ptr, h_row, stride_hh,
                                        weight_ptr, stride_wv, stride_wh, bias_ptr, hidden_size, HAS_BIAS, CHILD_BLOCK,
                                        BLOCK_H)
        dz = tl.where(valid, coefficient * ((column == token).to(acc) - tl.exp(z - lse)), 0.0)
        if WEIGHT_GRAD or BIAS_GRAD:
            slot = tl.load(slot_ptr + column, mask=valid, other=0)
        for k_first in range(0, hidden_size, BLOCK_H):
            k = k_first + tl.arange(0, BLOCK_H)
            inside = k < hidden_size
            w = tl.load(weight_ptr + column[:, None] * stride_wv + k[None, :] * stride_wh,
                        mask=valid[:, None] & inside[None, :], other=0.0).to(acc)
            dh = dh_ptr + here * hidden_size + k
            tl.store(dh, tl.load(dh, mask=inside, other=0.0) + tl.sum(dz[:, None] * w, 0), mask=inside)
            if WEIGHT_GRAD:
                h = tl.load(h_row + k * stride_hh, mask=inside, other=0.0).to(acc)
                tl.atomic_add(dw_ptr + slot[:, None] * hidden_size + k[None, :], dz[:, None] * h[None, :],
                              mask=valid[:, None] & inside[None, :])
        if BIAS_GRAD:
            tl.atomic_add(db_ptr + slot, dz, mask=valid)


def _launch_options(hidden, trie, bias):
    return dict(HAS_BIAS=bias is not None, CHILD_BLOCK=min(MAX_CHILD_BLOCK, triton.next_power_of_2(trie.max_degree)),
                BLOCK_H=min(MAX_BLOCK_H, triton.next_power_of_2(hidden.shape[-1])))


def log_probs(hidden, weight, bias, tokens, nodes, length, trie, normalize, flower):
    """As flowkern.head.log_probs with normalize="trie": (log π_t, None, lse_t), each (B, T)."""
    batch, steps, hidden_size = hidden.shape
    log_pf, lse = (torch.empty(batch, steps, dtype=compute_dtype(hidden.dtype), device=hidden.device) for _ in range(2))
    _head_log_probs_kernel[(batch * steps,)](
        hidden, *hidden.stride(), weight, *weight.stride(), weight if bias is None else bias, tokens, *tokens.stride(),
        nodes, length, trie.offsets, trie.tokens, log_pf, lse, steps, hidden_size,
        **_launch_options(hidden, trie, bias))
    return log_pf, None, lse


def grad(hidden, weight, bias, tokens, nodes, length, trie, lse, coefficient, normalize, flower, weight_grad,
         bias_grad):
    """As flowkern.head.grad with normalize="trie": (dh, dW or None, db or None)."""
    batch, steps, hidden_size = hidden.shape
    dh = torch.zeros(batch * steps, hidden_size, dtype=lse.dtype, device=hidden.device)
    dw = db = touched = None
    slot = dh  # read only for dW or db
    if weight_grad or bias_grad:
        b, t = used_rows(length, steps)
        touched = touched_tokens(nodes[b, t], trie)
        slot = torch.zeros(weight.shape[0], dtype=torch.long, device=hidden.device)
        slot[touched] = torch.arange(touched.numel(), device=hidden.device)
        dw = torch.zeros(touched.numel(), hidden_size, dtype=lse.dtype, device=hidden.device) if weight_grad else None
        db = torch.zeros(touched.numel(), dtype=lse.dtype, device=hidden.device) if bias_grad else None
    _head_grad_kernel[(batch * steps,)](
        hidden, *hidden.stride(), weight, *weight.stride(), weight if bias is None else bias, tokens, *tokens.stride(),
        nodes, length, trie.offsets, trie.tokens, lse, coefficient.to(lse.dtype).contiguous(), slot, dh,
        dh if dw is None else dw, dh if db is None else db, steps, hidden_size, WEIGHT_GRAD=weight_grad,
        BIAS_GRAD=bias_grad, **_launch_options(hidden, trie, bias))
    return dh.view(hidden.shape).to(hidden.dtype), on_rows(dw, touched, weight), on_rows(db, touched, bias)
