"""Flower's SubTB objective one trajectory and one token at a time: the spec that
flowkern.subtb_loss is tested against.  Every quantity is a float64 torch scalar, so
autograd gives the reference gradients too.  Definitions: flowkern/ops.py.
"""

import math

import torch

NONTERMINAL_LOG_REWARD = -15.0


def subtb_loss(logits, trie, tokens, rewards=None, lam=1.0, normalize="trie", form="process",
               pref_mode="div", pref_weight=1.0, reduction="mean", on_invalid="error", granularity=1):
    """`trie` is a reference.trie.DictTrie; arguments as flowkern.subtb_loss."""
    losses, weights = [], []
    for b in range(logits.shape[0]):
        row_tokens = [int(x) for x in tokens[b]]
        states, log_r, length, item, _ = trie.walk(row_tokens)
        if length is None:
            if on_invalid == "error":
                raise ValueError(f"trajectory {b} does not reach a leaf")
            losses.append(torch.zeros((), dtype=torch.float64))
            weights.append(0.0)
            continue
        preference = _preference(rewards, b, item)
        log_r = [_personalise(x, preference, pref_mode, pref_weight) for x in log_r]
        rows = [logits[b, t].double() for t in range(length + 1)]
        if form == "process":
            deltas = [log_pi(rows[t], states[t], row_tokens[t], normalize) - log_r[t] for t in range(length + 1)]
        else:
            log_pf = [torch.log_softmax(rows[k], 0)[row_tokens[k]] for k in range(length + 1)]
            log_pterm = [torch.log_softmax(rows[k], 0)[trie.eos] for k in range(length + 1)]
            log_r_states = [sum(log_r[:k]) + (NONTERMINAL_LOG_REWARD if k < length else log_r[length])
                            for k in range(length + 1)]
            deltas = modified_deltas(log_pf, log_pterm, log_r_states, length)
        loss, weight = pair_sum(deltas, lam, granularity)
        losses.append(loss)
        weights.append(weight)
    return reduce(losses, weights, reduction)


def sequence_log_probs(logits, trie, tokens, normalize="trie"):
    """Σ_t log π_t of each row, which must be an item of the trie."""
    out = []
    for b in range(logits.shape[0]):
        row_tokens = [int(x) for x in tokens[b]]
        states, _, length, _, _ = trie.walk(row_tokens)
        out.append(sum(log_pi(logits[b, t].double(), states[t], row_tokens[t], normalize) for t in range(length + 1)))
    return torch.stack(out)


def log_pi(row, state, token, normalize):
    """log-probability of `token` under the logits `row` at trie node `state`."""
    if normalize == "trie":
        return row[token] - torch.logsumexp(row[sorted(state.children)], 0)
    return torch.log_softmax(row, 0)[token]


def modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lam=1.0, reduction="mean", granularity=1):
    """Hu et al. (2024) modified SubTB over states 0..lengths[b] of each row."""
    losses, weights = [], []
    for b in range(log_pf.shape[0]):
        length = int(lengths[b])
        deltas = modified_deltas(log_pf[b], log_pterm[b], log_r[b], length)
        loss, weight = pair_sum(deltas, lam, granularity)
        losses.append(loss)
        weights.append(weight)
    return reduce(losses, weights, reduction)


def modified_deltas(log_pf, log_pterm, log_r, length):
    return [log_r[k] + log_pf[k] + log_pterm[k + 1] - log_r[k + 1] - log_pterm[k] for k in range(length)]


def pair_sum(deltas, lam, granularity=1):
    """Σ_{i<j} λ^(j−i−1) (D_{k_j} − D_{k_i})² with D_k = Σ_{t<k} δ_t over the kept states
    k_0 < k_1 < …: every `granularity`-th state and the last one (only the first and the
    last for "item"), and Σ_{i<j} λ^(j−i−1)."""
    cumulative = [torch.zeros((), dtype=torch.float64)]
    for delta in deltas:
        cumulative.append(cumulative[-1] + delta)
    last = len(cumulative) - 1
    kept = [k for k in range(last + 1) if k == last or (k == 0 if granularity == "item" else k % granularity == 0)]
    loss, weight = torch.zeros((), dtype=torch.float64), 0.0
    for j in range(len(kept)):
        for i in range(j):
            loss = loss + lam ** (j - i - 1) * (cumulative[kept[j]] - cumulative[kept[i]]) ** 2
            weight += lam ** (j - i - 1)
    return loss, weight


def reduce(losses, weights, reduction):
    if reduction == "none":
        return torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)
    total = sum(losses, torch.zeros((), dtype=torch.float64))
    if reduction == "sum":
        return total
    return total / sum(weights) if sum(weights) > 0 else total


def _preference(rewards, b, item):
    if rewards is None:
        return None
    return float(rewards[b]) if rewards.dim() == 1 else float(rewards[b, item])


def _personalise(log_r, preference, pref_mode, pref_weight):
    if preference is None:
        return log_r
    if pref_mode == "div":
        return log_r / preference
    return log_r + pref_weight * math.log(preference)
