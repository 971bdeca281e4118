"""log π forward and its gradient over the logits (flowkern/policy.py is the PyTorch twin),
one program per (b, t) row of the (B, T, V) logits, read through their strides.

Forward, at state s_t with z = logits[b, t] and x = tokens[b, t]:
  lse_t = log Σ exp z over all V columns ("full": one pass in blocks, online log-sum-exp in
          float32 — float64 for float64 logits — taking each block's max first, so one exp
          per column) or over the children of s_t only ("trie": their tokens gathered from
          the CSR, nothing else of the row is read);
  log π_t = z_x − lse_t, and for the Flower form log π(termination) = z_eos − lse_t.
Backward, with c_t the row's coefficient on log π(x_t) and e_t = c_{t−1} − c_t the one on
log π(termination) (Flower form, c_{−1} = 0):
  grad[b, t, v] = c_t [v = x] + e_t [v = eos] − (c_t + e_t) p_v,  p = exp(z − lse_t),
written once for every column: "full" streams the row; "trie" writes the children and
zeroes the other columns: a block of columns that holds no child (the next child's token
lies past it) is zeroed whole, in 16-byte stores, and in one that does each column looks
itself up among its children by binary search (children are sorted), so the row's other
logits are never read.  Each entry is read before it is written by the same lane, so the
gradient may be written over the logits themselves (inplace_grad).  Rows after a
trajectory's end get 0.  Columns are int32 (V < 2³¹), addresses int64 (row + column ×
stride: strides may be large).
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from flowkern.kernels.walk import lower_bound
from flowkern.policy import compute_dtype

MAX_BLOCK = 4096  # columns per step of the streaming loops
MAX_CHILD_BLOCK = 256  # children per step of the trie loops
MAX_SEARCH_BLOCK = tl.constexpr(1024)  # columns looked up among a block's children at once (registers)
_INTERPRETED = tl.constexpr(isinstance(lower_bound, InterpretedFunction))


@triton.jit
def _row(length_ptr, steps):
    """(b, t, whether the loss reads row (b, t)) of this program."""
    row = tl.program_id(0).to(tl.int64)
    b = row // steps
    t = row % steps
    return b, t, t <= tl.load(length_ptr + b)


@triton.jit
def _children(nodes_ptr, offsets_ptr, b, t, steps, used):
    """Edge range [start, end) of the children of s_t; empty for a row the loss does not read."""
    node = tl.load(nodes_ptr + b * (steps + 1) + t, mask=used, other=0)
    start = tl.load(offsets_ptr + node, mask=used, other=0)
    end = tl.load(offsets_ptr + node + 1, mask=used, other=0)
    return start, end


@triton.jit
def _at(row, column, stride):
    """Pointers to row[column]: int32 columns, int64 offsets."""
    return row + column.to(tl.int64) * stride


@triton.jit
def _lse_step(peak, total, z):
    """Online log-sum-exp: fold the block z into the scalars (peak, total·e^peak), peak the
    running max: the block's max first, then one exp per element, one sum and one more exp
    per block.  The shift is 0 while all is −inf, so that e^(−inf − shift) = 0; NaN and +inf
    give NaN."""
    new_peak = tl.maximum(peak, tl.max(z, 0))
    shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    return new_peak, total * tl.exp(peak - shift) + tl.sum(tl.exp(z - shift), 0)


@triton.jit
def _lse_finish(peak, total, used):
    """The log-sum-exp folded by _lse_step; 0 for a row that is not used."""
    return tl.where(used, peak + tl.log(tl.where(used, total, 1.0)), 0.0)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x in `dtype`, rounded to nearest (ties to even) as the GPU's conversion (cvt.rn) does.
    The Triton interpreter's float32 → bfloat16 cast truncates, so there bfloat16 is rounded
    by hand, NaN kept NaN."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, bits + 0x7FFF + ((bits >> 16) & 1), bits | 0x400000)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _log_probs_kernel(logits_ptr, stride_lb, stride_lt, stride_lv, tokens_ptr, stride_tb, stride_tt, nodes_ptr,
                      length_ptr, offsets_ptr, edge_tokens_ptr, log_pf_ptr, log_pterm_ptr, lse_ptr,
                      steps, vocab, eos, TRIE: tl.constexpr, FLOWER: tl.constexpr, BLOCK: tl.constexpr,
                      CHILD_BLOCK: tl.constexpr):
    b, t, used = _row(length_ptr, steps)
    row = logits_ptr + b * stride_lb + t * stride_lt
    acc = lse_ptr.dtype.element_ty
    peak = tl.full((), float("-inf"), acc)
    total = tl.zeros((), acc)
    if TRIE:
        start, end = _children(nodes_ptr, offsets_ptr, b, t, steps, used)
        for first in range(start, end, CHILD_BLOCK):
            edge = first + tl.arange(0, CHILD_BLOCK)
            column = tl.load(edge_tokens_ptr + edge, mask=edge < end, other=0)
            z = tl.load(_at(row, column, stride_lv), mask=edge < end, other=float("-inf")).to(acc)
            peak, total = _lse_step(peak, total, z)
    else:
        for first in range(0, tl.where(used, vocab, 0), BLOCK):
            column = first + tl.arange(0, BLOCK)
            z = tl.load(_at(row, column, stride_lv), mask=column < vocab, other=float("-inf")).to(acc)
            peak, total = _lse_step(peak, total, z)
    lse = _lse_finish(peak, total, used)
    token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt, mask=used, other=0)
    out = b * steps + t
    tl.store(lse_ptr + out, lse)
    tl.store(log_pf_ptr + out, tl.load(_at(row, token, stride_lv), mask=used, other=0.0).to(acc) - lse)
    if FLOWER:
        tl.store(log_pterm_ptr + out, tl.load(_at(row, eos, stride_lv), mask=used, other=0.0).to(acc) - lse)


@triton.jit
def _logits_grad_kernel(logits_ptr, stride_lb, stride_lt, stride_lv, out_ptr, stride_ob, stride_ot, stride_ov,
                        tokens_ptr, stride_tb, stride_tt, nodes_ptr, length_ptr, offsets_ptr, edge_tokens_ptr,
                        lse_ptr, coefficient_ptr, steps, vocab, eos, search_steps, TRIE: tl.constexpr,
                        FLOWER: tl.constexpr, BLOCK: tl.constexpr, CHILD_BLOCK: tl.constexpr):
    b, t, used = _row(length_ptr, steps)
    row = logits_ptr + b * stride_lb + t * stride_lt
    out_row = out_ptr + b * stride_ob + t * stride_ot
    acc = lse_ptr.dtype.element_ty
    dtype = out_ptr.dtype.element_ty
    here = b * steps + t
    lse = tl.load(lse_ptr + here, mask=used, other=0.0)
    taken = tl.load(coefficient_ptr + here, mask=used, other=0.0)
    termination = tl.zeros((), acc)
    if FLOWER:
        termination = tl.load(coefficient_ptr + here - 1, mask=used & (t > 0), other=0.0) - taken
    token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt, mask=used, other=-1).to(tl.int32)
    if TRIE:
        SEARCH_BLOCK: tl.constexpr = min(BLOCK, MAX_SEARCH_BLOCK)
        start, end = _children(nodes_ptr, offsets_ptr, b, t, steps, used)
        block_start = start  # the first child past the blocks done, and its token (past every block if none)
        next_token = tl.load(edge_tokens_ptr + start, mask=start < end, other=vocab + BLOCK)
        for first in range(0, vocab, BLOCK):
            if next_token < first + BLOCK:  # the children on edges [block_start, block_end) are here
                block_end = lower_bound(edge_tokens_ptr, block_start, end, first + BLOCK, search_steps)
                for part in range(first, first + BLOCK, SEARCH_BLOCK):  # every column but theirs
                    column = part + tl.arange(0, SEARCH_BLOCK)
                    edge = lower_bound(edge_tokens_ptr, block_start, block_end, column, search_steps)
                    child = tl.load(edge_tokens_ptr + edge, mask=edge < block_end, other=-1) == column
                    tl.store(_at(out_row, column, stride_ov), tl.zeros((SEARCH_BLOCK,), dtype),
                             mask=(column < vocab) & ~child)
                block_start = block_end
                next_token = tl.load(edge_tokens_ptr + block_end, mask=block_end < end, other=vocab + BLOCK)
            else:  # no child: one mask for the whole block, so the widest stores
                column = first + tl.arange(0, BLOCK)
                tl.store(_at(out_row, column, stride_ov), tl.zeros((BLOCK,), dtype), mask=column < vocab)
        for first in range(start, end, CHILD_BLOCK):
            edge = first + tl.arange(0, CHILD_BLOCK)
            column = tl.load(edge_tokens_ptr + edge, mask=edge < end, other=0)
            z = tl.load(_at(row, column, stride_lv), mask=edge < end, other=float("-inf")).to(acc)
            grad = tl.where(column == token, taken, 0.0) - taken * tl.exp(z - lse)
            tl.store(_at(out_row, column, stride_ov), _rounded(grad, dtype), mask=edge < end)
    else:
        read = tl.where(used, vocab, 0)
        for first in range(0, vocab, BLOCK):
            column = first + tl.arange(0, BLOCK)
            z = tl.load(_at(row, column, stride_lv), mask=column < read, other=float("-inf")).to(acc)
            grad = tl.where(column == token, taken, 0.0) - (taken + termination) * tl.exp(z - lse)
            if FLOWER:
                grad += tl.where(column == eos, termination, 0.0)
            tl.store(_at(out_row, column, stride_ov), _rounded(grad, dtype), mask=column < vocab)


def _launch_options(logits, trie, normalize, flower, grad):
    """Constexprs and warps.  The warps follow the width of the program's loop: BLOCK columns
    where it streams the row (the full forward; both backwards, which write every column), and
    in the trie forward CHILD_BLOCK children, a warp per 128 (small programs, many resident)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(logits.shape[-1]))
    child_block = min(MAX_CHILD_BLOCK, triton.next_power_of_2(trie.max_degree))
    streams = grad or normalize == "full"
    return dict(TRIE=normalize == "trie", FLOWER=flower, BLOCK=block, CHILD_BLOCK=child_block,
                num_warps=(8 if block >= 2048 else 4) if streams else max(1, child_block // 128))


def log_probs(logits, tokens, nodes, length, trie, normalize, flower):
    """As flowkern.eager.log_probs: (log π_t, log π(termination) or None, lse_t), each (B, T)."""
    batch, steps, vocab = logits.shape
    dtype = compute_dtype(logits.dtype)
    log_pf, log_pterm, lse = (torch.empty(batch, steps, dtype=dtype, device=logits.device) for _ in range(3))
    _log_probs_kernel[(batch * steps,)](
        logits, *logits.stride(), tokens, *tokens.stride(), nodes, length, trie.offsets, trie.tokens,
        log_pf, log_pterm, lse, steps, vocab, trie.eos_token_id,
        **_launch_options(logits, trie, normalize, flower, grad=False))
    return log_pf, log_pterm if flower else None, lse


def logits_grad(logits, tokens, nodes, length, trie, lse, coefficient, normalize, flower, out):
    """As flowkern.eager.logits_grad: writes every entry of `out` (which may be `logits`)."""
    batch, steps, vocab = logits.shape
    _logits_grad_kernel[(batch * steps,)](
        logits, *logits.stride(), out, *out.stride(), tokens, *tokens.stride(), nodes, length, trie.offsets,
        trie.tokens, lse, coefficient.to(lse.dtype).contiguous(), steps, vocab, trie.eos_token_id,
        trie.max_degree.bit_length(), **_launch_options(logits, trie, normalize, flower, grad=True))
