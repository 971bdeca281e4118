"""Flower's loss computed the way the published code does it, written from its description
for the benchmarks (and checked against flowkern in the tests):

- process rewards live in a dict keyed by the '-'-joined ids of a prefix, mapping each next
  token to its log process reward, and are looked up per sample and per token in Python;
- the log-softmax over the whole vocabulary is materialised;
- the subtrajectory pair sum is a Python loop over subtrajectory lengths that builds a
  (B, T − length) tensor each time (Hu et al. 2024's modified SubTB, the Flower form).
"""

import math
from collections import defaultdict

import torch

NONTERMINAL_LOG_REWARD = -15.0


def build_process_rewards(sequences, rewards, eos):
    """{'-'.join(prefix ids): {next token: log F(prefix + token) − log F(prefix)}}."""
    flow = defaultdict(float)
    for sequence, reward in zip(sequences, rewards):
        ids = [str(token) for token in list(sequence) + [eos]]
        for k in range(len(ids) + 1):
            flow["-".join(ids[:k])] += reward
    table = defaultdict(dict)
    for key, value in flow.items():
        if key:
            parent, _, token = key.rpartition("-")
            table[parent][int(token)] = math.log(value) - math.log(flow[parent])
    return dict(table)


def process_log_rewards(tokens, table, eos):
    """(B, T) log process rewards of each token, looked up one sample and token at a time."""
    log_r = torch.zeros(tokens.shape, dtype=torch.float64)
    for b, row in enumerate(tokens.tolist()):
        prefix = []
        for t, token in enumerate(row):
            log_r[b, t] = table["-".join(prefix)][token]
            if token == eos:
                break
            prefix.append(str(token))
    return log_r


def subtb_loss(logits, tokens, table, eos, lam=1.0):
    """The Flower-form SubTB loss, mean over all subtrajectories of the batch."""
    log_r = process_log_rewards(tokens, table, eos).to(logits.device)
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, T, V), materialised, in the logits dtype
    safe = torch.where(tokens == eos, eos, tokens)
    ended = (tokens == eos).cumsum(1) >= 1
    log_pf = log_probs.gather(2, safe.clamp(min=0)[..., None])[..., 0]
    log_pterm = log_probs[..., eos]
    inclusive = log_r.cumsum(1).to(log_probs.dtype)
    is_last = ended & ~torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], 1)
    state_log_r = torch.where(is_last, inclusive, inclusive - log_r.to(log_probs.dtype) + NONTERMINAL_LOG_REWARD)
    delta = state_log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - state_log_r[:, 1:] - log_pterm[:, :-1]
    cumulative = torch.cat([torch.zeros_like(delta[:, :1]), delta], 1).cumsum(1)
    after_end = (tokens[:, :-1] == eos).cumsum(1) >= 1  # pairs ending past the termination state
    loss, weight = 0.0, 0.0
    for length in range(1, cumulative.shape[1]):
        term = (cumulative[:, length:] - cumulative[:, :-length]) ** 2
        term = term.masked_fill(after_end[:, length - 1:], 0.0)
        loss = loss + lam ** (length - 1) * term.sum()
        weight += lam ** (length - 1) * float((~after_end[:, length - 1:]).sum())
    return loss / weight
