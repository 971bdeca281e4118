"""The vectorised PyTorch path of subtb_loss (backend="torch"; every device, CPU by default).

flowkern.ops runs the loss as four stages; this module and flowkern.kernels (Triton) each
implement all four with the same arguments and results:

  walk_rewards   trie walk + personalised process rewards log r_t (Eq. 10, Sec. 3.3.3)
  log_probs      log π_t (and log π(termination) for the Flower form) and the log-normaliser
  pair_sum       per trajectory the SubTB pair sum (Eq. 11) and its gradient g_t = ∂loss_b/∂δ_t
  logits_grad    ∂/∂logits of Σ_{b,t} coefficient_{b,t}·δ_{b,t}, one row at a time

Definitions of δ, the pair sum and the Flower form: flowkern/ops.py.
"""

import torch
import torch.nn.functional as F

from flowkern.policy import full_log_softmax, full_log_softmax_grad, trie_log_softmax, trie_log_softmax_grad

NONTERMINAL_LOG_REWARD = -15.0  # c_k of the Flower form: log reward of stopping before the leaf


def walk_rewards(tokens, trie, rewards, pref_mode, pref_weight):
    """(TrieWalk whose log_reward holds the personalised log r_t, 0 after each end;
    preference p_b as (B,) float64, 1 without rewards and for dropped rows, not yet checked)."""
    walk = trie.walk(tokens)
    in_trajectory = torch.arange(tokens.shape[1], device=tokens.device) <= walk.length[:, None]
    log_reward = torch.where(in_trajectory, walk.log_reward, 0.0)
    if rewards is None:
        return walk._replace(log_reward=log_reward), torch.ones_like(log_reward[:, 0])
    preference = rewards if rewards.dim() == 1 else \
        rewards[torch.arange(tokens.shape[0], device=tokens.device), walk.item.clamp(min=0)]
    preference = torch.where(walk.length >= 0, preference.double(), 1.0)
    if pref_mode == "div":
        return walk._replace(log_reward=log_reward / preference[:, None]), preference
    added = torch.where(in_trajectory, log_reward + pref_weight * preference.log()[:, None], 0.0)
    return walk._replace(log_reward=added), preference


def used_rows(length, steps):
    """(b, t) of every position the loss reads: t ≤ L_b."""
    return (torch.arange(steps, device=length.device) <= length[:, None]).nonzero(as_tuple=True)


def log_probs(logits, tokens, nodes, length, trie, normalize, flower):
    """(log π_t, log π(termination) at s_t or None, lse_t), each (B, T) in the compute dtype
    and 0 after each trajectory's end."""
    b, t = used_rows(length, tokens.shape[1])
    if normalize == "trie":
        log_pi, lse = trie_log_softmax(logits, b, t, nodes[b, t], nodes[b, t + 1] - 1, trie)
        return per_position(tokens.shape, b, t, log_pi[:, None], lse, flower)
    columns, lse = full_log_softmax(logits, b, t, taken_columns(tokens, b, t, trie.eos_token_id, flower))
    return per_position(tokens.shape, b, t, columns, lse, flower)


def taken_columns(tokens, b, t, eos, flower):
    """The columns log π is read at in row (b_i, t_i), (R, K): the taken token, and for the
    Flower form the termination token too."""
    taken = tokens[b, t].long()
    return torch.stack([taken, torch.full_like(taken, eos)], 1) if flower else taken[:, None]


def column_weights(coefficient, b, t, flower):
    """The coefficients of the columns of taken_columns in Σ coefficient·δ, (R, K): c_t on
    log π(x_t), and for the Flower form c_{t−1} − c_t on log π(termination)."""
    if not flower:
        return coefficient[b, t, None]
    previous = F.pad(coefficient, (1, 0))[:, :-1]
    return torch.stack([coefficient[b, t], previous[b, t] - coefficient[b, t]], 1)


def per_position(shape, b, t, columns, lse, flower):
    """log_probs' result from per-row values: columns (R, K) and lse (R,) put at (b_i, t_i)
    of (B, T) tensors that are 0 elsewhere."""
    empty = torch.zeros(shape, dtype=lse.dtype, device=lse.device)
    pieces = [empty.index_put((b, t), column) for column in columns.unbind(1)]
    return pieces[0], pieces[1] if flower else None, empty.index_put((b, t), lse)


def pair_sum(log_pf, log_pterm, log_r, length, lam, period=1):
    """(loss_b, weight_b = Σ_{m<n} λ^(n−m−1), g = ∂loss_b/∂δ (B, T)) of each trajectory:
    process form if log_pterm is None, else the Flower form; states every `period` tokens."""
    if log_pterm is None:
        return subtrajectory_balance(log_pf - log_r.to(log_pf.dtype), length + 2, lam, period)
    deltas = modified_deltas(log_pf, log_pterm, flower_state_log_rewards(log_r, length).to(log_pf.dtype))
    loss, weight, grad = subtrajectory_balance(deltas, length + 1, lam, period)
    return loss, weight, F.pad(grad, (0, 1))  # δ_k for k < T − 1


def modified_deltas(log_pf, log_pterm, log_r):
    return log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]


def flower_state_log_rewards(log_r, length):
    """log_r[k] = Σ_{t<k} log r_t + c_k, c_k = −15 before the last state, log r_L at it."""
    inclusive = log_r.cumsum(1)
    k = torch.arange(log_r.shape[1], device=log_r.device)
    return torch.where(k == length[:, None], inclusive, inclusive - log_r + NONTERMINAL_LOG_REWARD)


def subtrajectory_balance(delta, num_states, lam, period=1):
    """Σ_{m<n} λ^(κ_n−κ_m−1) (D_n − D_m)² per row over its coarse states m, n: the multiples
    of `period` below K_b − 1 and the last state K_b − 1 (K_b = num_states[b]; κ counts the
    coarse states before; period 1 keeps every state).  D_k = Σ_{t<k} δ_t; rows with K_b ≤ 1
    add nothing.  Returns the losses, the pair weights and the gradient w.r.t. δ (0 at the
    entries t ≥ K_b − 1, which are never read).  O(T²) per row, all rows at once."""
    steps = delta.shape[1]
    k = torch.arange(steps + 1, device=delta.device)
    last = num_states[:, None] - 1
    live = k[:-1] < last
    cumulative = F.pad(torch.where(live, delta, 0.0).cumsum(1), (1, 0))
    coarse = ((k % period == 0) & (k < last)) | (k == last)  # (B, T + 1)
    index = coarse.cumsum(1)
    gap = index[:, None, :] - index[:, :, None]  # [b, m, n] -> κ_n − κ_m
    decay = torch.pow(float(lam), (gap - 1).clamp(min=0).double()).to(delta.dtype)
    pair_weight = torch.where((gap > 0) & coarse[:, :, None] & coarse[:, None, :], decay, 0.0)
    weighted_diff = pair_weight * (cumulative[:, None, :] - cumulative[:, :, None])
    per_trajectory = (weighted_diff * (cumulative[:, None, :] - cumulative[:, :, None])).sum((1, 2))
    grad_cumulative = 2 * (weighted_diff.sum(1) - weighted_diff.sum(2))  # ∂loss/∂D_k
    grad = grad_cumulative[:, 1:].flip(1).cumsum(1).flip(1)  # g_t = Σ_{k>t} ∂loss/∂D_k
    return per_trajectory, pair_weight.sum((1, 2)), torch.where(live, grad, 0.0)


def logits_grad(logits, tokens, nodes, length, trie, lse, coefficient, normalize, flower, out):
    """Write ∂/∂logits of Σ_{b,t} coefficient[b, t]·δ_{b,t} into `out` (B, T, V) — every
    entry, 0 where the loss reads nothing; `out` may be `logits` itself.  δ_t holds +log π_t
    (process form), or +log π(x_t) + log π_term(s_{t+1}) − log π_term(s_t) (Flower form), so
    row t carries coefficient c_t on log π(x_t) and c_{t−1} − c_t on log π(termination)."""
    steps = tokens.shape[1]
    b, t = used_rows(length, steps)
    if normalize == "trie":
        trie_log_softmax_grad(logits, b, t, nodes[b, t], nodes[b, t + 1] - 1, trie, lse[b, t],
                              coefficient[b, t], out)
        return
    cols = taken_columns(tokens, b, t, trie.eos_token_id, flower)
    full_log_softmax_grad(logits, b, t, cols, lse[b, t], column_weights(coefficient, b, t, flower), out)
    unused = (torch.arange(steps, device=tokens.device) > length[:, None]).nonzero(as_tuple=True)
    out[unused] = 0

