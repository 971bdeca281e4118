"""GFlowGR's trajectory-level GFlowNet losses with per-trajectory rewards (arXiv 2506.16114, Sec. 3).

Flower's SubTB (flowkern.ops) reads fixed process rewards from the trie's flows.  GFlowGR
instead gives each trajectory its own reward R_b (the user's interaction, a collaborative
model's score, the code prefix shared with the ground truth: flowkern.augment) and learns the
flows.  With log π_t the policy's log-probability of token x_t at state s_t (trie or full
normalisation, as in flowkern.ops), states s_0 (the prompt's end) .. s_{L+1} (the item's
leaf, after the termination token at position L):

  trajectory balance (form="tb", Malkin et al. 2022):
      loss_b = (log Z_b + Σ_{t≤L} log π_t − log R_b)²                         weight_b = 1
  detailed balance (form="db", Bengio et al. 2023), log F_b(s_t) supplied for t ≤ L and
  log F_b(s_{L+1}) = log R_b:
      loss_b = Σ_{t≤L} (log F_b(s_t) + log π_t − log F_b(s_{t+1}))²           weight_b = L + 1

log Z_b (e.g. a linear head on the hidden state at the prompt's end) and log F (one on every
state's hidden state) are differentiable inputs.  reduction="mean" divides Σ_b loss_b by
Σ_b weight_b, as subtb_loss does: TB and DB are SubTB's extremes (only the first and last
states; only adjacent pairs, λ → 0) with these flows in place of the trie's.  Their sums are
O(T) per row and are written in plain torch; the walk, log π and its gradient (the O(B·T·V)
part) run on the backend's stages, Triton kernels on CUDA, as for subtb_loss.
"""

import torch

from flowkern._checks import check_choice, describe
from flowkern.ops import (BACKENDS, _check_head_inputs, _check_inputs, _FLOAT_DTYPES, _logits_source, _reduce,
                          position_log_probs)

FORMS = ("tb", "db")


def balance_loss(logits, trie, log_rewards, *, tokens, form="tb", log_z=None, log_flows=None, normalize="trie",
                 reduction="mean", backend="auto"):
    """GFlowGR's TB or DB loss of the trajectories `tokens` (B, T) under `logits` (B, T, V).

    log_rewards: (B,) float, log R_b of each trajectory's item (finite).
    form:        "tb" with log_z (B,), or "db" with log_flows (B, T): log F(s_t) at position t
                 (read for t ≤ L_b only).  Both differentiable, any float dtype.
    normalize:   "trie" (the trie-constrained policy) or "full" (the model's softmax).
    reduction:   "mean" (Σ loss / Σ weight), "sum" or "none" (per trajectory).
    backend:     as subtb_loss: "auto", "torch" or "triton".
    Every trajectory must be an item of the trie.  Returns a float32 loss (float64 for
    float64 logits), differentiable w.r.t. logits, log_z / log_flows and log_rewards."""
    _check_options(form, normalize, reduction, backend)
    _check_inputs(logits, tokens, trie)
    _check_flows(tokens, log_rewards, form, log_z, log_flows)
    log_pi, length = position_log_probs(_logits_source(logits), tokens, trie, normalize, backend, logits)
    return _balance(log_pi, length, log_rewards, form, log_z, log_flows, reduction)


def linear_balance_loss(hidden, weight, trie, log_rewards, *, tokens, bias=None, form="tb", log_z=None,
                        log_flows=None, normalize="trie", reduction="mean", backend="auto"):
    """balance_loss of the logits hidden @ weight.T + bias, computed without forming them
    (the restricted head of linear_subtb_loss: with normalize="trie" only the rows of weight
    at each state's children are read)."""
    _check_options(form, normalize, reduction, backend)
    source = _check_head_inputs(hidden, weight, bias, tokens, trie)
    _check_flows(tokens, log_rewards, form, log_z, log_flows)
    log_pi, length = position_log_probs(source, tokens, trie, normalize, backend, hidden, weight, bias)
    return _balance(log_pi, length, log_rewards, form, log_z, log_flows, reduction)


def _balance(log_pi, length, log_rewards, form, log_z, log_flows, reduction):
    steps, dtype, device = log_pi.shape[1], log_pi.dtype, log_pi.device
    log_rewards = log_rewards.to(dtype)
    if form == "tb":
        loss = (log_z.to(dtype) + log_pi.sum(1) - log_rewards) ** 2
        weight = torch.ones_like(loss)
    else:
        position = torch.arange(steps, device=device)
        used = position <= length[:, None]
        _check_finite("log_flows", log_flows, used)
        log_flows = log_flows.to(dtype)
        following = torch.cat([log_flows[:, 1:], log_flows[:, -1:]], 1)
        following = torch.where(position == length[:, None], log_rewards[:, None], following)
        delta = torch.where(used, log_flows + log_pi - following, 0.0)
        loss = (delta ** 2).sum(1)
        weight = (length + 1).to(dtype)
    if not bool(torch.isfinite(loss).all()):
        b = int((~torch.isfinite(loss)).nonzero()[0])
        raise ValueError(f"the {form.upper()} loss of trajectory {b} overflows {dtype}: log π sums to "
                         f"{float(log_pi[b].sum()):.3g} and log_rewards[{b}] = {float(log_rewards[b]):.3g}; "
                         f"their squared difference is too large")
    return _reduce(loss, weight, reduction)


def _check_options(form, normalize, reduction, backend):
    check_choice("form", form, FORMS)
    check_choice("normalize", normalize, ("trie", "full"))
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_choice("backend", backend, BACKENDS)


def _check_flows(tokens, log_rewards, form, log_z, log_flows):
    """Types, shapes and devices of the rewards and flows; log_rewards and log_z finite (log_flows
    is checked where it is read, once the trajectories' lengths are known)."""
    batch, steps = tokens.shape
    given, absent = (("log_z", log_z, (batch,)), ("log_flows", log_flows)) if form == "tb" else \
        (("log_flows", log_flows, (batch, steps)), ("log_z", log_z))
    if absent[1] is not None:
        raise ValueError(f"{absent[0]} is for form={'db' if form == 'tb' else 'tb'!r}; form={form!r} does not read it")
    for name, value, shape in (("log_rewards", log_rewards, (batch,)), given):
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES or tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a floating-point tensor of shape {shape} (tokens are {tuple(tokens.shape)}), "
                             f"got {describe(value)}")
        if value.device != tokens.device:
            raise ValueError(f"{name} is on {value.device} but tokens are on {tokens.device}")
    _check_finite("log_rewards", log_rewards, torch.ones_like(log_rewards, dtype=torch.bool))
    if form == "tb":
        _check_finite("log_z", log_z, torch.ones_like(log_z, dtype=torch.bool))


def _check_finite(name, value, used):
    bad = used & ~torch.isfinite(value)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {float(value[where])}: it must be finite")
