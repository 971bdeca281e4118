"""Trie-constrained decoding: mask step, sampler, beam search, Hugging Face processor."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList

import flowkern
from flowkern.data import load_task
from flowkern.head import linear_head
from flowkern.models import load_model
from reference.generation import isin_mask
from tests.strategies import Catalogue, catalogues, tiny_qwen2

VOCAB = 40  # every catalogue below uses token ids < 13, so a 40-token model covers them
CATALOGUE = Catalogue([[5, 6], [5], [7, 8, 9], [5, 6, 10], [7, 8, 9], [11]], [1.0, 2.0, 3.0, 4.0, 2.0, 6.0], eos=1)


@st.composite
def tries_and_prefixes(draw):
    catalogue = draw(catalogues())
    prefixes = []
    for _ in range(draw(st.integers(1, 5))):
        sequence = draw(st.sampled_from(catalogue.sequences))
        prefixes.append(sequence[: draw(st.integers(0, len(sequence)))])
    return catalogue, prefixes


@settings(max_examples=100, deadline=None)
@given(tries_and_prefixes(), st.integers(0, 5))
def test_mask_matches_isin_per_row(case, padding):
    catalogue, prefixes = case
    trie = catalogue.trie()
    vocab = trie.max_token + 1 + padding  # padded vocabulary columns are never allowed
    width = max(map(len, prefixes))
    walk = trie.walk(torch.tensor([p + [-1] * (width - len(p)) for p in prefixes], dtype=torch.long)
                     .view(len(prefixes), width))
    nodes = walk.nodes.gather(1, torch.tensor([[len(p)] for p in prefixes]))[:, 0]
    logits = torch.randn(len(prefixes), vocab, generator=torch.Generator().manual_seed(0))
    want = isin_mask(logits, prefixes, catalogue.dict_trie())
    assert torch.equal(flowkern.mask_logits(logits, nodes, trie), want)
    copy = logits.clone()
    assert flowkern.mask_logits(copy, nodes, trie, inplace=True) is copy and torch.equal(copy, want)

    children = flowkern.children_logits(logits, nodes, trie)
    for b in range(len(prefixes)):
        allowed = want[b] > float("-inf")
        present = children.logits[b] > float("-inf")
        assert children.tokens[b, present].tolist() == allowed.nonzero()[:, 0].tolist()
        assert torch.equal(children.logits[b, present], logits[b, allowed])
        walked = trie.walk(torch.tensor([prefixes[b] + children.tokens[b, present].tolist()[:1]])).nodes
        assert children.nodes[b, 0] == walked[0, len(prefixes[b]) + 1]


class FlowModel(torch.nn.Module):
    """A stand-in causal LM whose logits at trie node s are log F(c) − log F(s) on the
    children c (junk elsewhere), so that its trie policy samples items ∝ reward.  It keeps
    each row's tokens in the KV cache, so repeats and beam reorders follow the rows."""

    def __init__(self, trie, vocab, prompt_length):
        super().__init__()
        self.trie, self.vocab, self.prompt_length = trie, vocab, prompt_length
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        history = input_ids[:, None, :, None].float()
        history = past_key_values.update(history, history, 0)[0][:, 0, :, 0].long()
        node = self.trie.walk(history[:, self.prompt_length:]).nodes[:, -1].clamp(min=0)
        logits = torch.full((len(node), self.vocab), 3.0)  # junk the mask must remove
        children = flowkern.children_logits(logits, node, self.trie)
        for b in range(len(node)):
            present = children.logits[b] > float("-inf")
            logits[b, children.tokens[b, present]] = (self.trie.log_flow[children.nodes[b, present]]
                                                      - self.trie.log_flow[node[b]]).float()
        return SimpleNamespace(logits=logits[:, None, :])


def item_shares(catalogue, trie, temperature):
    """(canonical item ids, P(item)) under the flow-ratio policy with every step's children
    logits divided by T, for each distinct title."""
    items, shares = [], []
    for item, sequence in enumerate(catalogue.sequences):
        if sequence in catalogue.sequences[:item]:
            continue
        log_p, node = 0.0, 0
        for token in sequence + [catalogue.eos]:
            edges = range(int(trie.offsets[node]), int(trie.offsets[node + 1]))
            log_r = {int(trie.tokens[e]): float(trie.log_flow[e + 1] - trie.log_flow[node]) for e in edges}
            log_p += log_r[token] / temperature - math.log(sum(math.exp(v / temperature) for v in log_r.values()))
            node = next(e + 1 for e in edges if int(trie.tokens[e]) == token)
        items.append(item)
        shares.append(math.exp(log_p))
    return items, shares


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampler_draws_items_in_proportion_to_reward(temperature):
    """5 distinct titles (6 items, two share a title): a chi-square test of 20,000 samples at
    a fixed seed.  At T = 1 the shares are the rewards' (Eq. 9); at T = 2 each step's
    children probabilities are π^(1/2), renormalised."""
    trie = CATALOGUE.trie()
    model = FlowModel(trie, VOCAB, prompt_length=1)
    samples = flowkern.sample(model, [[0]], trie, num_samples=20_000, temperature=temperature,
                              generator=torch.Generator().manual_seed(0))
    items, shares = item_shares(CATALOGUE, trie, temperature)
    counts = torch.bincount(samples.items, minlength=trie.num_items)[items].double()
    assert counts.sum() == 20_000
    expected = torch.tensor(shares, dtype=torch.float64) * counts.sum()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 18.47  # 99.9th percentile of chi-square with 4 degrees of freedom


def test_flow_shares_at_unit_temperature_are_reward_shares():
    trie = CATALOGUE.trie()
    items, shares = item_shares(CATALOGUE, trie, 1.0)
    leaf_reward = {0: 1.0, 1: 2.0, 2: 5.0, 3: 4.0, 5: 6.0}  # items 2 and 4 share "7 8 9"
    torch.testing.assert_close(torch.tensor(shares), torch.tensor([leaf_reward[i] / 18 for i in items]))


@settings(max_examples=25, deadline=None)
@given(catalogue=catalogues(max_token=12), prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                    max_size=5), min_size=1, max_size=3),
       temperature=st.sampled_from([1.0, 0.7]))
def test_samples_are_items_with_the_model_log_probs(catalogue, prompts, temperature):
    """Every row is an item; with a real model and ragged (left-padded) prompts, the sampled
    log-probabilities agree with a full forward pass of prompt + sample."""
    model = tiny_qwen2(VOCAB)
    trie = catalogue.trie()
    samples = flowkern.sample(model, prompts, trie, num_samples=2, temperature=temperature, return_log_probs=True,
                              generator=torch.Generator().manual_seed(1))
    walk = trie.walk(samples.tokens)
    assert (walk.length >= 0).all() and torch.equal(walk.length + 1, samples.lengths)
    assert torch.equal(walk.item, samples.items)
    for r, tokens in enumerate(samples.tokens):
        prompt = prompts[r // 2]
        length = int(samples.lengths[r])
        assert (tokens[length:] == catalogue.eos).all()
        full = torch.tensor([prompt + tokens[:length].tolist()])
        with torch.no_grad():
            logits = model(full).logits[:, len(prompt) - 1:-1] / temperature
        want = flowkern.sequence_log_probs(logits.double(), trie, tokens=tokens[None, :length])
        torch.testing.assert_close(samples.log_probs[r].sum().double(), want[0], rtol=1e-4, atol=1e-4)


def brute_force_top_k(model, prompt, trie, sequences, k):
    """Sequence log-probability of every distinct item, by one forward pass each."""
    scores = {}
    for sequence in {tuple(s) for s in sequences}:
        tokens = torch.tensor([list(sequence) + [trie.eos_token_id]])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[0].tolist()])).logits[:, len(prompt) - 1:-1]
        item = int(trie.walk(tokens).item[0])
        scores[item] = float(flowkern.sequence_log_probs(logits.double(), trie, tokens=tokens)[0])
    ranked = sorted(scores.items(), key=lambda pair: -pair[1])[:k]
    return [item for item, _ in ranked], [score for _, score in ranked]


@settings(max_examples=25, deadline=None)
@given(catalogue=catalogues(max_token=12), k=st.integers(1, 4), seed=st.integers(0, 3),
       batch_size=st.sampled_from([None, 1, 2]))
def test_beam_search_with_enough_beams_is_the_exact_top_k(catalogue, k, seed, batch_size):
    """Each prompt's search stops on its own, and prompts of different lengths are batched
    (sorted by length) in any batch size: the exact top-K of each, in the prompts' order."""
    model = tiny_qwen2(VOCAB, seed)
    trie = catalogue.trie()
    k = min(k, trie.num_items)
    prompts = [[3, 4], [9], [20, 21, 22]]
    got = flowkern.recommend(model, prompts, trie, k=k, num_beams=trie.num_items, batch_size=batch_size)
    for p, prompt in enumerate(prompts):
        items, scores = brute_force_top_k(model, prompt, trie, catalogue.sequences, k)
        assert got.items[p, : len(items)].tolist() == items
        torch.testing.assert_close(got.scores[p, : len(items)].double(), torch.tensor(scores, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-4)
        assert (got.items[p, len(items):] == -1).all()  # fewer distinct titles than k


def test_beam_search_returns_valid_ranked_items_and_titles():
    trie = CATALOGUE.trie()
    model = tiny_qwen2(VOCAB)
    titles = [f"title {i}" for i in range(trie.num_items)]
    got = flowkern.recommend(model, [[3, 4, 5], [9]], trie, k=3, titles=titles)
    assert (got.items >= 0).all() and (got.scores[:, :-1] >= got.scores[:, 1:]).all()
    assert got.titles == [[titles[i] for i in row] for row in got.items.tolist()]
    assert all(len(set(row)) == 3 for row in got.items.tolist())
    normalised = flowkern.recommend(model, [[3, 4, 5]], trie, k=5, num_beams=6, length_normalize=True)
    lengths = torch.tensor([len(CATALOGUE.sequences[i]) + 1 for i in normalised.items[0].tolist()])
    per_token = normalised.scores[0] / lengths
    assert (per_token[:-1] >= per_token[1:]).all()


@pytest.mark.parametrize("num_beams", [3, 6])
def test_logits_processor_with_generate_matches_recommend(num_beams):
    trie = CATALOGUE.trie()
    model = tiny_qwen2(VOCAB)
    prompt = torch.tensor([[3, 4, 5]])
    processor = flowkern.TrieLogitsProcessor(trie, prompt_length=prompt.shape[1], pad_token_id=0)
    out = model.generate(prompt, logits_processor=LogitsProcessorList([processor]), num_beams=num_beams,
                         num_return_sequences=3, do_sample=False, length_penalty=0.0, early_stopping="never",
                         max_new_tokens=trie.depth, eos_token_id=trie.eos_token_id, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    generated = out.sequences[:, prompt.shape[1]:]
    items = trie.walk(generated).item
    want = flowkern.recommend(model, prompt, trie, k=3, num_beams=num_beams)
    assert items.tolist() == want.items[0].tolist()
    torch.testing.assert_close(out.sequences_scores, want.scores[0], rtol=1e-4, atol=1e-4)


def test_logits_processor_sampling_gives_items():
    trie = CATALOGUE.trie()
    model = tiny_qwen2(VOCAB)
    prompt = torch.tensor([[3, 4, 5]])
    processor = flowkern.TrieLogitsProcessor(trie, prompt_length=prompt.shape[1], pad_token_id=0)
    torch.manual_seed(0)
    out = model.generate(prompt, logits_processor=LogitsProcessorList([processor]), do_sample=True,
                         num_return_sequences=16, max_new_tokens=trie.depth, eos_token_id=trie.eos_token_id,
                         pad_token_id=0)
    assert (trie.walk(out[:, prompt.shape[1]:]).length >= 0).all()


# ---- restricted head: the body's hidden state and the children's rows of the output layer ----

def restricted_models():
    """Tiny Qwen2s: tied embeddings, an untied head with a bias, and one under LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    models = {}
    for name, tied in (("tied", True), ("untied with bias", False)):
        torch.manual_seed(3)
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        models[name] = Qwen2ForCausalLM(config).eval()
    head = models["untied with bias"].lm_head
    head.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=torch.Generator().manual_seed(4)))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    models["LoRA"] = get_peft_model(tiny_qwen2(VOCAB, seed=5), lora).eval()
    return models


@pytest.mark.parametrize("name", ["tied", "untied with bias", "LoRA"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_restricted_head_samples_what_the_full_head_samples(name, temperature):
    """Same seed, same samples: the children's logits agree to float32 rounding (different
    summation order), so every draw falls on the same side of the same boundaries; the
    log-probabilities agree to 1e-5."""
    model = restricted_models()[name]
    trie = CATALOGUE.trie()
    prompts = [[3, 4, 5], [9], [20, 21]]
    draws = [flowkern.sample(model, prompts, trie, num_samples=40, temperature=temperature, return_log_probs=True,
                             generator=torch.Generator().manual_seed(6), restricted_head=restricted)
             for restricted in (False, True)]
    assert torch.equal(draws[0].tokens, draws[1].tokens) and torch.equal(draws[0].items, draws[1].items)
    torch.testing.assert_close(draws[1].log_probs, draws[0].log_probs, rtol=1e-5, atol=1e-5)
    assert len(set(draws[0].items.tolist())) >= 3  # the draws differ between rows


@pytest.mark.parametrize("name", ["tied", "untied with bias", "LoRA"])
def test_restricted_head_recommends_what_the_full_head_recommends(name):
    model = restricted_models()[name]
    trie = CATALOGUE.trie()
    got, want = (flowkern.recommend(model, [[3, 4, 5], [9]], trie, k=4, num_beams=5, temperature=1.3,
                                    restricted_head=restricted) for restricted in (True, False))
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_batched_beam_search_ranks_real_prompts_as_one_prompt_at_a_time():
    """The trainer's evaluation on Movies_and_TV test rows (prompts of 33 to 100 tokens, the
    embedded model with the real vocabulary, restricted head, top-10 of 10 beams): batched
    in any size, the rankings are those of each prompt searched alone, without padding."""
    loaded = load_model(None, seed=0)
    model = loaded.model.eval()
    task = load_task("movies", loaded.tokenizer)
    trie, head = task.trie(), linear_head(model)
    prompts = [example.prompt for example in task.test[:12]]
    alone = [flowkern.recommend(model, [prompt], trie, k=10, num_beams=10, restricted_head=head) for prompt in prompts]
    for batch_size in (None, 5):
        got = flowkern.recommend(model, prompts, trie, k=10, num_beams=10, restricted_head=head, batch_size=batch_size)
        assert torch.equal(got.items, torch.cat([a.items for a in alone]))
        torch.testing.assert_close(got.scores, torch.cat([a.scores for a in alone]), rtol=1e-5, atol=1e-5)


class SoftCapped(torch.nn.Module):
    """A causal LM whose logits are the output layer's, soft-capped (as Gemma 2's)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        return SimpleNamespace(logits=30 * torch.tanh(out.logits / 30))

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        return self.model.get_decoder()


@pytest.mark.parametrize("make_model, message", [
    (lambda trie: FlowModel(trie, VOCAB, 1), r"needs get_output_embeddings\(\) to be a plain torch.nn.Linear, got "
                                             r"NoneType"),
    (lambda trie: SoftCapped(tiny_qwen2(VOCAB)), "the model's logits are not its output layer applied to its body's "
                                                 "last hidden state"),
])
def test_restricted_head_needs_a_model_that_ends_in_a_linear_layer(make_model, message):
    trie = CATALOGUE.trie()
    model = make_model(trie)
    with pytest.raises(ValueError, match=message):
        flowkern.sample(model, [[3]], trie, restricted_head=True)
    assert flowkern.sample(model, [[3]], trie).items.shape == (1,)  # the full head works


# ---- bad input ------------------------------------------------------------------------

MODEL = tiny_qwen2(VOCAB)
TRIE = CATALOGUE.trie()


@pytest.mark.parametrize("call, error, message", [
    (lambda: flowkern.sample(MODEL, [[3]], TRIE.to("meta")), ValueError,
     r"trie is on meta but the model is on cpu: use trie.to\(device\(type='cpu'\)\)"),
    (lambda: flowkern.sample(MODEL, [[3]], TRIE, temperature=0.0), ValueError,
     "temperature must be a finite number > 0, got 0.0"),
    (lambda: flowkern.sample(MODEL, [[3]], TRIE, num_samples=2, temperature=torch.tensor([1.0, -1.0])), ValueError,
     r"temperature must be finite and > 0, got \[1.0, -1.0\]"),
    (lambda: flowkern.sample(MODEL, [[3]], TRIE, num_samples=2, temperature=torch.ones(3)), ValueError,
     r"temperature must be a number or a \(2,\) tensor \(one per row\), got shape \(3,\)"),
    (lambda: flowkern.sample(MODEL, [[3]], TRIE, max_len=3), ValueError,
     "max_len must be an int >= 4 \\(the deepest item with its termination token\\), got 3"),
    (lambda: flowkern.sample(MODEL, [[3]], TRIE, num_samples=0), ValueError, "num_samples must be a positive int, got 0"),
    (lambda: flowkern.sample(MODEL, [], TRIE), ValueError, "prompt_ids must be a non-empty list of token-id sequences"),
    (lambda: flowkern.sample(MODEL, [[3], []], TRIE), ValueError, "prompt_ids: every prompt needs at least one token"),
    (lambda: flowkern.sample(MODEL, torch.zeros(2, 3), TRIE), ValueError, r"prompt_ids must be a \(P, S\) integer tensor"),
    (lambda: flowkern.sample(MODEL, [[3]], "trie"), TypeError, "trie must be a flowkern.Trie, got str"),
    (lambda: flowkern.sample(MODEL, [[3]], flowkern.Trie.build([[50]], eos_token_id=1)), ValueError,
     "the model's logits have V = 40 columns but the trie holds token id 50"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, k=0), ValueError, "k must be a positive int, got 0"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, k=-2), ValueError, "k must be a positive int, got -2"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, k=7), ValueError, r"k = 7 exceeds the number of items \(6\)"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, k=2, num_beams=0), ValueError, "num_beams must be a positive int"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, k=2, batch_size=0), ValueError,
     "batch_size must be a positive int, got 0"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE, titles=["a"], k=2), ValueError,
     r"titles must hold one title per item \(6\), got 1"),
    (lambda: flowkern.recommend(MODEL, [[3]], TRIE.to("meta")), ValueError, "trie is on meta but the model is on cpu"),
    (lambda: flowkern.mask_logits(torch.zeros(2, VOCAB), torch.tensor([0, 99]), TRIE), ValueError,
     r"nodes must be trie node ids in \[0, 12\], got values in \[0, 99\]"),
    (lambda: flowkern.mask_logits(torch.zeros(2, VOCAB), torch.tensor([0, 1], dtype=torch.int32), TRIE), ValueError,
     r"nodes must be a \(2,\) int64 tensor of trie node ids"),
    (lambda: flowkern.mask_logits(torch.zeros(2, 8), torch.tensor([0, 1]), TRIE), ValueError,
     "logits have V = 8 columns but the trie holds token id 11"),
    (lambda: flowkern.children_logits(torch.zeros(VOCAB), torch.tensor([0]), TRIE), ValueError,
     r"logits must be a \(B, V\) tensor"),
    (lambda: flowkern.mask_logits(torch.zeros(1, VOCAB), torch.tensor([0]), TRIE.to("meta")), ValueError,
     r"logits \(cpu\), nodes \(cpu\) and trie \(meta\) must share a device"),
    (lambda: flowkern.TrieLogitsProcessor(TRIE, prompt_length=0), ValueError, "prompt_length must be a positive int"),
])
def test_generation_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


class FixedLogits(torch.nn.Module):
    """A model whose next-token logits are `row` at every position."""

    def __init__(self, row):
        super().__init__()
        self.row = row
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        history = input_ids[:, None, :, None].float()
        past_key_values.update(history, history, 0)
        return SimpleNamespace(logits=self.row.expand(input_ids.shape[0], input_ids.shape[1], -1))


def logits_row(**values):
    """A (VOCAB,) row of zeros with the given token ids (t5=…) set."""
    row = torch.zeros(VOCAB)
    for name, value in values.items():
        row[int(name[1:])] = value
    return row


NAN_OR_INF = r"the model's logits hold NaN or \+inf at the trie children of row 0: \[{}\]; the trie policy needs finite"
NO_CHILD = "the model's logits give every child of row 0's trie node −inf: the trie policy has no item to take"


@pytest.mark.parametrize("call, message", [
    (lambda model: flowkern.sample(model, [[3]], TRIE), NAN_OR_INF.format("nan")),
    (lambda model: flowkern.recommend(model, [[3]], TRIE, k=2), NAN_OR_INF.format("nan")),
], ids=["sample", "recommend"])
def test_generation_refuses_nan_logits(call, message):
    with pytest.raises(ValueError, match=message):
        call(FixedLogits(logits_row(t5=float("nan"))))


@pytest.mark.parametrize("row, message", [
    (logits_row(t7=float("inf")), NAN_OR_INF.format("inf")),
    (logits_row(t5=-float("inf"), t7=-float("inf"), t11=-float("inf")), NO_CHILD),
    (logits_row(t3=float("nan")), None),  # not a child of any node: never read
])
def test_recommend_and_sample_need_finite_logits_at_the_children(row, message):
    for call in (lambda model: flowkern.sample(model, [[3]], TRIE), lambda model: flowkern.recommend(model, [[3]], TRIE, k=2)):
        if message is None:
            call(FixedLogits(row))
            continue
        with pytest.raises(ValueError, match=message):
            call(FixedLogits(row))


def test_logits_processor_checks_pad_token_id_and_scores():
    processor = flowkern.TrieLogitsProcessor(TRIE, prompt_length=1, pad_token_id=VOCAB)
    input_ids = torch.tensor([[3], [3]])
    with pytest.raises(ValueError, match=r"pad_token_id = 40 is not a token id of scores with V = 40 columns"):
        processor(input_ids, torch.zeros(2, VOCAB))
    for pad in (-1, True, 2.0):
        with pytest.raises(ValueError, match=rf"pad_token_id must be None or a token id >= 0, got {pad!r}"):
            flowkern.TrieLogitsProcessor(TRIE, prompt_length=1, pad_token_id=pad)
    processor = flowkern.TrieLogitsProcessor(TRIE, prompt_length=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"scores hold NaN or \+inf at the trie children of row 1: \[nan\]"):
        processor(input_ids, torch.stack([logits_row(), logits_row(t7=float("nan"))]))
    with pytest.raises(ValueError, match=r"scores hold NaN or \+inf at the trie children of row 0: \[inf\]"):
        processor(input_ids, torch.stack([logits_row(t11=float("inf")), logits_row()]))
    # a row whose children all score −inf stays −inf; finished rows may take eos or pad; NaN elsewhere is unread
    scores = torch.stack([logits_row(t5=-float("inf"), t7=-float("inf"), t11=-float("inf")),
                          logits_row(t3=float("nan"), t9=float("nan"))])
    out = processor(torch.tensor([[3], [3]]), scores)
    assert not bool(out.isnan().any()) and bool((out[0] == -float("inf")).all())
    assert torch.allclose(out[1, [5, 7, 11]].exp().sum(), torch.tensor(1.0))
    finished = processor(torch.tensor([[3, 11, 1]]), scores[1:])
    assert (finished[0] > -float("inf")).nonzero().view(-1).tolist() == [0, 1]
