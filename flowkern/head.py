"""The restricted LM head: log π of the taken tokens, and its gradient, straight from the last
hidden states and the output layer z = W·h + b, never forming the (B, T, V) logits.  This is
the vectorised PyTorch path of flowkern.linear_subtb_loss (any device) and of restricted-head
decoding; flowkern/kernels/head.py is the Triton one for normalize="trie".

At state s_t with h = hidden[b, t] (H,), W (V, H), b (V,) and x the token taken there:
  normalize="trie":  z_c = W_c·h + b_c for the children c of s_t only; log π(x) = z_x − lse
      over them.  Rows are grouped by trie node, so all the rows at a node meet all its
      children in one matrix product and W's rows are read once per node, not once per row;
      nodes are bucketed by ⌈log2 rows⌉ × ⌈log2 children⌉, one batched product per bucket
      (padding under 2× each way).  No other row of W is read.
  normalize="full":  lse = log Σ_{v<V} exp z_v by an online log-sum-exp over chunks of W's
      rows; backward recomputes each chunk, so memory is O(rows × chunk), never O(rows × V).
      With W and b frozen, the forward can instead carry q = Σ_v p_v W_v along (rescaled as
      the running maximum grows, as flash attention does), and backward needs no chunk:
      dh = Σ_k g_k W_{c_k} − (Σ_k g_k) q.  Two passes over W in all, as materialising takes.
      Taken columns enter by masked scatters, so no chunk waits on the device.
  Gradient of Σ_k g_k log π(c_k), with p the softmax over the same columns:
      ∂z_v = Σ_k g_k [v = c_k] − (Σ_k g_k) p_v,  dh = Σ_v ∂z_v W_v,  dW_v = Σ_rows ∂z_v h,
      db_v = Σ_rows ∂z_v.
Products and sums run in float32 (float64 for float64 input); each gradient is rounded once
to its tensor's dtype.  Under "trie", dW and db are nonzero only at the children's tokens
and are accumulated on those rows alone.
"""

from typing import NamedTuple, Optional

import torch

from flowkern.eager import column_weights, per_position, taken_columns, used_rows
from flowkern.policy import compute_dtype, trie_children

_BLOCK_ELEMENTS = 1 << 22  # operand and result elements of one batched product (trie)
_CHUNK_ELEMENTS = 1 << 22  # logits of one chunk of the full softmax: 16 MiB in float32 (matrix products wide enough)
_MIN_CHUNK_COLUMNS = 256  # ... unless the rows are so many that a chunk would be narrower


def log_probs(hidden, weight, bias, tokens, nodes, length, trie, normalize, flower, softmax_product=False):
    """As flowkern.eager.log_probs, from hidden (B, T, H), weight (V, H) and bias (V,) or None.
    softmax_product (normalize="full"): also return q (R, H) of the rows t ≤ L_b, for `grad`."""
    b, t = used_rows(length, tokens.shape[1])
    h = hidden[b, t].to(compute_dtype(hidden.dtype))
    if normalize == "trie":
        taken, lse = _trie_taken_logits(h, weight, bias, nodes[b, t], nodes[b, t + 1] - 1, trie)
        return per_position(tokens.shape, b, t, (taken - lse)[:, None], lse, flower)
    columns, lse, product = _full_columns_and_lse(h, weight, bias,
                                                  taken_columns(tokens, b, t, trie.eos_token_id, flower),
                                                  softmax_product)
    pieces = per_position(tokens.shape, b, t, columns - lse[:, None], lse, flower)
    return (*pieces, product) if softmax_product else pieces


def grad(hidden, weight, bias, tokens, nodes, length, trie, lse, coefficient, normalize, flower, weight_grad,
         bias_grad, softmax_product=None):
    """(dh (B, T, H), dW (V, H) or None, db (V,) or None): the gradient of Σ_{b,t}
    coefficient[b, t]·δ_{b,t} (see flowkern.eager.logits_grad) w.r.t. hidden, and w.r.t.
    weight and bias when asked for; 0 wherever the loss reads nothing.  softmax_product: the
    q that log_probs returned (normalize="full", frozen W and b): no pass over W."""
    b, t = used_rows(length, tokens.shape[1])
    h = hidden[b, t].to(lse.dtype)
    weights = column_weights(coefficient.to(lse.dtype), b, t, flower)
    if normalize == "trie":
        dh, dw, db = _trie_grad(h, weight, bias, nodes[b, t], nodes[b, t + 1] - 1, trie, lse[b, t], weights[:, 0],
                                weight_grad, bias_grad)
    else:
        cols = taken_columns(tokens, b, t, trie.eos_token_id, flower)
        dh, dw, db = _full_grad(h, weight, bias, cols, lse[b, t], weights, weight_grad, bias_grad, softmax_product)
    grad_hidden = torch.zeros_like(hidden)
    grad_hidden[b, t] = dh.to(hidden.dtype)
    return grad_hidden, dw, db


def children_logits(hidden, weight, bias, nodes, trie, width):
    """(R, width) logits of the children of nodes[i] from hidden (R, H), in ascending token
    order, −inf in padding (width ≥ each node's number of children; a leaf's row is all −inf)."""
    h = hidden.to(compute_dtype(hidden.dtype))
    out = h.new_full((nodes.numel(), width), float("-inf"))
    for rows, edges in _node_blocks(nodes, trie, h.shape[1]):
        z = _block_logits(h, weight, bias, rows, edges, trie)[0]
        used = rows >= 0
        columns = min(width, z.shape[-1])
        out[rows[used], :columns] = z[used][:, :columns]
    return out


# ---- trie normalisation: rows grouped by node -----------------------------------------------

def _node_blocks(state, trie, hidden_size):
    """The rows (indices into `state`) grouped by node, nodes bucketed by ⌈log2 rows⌉ and
    ⌈log2 children⌉: yields (rows (K, n), child edges (K, d)) for K nodes of one bucket, with
    −1 in padding; n and d are powers of two, K keeps a product under _BLOCK_ELEMENTS."""
    order = torch.argsort(state, stable=True)
    node, count = torch.unique_consecutive(state[order], return_counts=True)
    first = torch.cumsum(count, 0) - count
    start = trie.offsets[node]
    degree = trie.offsets[node + 1] - start
    bucket = _ceil_log2(count) * 64 + _ceil_log2(degree)
    for key in torch.unique(bucket).tolist():
        n, d = 1 << (key // 64), 1 << (key % 64)
        row_slot = torch.arange(n, device=state.device)
        child_slot = torch.arange(d, device=state.device)
        members = (bucket == key).nonzero()[:, 0]
        for part in members.split(max(1, _BLOCK_ELEMENTS // (n * d + (n + d) * hidden_size))):
            position = (first[part, None] + row_slot).clamp(max=order.numel() - 1)
            rows = torch.where(row_slot < count[part, None], order[position], -1)
            yield rows, torch.where(child_slot < degree[part, None], start[part, None] + child_slot, -1)


def _ceil_log2(x):
    return torch.log2(x.clamp(min=1).double()).ceil().long()


def _block_logits(h, weight, bias, rows, edges, trie):
    """(z (K, n, d) of each node's rows at its children, −inf at padded children; the
    operands (K, n, H) and (K, d, H); the children's tokens (K, d))."""
    hb = h[rows.clamp(min=0)]
    columns = trie.tokens[edges.clamp(min=0)].long()
    wb = weight[columns].to(h.dtype)
    z = torch.bmm(hb, wb.transpose(1, 2))
    if bias is not None:
        z += bias[columns].to(h.dtype)[:, None, :]
    return z.masked_fill_(edges[:, None, :] < 0, float("-inf")), hb, wb, columns


def _trie_taken_logits(h, weight, bias, state, edge, trie):
    """(z at the child on edge[i], lse over the children of state[i]) per row, (R,) each."""
    taken, lse = h.new_empty(state.shape), h.new_empty(state.shape)
    for rows, edges in _node_blocks(state, trie, h.shape[1]):
        z = _block_logits(h, weight, bias, rows, edges, trie)[0]
        used = rows >= 0
        row, z = rows[used], z[used]
        position = edge[row] - edges[:, :1].expand_as(rows)[used]  # the taken child among the node's
        lse[row] = torch.logsumexp(z, -1)
        taken[row] = z.gather(1, position[:, None])[:, 0]
    return taken, lse


def _trie_grad(h, weight, bias, state, edge, trie, lse, g, weight_grad, bias_grad):
    """(dh (R, H), dW, db) of Σ_i g_i log π_i under the trie policy."""
    dh = torch.zeros_like(h)
    touched = touched_tokens(state, trie) if weight_grad or bias_grad else None
    dw = h.new_zeros(touched.numel(), h.shape[1]) if weight_grad else None
    db = h.new_zeros(touched.numel()) if bias_grad else None
    for rows, edges in _node_blocks(state, trie, h.shape[1]):
        z, hb, wb, columns = _block_logits(h, weight, bias, rows, edges, trie)
        used = rows >= 0
        safe = rows.clamp(min=0)
        position = (edge[safe] - edges[:, :1]).clamp(0, z.shape[-1] - 1)  # the taken child; junk in padding
        taken = torch.zeros_like(z).scatter_(2, position[..., None], 1.0)
        dz = ((taken - torch.exp(z - lse[safe][..., None])) * g[safe][..., None]).masked_fill_(~used[..., None], 0.0)
        dh[rows[used]] = torch.bmm(dz, wb)[used]
        if touched is None:
            continue
        child = edges >= 0
        slot = torch.searchsorted(touched, columns[child])
        if dw is not None:
            dw.index_put_((slot,), torch.bmm(dz.transpose(1, 2), hb)[child], accumulate=True)
        if db is not None:
            db.index_put_((slot,), dz.sum(1)[child], accumulate=True)
    return dh, on_rows(dw, touched, weight), on_rows(db, touched, bias)


def touched_tokens(state, trie):
    """The tokens of the children of the nodes `state`, ascending and distinct: the rows of W
    and b that the trie policy's gradient touches."""
    return torch.unique(trie.tokens[trie_children(torch.unique(state), trie)[1]].long())


def on_rows(values, rows, like):
    """A zero tensor shaped and typed like `like` holding `values` at `rows` (None stays None)."""
    return None if values is None else torch.zeros_like(like).index_copy_(0, rows, values.to(like.dtype))


# ---- full normalisation: chunks of the vocabulary --------------------------------------------

def _column_chunks(vocab, rows):
    step = max(_MIN_CHUNK_COLUMNS, _CHUNK_ELEMENTS // max(rows, 1))
    return (slice(start, min(start + step, vocab)) for start in range(0, vocab, step))


def _full_columns_and_lse(h, weight, bias, cols, softmax_product):
    """(z of row i at columns cols[i, k], (R, K); lse over all V columns, (R,); q = Σ_v p_v W_v
    (R, H) if softmax_product, else None), all read from the same chunks of logits."""
    columns = h.new_zeros(cols.shape)
    lse = h.new_full(h.shape[:1], float("-inf"))
    product = h.new_zeros(h.shape) if softmax_product else None  # Σ_v exp(z_v − lse) W_v so far
    for chunk in _column_chunks(weight.shape[0], h.shape[0]):
        z, w = _chunk_logits(h, weight, bias, chunk)
        position, inside = _in_chunk(cols, chunk, z.shape[1])
        columns += torch.where(inside, z.gather(1, position), 0.0)
        new_lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
        if product is not None:
            product = torch.addmm(product * torch.exp(lse - new_lse)[:, None], torch.exp(z - new_lse[:, None]), w)
        lse = new_lse
    return columns, lse, product


def _in_chunk(cols, chunk, width):
    """(cols' positions within the chunk, clamped into it; which of them lie in it)."""
    position = cols - chunk.start
    return position.clamp(0, width - 1), (position >= 0) & (position < width)


def _chunk_logits(h, weight, bias, chunk):
    """(z of every row at the columns `chunk`, W's rows of the chunk in h's dtype)."""
    w = weight[chunk].to(h.dtype)
    z = h @ w.T
    return (z if bias is None else z + bias[chunk].to(h.dtype)), w


def _full_grad(h, weight, bias, cols, lse, weights, weight_grad, bias_grad, softmax_product):
    """(dh (R, H), dW, db) of Σ_{i,k} weights[i, k] log π(cols[i, k]) under the full softmax:
    ∂z = Σ_k weights[:, k] e_{cols[:, k]} − total·p.  With softmax_product (q) and a frozen
    head, dh = Σ_k weights[:, k] W_{cols[:, k]} − total·q, no chunk read."""
    total = weights.sum(1, keepdim=True)
    if softmax_product is not None and not (weight_grad or bias_grad):
        taken = weight[cols].to(h.dtype)  # (R, K, H)
        return (weights[..., None] * taken).sum(1) - total * softmax_product, None, None
    dh = torch.zeros_like(h)
    dw = torch.empty_like(weight) if weight_grad else None
    db = torch.empty_like(bias) if bias_grad else None
    for chunk in _column_chunks(weight.shape[0], h.shape[0]):
        z, w = _chunk_logits(h, weight, bias, chunk)
        dz = z.sub_(lse[:, None]).exp_().mul_(-total)
        position, inside = _in_chunk(cols, chunk, dz.shape[1])
        dz.scatter_add_(1, position, torch.where(inside, weights, 0.0))
        dh.addmm_(dz, w)
        if dw is not None:
            dw[chunk] = (dz.T @ h).to(dw.dtype)
        if db is not None:
            db[chunk] = dz.sum(0).to(db.dtype)
    return dh, dw, db


# ---- the output layer of a Hugging Face model -----------------------------------------------

class LinearHead(NamedTuple):
    """A causal LM split at its output layer: `body` maps token ids to the last hidden states
    (B, S, H), and the model's logits are hidden @ weight.T + bias."""

    body: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def linear_head(model) -> LinearHead:
    """The body and output layer of a Hugging Face causal LM (looking through a peft
    wrapper), checked on one token: the body's last hidden state must be what the output
    layer reads and the model's logits what it writes (no soft-capping or scaling after it).
    A ValueError says what is missing otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(output) is not torch.nn.Linear:
        raise ValueError(f"the restricted head needs get_output_embeddings() to be a plain torch.nn.Linear, got "
                         f"{type(output).__name__}")
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(body, torch.nn.Module) or body is base:
        raise ValueError("the restricted head needs get_decoder() to return the model's body (its layers before "
                         "the output layer)")
    if not _splits_at(base, body, output):
        raise ValueError("the model's logits are not its output layer applied to its body's last hidden state "
                         "(e.g. soft-capped or scaled logits): the restricted head would change them")
    return LinearHead(body, output.weight, output.bias)


@torch.no_grad()
def _splits_at(model, body, output):
    """Whether, on one token in eval mode, the output layer reads the body's last hidden state
    and the model returns what the output layer writes."""
    seen = []
    hook = output.register_forward_hook(lambda module, args, result: seen.append((args[0], result)))
    training = model.training
    model.eval()
    try:
        token = torch.zeros(1, 1, dtype=torch.long, device=output.weight.device)
        logits = model(input_ids=token).logits
        hidden = body(input_ids=token).last_hidden_state
    finally:
        hook.remove()
        model.train(training)
    return len(seen) == 1 and torch.equal(seen[0][0], hidden) and torch.equal(seen[0][1].to(logits.dtype), logits)
