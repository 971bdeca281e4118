"""flowkern.augment: GFlowGR's augmented trajectories (four strategies) and fused rewards."""

import math

import pytest
import torch

from flowkern.augment import STRATEGIES, RewardWeights, augment, curriculum_progress, trajectory_rewards

NUM_ITEMS, N = 40, 4
HISTORIES = [[1, 2, 3, 4, 5, 6], [7, 8], [], [9, 9, 10, 11, 12, 13, 14, 15]]
TARGETS = [20, 21, 22, 10]  # row 3's target is also in its history
SCORES = torch.randn(len(TARGETS), NUM_ITEMS, generator=torch.Generator().manual_seed(1))
PROPOSALS = torch.tensor([[20, -1, 5, 5, 30, 3], [-1, -1, 21, 33, -1, -1], [0, 1, 2, 3, 4, 5],
                          [10, 39, 38, 37, 36, 35]])


def run(strategy, seed=0, histories=HISTORIES, targets=TARGETS, num_items=NUM_ITEMS, n=N, **options):
    options = {"scores": SCORES, "proposals": PROPOSALS, **options}
    return augment(strategy, histories, targets, num_items, n, generator=torch.Generator().manual_seed(seed), **options)


def observed(row):
    return set(HISTORIES[row]) | {TARGETS[row]}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_target_then_distinct_other_items(strategy):
    for seed in range(20):
        items = run(strategy, seed, progress=seed / 19)
        assert items.shape == (len(TARGETS), N) and items.dtype == torch.long
        assert items[:, 0].tolist() == TARGETS
        assert ((items >= 0) & (items < NUM_ITEMS)).all()
        for row, target in zip(items.tolist(), TARGETS):
            assert len(set(row)) == N and target not in row[1:]
        assert torch.equal(items, run(strategy, seed, progress=seed / 19))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_history_covering_the_catalogue_still_gives_distinct_items(strategy):
    histories, targets = [[0, 1, 2, 3, 5], [0]], [4, 2]
    scores, proposals = torch.zeros(2, 6), torch.full((2, 1), -1)
    items = run(strategy, histories=histories, targets=targets, num_items=6, n=6, scores=scores, proposals=proposals)
    assert [sorted(row) for row in items.tolist()] == [list(range(6))] * 2 and items[:, 0].tolist() == targets


def test_n_of_one_gives_the_targets():
    assert run("random", n=1).tolist() == [[t] for t in TARGETS]


def test_logs_samples_the_history_uniformly_then_fills_with_unobserved_items():
    seen = set()
    for seed in range(50):
        items = run("logs", seed).tolist()
        assert set(items[0][1:]) <= set(HISTORIES[0]) and set(items[3][1:]) <= set(HISTORIES[3]) - {10}
        assert {7, 8} <= set(items[1]) and not (set(items[1][1:]) - {7, 8}) & observed(1)
        assert not set(items[2][1:]) & observed(2)
        seen |= set(items[0][1:])
    assert seen == set(HISTORIES[0])  # not just the most recent ones


def test_random_never_takes_an_observed_item():
    for seed in range(50):
        for row, items in enumerate(run("random", seed).tolist()):
            assert not set(items[1:]) & observed(row)


def ascending_scores():
    """Score = item id, except the observed items, which score highest."""
    scores = torch.arange(NUM_ITEMS, dtype=torch.float32).repeat(len(TARGETS), 1)
    for row in range(len(TARGETS)):
        scores[row, list(observed(row))] = 100.0
    return scores


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_cm_moves_from_the_lowest_to_the_highest_scored_unobserved_items(progress):
    for seed in range(20):
        items = run("cm", seed, scores=ascending_scores(), progress=progress).tolist()
        for row, augmented in enumerate(items):
            candidates = [i for i in range(NUM_ITEMS) if i not in observed(row)]
            width = max(N - 1, math.ceil(0.1 * len(candidates)))
            window = candidates[:width] if progress == 0 else candidates[-width:]
            assert set(augmented[1:]) <= set(window)


def test_cm_window_is_a_tenth_of_the_candidates_at_the_given_rank():
    histories, targets = [list(range(10, 19))], [0]  # 40 - 9 - 1 = 30 candidates: a window of 3
    scores = -torch.arange(NUM_ITEMS, dtype=torch.float32)[None]  # descending: rank 0 is item 39
    for progress, window in [(0.0, {39, 38, 37}), (0.5, {25, 24, 23}), (1.0, {3, 2, 1})]:
        seen = set()
        for seed in range(20):
            seen |= set(run("cm", seed, histories=histories, targets=targets, n=3, scores=scores,
                            progress=progress)[0, 1:].tolist())
        assert seen == window  # at 0.5 the window starts at rank round(13.5) = 14, item 25


def test_cm_window_width_forgives_float_rounding():
    scores = torch.arange(101, dtype=torch.float32)[None]  # 100 candidates; 0.07 * 100 = 7.000000000000001
    seen = set()
    for seed in range(10):
        seen |= set(run("cm", seed, histories=[[]], targets=[0], num_items=101, n=7, scores=scores,
                        window_frac=0.07)[0, 1:].tolist())
    assert seen == set(range(1, 8))


def test_onpolicy_takes_the_proposals_in_order_then_random_unobserved_items():
    items = run("onpolicy").tolist()
    assert items[0][1:] == [5, 30, 3]  # the target, -1 and the repeat skipped
    assert items[1][1] == 33 and not set(items[1][2:]) & (observed(1) | {33})
    assert items[2][1:] == [0, 1, 2]
    assert items[3][1:] == [39, 38, 37]


def hand_example():
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 2], [1, 1, 1]])
    items = torch.tensor([[0, 1, 3], [5, 3, 2]])
    histories = [[1, 2], [2]]
    probabilities = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.05, 0.05], [0.1, 0.1, 0.5, 0.1, 0.1, 0.1]],
                                 dtype=torch.float64)
    return items, histories, codes, probabilities


def test_rewards_match_a_hand_computed_example():
    items, histories, codes, probabilities = hand_example()
    weights = RewardWeights(interaction=2.0, collaborative=0.5, prefix=3.0, floor=0.1, history_value=0.5)
    # R = 0.1 + 2 v + 0.5 c + 3 s
    want = torch.tensor([[0.1 + 2 * 1 + 0.5 * 1 + 3 * 1, 0.1 + 2 * 0.5 + 0.5 * 0.25 + 3 * 2 / 3, 0.1 + 0.5 * 0.5],
                         [0.1 + 2 * 1 + 0.5 * 0.2 + 3 * 1, 0.1 + 0.5 * 0.2 + 3 * 1 / 3, 0.1 + 2 * 0.5 + 0.5 * 1]],
                        dtype=torch.float64)
    got = trajectory_rewards(items, histories, codes, weights, probabilities)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    without = trajectory_rewards(items, histories, codes, weights)
    assert without.dtype == torch.float64
    collaborative = probabilities.gather(1, items) / probabilities.amax(1, keepdim=True)
    torch.testing.assert_close(without, want - 0.5 * collaborative, rtol=1e-12, atol=1e-15)


def test_the_target_has_the_largest_prefix_signal():
    generator = torch.Generator().manual_seed(0)
    codes = torch.cartesian_prod(torch.arange(3), torch.arange(3), torch.arange(5))
    codes = codes[torch.randperm(len(codes), generator=generator)[:NUM_ITEMS]]
    weights = RewardWeights(interaction=0.0, collaborative=0.0, prefix=1.0, floor=1e-3)
    for seed in range(5):
        prefix = trajectory_rewards(run("random", seed), HISTORIES, codes, weights) - 1e-3
        assert torch.allclose(prefix[:, 0], torch.ones(len(TARGETS), dtype=torch.float64))
        assert (prefix[:, 1:] < 1 - 1e-9).all()


def test_rewards_refuse_a_zero_reward_and_bad_weights():
    items, histories, codes, _ = hand_example()
    zero = RewardWeights(interaction=0.0, collaborative=0.0, prefix=0.0, floor=0.0)
    with pytest.raises(ValueError, match=r"rewards.*\[0, 0\].*floor 0.0"):
        trajectory_rewards(items, histories, codes, zero)
    for field, value in [("prefix", -1.0), ("floor", float("nan")), ("collaborative", float("inf"))]:
        with pytest.raises(ValueError, match=f"RewardWeights.{field}"):
            RewardWeights(**{field: value})
    with pytest.raises(ValueError, match="codes"):
        trajectory_rewards(items, histories, codes.clamp(max=0), RewardWeights())


def test_curriculum_progress():
    assert [curriculum_progress(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert curriculum_progress(3, 0) == 1.0
    with pytest.raises(ValueError, match="step"):
        curriculum_progress(-1, 10)


@pytest.mark.parametrize("call, name", [
    (lambda: run("random", n=0), "num_trajectories"),
    (lambda: run("random", n=NUM_ITEMS + 1), "num_trajectories"),
    (lambda: run("popular"), "strategy.*'logs', 'random', 'cm', 'onpolicy'"),
    (lambda: run("cm", scores=None), "scores"),
    (lambda: run("cm", scores=SCORES[:, :5]), "scores"),
    (lambda: run("onpolicy", proposals=None), "proposals"),
    (lambda: run("onpolicy", proposals=PROPOSALS - 2), "proposals"),
    (lambda: run("cm", progress=-0.1), "progress"),
    (lambda: run("logs", progress=1.5), "progress"),
    (lambda: run("logs", targets=[0, 1, 2, NUM_ITEMS]), "targets"),
    (lambda: run("logs", histories=HISTORIES[:3]), "histories"),
    (lambda: run("logs", histories=[[0.5], [], [], []]), "histories"),
])
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
