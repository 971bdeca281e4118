"""Fuzz of the C++ extension (csrc/trie.cpp): both builders and walk on adversarial input,
against the dict trie (reference/trie.py) where the input is valid and a ValueError naming
the argument where it is not.  .ci/sanitize runs this file under AddressSanitizer and UBSan
with more examples (FLOWKERN_FUZZ_EXAMPLES), so an out-of-bounds read fails there even
when it happens to return the right answer."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern
from flowkern.trie import _trie
from reference.trie import DictTrie
from tests.test_trie import assert_same_trie

EXAMPLES = int(os.environ.get("FLOWKERN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOP = 2**31 - 1  # the largest token id
# token ids: a small alphabet (shared prefixes), ids near 2^31, negatives
TOKENS = st.one_of(st.integers(0, 6), st.integers(TOP - 3, TOP), st.integers(-3, -1), st.just(-(2**31)))
REWARDS = st.one_of(st.floats(1e-3, 1e3), st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-320, 1e308]))
EOS = st.one_of(st.integers(0, 6), st.integers(TOP - 1, TOP))


def problem(sequences, rewards, eos):
    """Why the items are no valid catalogue (the argument the error must name), or None."""
    if not sequences:
        return "empty"
    for sequence in sequences:
        if not sequence:
            return "empty"
        if any(token < 0 or token == eos for token in sequence):
            return "token"
    if not all(math.isfinite(r) and r > 0 for r in rewards):
        return "rewards"
    if not math.isfinite(sum(rewards)):  # all > 0 here: overflows exactly when the flows do
        return "rewards"
    return None


@st.composite
def ragged(draw):
    """Items, and offsets that are either theirs or adversarial (past the end, negative,
    falling, huge)."""
    sequences = draw(st.lists(st.lists(TOKENS, min_size=0, max_size=5), min_size=0, max_size=8))
    if len(sequences) > 1 and draw(st.booleans()):  # a duplicate and a prefix
        sequences[-1] = list(sequences[0])
        sequences[-2] = sequences[0][:-1]
    tokens = [token for sequence in sequences for token in sequence]
    offsets = list(np.cumsum([0] + [len(s) for s in sequences]))
    kind = draw(st.sampled_from(["theirs", "past the end", "negative", "any", "huge"]))
    if kind != "theirs" and len(offsets) > 1:
        i = draw(st.integers(min(1, len(offsets) - 2), len(offsets) - 2)) if kind == "past the end" else \
            draw(st.integers(0, len(offsets) - 1))
        offsets[i] = draw({"past the end": st.integers(len(tokens) + 1, len(tokens) + 8),
                           "negative": st.integers(-8, -1), "any": st.integers(0, len(tokens)),
                           "huge": st.sampled_from([2**62, -(2**62), 2**63 - 1])}[kind])
    rewards = draw(st.lists(REWARDS, min_size=len(sequences), max_size=len(sequences)))
    return sequences, tokens, offsets, rewards, draw(EOS)


def offsets_problem(offsets, size):
    if offsets[0] != 0:
        return "offsets[0]"
    if offsets[-1] != size:
        return "offsets[-1]"
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        return "non-decreasing"
    return None


@FUZZ
@given(ragged())
def test_ragged_builder_matches_dict_trie_or_names_the_argument(case):
    sequences, tokens, offsets, rewards, eos = case
    flat = np.array(tokens, dtype=np.int32)
    expected = offsets_problem(offsets, len(tokens)) if len(offsets) > 1 else None
    items = [tokens[a:b] for a, b in zip(offsets, offsets[1:])] if expected is None else None
    if expected is None:
        expected = problem(items, rewards, eos)
    if expected is None:
        trie = flowkern.Trie.from_ragged(flat, offsets, rewards, eos_token_id=eos)
        assert_same_trie(trie, DictTrie(items, rewards, eos).to_arrays())
        return
    with pytest.raises(ValueError, match=r"offsets|tokens|rewards"):
        flowkern.Trie.from_ragged(flat, offsets, rewards, eos_token_id=eos)


@FUZZ
@given(sequences=st.lists(st.lists(TOKENS, min_size=0, max_size=5), min_size=0, max_size=8), data=st.data(),
       eos=EOS)
def test_list_builder_matches_dict_trie_or_names_the_argument(sequences, data, eos):
    rewards = data.draw(st.lists(REWARDS, min_size=len(sequences), max_size=len(sequences)))
    expected = problem(sequences, rewards, eos)
    if expected is None:
        trie = flowkern.Trie.build(sequences, rewards, eos_token_id=eos)
        assert_same_trie(trie, DictTrie(sequences, rewards, eos).to_arrays())
        return
    with pytest.raises(ValueError, match=r"sequences|rewards"):
        flowkern.Trie.build(sequences, rewards, eos_token_id=eos)


@st.composite
def trie_and_rows(draw):
    """A valid catalogue over ids that reach 2^31 − 1, and rows of its items, their
    prefixes and junk (ids past int32, negatives)."""
    token = st.one_of(st.integers(0, 6), st.integers(TOP - 3, TOP - 1))
    sequences = draw(st.lists(st.lists(token, min_size=1, max_size=5), min_size=1, max_size=8))
    eos = TOP
    junk = st.one_of(token, st.just(eos), st.integers(-3, -1), st.just(2**40), st.just(-(2**63)))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row = list(draw(st.sampled_from(sequences))) + [eos]
        row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(junk, max_size=3))
        rows.append(row)
    steps = max(max(map(len, rows)), 1)
    return sequences, eos, [row + [0] * (steps - len(row)) for row in rows]


@FUZZ
@given(trie_and_rows())
def test_walk_matches_dict_trie_near_the_int32_edge(case):
    sequences, eos, rows = case
    trie = flowkern.Trie.build(sequences, eos_token_id=eos)
    walk = trie.walk(torch.tensor(rows))
    oracle = DictTrie(sequences, [1.0] * len(sequences), eos)
    for b, row in enumerate(rows):
        states, log_rewards, length, item, left_at = oracle.walk(row)
        assert walk.length[b] == (-1 if length is None else length)
        assert walk.item[b] == (-1 if item is None else item)
        assert walk.left_at[b] == (-1 if left_at is None else left_at)
        np.testing.assert_allclose(walk.log_reward[b, : len(log_rewards)].numpy(), log_rewards, rtol=1e-12,
                                   atol=1e-12)


@FUZZ
@given(data=st.data(), case=trie_and_rows())
def test_cpp_walk_on_arrays_that_are_no_trie_raises_or_stays_in_bounds(data, case):
    """Arrays scrambled past what the Trie check allows (only the extension sees them):
    the walk raises a ValueError naming an array or returns results of the right shape."""
    sequences, eos, rows = case
    trie = flowkern.Trie.build(sequences, eos_token_id=eos)
    offsets, tokens, log_flow = trie.offsets.numpy().copy(), trie.tokens.numpy().copy(), trie.log_flow.numpy()
    value = st.one_of(st.integers(-3, offsets.size + 3), st.just(2**62), st.just(-(2**62)))
    for _ in range(data.draw(st.integers(1, 3))):
        offsets[data.draw(st.integers(0, offsets.size - 1))] = data.draw(value)
    tokens = tokens[: data.draw(st.integers(0, tokens.size))] if data.draw(st.booleans()) else tokens
    log_flow = log_flow[: data.draw(st.integers(0, log_flow.size))] if data.draw(st.booleans()) else log_flow
    try:
        out = _trie.walk(offsets, tokens, log_flow, eos, np.array(rows, dtype=np.int64))
    except ValueError as error:
        assert any(name in str(error) for name in ("offsets", "edge_tokens", "log_flow")), str(error)
        return
    assert out["nodes"].shape == (len(rows), len(rows[0]) + 1)
    assert bool(((out["nodes"] >= -1) & (out["nodes"] < log_flow.size)).all())
