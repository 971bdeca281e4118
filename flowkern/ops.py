"""Flower's Subtrajectory Balance loss over an item trie (arXiv 2503.07377, Sec. 3.3).

A trajectory is a row of `tokens`: title tokens x_0 .. x_{L−1}, then the termination token
at position L.  States: s_0 = root, s_{t+1} = child(s_t, x_t); s_{L+1} is the item's leaf.
`logits[b, t]` is the model's next-token distribution at s_t.  Per trajectory:

  log π_t  log-probability of x_t at s_t (flowkern.policy: trie or full normalisation)
  log r_t  = log F(s_{t+1}) − log F(s_t), the process reward (Eq. 10); with a preference
           score p > 0 (Sec. 3.3.3): log r_t / p ("div") or log r_t + w·log p ("add")

Process form (Eq. 11), over the L + 2 states s_0 .. s_{L+1}:
  δ_t = log π_t − log r_t,  D_k = Σ_{t<k} δ_t,  loss = Σ_{0≤m<n≤L+1} λ^(n−m−1) (D_n − D_m)²

Flower form (the published code's "modified SubTB", Hu et al. 2024), over s_0 .. s_L, every
state able to terminate:  log_pf[k] = log π(x_k),  log_pterm[k] = log π(termination) at s_k
(full softmax), log_r[k] = Σ_{t<k} log r_t + c_k with c_k = −15 for k < L, c_L = log r_L;
  δ_k = log_r[k] + log_pf[k] + log_pterm[k+1] − log_r[k+1] − log_pterm[k]  (k < L)
and the same pair sum over states 0 .. L.

reduction="mean" divides Σ_b loss_b by Σ_b Σ_{m<n} λ^(n−m−1), the published normalisation.
"""

import torch
import torch.nn.functional as F

from flowkern._checks import check_choice, check_number, check_token_tensor, describe
from flowkern.policy import full_log_probs, trie_log_probs
from flowkern.trie import Trie

NONTERMINAL_LOG_REWARD = -15.0  # c_k of the Flower form: log reward of stopping before the leaf

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def subtb_loss(logits, trie, rewards=None, *, tokens, lam=1.0, normalize=None, form="process",
               pref_mode="div", pref_weight=1.0, reduction="mean", on_invalid="error"):
    """Flower's SubTB loss of the trajectories `tokens` (B, T) under `logits` (B, T, V).

    logits:     float16/bfloat16/float32/float64, any strides; logits[b, t] is the
                distribution at state s_t.  Positions after a row's termination token are
                never read, in logits or in tokens.
    trie:       the item `Trie`, on the logits' device.
    rewards:    None (the trie's item rewards), or preference scores p_b > 0 as a (B,)
                tensor, or a (B, num_items) tensor read at each trajectory's item (the
                leaf's smallest item id when items share a title).
    lam:        λ > 0, the subtrajectory weight decay.
    normalize:  "trie" (default for form="process") or "full"; form="flower" needs "full".
    form:       "process" (Eq. 11) or "flower" (parity with the published code).
    pref_mode:  "div" (log r / p) or "add" (log r + pref_weight·log p).
    reduction:  "mean" (published normalisation), "sum", or "none" (per-trajectory losses).
    on_invalid: "error", or "ignore" to drop trajectories that leave the trie or never
                terminate (they add nothing to the loss or to the normaliser; a batch with
                none left gives 0).
    Returns a float32 loss (float64 for float64 logits), differentiable w.r.t. logits.
    """
    normalize = _check_options(lam, normalize, form, pref_mode, pref_weight, reduction, on_invalid)
    _check_inputs(logits, tokens, trie)
    walk = trie.walk(tokens)
    _check_trajectories(walk, tokens, logits.shape[-1], trie.eos_token_id, on_invalid)
    length = walk.length  # −1 for a dropped trajectory: it then has at most one state, so no pairs
    log_r = _personalised_log_rewards(walk.log_reward, walk.item, length, rewards, pref_mode, pref_weight,
                                      trie.num_items)
    if form == "process":
        (log_pi,) = _taken_log_probs(logits, trie, tokens, walk, length, normalize, termination=False)
        return _subtrajectory_balance(log_pi - log_r.to(log_pi.dtype), length + 2, lam, reduction)
    log_pf, log_pterm = _taken_log_probs(logits, trie, tokens, walk, length, "full", termination=True)
    log_r_states = _flower_state_log_rewards(log_r, length).to(log_pf.dtype)
    return _subtrajectory_balance(_modified_deltas(log_pf, log_pterm, log_r_states), length + 1, lam, reduction)


def sequence_log_probs(logits, trie, *, tokens, normalize="trie"):
    """log P(x) = Σ_{t ≤ L} log π_t of each trajectory in `tokens` (B, T) under `logits`
    (B, T, V): the item's log-probability under the trie-constrained policy (normalize=
    "trie") or under the unconstrained model ("full").  Shape (B,), differentiable.
    Arguments and errors as subtb_loss; every trajectory must be an item of the trie."""
    check_choice("normalize", normalize, ("trie", "full"))
    _check_inputs(logits, tokens, trie)
    walk = trie.walk(tokens)
    _check_trajectories(walk, tokens, logits.shape[-1], trie.eos_token_id, "error")
    (log_pi,) = _taken_log_probs(logits, trie, tokens, walk, walk.length, normalize, termination=False)
    return log_pi.sum(1)


def modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lam=1.0, *, reduction="mean"):
    """The Flower form's loss from its per-state pieces, each (B, T): row b uses states
    0 .. lengths[b] (lengths[b] ≤ T − 1 is the position of its termination token) and
    ignores the rest.  See the module docstring for δ and the pair sum."""
    _check_options(lam, "full", "flower", "div", 1.0, reduction, "error")
    pieces = {"log_pf": log_pf, "log_pterm": log_pterm, "log_r": log_r}
    for name, value in pieces.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point (B, T) tensor, got {describe(value)}")
        if value.shape != log_pf.shape or value.device != log_pf.device:
            raise ValueError(f"{name} has shape {tuple(value.shape)} on {value.device} but log_pf has "
                             f"{tuple(log_pf.shape)} on {log_pf.device}: they must match")
    batch, steps = log_pf.shape
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be a ({batch},) integer tensor, got {describe(lengths)}")
    lengths = lengths.to(log_pf.device, torch.long)
    if bool(((lengths < 0) | (lengths >= steps)).any()):
        raise ValueError(f"lengths must lie in [0, T - 1] = [0, {steps - 1}], got {lengths.tolist()}")
    used = torch.arange(steps, device=log_pf.device) <= lengths[:, None]
    for name, value in pieces.items():
        if not bool(torch.isfinite(value[used]).all()):
            raise ValueError(f"{name} holds NaN or inf at a state the loss uses")
    return _subtrajectory_balance(_modified_deltas(log_pf, log_pterm, log_r), lengths + 1, lam, reduction)


def _taken_log_probs(logits, trie, tokens, walk, length, normalize, termination):
    """log π_t of each taken token, and with `termination` also log π(termination) (full
    softmax only), as (B, T) tensors that are 0 after each trajectory's end."""
    batch, steps = tokens.shape
    b, t = (torch.arange(steps, device=tokens.device) <= length[:, None]).nonzero(as_tuple=True)
    taken = tokens[b, t].long()
    if normalize == "trie":
        log_probs = trie_log_probs(logits, b, t, walk.nodes[b, t], walk.nodes[b, t + 1] - 1, trie)[:, None]
    else:
        columns = [taken, torch.full_like(taken, trie.eos_token_id)] if termination else [taken]
        log_probs = full_log_probs(logits, b, t, torch.stack(columns, dim=1))
    _check_finite_log_probs(log_probs, b, t, taken)
    empty = torch.zeros(batch, steps, dtype=log_probs.dtype, device=log_probs.device)
    return [empty.index_put((b, t), column) for column in log_probs.unbind(1)]


def _modified_deltas(log_pf, log_pterm, log_r):
    return log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]


def _subtrajectory_balance(delta, num_states, lam, reduction):
    """Σ_{0≤m<n<K_b} λ^(n−m−1) (D_n − D_m)² per row, D_k = Σ_{t<k} δ_t, K_b = num_states[b]
    (rows with K_b ≤ 1 add nothing); entries δ_t with t ≥ K_b − 1 are never read."""
    batch, steps = delta.shape
    k = torch.arange(steps + 1, device=delta.device)
    delta = torch.where(k[:-1] < num_states[:, None] - 1, delta, 0.0)
    cumulative = F.pad(delta.cumsum(1), (1, 0))
    gap = k[None, :] - k[:, None]  # [m, n] -> n − m
    decay = torch.pow(float(lam), (gap - 1).clamp(min=0).double()).to(delta.dtype)
    pair_weight = torch.where(gap > 0, decay, 0.0) * (k < num_states[:, None])[:, None, :]
    diff = cumulative[:, None, :] - cumulative[:, :, None]
    per_trajectory = (pair_weight * diff.square()).sum((1, 2))
    if reduction == "none":
        return per_trajectory
    if reduction == "sum":
        return per_trajectory.sum()
    return per_trajectory.sum() / pair_weight.sum().clamp(min=1.0)  # any trajectory weighs >= 1


def _flower_state_log_rewards(log_r, length):
    """log_r[k] = Σ_{t<k} log r_t + c_k, c_k = −15 before the last state, log r_L at it."""
    inclusive = log_r.cumsum(1)
    k = torch.arange(log_r.shape[1], device=log_r.device)
    return torch.where(k == length[:, None], inclusive, inclusive - log_r + NONTERMINAL_LOG_REWARD)


def _personalised_log_rewards(log_reward, item, length, rewards, pref_mode, pref_weight, num_items):
    """Process rewards with the preference of each trajectory applied; 0 after its end."""
    steps = log_reward.shape[1]
    in_trajectory = torch.arange(steps, device=log_reward.device) <= length[:, None]
    log_reward = torch.where(in_trajectory, log_reward, 0.0)
    if rewards is None:
        return log_reward
    preference = _preference(rewards, item, length >= 0, num_items)
    if pref_mode == "div":
        return log_reward / preference[:, None]
    return torch.where(in_trajectory, log_reward + pref_weight * preference.log()[:, None], 0.0)


def _preference(rewards, item, kept, num_items):
    """p_b of each kept trajectory as float64 (1 for dropped ones), checked finite and > 0."""
    batch = item.shape[0]
    if not isinstance(rewards, torch.Tensor) or rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise TypeError(f"rewards must be None or a real tensor of preference scores, got {describe(rewards)}")
    if rewards.device != item.device:
        raise ValueError(f"rewards are on {rewards.device} but logits are on {item.device}")
    per_item = rewards.dim() == 2
    if rewards.shape == (batch,):
        preference = rewards
    elif rewards.shape == (batch, num_items):
        preference = rewards[torch.arange(batch, device=item.device), item.clamp(min=0)]
    else:
        raise ValueError(f"rewards must have shape (B,) = ({batch},) or (B, num_items) = ({batch}, {num_items}), "
                         f"got {tuple(rewards.shape)}")
    preference = torch.where(kept, preference.double(), 1.0)
    bad = ~(torch.isfinite(preference) & (preference > 0))
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        where = f"rewards[{b}, {int(item[b])}] (trajectory {b}'s item)" if per_item else f"rewards[{b}]"
        raise ValueError(f"{where} = {float(preference[b])}: preference scores must be finite and > 0")
    return preference


def _check_options(lam, normalize, form, pref_mode, pref_weight, reduction, on_invalid):
    """Validate the scalar options; returns the normalisation to use."""
    check_choice("form", form, ("process", "flower"))
    if normalize is None:
        normalize = "trie" if form == "process" else "full"
    check_choice("normalize", normalize, ("trie", "full"))
    if form == "flower" and normalize != "full":
        raise ValueError("form='flower' needs normalize='full': it uses the full-softmax probability of "
                         "the termination token at every state, which the trie policy sets to 0 off the leaves")
    check_choice("pref_mode", pref_mode, ("div", "add"))
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_choice("on_invalid", on_invalid, ("error", "ignore"))
    check_number("lam", lam, positive=True)
    check_number("pref_weight", pref_weight, positive=False)
    return normalize


def _check_inputs(logits, tokens, trie):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a (B, T, V) tensor, got {describe(logits)}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be a (B, T, V) tensor, got {describe(logits)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    check_token_tensor("tokens", tokens)
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but logits has shape {tuple(logits.shape)}: "
                         f"tokens must be (B, T) = {tuple(logits.shape[:2])}")
    if not isinstance(trie, Trie):
        raise TypeError(f"trie must be a flowkern.Trie, got {type(trie).__name__}")
    for name, device in (("tokens", tokens.device), ("trie", trie.device)):
        if device != logits.device:
            raise ValueError(f"{name} is on {device} but logits are on {logits.device}: move it with "
                             f"{name}.to(logits.device)")
    vocab = logits.shape[-1]
    if trie.max_token >= vocab:
        raise ValueError(f"logits have V = {vocab} columns but the trie holds token id {trie.max_token}: "
                         f"the vocabulary must cover every trie token")
    if tokens.shape[1] < trie.min_depth:
        raise ValueError(f"T = {tokens.shape[1]} positions is too short: the shortest item in the trie "
                         f"takes {trie.min_depth} (its tokens and the termination token)")


def _check_trajectories(walk, tokens, vocab, eos, on_invalid):
    """Raise on the first trajectory that does not reach a leaf, unless on_invalid="ignore"."""
    invalid = walk.length < 0
    if on_invalid == "error" and bool(invalid.any()):
        b = int(invalid.nonzero()[0])
        position = int(walk.left_at[b])
        if position < 0:
            raise ValueError(f"tokens[{b}] has no termination token (eos_token_id = {eos}) in its "
                             f"T = {tokens.shape[1]} positions: every trajectory must end with it")
        token = int(tokens[b, position])
        if not 0 <= token < vocab:
            raise ValueError(f"tokens[{b}, {position}] = {token} is not a token id of logits with V = {vocab} "
                             f"columns")
        raise ValueError(f"tokens[{b}, {position}] = {token} leaves the trie: it is not a child of the state "
                         f"reached by tokens[{b}, :{position}] (on_invalid='ignore' drops such trajectories)")


def _check_finite_log_probs(log_probs, b, t, taken):
    """log_probs: (R, K), row i read at logits[b_i, t_i] for token taken_i."""
    bad = ~torch.isfinite(log_probs).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"logits[{int(b[i])}, {int(t[i])}] give log-probabilities {log_probs[i].tolist()} "
                         f"(token {int(taken[i])}): the logits hold NaN/inf there or give the taken token "
                         f"zero probability")
