"""GFlowGR's TB and DB losses one trajectory and one state at a time: the spec that
flowkern.balance_loss is tested against (float64 scalars; definitions in flowkern/balance.py)."""

import torch

from reference.subtb import log_pi, reduce


def balance_loss(logits, trie, tokens, log_rewards, form="tb", log_z=None, log_flows=None, normalize="trie",
                 reduction="mean"):
    """`trie` is a reference.trie.DictTrie; every row of `tokens` must be an item of it."""
    losses, weights = [], []
    for b in range(logits.shape[0]):
        row_tokens = [int(x) for x in tokens[b]]
        states, _, length, _, _ = trie.walk(row_tokens)
        log_pis = [log_pi(logits[b, t].double(), states[t], row_tokens[t], normalize) for t in range(length + 1)]
        log_r = log_rewards[b].double()
        if form == "tb":
            losses.append((log_z[b].double() + sum(log_pis) - log_r) ** 2)
            weights.append(1.0)
            continue
        flows = [log_flows[b, t].double() for t in range(length + 1)] + [log_r]  # F(s_{L+1}) = R
        losses.append(sum((flows[t] + log_pis[t] - flows[t + 1]) ** 2 for t in range(length + 1)))
        weights.append(float(length + 1))
    return reduce(losses, weights, reduction)
