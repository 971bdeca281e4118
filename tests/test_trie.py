"""flowkern.Trie: the C++ builder against the dict-of-dicts oracle, persistence, walking."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from tests import corruptions
from tests.strategies import catalogues, history_free_catalogue, movie_catalogue

INT_ARRAYS = ["offsets", "tokens", "level_offsets", "leaf_nodes", "leaf_item_offsets", "leaf_items", "item_leaf"]


def assert_same_trie(trie, expected):
    for name in INT_ARRAYS:
        assert getattr(trie, name).tolist() == expected[name], name
    np.testing.assert_allclose(trie.log_flow.numpy(), expected["log_flow"], rtol=1e-12, atol=1e-12)
    assert trie.log_z == pytest.approx(expected["log_z"], rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(catalogues())
def test_builder_matches_dict_trie(catalogue):
    trie = catalogue.trie()
    assert_same_trie(trie, catalogue.dict_trie().to_arrays())
    assert trie.num_items == len(catalogue.sequences)
    assert trie.depth == max(map(len, catalogue.sequences)) + 1
    assert trie.min_depth == min(map(len, catalogue.sequences)) + 1
    assert trie.children.tolist() == list(range(1, trie.num_nodes))
    assert trie.item_rewards.tolist() == catalogue.rewards


@pytest.mark.parametrize("catalogue, items, titles", [
    (movie_catalogue, 2653, 2599),  # Movies_and_TV: some titles repeat across item ids
    (lambda: history_free_catalogue("select_100_Movies.json"), 100, 100),
    (lambda: history_free_catalogue("select_1500_Movies.json"), 1439, 1439),
], ids=["movies_and_tv", "history_free_100", "history_free_1500"])
def test_builder_matches_dict_trie_on_real_titles(catalogue, items, titles):
    catalogue = catalogue()  # real Qwen2.5 ids
    trie = catalogue.trie()
    assert_same_trie(trie, catalogue.dict_trie().to_arrays())
    assert trie.num_items == items and trie.leaf_nodes.numel() == titles


@settings(max_examples=50, deadline=None)
@given(catalogues())
def test_ragged_input_matches_lists(catalogue):
    flat = [token for sequence in catalogue.sequences for token in sequence]
    offsets = np.cumsum([0] + [len(s) for s in catalogue.sequences])
    ragged = flowkern.Trie.from_ragged(np.array(flat), offsets, catalogue.rewards, eos_token_id=catalogue.eos)
    assert_same_trie(ragged, catalogue.dict_trie().to_arrays())


def test_accepts_tuples_arrays_and_tensors_as_items():
    expected = flowkern.Trie.build([[3, 1], [3]], eos_token_id=0)
    for items in ([(3, 1), (3,)], [np.array([3, 1]), np.array([3], dtype=np.int16)],
                  [torch.tensor([3, 1]), torch.tensor([3])]):
        trie = flowkern.Trie.build(items, eos_token_id=0)
        assert trie.tokens.tolist() == expected.tokens.tolist()


def test_documented_layout_on_a_small_example():
    # items: 0 "5 3", 1 "5", 2 "5 3" (same title as 0), 3 "7 1 2"; termination token 9
    trie = flowkern.Trie.build([[5, 3], [5], [5, 3], [7, 1, 2]], [1.0, 2.0, 3.0, 4.0], eos_token_id=9)
    assert trie.offsets.tolist() == [0, 2, 4, 5, 6, 6, 7, 7, 8, 8]
    assert trie.tokens.tolist() == [5, 7, 3, 9, 1, 9, 2, 9]
    assert trie.node_depth.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert trie.item_leaf.tolist() == [6, 4, 6, 8]
    flows = np.exp(trie.log_flow.numpy() + trie.log_z)
    np.testing.assert_allclose(flows, [10, 6, 4, 4, 2, 4, 4, 4, 4])
    assert (trie.num_nodes, trie.num_edges, trie.depth, trie.max_degree) == (9, 8, 4, 2)


def test_save_load_roundtrip(tmp_path):
    trie = movie_catalogue().trie()
    trie.save(tmp_path / "movies.npz")
    loaded = flowkern.Trie.load(tmp_path / "movies.npz")
    for name in INT_ARRAYS + ["log_flow", "item_rewards"]:
        assert torch.equal(getattr(loaded, name), getattr(trie, name)), name
    assert (loaded.eos_token_id, loaded.log_z, loaded.max_token) == (trie.eos_token_id, trie.log_z, trie.max_token)


def test_to_device_moves_every_array():
    trie = flowkern.Trie.build([[1, 2], [1]], eos_token_id=0)
    moved = trie.to("meta")
    assert moved.device == torch.device("meta") and moved.log_flow.device == torch.device("meta")
    assert trie.device == torch.device("cpu")
    assert "num_items=2" in repr(trie)


@st.composite
def catalogue_and_rows(draw):
    catalogue = draw(catalogues())
    alphabet = max(max(map(max, catalogue.sequences)), catalogue.eos) + 2
    token = st.integers(-1, alphabet)
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):  # an item, possibly with one token changed
            row = list(draw(st.sampled_from(catalogue.sequences))) + [catalogue.eos]
            if draw(st.booleans()):
                row[draw(st.integers(0, len(row) - 1))] = draw(token)
        else:
            row = draw(st.lists(token, min_size=1, max_size=8))
        rows.append(row)
    steps = max(map(len, rows)) + draw(st.integers(0, 2))
    return catalogue, [row + [draw(token) for _ in range(steps - len(row))] for row in rows]


@pytest.mark.parametrize("path", ["walk", "_walk_tensors"])  # C++ on CPU; PyTorch on other devices
@settings(max_examples=150, deadline=None)
@given(case=catalogue_and_rows())
def test_walk_matches_dict_trie(path, case):
    catalogue, rows = case
    trie = catalogue.trie()
    walk = getattr(trie, path)(torch.tensor(rows))
    oracle = catalogue.dict_trie()
    for b, row in enumerate(rows):
        states, log_rewards, length, item, left_at = oracle.walk(row)
        steps = len(states) - 1
        assert walk.length[b] == (-1 if length is None else length)
        assert walk.item[b] == (-1 if item is None else item)
        assert walk.left_at[b] == (-1 if left_at is None else left_at)
        assert (walk.nodes[b, steps + 1:] == -1).all() and (walk.log_reward[b, steps:] == 0).all()
        np.testing.assert_allclose(walk.log_reward[b, :steps].numpy(), log_rewards, rtol=1e-12, atol=1e-12)
        flows = np.exp(trie.log_flow.numpy()[walk.nodes[b, : steps + 1].numpy()] + trie.log_z)
        np.testing.assert_allclose(flows, [state.flow for state in states], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64])
def test_walk_paths_agree_on_any_integer_layout(dtype):
    """Token dtypes, a non-contiguous batch and ids beyond int32 (never children)."""
    trie = flowkern.Trie.build([[1, 2, 3], [1, 2], [4], [1, 5, 6, 7]], [1.0, 2.0, 3.0, 4.0], eos_token_id=0)
    rows = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 9], [4, 0, 0, 0], [1, 5, 6, 7], [1, 9, 0, 0], [-1, 0, 0, 0]])
    batches = [rows.to(dtype), rows.to(dtype).T.contiguous().T]
    if dtype == torch.int64:
        batches.append(torch.where(rows == 9, 2**40 + 9, rows))
    for tokens in batches:
        fast, slow = trie.walk(tokens), trie._walk_tensors(tokens)
        for name, a, b in zip(fast._fields, fast, slow):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert trie.walk(rows).length.tolist() == [3, 2, 1, -1, -1, -1]


def test_build_releases_the_gil():
    """A Python thread keeps running while a large trie is built in another thread."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 150_000, size=10_000_000, dtype=np.int32)
    offsets = np.arange(0, tokens.size + 1, 20)
    start = time.perf_counter()
    flowkern.Trie.from_ragged(tokens, offsets, eos_token_id=0)
    alone = time.perf_counter() - start

    builder = threading.Thread(target=flowkern.Trie.from_ragged, args=(tokens, offsets), kwargs={"eos_token_id": 0})
    ticks = [time.perf_counter()]
    builder.start()
    while builder.is_alive():
        ticks.append(time.perf_counter())
    builder.join()
    longest_pause = max(np.diff(ticks), default=0.0)
    assert alone > 0.1, "the build is too quick to tell whether the GIL was held"
    assert longest_pause < alone / 2, f"the Python thread stalled {longest_pause:.3f}s of a {alone:.3f}s build"


# ---- bad input: the error names the argument and what was expected -------------------

@pytest.mark.parametrize("sequences, rewards, eos, error, message", [
    ([], None, 0, ValueError, "sequences is empty: a trie needs at least one item"),
    ([[1, 2], []], None, 0, ValueError, r"sequences\[1\] is empty: every item needs at least one token"),
    ([[1, -4]], None, 0, ValueError, r"sequences\[0\]\[1\] = -4 is negative"),
    ([[1, 7, 2]], None, 7, ValueError, r"sequences\[0\]\[1\] is the termination token \(eos_token_id = 7\)"),
    ([[1, 2**31]], None, 0, ValueError, r"sequences\[0\]\[1\] does not fit in int32"),
    ([[1, 2.5]], None, 0, TypeError, r"sequences\[0\]\[1\] is a float, not an integer token id"),
    (["Aladdin"], None, 0, TypeError, r"sequences\[0\] is a string: tokenise titles"),
    ([[1], 5], None, 0, TypeError, r"sequences\[1\] is a int, not a sequence of token ids"),
    ("Aladdin", None, 0, TypeError, "sequences must be a list of token-id sequences, got str"),
    ((s for s in [[1]]), None, 0, TypeError, "sequences must be a list of token-id sequences, got generator"),
    ([[1], [2]], [1.0], 0, ValueError, r"rewards must hold one value per item \(2\), got shape \(1,\)"),
    ([[1], [2]], [1.0, 0.0], 0, ValueError, r"rewards\[1\] = 0.000000: item rewards must be finite and > 0"),
    ([[1], [2]], [-1.0, 1.0], 0, ValueError, r"rewards\[0\] = -1.000000: item rewards must be finite and > 0"),
    ([[1], [2]], [float("nan"), 1.0], 0, ValueError, r"rewards\[0\] = nan: item rewards must be finite"),
    ([[1], [2]], [1.0, float("inf")], 0, ValueError, r"rewards\[1\] = inf: item rewards must be finite"),
    ([[1], [2]], [1e308, 1e308], 0, ValueError, "rewards: their sum overflows float64"),
    ([[1], [2]], ["a", "b"], 0, TypeError, "rewards must be numbers"),
    ([[1]], None, -1, ValueError, r"eos_token_id must be in \[0, 2\^31 - 1\], got -1"),
    ([[1]], None, 2**31, ValueError, r"eos_token_id must be in \[0, 2\^31 - 1\], got 2147483648"),
    ([[1]], None, 1.0, TypeError, "eos_token_id must be an int, got float"),
])
def test_build_rejects_bad_input(sequences, rewards, eos, error, message):
    with pytest.raises(error, match=message):
        flowkern.Trie.build(sequences, rewards, eos_token_id=eos)


@pytest.mark.parametrize("tokens, offsets, error, message", [
    ([1, 2, 3], [0, 2], ValueError, r"offsets\[-1\] must equal len\(tokens\) = 3, got 2"),
    ([1, 2, 3], [1, 3], ValueError, r"offsets\[0\] must be 0, got 1"),
    ([1, 2, 3], [0, 2, 1, 3], ValueError, r"offsets must be non-decreasing, but offsets\[2\] < offsets\[1\]"),
    ([1, 2, 3], [0, 3, 3], ValueError, r"tokens\[1\] is empty"),
    ([5, 6, 7], [0, 100, 3], ValueError, r"offsets\[1\] = 100 is past the end of tokens \(3 tokens\)"),
    ([5, 6, 7], [0, 2**40, 3], ValueError, r"offsets\[1\] = 1099511627776 is past the end of tokens"),
    ([1, 2**40], [0, 2], ValueError, r"tokens must fit in int32"),
    ([1.5, 2.0], [0, 2], TypeError, "tokens must be integers, got dtype float64"),
    ([[1, 2]], [0, 2], ValueError, r"tokens must be one-dimensional, got shape \(1, 2\)"),
    ([1, 2], [0.0, 2.0], TypeError, "offsets must be integers"),
    ([], [], ValueError, "offsets must be one-dimensional with num_items \\+ 1 entries"),
    ([], [0], ValueError, "tokens is empty: a trie needs at least one item"),
])
def test_from_ragged_rejects_bad_input(tokens, offsets, error, message):
    with pytest.raises(error, match=message):
        flowkern.Trie.from_ragged(tokens, offsets, eos_token_id=0)


def test_load_rejects_files_that_are_not_tries(tmp_path):
    trie = flowkern.Trie.build([[1, 2], [1]], eos_token_id=0)
    trie.save(tmp_path / "good.npz")
    arrays = dict(np.load(tmp_path / "good.npz"))

    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    cases = [
        ("other.npz", "the archive has no offsets, tokens, .*, item_rewards, format_version, eos_token_id, log_z$"),
        ("future.npz", dict(arrays, format_version=np.int64(99)),
         "format_version is 99; this flowkern reads version 1"),
        ("partial.npz", {k: v for k, v in arrays.items() if k not in ("log_flow", "log_z")},
         "the archive has no log_flow, log_z$"),
        ("broken.npz", dict(arrays, item_leaf=np.array([1, 99], dtype=np.int32)),
         "item_leaf must map each item to the leaf that lists it"),
        ("pickled.npz", dict(arrays, tokens=np.array([[1], "x"], dtype=object)),
         "tokens must be a 1-dimensional int32 array, got a 1-dimensional object array"),
        ("wide.npz", dict(arrays, log_flow=arrays["log_flow"].astype(np.float16)),
         "log_flow must be a 1-dimensional float64 array, got a 1-dimensional float16 array"),
    ]
    for name, *content, message in cases:
        if content:
            np.savez(tmp_path / name, **content[0])
        with pytest.raises(ValueError, match=rf"^'{tmp_path / name}' does not hold a flowkern trie: .*{message}"):
            flowkern.Trie.load(tmp_path / name)
    np.save(tmp_path / "plain.npy", arrays["tokens"])
    with pytest.raises(ValueError, match=r"plain.npy' does not hold a flowkern trie: it is not a readable .npz archive"):
        flowkern.Trie.load(tmp_path / "plain.npy")


def test_load_refuses_every_corruption_of_a_file(tmp_path):
    """tests/corruptions.py's cases (dtypes, shapes, values, orders, scalars, non-archives, a
    compressed archive, headers that declare more than the file holds): each is a ValueError
    naming an array of the file, or a file that is a trie of other titles (an edge token
    changed in order)."""
    trie = corruptions.sample_trie()
    outcomes = []
    for label, blamed, content in corruptions.corruptions(corruptions.saved_arrays(trie, tmp_path)):
        corruptions.write(tmp_path / "corrupt.npz", content)
        try:
            loaded = flowkern.Trie.load(tmp_path / "corrupt.npz")
        except ValueError as error:
            assert corruptions.refusal(str(error), blamed) < 2, (label, str(error))
            outcomes.append(corruptions.refusal(str(error), blamed))
            continue
        assert blamed == "tokens" and corruptions.same_trie(loaded, corruptions.rebuilt(loaded)), label
        outcomes.append("other titles")
    assert len(outcomes) == 450 and outcomes.count(0) == 436 and outcomes.count("other titles") == 2


def test_replaced_arrays_are_checked():
    """dataclasses.replace runs the same check as the constructor and load."""
    trie = flowkern.Trie.build([[1, 2], [1], [3]], [1.0, 2.0, 3.0], eos_token_id=0)
    cases = [
        (dict(offsets=trie.offsets * 100), "offsets must rise from 0 to 6"),
        (dict(offsets=trie.offsets.int()), r"offsets must be a one-dimensional int64 tensor, got a torch.int32"),
        (dict(log_flow=trie.log_flow[:-1]), r"offsets must hold len\(log_flow\) \+ 1 = 7 entries, got 8"),
        (dict(log_flow=trie.log_flow.clone().fill_(float("nan"))), r"log_flow must be log F\(n\) − log Z"),
        (dict(tokens=trie.tokens.flip(0)), "tokens must hold each node's children in strictly ascending token order"),
        (dict(eos_token_id=1), "eos_token_id = 1 must be the token of exactly the edges into the leaves"),
        (dict(eos_token_id=True), r"eos_token_id must be an int in \[0, 2\^31 - 1\], got True"),
        (dict(log_z=trie.log_z + 1e-6), "log_z must be log Σ item_rewards"),
        (dict(log_z="1"), "log_z must be a float, got a str"),
        (dict(leaf_items=trie.leaf_items.flip(0)), "item_leaf must map each item to the leaf that lists it"),
        (dict(item_rewards=trie.item_rewards * 2), "log_z must be log Σ item_rewards"),
        (dict(level_offsets=trie.level_offsets[[0, 1, 2, 4]]), "level_offsets must bound the depths"),
        (dict(leaf_nodes=trie.leaf_nodes.to("meta")), "leaf_nodes is on meta"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(trie, **change)
    with pytest.raises(ValueError, match="field max_token is declared with init=False"):
        dataclasses.replace(trie, max_token=0)  # derived from the arrays, never given


@pytest.mark.parametrize("tokens, error, message", [
    ([[1, 0]], TypeError, r"tokens must be a \(B, T\) tensor of token ids, got a list"),
    (torch.tensor([1, 0]), ValueError, r"tokens must be a \(B, T\) tensor of token ids, got a torch.int64 tensor of shape \(2,\)"),
    (torch.tensor([[1.0, 0.0]]), TypeError, "tokens must be an integer tensor, got torch.float32"),
    (torch.tensor([[1, 0]], device="meta"), ValueError, "tokens are on meta but the trie is on cpu"),
])
def test_walk_rejects_bad_input(tokens, error, message):
    with pytest.raises(error, match=message):
        flowkern.Trie.build([[1, 2], [1]], eos_token_id=0).walk(tokens)



def test_cpp_walk_checks_the_arrays_before_reading():
    """The extension's walk on arrays that are not a trie's: an error, never a read out of bounds."""
    trie = flowkern.Trie.build([[1, 2], [1]], eos_token_id=0)
    offsets, tokens, log_flow = trie.offsets.numpy(), trie.tokens.numpy(), trie.log_flow.numpy()
    rows = np.array([[1, 2, 0]])
    cases = [
        ((offsets * 100, tokens, log_flow), r"offsets\[0:2\] = \[0, 100\] is not a range of the 4 edges"),
        ((offsets - 1, tokens, log_flow), r"offsets\[0:2\] = \[-1, 0\] is not a range of the 4 edges"),
        ((np.array([0, 1, 7, 3, 4, 4]), tokens, log_flow), r"offsets\[1:3\] = \[1, 7\] is not a range"),
        ((np.array([0, 1, 0, 3, 4, 4]), tokens, log_flow), r"offsets\[1:3\] = \[1, 0\] is not a range"),
        ((offsets, tokens, log_flow[:2]), r"offsets must hold len\(log_flow\) \+ 1 = 3 entries, got 6"),
        ((offsets, tokens[:2], log_flow), r"edge_tokens must hold len\(log_flow\) - 1 = 4 entries, got 2"),
        ((offsets, tokens, log_flow[:0]), "log_flow must be one-dimensional and non-empty"),
    ]
    for (offsets_, tokens_, log_flow_), message in cases:
        with pytest.raises(ValueError, match=message):
            flowkern.trie._trie.walk(offsets_, tokens_, log_flow_, 0, rows)
