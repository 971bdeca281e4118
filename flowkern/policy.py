"""log π: the model's log-probability of the taken tokens, read from (B, T, V) logits, and
its gradient, in vectorised PyTorch (the CPU path; flowkern/kernels/policy.py is the GPU one).

With z = logits[b, t] at state s_t and x = the token taken there:
  normalize="full":  log π(x) = z_x − lse,  lse = log Σ_{v < V} exp z_v   (the whole width)
  normalize="trie":  log π(x) = z_x − lse,  lse = log Σ_{c ∈ children(s_t)} exp z_c   (the
                     policy a trie-constrained decoder samples from)
  gradient of Σ_k g_k log π(c_k):  ∂/∂z_v = Σ_k g_k [v = c_k] − (Σ_k g_k) softmax(z)_v, the
                     softmax over the same columns as lse (0 off the children for "trie").
Only the (b, t) rows the loss uses are read, through the logits' strides (a slice such as
`out.logits[:, p-1:-1]` is never copied whole).  The full softmax is taken a chunk of rows
at a time in float32 (float64 for float64 logits), so its only B×T×V tensor is the gradient.
"""

import torch

_CHUNK_ELEMENTS = 1 << 22  # logits elements upcast at once by the full softmax


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_log_softmax(logits, b, t, cols):
    """(log softmax(logits[b_i, t_i])[cols[i, k]] as (R, K), the log-normaliser lse as (R,))."""
    dtype = compute_dtype(logits.dtype)
    out = torch.empty(cols.shape, dtype=dtype, device=logits.device)
    lse = torch.empty(b.shape, dtype=dtype, device=logits.device)
    for rows in _chunks(b.numel(), logits.shape[-1]):
        z = logits[b[rows], t[rows]].to(dtype)
        lse[rows] = torch.logsumexp(z, dim=-1)
        out[rows] = z.gather(1, cols[rows]) - lse[rows, None]
    return out, lse


def full_log_softmax_grad(logits, b, t, cols, lse, g, out):
    """Write the gradient of Σ_k g[i, k] log π(cols[i, k]) into the rows out[b_i, t_i]; reads
    each row of `logits` before writing it, so `out` may be `logits` itself."""
    for rows in _chunks(b.numel(), logits.shape[-1]):
        weights = g[rows].to(lse.dtype)
        z = logits[b[rows], t[rows]].to(lse.dtype)
        grad_z = torch.exp(z - lse[rows, None]).mul_(-weights.sum(1, keepdim=True))
        grad_z.scatter_add_(1, cols[rows], weights)
        out[b[rows], t[rows]] = grad_z.to(out.dtype)


def _chunks(num_rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, num_rows, step))


def trie_children(state, trie):
    """The children of each row's node as one flat list: (row i of each child, its edge,
    position of row i's first child in the list)."""
    start = trie.offsets[state]
    degree = trie.offsets[state + 1] - start
    first = torch.cumsum(degree, 0) - degree
    row = torch.repeat_interleave(torch.arange(state.numel(), device=state.device), degree)
    edges = torch.arange(row.numel(), device=state.device) - first[row] + start[row]
    return row, edges, first


def trie_log_softmax(logits, b, t, state, edge, trie):
    """(log π of the token on edge `edge[i]` among the children of node `state[i]`, read at
    logits[b_i, t_i], as (R,); the children's lse as (R,)).  Gathers only the children's
    logits (Σ_i deg(state_i) values), so autograd scatters the gradient back to those."""
    row, edges, first = trie_children(state, trie)
    z = logits[b[row], t[row], trie.tokens[edges].long()].to(compute_dtype(logits.dtype))
    peak = torch.zeros(state.shape, dtype=z.dtype, device=z.device)
    peak = peak.scatter_reduce(0, row, z.detach(), "amax", include_self=False)
    lse = peak + torch.log(torch.zeros_like(peak).index_add(0, row, torch.exp(z - peak[row])))
    return z[first + edge - trie.offsets[state]] - lse, lse


def trie_log_softmax_grad(logits, b, t, state, edge, trie, lse, g, out):
    """Write the gradient of Σ_i g_i log π_i (trie policy) into `out`: the children of
    state_i get g_i ([edge] − softmax), every other entry 0.  Reads the children's logits
    before zeroing `out`, so `out` may be `logits` itself."""
    row, edges, _ = trie_children(state, trie)
    columns = trie.tokens[edges].long()
    z = logits[b[row], t[row], columns].to(lse.dtype)
    weights = g.to(lse.dtype)[row]
    grad = weights * ((edges == edge[row]).to(lse.dtype) - torch.exp(z - lse[row]))
    out.zero_()
    out[b[row], t[row], columns] = grad.to(out.dtype)
