"""GFlowGR's trajectories and rewards (arXiv 2506.16114): each user gets N trajectories, the
ground-truth item (column 0) and N - 1 augmented items, each with a fused reward.

    items = augment("cm", histories, targets, num_items, N, generator=g, scores=cm_logits,
                    progress=curriculum_progress(step, max_steps))
    rewards = trajectory_rewards(items, histories, codes, RewardWeights(), cm_logits.softmax(1))

Design: every strategy ranks the whole catalogue per row with one key, tier + order, and takes
the N - 1 smallest (one argsort).  Tier 0 holds the strategy's preferred items, tier 1 the other
unobserved items (neither in the history nor the target), tier 2 the history, tier 3 the
target (never taken, as num_items >= N); order is uniform in [0, 1), so each tier is sampled
uniformly without replacement, except on-policy proposals, whose order is their position.
  logs      preferred: the distinct history items other than the target; a short history is
            filled with random unobserved items.
  random    preferred: the unobserved items.
  cm        preferred: a window of the unobserved items ranked by ascending collaborative score
            (ties by item id), of width max(N - 1, ceil(window_frac * candidates)) (at most
            candidates; ceil forgives 1e-9 of rounding error, so 0.07 * 100 gives 7), starting at
            rank round(progress * (candidates - width)) (half to even): easy negatives at
            progress 0, hard ones at progress 1.
  onpolicy  preferred: the proposals other than the target and -1, first occurrence first
            (history items included: they are the model's own proposals).
Where the unobserved items run out (a history covering the catalogue) the history fills the
rest, so the augmented items stay distinct.  progress and window_frac are checked whatever the
strategy; scores and proposals are only read by their strategy.  All on the CPU, no loops.

Rewards, R = floor + w_int * v + w_cm * c + w_prefix * s, per trajectory:
  v  target_value for column 0 (even when the target is also in the history), history_value
     for an item of the user's history, else 0: the paper's liked / clicked / augmented
     (10 / 1 / 0); our data has one kind of interaction, so the target counts as liked and
     the history as clicked.
  c  the collaborative model's probability of the item divided by the row's largest
     probability over the whole catalogue (0 when probabilities is None).
  s  the number of leading code positions shared with the target's code, over L (codes are
     checked to be distinct per item, so only the target has s = 1).
The rewards are returned, not their logs (float64, CPU).
"""

import math
import numbers
from dataclasses import dataclass, fields

import torch

from flowkern._checks import check_choice, check_count, describe

STRATEGIES = ("logs", "random", "cm", "onpolicy")


def augment(strategy, histories, targets, num_items, num_trajectories, *, generator, scores=None, progress=0.0,
            proposals=None, window_frac=0.1) -> torch.Tensor:
    """(B, num_trajectories) item ids: column 0 the targets, then distinct augmented items."""
    check_choice("strategy", strategy, STRATEGIES)
    check_count("num_items", num_items)
    check_count("num_trajectories", num_trajectories)
    if num_trajectories > num_items:
        raise ValueError(f"num_trajectories ({num_trajectories}) exceeds num_items ({num_items})")
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or not 0 <= progress <= 1:
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    if isinstance(window_frac, bool) or not isinstance(window_frac, numbers.Real) or not 0 < window_frac <= 1:
        raise ValueError(f"window_frac must be a number in (0, 1], got {window_frac!r}")
    targets = _ids("targets", torch.as_tensor(targets), num_items, 1)
    history = _history_mask(histories, num_items, len(targets))
    target = torch.zeros_like(history)
    target[torch.arange(len(targets)), targets] = True
    unobserved = ~history & ~target
    order = torch.rand(history.shape, generator=generator, dtype=torch.float64)
    if strategy == "logs":
        preferred = history & ~target
    elif strategy == "random":
        preferred = unobserved
    elif strategy == "cm":
        preferred = _window(scores, unobserved, progress, num_trajectories - 1, window_frac)
    else:
        first = _first_positions(proposals, targets, num_items)
        preferred = first < 1
        order = torch.where(preferred, first, order)
    tier = torch.where(preferred, 0, torch.where(unobserved, 1, torch.where(history, 2, 3)))
    augmented = (tier + order).argsort(dim=1, stable=True)[:, :num_trajectories - 1]
    return torch.cat([targets[:, None], augmented], 1)


def _window(scores, unobserved, progress, least, window_frac):
    """The unobserved items whose ascending-score rank among the unobserved is in the window."""
    if scores is None:
        raise ValueError('strategy "cm" needs scores, the (B, num_items) collaborative-model scores')
    if not isinstance(scores, torch.Tensor) or scores.shape != unobserved.shape or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a {tuple(unobserved.shape)} float tensor, got {describe(scores)}")
    scores = scores.detach().cpu()
    if scores.isnan().any():
        raise ValueError("scores must not hold NaN")
    candidates = unobserved.sum(1)
    width = torch.ceil(window_frac * candidates.double() - 1e-9).long().clamp(min=least).minimum(candidates)
    start = torch.round(progress * (candidates - width).double()).long()
    by_score = scores.argsort(dim=1, stable=True)
    rank = torch.empty_like(by_score).scatter_(1, by_score, unobserved.gather(1, by_score).cumsum(1) - 1)
    return unobserved & (rank >= start[:, None]) & (rank < (start + width)[:, None])


def _first_positions(proposals, targets, num_items):
    """(B, num_items): position / K of each item's first proposal, 1 where not proposed."""
    if proposals is None:
        raise ValueError('strategy "onpolicy" needs proposals, the (B, K) items of the model\'s own beam search')
    proposals = _ids("proposals", proposals, num_items, 2, len(targets), low=-1)
    count, k = proposals.shape
    usable = (proposals >= 0) & (proposals != targets[:, None])
    position = (torch.arange(k, dtype=torch.float64) / k).expand(count, k)
    first = torch.ones(count, num_items + 1, dtype=torch.float64)
    first.scatter_reduce_(1, proposals.where(usable, num_items), position, "amin")
    return first[:, :num_items]


@dataclass
class RewardWeights:
    interaction: float = 1.0    # weight of the interaction signal v
    collaborative: float = 1.0  # weight of the collaborative model's signal c
    prefix: float = 1.0         # weight of the shared-code-prefix signal s
    floor: float = 0.01         # added to every reward
    target_value: float = 1.0   # v of the ground-truth item
    history_value: float = 0.5  # v of an item of the user's own history (0 for the others)

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"RewardWeights.{field.name} must be a finite number >= 0, got {value!r}")


def trajectory_rewards(items, histories, codes, weights, probabilities=None) -> torch.Tensor:
    """(B, N) float64 rewards of the trajectories `items` (from `augment`: column 0 the target);
    codes: (num_items, L) semantic ids, one distinct row per item; probabilities: (B, num_items)."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] < 1 \
            or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a (num_items, L) integer tensor, got {describe(codes)}")
    codes = codes.cpu()
    if len(torch.unique(codes, dim=0)) != len(codes):
        raise ValueError("codes must give every item a distinct code")
    if not isinstance(weights, RewardWeights):
        raise ValueError(f"weights must be a RewardWeights, got {describe(weights)}")
    num_items = len(codes)
    items = _ids("items", items, num_items, 2)
    if items.shape[1] < 1:
        raise ValueError(f"items must hold at least the target column, got {describe(items)}")
    interaction = _history_mask(histories, num_items, len(items)).gather(1, items).double() * weights.history_value
    interaction[:, 0] = weights.target_value
    collaborative = torch.zeros_like(interaction)
    if probabilities is not None:
        if not isinstance(probabilities, torch.Tensor) or probabilities.shape != (len(items), num_items) \
                or not probabilities.dtype.is_floating_point:
            raise ValueError(f"probabilities must be a ({len(items)}, {num_items}) float tensor, "
                             f"got {describe(probabilities)}")
        probabilities = probabilities.detach().cpu().double()
        if not (probabilities.isfinite().all() and (probabilities >= 0).all() and (probabilities.amax(1) > 0).all()):
            raise ValueError("probabilities must be finite and >= 0, with a positive entry in every row")
        collaborative = probabilities.gather(1, items) / probabilities.amax(1, keepdim=True)
    item_codes = codes[items]
    prefix = (item_codes == item_codes[:, :1]).cumprod(2).sum(2).double() / codes.shape[1]
    rewards = weights.floor + weights.interaction * interaction + weights.collaborative * collaborative \
        + weights.prefix * prefix
    bad = ~(torch.isfinite(rewards) & (rewards > 0))
    if bad.any():
        row, column = bad.nonzero()[0].tolist()
        r, v, c, p = (signal[row, column].item() for signal in (rewards, interaction, collaborative, prefix))
        raise ValueError(f"rewards must be finite and > 0, but rewards[{row}, {column}] = {r} (floor {weights.floor}, "
                         f"interaction {v}, collaborative {c}, prefix {p})")
    return rewards


def curriculum_progress(step, max_steps) -> float:
    """The cm curriculum's progress at `step`: min(1, step / max(1, max_steps))."""
    for name, value in (("step", step), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return min(1.0, step / max(1, max_steps))


def _ids(name, value, num_items, dims, rows=None, low=0):
    """`value` as a CPU long tensor: `dims`-D, `rows` rows, ids in [low, num_items)."""
    if not isinstance(value, torch.Tensor) or value.dim() != dims or value.dtype.is_floating_point \
            or value.dtype == torch.bool or (rows is not None and len(value) != rows):
        rows_text = "" if rows is None else f" with {rows} rows"
        raise ValueError(f"{name} must be a {dims}-D integer tensor{rows_text}, got {describe(value)}")
    value = value.long().cpu()
    if value.numel() and (value.min() < low or value.max() >= num_items):
        raise ValueError(f"{name} must hold ids in [{low}, {num_items}), got {value.min().item()} to "
                         f"{value.max().item()}")
    return value


def _history_mask(histories, num_items, rows):
    """(rows, num_items) bool: True where the item is in that row's history."""
    if not isinstance(histories, (list, tuple)) or len(histories) != rows or not all(
            isinstance(history, (list, tuple)) and all(isinstance(i, numbers.Integral) for i in history)
            for history in histories):
        raise ValueError(f"histories must be a list of {rows} lists of int item ids, got {describe(histories)}")
    lengths = torch.tensor([len(history) for history in histories])
    flat = _ids("histories", torch.tensor([i for history in histories for i in history], dtype=torch.long),
                num_items, 1)
    mask = torch.zeros(rows, num_items, dtype=torch.bool)
    mask[torch.arange(rows).repeat_interleave(lengths), flat] = True
    return mask

