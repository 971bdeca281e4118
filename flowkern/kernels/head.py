"""The restricted head's trie policy (flowkern/head.py is the PyTorch twin): log π and its
gradient from hidden[b, t] and the rows of W (and b) at the children of s_t, all read through
their strides; no other row of W is read.

Tiling: the rows t ≤ L_b are sorted by s_t and cut into tiles of BLOCK_R rows at one node
(_tiles: device operations only, no host sync, so the grid is a bound and most tiles may be
empty); one program per tile reads its node's children's rows of W once for all its rows.
Forward, per block of CHILD_BLOCK children:
  Z (BLOCK_R × CHILD_BLOCK) = Σ_k tl.dot(h[:, k], W[children, k]ᵀ) (+ b), k blocks of BLOCK_H,
folded into each row's online log-sum-exp; log π_t = z_x − lse_t.
Backward: Z recomputed, ∂Z = g_t ([c = x] − exp(z − lse_t)); dh += ∂Z·W on the tile's own rows
(no atomics), and dW += ∂Zᵀ·h, db += Σ_rows ∂Z by relaxed atomic adds, one per (tile, child
block, k block), into float32 (float64) accumulators with a row per child token (an edge that
carries the token stands for it; the order of the additions, and so their rounding, varies
from run to run on a GPU).
Products: bfloat16/float16 operands go to the tensor cores with float32 accumulation; the
backward's float32 ∂Z meets W and h (exact in TF32) in three TF32 products ("tf32x3": ∂Z split
in two TF32 parts, within about 2⁻²¹ of it); float32 input is multiplied in IEEE float32 (FMA),
float64 in float64.  Each gradient is rounded once to its tensor's dtype.  Rows after a
trajectory's end read nothing and get 0.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from flowkern.head import on_rows
from flowkern.policy import compute_dtype

BLOCK_R = 16  # rows per tile (tl.dot's least)
MAX_CHILD_BLOCK = 64  # children per step
MAX_BLOCK_H = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 16, torch.float64: 16}  # hidden units per step,
# as many as compile for sm_90 without register spills (IEEE float32 products are FMA ones, float64 ones DMMA)


@triton.jit
def _tile(rows_ptr, node, offsets_ptr, hidden_ptr, stride_hb, stride_ht, tokens_ptr, stride_tb, stride_tt, steps,
          BLOCK_R: tl.constexpr):
    """This program's tile: its rows b·T + t (int64), which are used (not padding), pointers to
    their hidden states, their taken tokens (−1 in padding), its node's edges [start, end)."""
    row = tl.load(rows_ptr + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    used = row >= 0
    b = tl.where(used, row, 0) // steps
    t = tl.where(used, row, 0) % steps
    token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt, mask=used, other=-1).to(tl.int64)
    return (row, used, hidden_ptr + b * stride_hb + t * stride_ht, token, tl.load(offsets_ptr + node),
            tl.load(offsets_ptr + node + 1))


_INTERPRETED = tl.constexpr(isinstance(_tile, InterpretedFunction))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b.  The interpreter would multiply bfloat16 as its raw bits: there it gets the
    operands in float32 (the same exact products)."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _operands(h_rows, used, stride_hh, column, valid, weight_ptr, stride_wv, stride_wh, k_first, hidden_size,
              BLOCK_H: tl.constexpr):
    """(h (BLOCK_R × BLOCK_H), W (CHILD_BLOCK × BLOCK_H)) at hidden units k_first .. k_first +
    BLOCK_H − 1, 0 in padding; the units k and which are inside H."""
    k = k_first + tl.arange(0, BLOCK_H)
    inside = k < hidden_size
    h = tl.load(h_rows[:, None] + k[None, :] * stride_hh, mask=used[:, None] & inside[None, :], other=0.0)
    w = tl.load(weight_ptr + column[:, None] * stride_wv + k[None, :] * stride_wh,
                mask=valid[:, None] & inside[None, :], other=0.0)
    return h, w, k, inside


@triton.jit
def _logits(h_rows, used, stride_hh, first, end, edge_tokens_ptr, weight_ptr, stride_wv, stride_wh, bias_ptr,
            hidden_size, acc: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_R: tl.constexpr, CHILD_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    """The children on edges first .. first + CHILD_BLOCK − 1 (below `end`): their tokens, which
    are valid, and Z (BLOCK_R × CHILD_BLOCK) of the tile's rows at them, −inf where not valid."""
    edge = first + tl.arange(0, CHILD_BLOCK)
    valid = edge < end
    column = tl.load(edge_tokens_ptr + edge, mask=valid, other=0).to(tl.int64)
    z = tl.zeros((BLOCK_R, CHILD_BLOCK), acc)
    for k_first in range(0, hidden_size, BLOCK_H):
        h, w, _, _ = _operands(h_rows, used, stride_hh, column, valid, weight_ptr, stride_wv, stride_wh, k_first,
                               hidden_size, BLOCK_H)
        z = _dot(h, tl.trans(w), z, PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + column, mask=valid, other=0.0).to(acc)[None, :]
    return column, valid, tl.where(valid[None, :], z, float("-inf"))


@triton.jit
def _head_log_probs_kernel(hidden_ptr, stride_hb, stride_ht, stride_hh, weight_ptr, stride_wv, stride_wh, bias_ptr,
                           tokens_ptr, stride_tb, stride_tt, rows_ptr, tile_nodes_ptr, offsets_ptr, edge_tokens_ptr,
                           log_pf_ptr, lse_ptr, steps, hidden_size, HAS_BIAS: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, CHILD_BLOCK: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    node = tl.load(tile_nodes_ptr + tl.program_id(0))
    if node < 0:
        return
    row, used, h_rows, token, start, end = _tile(rows_ptr, node, offsets_ptr, hidden_ptr, stride_hb, stride_ht,
                                                 tokens_ptr, stride_tb, stride_tt, steps, BLOCK_R)
    acc = lse_ptr.dtype.element_ty
    peak = tl.full((BLOCK_R,), float("-inf"), acc)  # online log-sum-exp per row: running max, Σ e^(z − max)
    total = tl.zeros((BLOCK_R,), acc)
    taken = tl.zeros((BLOCK_R,), acc)
    for first in range(start, end, CHILD_BLOCK):
        column, valid, z = _logits(h_rows, used, stride_hh, first, end, edge_tokens_ptr, weight_ptr, stride_wv,
                                   stride_wh, bias_ptr, hidden_size, acc, HAS_BIAS, PRECISION, BLOCK_R, CHILD_BLOCK,
                                   BLOCK_H)
        new_peak = tl.maximum(peak, tl.max(z, 1))
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # e^(−inf − 0) = 0 while all is −inf
        total = total * tl.exp(peak - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        peak = new_peak
        taken += tl.sum(tl.where(valid[None, :] & (column[None, :] == token[:, None]), z, 0.0), 1)
    lse = peak + tl.log(total)
    tl.store(lse_ptr + row, lse, mask=used)
    tl.store(log_pf_ptr + row, taken - lse, mask=used)


def log_probs(hidden, weight, bias, tokens, nodes, length, trie, normalize, flower):
    """As flowkern.head.log_probs with normalize="trie": (log π_t, None, lse_t), each (B, T)."""
    batch, steps, hidden_size = hidden.shape
    log_pf, lse = (torch.zeros(batch, steps, dtype=compute_dtype(hidden.dtype), device=hidden.device)
                   for _ in range(2))
    rows, tile_nodes = _tiles(nodes, length, trie.offsets.numel() - 1, BLOCK_R)
    _head_log_probs_kernel[(tile_nodes.numel(),)](
        hidden, *hidden.stride(), weight, *weight.stride(), weight if bias is None else bias, tokens, *tokens.stride(),
        rows, tile_nodes, trie.offsets, trie.tokens, log_pf, lse, steps, hidden_size,
        **_launch_options(hidden, trie, bias))
    return log_pf, None, lse


@triton.jit
def _head_grad_kernel(hidden_ptr, stride_hb, stride_ht, stride_hh, weight_ptr, stride_wv, stride_wh, bias_ptr,
                      tokens_ptr, stride_tb, stride_tt, rows_ptr, tile_nodes_ptr, offsets_ptr, edge_tokens_ptr,
                      lse_ptr, coefficient_ptr, slot_ptr, dh_ptr, dw_ptr, db_ptr, steps, hidden_size,
                      HAS_BIAS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, CHILD_BLOCK: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    node = tl.load(tile_nodes_ptr + tl.program_id(0))
    if node < 0:
        return
    row, used, h_rows, token, start, end = _tile(rows_ptr, node, offsets_ptr, hidden_ptr, stride_hb, stride_ht,
                                                 tokens_ptr, stride_tb, stride_tt, steps, BLOCK_R)
    acc = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + row, mask=used, other=0.0)
    coefficient = tl.load(coefficient_ptr + row, mask=used, other=0.0)
    for first in range(start, end, CHILD_BLOCK):
        column, valid, z = _logits(h_rows, used, stride_hh, first, end, edge_tokens_ptr, weight_ptr, stride_wv,
                                   stride_wh, bias_ptr, hidden_size, acc, HAS_BIAS, PRECISION, BLOCK_R, CHILD_BLOCK,
                                   BLOCK_H)
        dz = tl.where(used[:, None] & valid[None, :], coefficient[:, None] * (
            (column[None, :] == token[:, None]).to(acc) - tl.exp(z - lse[:, None])), 0.0)
        if WEIGHT_GRAD or BIAS_GRAD:
            slot = tl.load(slot_ptr + column, mask=valid, other=0).to(tl.int64)
        if BIAS_GRAD:
            tl.atomic_add(db_ptr + slot, tl.sum(dz, 0), mask=valid, sem="relaxed")
        for k_first in range(0, hidden_size, BLOCK_H):
            h, w, k, inside = _operands(h_rows, used, stride_hh, column, valid, weight_ptr, stride_wv, stride_wh,
                                        k_first, hidden_size, BLOCK_H)
            dh = dh_ptr + row[:, None] * hidden_size + k[None, :]
            mine = used[:, None] & inside[None, :]
            tl.store(dh, _dot(dz, w.to(acc), tl.load(dh, mask=tl.where(first > start, mine, False), other=0.0),
                              PRECISION), mask=mine)
            if WEIGHT_GRAD:
                tl.atomic_add(dw_ptr + slot[:, None] * hidden_size + k[None, :],
                              _dot(tl.trans(dz), h.to(acc), tl.zeros((CHILD_BLOCK, BLOCK_H), acc), PRECISION),
                              mask=valid[:, None] & inside[None, :], sem="relaxed")


def grad(hidden, weight, bias, tokens, nodes, length, trie, lse, coefficient, normalize, flower, weight_grad,
         bias_grad):
    """As flowkern.head.grad with normalize="trie": (dh, dW or None, db or None)."""
    batch, steps, hidden_size = hidden.shape
    edges = trie.tokens.numel()
    dh = torch.zeros(batch * steps, hidden_size, dtype=lse.dtype, device=hidden.device)
    dw = torch.zeros(edges, hidden_size, dtype=lse.dtype, device=hidden.device) if weight_grad else None
    db = torch.zeros(edges, dtype=lse.dtype, device=hidden.device) if bias_grad else None
    child_tokens = trie.tokens.long()
    slot = torch.empty(weight.shape[0], dtype=torch.int32, device=hidden.device)  # a child token's row of dW and db:
    slot[child_tokens] = torch.arange(edges, dtype=torch.int32, device=hidden.device)  # one edge that carries it
    rows, tile_nodes = _tiles(nodes, length, trie.offsets.numel() - 1, BLOCK_R)
    _head_grad_kernel[(tile_nodes.numel(),)](
        hidden, *hidden.stride(), weight, *weight.stride(), weight if bias is None else bias, tokens, *tokens.stride(),
        rows, tile_nodes, trie.offsets, trie.tokens, lse, coefficient.to(lse.dtype).contiguous(), slot, dh,
        dh if dw is None else dw, dh if db is None else db, steps, hidden_size, WEIGHT_GRAD=weight_grad,
        BIAS_GRAD=bias_grad, **_launch_options(hidden, trie, bias))
    row = slot[child_tokens].long()  # per edge, its token's row
    return (dh.view(hidden.shape).to(hidden.dtype), on_rows(None if dw is None else dw[row], child_tokens, weight),
            on_rows(None if db is None else db[row], child_tokens, bias))


def _tiles(nodes, length, num_nodes, block_rows):
    """(rows (tiles, block_rows) int32: the rows b·T + t with t ≤ L_b sorted by s_t, each
    node's cut into tiles of block_rows, −1 in padding; tile_nodes (tiles,) int32: each tile's
    node, −1 for an empty tile).  Device operations only, no host sync: the number of tiles is
    the bound ⌊B·T / block_rows⌋ + min(B·T, nodes), as a node of n rows takes ⌈n / block_rows⌉
    ≤ ⌊n / block_rows⌋ + 1 tiles."""
    steps = nodes.shape[1] - 1
    count = length.numel() * steps
    tiles = count // block_rows + min(count, num_nodes)
    used = torch.arange(steps, device=nodes.device) <= length[:, None]
    key, order = torch.sort(torch.where(used, nodes[:, :steps], num_nodes).flatten(), stable=True)  # unused last
    position = torch.arange(count, device=nodes.device)
    change = key[1:] != key[:-1]
    true = torch.ones(1, dtype=torch.bool, device=nodes.device)
    first = torch.where(torch.cat([true, change]), position, 0).cummax(0).values  # of the rows at the same node
    end = torch.where(torch.cat([change, true]), position + 1, count).flip(0).cummin(0).values.flip(0)
    used = key < num_nodes
    need = torch.where(used & (position == first), (end - first + block_rows - 1) // block_rows, 0)
    at = (need.cumsum(0) - need)[first] * block_rows + position - first  # in the flat (tiles · block_rows) table
    rows = torch.full((tiles * block_rows + 1,), -1, dtype=torch.int32, device=nodes.device)
    rows.scatter_(0, torch.where(used, at, tiles * block_rows), order.int())  # unused ones into a last, dropped entry
    tile_nodes = torch.full((tiles + 1,), -1, dtype=torch.int32, device=nodes.device)
    tile_nodes.scatter_(0, torch.where(used, at // block_rows, tiles), key.int())
    return rows[:-1].view(tiles, block_rows), tile_nodes[:-1]


def _launch_options(hidden, trie, bias):
    return dict(HAS_BIAS=bias is not None,
                PRECISION="tf32x3" if hidden.dtype in (torch.bfloat16, torch.float16) else "ieee", BLOCK_R=BLOCK_R,
                CHILD_BLOCK=max(16, min(MAX_CHILD_BLOCK, triton.next_power_of_2(trie.max_degree))),
                BLOCK_H=max(16, min(MAX_BLOCK_H[hidden.dtype], triton.next_power_of_2(hidden.shape[-1]))))
