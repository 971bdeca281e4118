"""log π: the model's log-probability of the taken tokens, read from (B, T, V) logits.

With z = logits[b, t] at state s_t and x = the token taken there:
  normalize="full":  log π(x) = z_x − log Σ_{v < V} exp z_v   (the whole width of the logits)
  normalize="trie":  log π(x) = z_x − log Σ_{c ∈ children(s_t)} exp z_c   (the policy a
                     trie-constrained decoder samples from)
Only the (b, t) rows the loss uses are read, through the logits' strides (a slice such as
`out.logits[:, p-1:-1]` is never copied whole).  The full softmax is taken a chunk of rows
at a time in float32 (float64 for float64 logits), so its only B×T×V tensor is the gradient.
"""

import torch

_CHUNK_ELEMENTS = 1 << 22  # logits elements upcast at once by the full softmax


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_log_probs(logits: torch.Tensor, b: torch.Tensor, t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[b_i, t_i])[cols[i, k]] for rows i and columns k: shape (R, K)."""
    return _FullLogSoftmax.apply(logits, b, t, cols)


class _FullLogSoftmax(torch.autograd.Function):
    """Forward keeps one log-normaliser per row; backward rebuilds the softmax per chunk:
    ∂/∂z_v Σ_k g_k log π(c_k) = Σ_k g_k [v = c_k] − (Σ_k g_k) softmax(z)_v."""

    @staticmethod
    def forward(ctx, logits, b, t, cols):
        dtype = compute_dtype(logits.dtype)
        out = torch.empty(cols.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(b.shape, dtype=dtype, device=logits.device)
        for rows in _chunks(b.numel(), logits.shape[-1]):
            z = logits[b[rows], t[rows]].to(dtype)
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(1, cols[rows]) - lse[rows, None]
        ctx.save_for_backward(logits, b, t, cols, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, b, t, cols, lse = ctx.saved_tensors
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        for rows in _chunks(b.numel(), logits.shape[-1]):
            g = grad_out[rows].to(lse.dtype)
            z = logits[b[rows], t[rows]].to(lse.dtype)
            grad_z = torch.exp(z - lse[rows, None]).mul_(-g.sum(1, keepdim=True))
            grad_z.scatter_add_(1, cols[rows], g)
            grad[b[rows], t[rows]] = grad_z.to(logits.dtype)
        return grad, None, None, None


def _chunks(num_rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, num_rows, step))


def trie_log_probs(logits, b, t, state, edge, trie) -> torch.Tensor:
    """log π of the token on edge `edge[i]` among the children of node `state[i]`, read at
    logits[b_i, t_i]: shape (R,).  Gathers only the children's logits (Σ_i deg(state_i)
    values); autograd scatters the gradient back to those entries."""
    start = trie.offsets[state]
    degree = trie.offsets[state + 1] - start
    first = torch.cumsum(degree, 0) - degree  # position of row i's first child in the flat list
    row = torch.repeat_interleave(torch.arange(state.numel(), device=state.device), degree)
    edges = torch.arange(row.numel(), device=state.device) - first[row] + start[row]
    z = logits[b[row], t[row], trie.tokens[edges].long()].to(compute_dtype(logits.dtype))
    peak = torch.zeros(state.shape, dtype=z.dtype, device=z.device)
    peak = peak.scatter_reduce(0, row, z.detach(), "amax", include_self=False)
    total = torch.zeros_like(peak).index_add(0, row, torch.exp(z - peak[row]))
    return z[first + edge - start] - (peak + torch.log(total))
