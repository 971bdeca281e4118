"""D3's text-free ensemble at decoding: node masses against a dict trie, recommend against a
brute force, and the Hugging Face processor against recommend."""

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList

import flowkern
from reference.generation import d3_top_k, mass
from tests.strategies import catalogues, tiny_qwen2
from tests.test_generation import CATALOGUE, VOCAB

PROMPTS = [[3, 4], [9], [20, 21, 22]]


@functools.lru_cache(maxsize=None)
def model(seed):
    return tiny_qwen2(VOCAB, seed)


@st.composite
def item_scores(draw, num_items, rows):
    """(rows, num_items) float32 scores, zeros common, each row with one > 0 at least."""
    values = st.one_of(st.just(0.0), st.floats(1e-3, 10.0))
    scores = draw(st.lists(st.lists(values, min_size=num_items, max_size=num_items), min_size=rows, max_size=rows))
    for row in scores:
        if sum(row) == 0:
            row[draw(st.integers(0, num_items - 1))] = 1.0
    return torch.tensor(scores, dtype=torch.float32)


def assert_ranks_as(items, scores, every, tolerance=1e-5):
    """`items`, `scores` (K,) from recommend are the top of `every` [(item, score)] (all items
    with a score > −inf, best first): the same scores, each item's the one `every` gives it
    (so the order may differ only among near ties), then −1 and −inf."""
    n = min(len(items), len(every))
    want = torch.tensor([score for _, score in every[:n]], dtype=torch.float64)
    torch.testing.assert_close(scores[:n].double(), want, rtol=tolerance, atol=tolerance)
    score_of = dict(every)
    assert len(set(items[:n].tolist())) == n
    for item, score in zip(items[:n].tolist(), scores[:n].tolist()):
        assert abs(score_of[item] - score) <= tolerance * (1 + abs(score)), (item, score, every)
    assert (items[n:] == -1).all() and (scores[n:] == float("-inf")).all()


@settings(max_examples=100, deadline=None)
@given(catalogue=catalogues(), data=st.data())
def test_node_masses_are_the_summed_scores_below_each_node(catalogue, data):
    trie = catalogue.trie()
    scores = data.draw(item_scores(trie.num_items, rows=data.draw(st.integers(1, 3))))
    got = flowkern.node_log_masses(scores, trie)
    assert got.dtype == torch.float64 and got.shape == (len(scores), trie.num_nodes)
    order, _ = catalogue.dict_trie().breadth_first()  # flowkern's node numbering
    want = torch.tensor([[mass(node, row) for node in order] for row in scores.double().tolist()],
                        dtype=torch.float64)
    torch.testing.assert_close(got.exp(), want, rtol=1e-12, atol=0)


@settings(max_examples=25, deadline=None)
@given(catalogue=catalogues(max_token=12), seed=st.integers(0, 3), batch_size=st.sampled_from([None, 1, 2]),
       data=st.data())
def test_alpha_one_ranks_by_the_collaborative_scores_alone(catalogue, seed, batch_size, data):
    """Along a title the shares telescope: its score is log(s / Σ s), s the summed scores of
    the items of that title (the smallest id stands for them)."""
    trie = catalogue.trie()
    scores = data.draw(item_scores(trie.num_items, rows=len(PROMPTS)))
    got = flowkern.recommend(model(seed), PROMPTS, trie, k=trie.num_items, num_beams=trie.num_items,
                             batch_size=batch_size, item_scores=scores, alpha=1.0)
    for p, row in enumerate(scores.double().tolist()):
        title = {}
        for item, sequence in enumerate(catalogue.sequences):
            canonical = catalogue.sequences.index(sequence)
            title[canonical] = title.get(canonical, 0.0) + row[item]
        every = sorted(((item, math.log(s / sum(row))) for item, s in title.items() if s > 0), key=lambda x: -x[1])
        assert_ranks_as(got.items[p], got.scores[p], every)


@pytest.mark.parametrize("num_beams, batch_size", [(2, None), (6, 1), (6, 2)])
def test_alpha_zero_is_recommend_without_item_scores(num_beams, batch_size):
    trie = CATALOGUE.trie()
    scores = torch.rand(len(PROMPTS), trie.num_items, generator=torch.Generator().manual_seed(0))
    got, want = (flowkern.recommend(model(0), PROMPTS, trie, k=4, num_beams=num_beams, batch_size=batch_size,
                                    **mixing) for mixing in (dict(item_scores=scores, alpha=0.0), {}))
    assert torch.equal(got.items, want.items) and torch.equal(got.scores, want.scores)


@settings(max_examples=30, deadline=None)
@given(catalogue=catalogues(max_token=12), seed=st.integers(0, 3), alpha=st.sampled_from([0.2, 0.5, 0.9]),
       k=st.integers(1, 4), batch_size=st.sampled_from([None, 1, 2]), temperature=st.sampled_from([1.0, 0.7]),
       restricted_head=st.booleans(), data=st.data())
def test_mixed_beam_search_with_enough_beams_is_the_brute_force_top_k(catalogue, seed, alpha, k, batch_size,
                                                                      temperature, restricted_head, data):
    """Prompts of different lengths, each with its own row of item_scores, batched in any
    size, with the full or the restricted head: each prompt's exact top-K by the mixed score."""
    trie, dict_trie = catalogue.trie(), catalogue.dict_trie()
    k = min(k, trie.num_items)
    scores = data.draw(item_scores(trie.num_items, rows=len(PROMPTS)))
    got = flowkern.recommend(model(seed), PROMPTS, trie, k=k, num_beams=trie.num_items, batch_size=batch_size,
                             temperature=temperature, restricted_head=restricted_head, item_scores=scores,
                             alpha=alpha)
    for p, prompt in enumerate(PROMPTS):
        every = d3_top_k(model(seed), prompt, dict_trie, scores[p].double().tolist(), alpha, trie.num_items,
                         temperature)
        assert_ranks_as(got.items[p], got.scores[p], every)


# item 0 ("5 6") scores 0 for the second prompt: it is never reached there
SCORES = torch.tensor([[1.0, 0.5, 3.0, 0.2, 1.0, 2.0], [0.0, 0.1, 0.5, 1.0, 2.0, 0.3]])


@pytest.mark.parametrize("num_beams", [3, 6])
def test_d3_processor_with_generate_matches_recommend(num_beams):
    """Two prompts of num_beams rows each in generate's batch, each with its own scores: every
    sequence's score is its item's score in recommend, and with a beam per item (6) the top 3
    are recommend's.  (With fewer beams the two searches may keep different items: generate
    keeps a completed title only if it ranks among the num_beams best candidates of its step,
    recommend keeps every one.)"""
    trie = CATALOGUE.trie()
    prompts = torch.tensor([[3, 4, 5], [9, 8, 7]])
    processor = flowkern.D3LogitsProcessor(trie, prompts.shape[1], SCORES, alpha=0.4, pad_token_id=0,
                                           num_beams=num_beams)
    out = model(0).generate(prompts, attention_mask=torch.ones_like(prompts),
                            logits_processor=LogitsProcessorList([processor]), num_beams=num_beams,
                            num_return_sequences=3, do_sample=False, length_penalty=0.0, early_stopping="never",
                            max_new_tokens=trie.depth, eos_token_id=trie.eos_token_id, pad_token_id=0,
                            return_dict_in_generate=True, output_scores=True)
    items = trie.walk(out.sequences[:, prompts.shape[1]:]).item.view(2, 3)
    exact = flowkern.recommend(model(0), prompts, trie, k=trie.num_items, num_beams=trie.num_items,
                               item_scores=SCORES, alpha=0.4)
    for p, row in enumerate(items.tolist()):
        score_of = dict(zip(exact.items[p].tolist(), exact.scores[p].tolist()))
        torch.testing.assert_close(out.sequences_scores.view(2, 3)[p], torch.tensor([score_of[i] for i in row]),
                                   rtol=1e-4, atol=1e-4)
    if num_beams == 6:
        assert items.tolist() == exact.items[:, :3].tolist()


def test_d3_processor_at_alpha_zero_and_one():
    """α = 0 is TrieLogitsProcessor; α = 1 gives each child its share M(c) / M(n) whatever
    the model's scores; a finished row takes the termination token either way."""
    trie = CATALOGUE.trie()
    input_ids = torch.tensor([[3, 5, 6], [3, 11, 1], [3, 5, 6], [3, 7, 8]])  # rows 0, 1: prompt 0; 2, 3: prompt 1
    scores = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    d3 = {alpha: flowkern.D3LogitsProcessor(trie, 1, SCORES, alpha, num_beams=2) for alpha in (0.0, 1.0)}
    assert torch.equal(d3[0.0](input_ids, scores), flowkern.TrieLogitsProcessor(trie, 1)(input_ids, scores))
    want = torch.zeros(4, VOCAB)
    want[0, [1, 10]] = torch.tensor([1.0, 0.2]) / 1.2  # "5 6" then end (item 0) or "10" (item 3)
    want[1, 1] = want[2, 10] = want[3, 9] = 1.0  # finished; item 0 has mass 0 for prompt 1; "7 8" then "9" only
    torch.testing.assert_close(d3[1.0](input_ids, scores).exp(), want)


# ---- bad input ------------------------------------------------------------------------

TRIE = CATALOGUE.trie()
GOOD = torch.ones(1, 6)


def recommend(**arguments):
    return flowkern.recommend(model(0), [[3]], TRIE, k=2, **arguments)


@pytest.mark.parametrize("call, message", [
    (lambda: recommend(item_scores=GOOD, alpha=1.5), r"alpha must be a number in \[0, 1\], got 1.5"),
    (lambda: recommend(item_scores=GOOD, alpha=-0.1), r"alpha must be a number in \[0, 1\], got -0.1"),
    (lambda: recommend(item_scores=GOOD, alpha=float("nan")), r"alpha must be a number in \[0, 1\], got nan"),
    (lambda: recommend(item_scores=GOOD, alpha=True), r"alpha must be a number in \[0, 1\], got True"),
    (lambda: recommend(alpha=0.5), "alpha = 0.5 weighs item_scores, but item_scores is None"),
    (lambda: recommend(item_scores=torch.ones(1, 5), alpha=0.5),
     r"item_scores must be a \(1, 6\) float tensor, a score per prompt and item, got a torch.float32 tensor of "
     r"shape \(1, 5\)"),
    (lambda: recommend(item_scores=torch.ones(2, 6), alpha=0.5), r"item_scores must be a \(1, 6\) float tensor"),
    (lambda: recommend(item_scores=torch.ones(6), alpha=0.5), r"item_scores must be a \(1, 6\) float tensor"),
    (lambda: recommend(item_scores=torch.ones(1, 6, dtype=torch.long), alpha=0.5),
     r"item_scores must be a \(1, 6\) float tensor, a score per prompt and item, got a torch.int64 tensor"),
    (lambda: recommend(item_scores=[[1.0] * 6], alpha=0.5),
     r"item_scores must be a \(1, 6\) float tensor, .* got a list"),
    (lambda: recommend(item_scores=torch.tensor([[1, 1, float("nan"), 1, 1, 1]]), alpha=0.5),
     r"item_scores must be finite and >= 0, got \[nan\] in row 0"),
    (lambda: recommend(item_scores=torch.tensor([[1, 1, float("inf"), 1, 1, 1]]), alpha=0.5),
     r"item_scores must be finite and >= 0, got \[inf\] in row 0"),
    (lambda: recommend(item_scores=torch.tensor([[1, -2.0, 1, 1, 1, 1]]), alpha=0.5),
     r"item_scores must be finite and >= 0, got \[-2.0\] in row 0"),
    (lambda: recommend(item_scores=torch.zeros(1, 6), alpha=0.5),
     "item_scores must have a finite sum > 0 in every row, got 0.0 in row 0"),
    (lambda: recommend(item_scores=torch.zeros(1, 6), alpha=0.0),  # checked even where it weighs nothing
     "item_scores must have a finite sum > 0 in every row, got 0.0 in row 0"),
    (lambda: recommend(item_scores=torch.full((1, 6), 1e308, dtype=torch.float64), alpha=0.5),
     "item_scores must have a finite sum > 0 in every row, got inf in row 0"),
    (lambda: flowkern.node_log_masses(torch.tensor([[1.0] * 6, [0.0] * 6]), TRIE),
     "item_scores must have a finite sum > 0 in every row, got 0.0 in row 1"),
    (lambda: flowkern.node_log_masses(torch.ones(2, 5), TRIE), r"item_scores must be a \(P, 6\) float tensor"),
    (lambda: flowkern.D3LogitsProcessor(TRIE, 1, GOOD, alpha=2), r"alpha must be a number in \[0, 1\], got 2"),
    (lambda: flowkern.D3LogitsProcessor(TRIE, 1, -GOOD, alpha=0.5),
     r"item_scores must be finite and >= 0, got \[-1.0, -1.0, -1.0, -1.0\] in row 0"),
    (lambda: flowkern.D3LogitsProcessor(TRIE, 1, GOOD, alpha=0.5, num_beams=0), "num_beams must be a positive int"),
    (lambda: flowkern.D3LogitsProcessor(TRIE, 1, GOOD, alpha=0.5, num_beams=2)(torch.tensor([[3]] * 3),
                                                                               torch.zeros(3, VOCAB)),
     "input_ids has 3 rows, but item_scores' 1 prompts × num_beams = 2 make 2"),
])
def test_d3_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_node_masses_need_a_trie():
    with pytest.raises(TypeError, match="trie must be a flowkern.Trie, got str"):
        flowkern.node_log_masses(GOOD, "trie")
