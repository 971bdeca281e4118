"""flowkern.subtb_loss and modified_subtb_loss against the loop-level reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from reference import published
from reference import subtb as ref
from tests.strategies import Catalogue, batches, catalogues, make_batch, movie_catalogue

SMALL = Catalogue([[1, 2], [1, 3, 2], [4], [1, 2], [1]], [1.0, 2.0, 0.5, 3.0, 0.7], eos=0)

VARIANTS = [("process", "trie"), ("process", "full"), ("flower", "full")]


def preference_for(batch, kind, generator):
    rows, items = batch.tokens.shape[0], len(batch.catalogue.sequences)
    if kind == "none":
        return None
    if kind == "per_row":
        return torch.rand(rows, generator=generator, dtype=torch.float64) * 2 + 0.1
    return torch.rand(rows, items, generator=generator, dtype=torch.float64) * 2 + 0.1


def loss_and_grad(fn, logits, upstream=None):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss, logits, upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), grad


@settings(max_examples=120, deadline=None)
@given(batch=batches(), variant=st.sampled_from(VARIANTS), lam=st.sampled_from([1.0, 0.9]),
       pref=st.sampled_from(["none", "per_row", "per_item"]), pref_mode=st.sampled_from(["div", "add"]),
       pref_weight=st.sampled_from([1.0, 0.5]), reduction=st.sampled_from(["mean", "sum", "none"]),
       granularity=st.sampled_from([1, 2, 3, 5, "item"]))
def test_matches_reference(batch, variant, lam, pref, pref_mode, pref_weight, reduction, granularity):
    form, normalize = variant
    generator = torch.Generator().manual_seed(0)
    rewards = preference_for(batch, pref, generator)
    options = dict(lam=lam, normalize=normalize, form=form, pref_mode=pref_mode, pref_weight=pref_weight,
                   reduction=reduction, granularity=granularity)
    trie, oracle = batch.catalogue.trie(), batch.catalogue.dict_trie()
    upstream = torch.randn(batch.tokens.shape[0], generator=generator, dtype=torch.float64) \
        if reduction == "none" else None
    got = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, rewards, tokens=batch.tokens, **options),
                        batch.logits, upstream)
    want = loss_and_grad(lambda x: ref.subtb_loss(x, oracle, batch.tokens, rewards, **options),
                         batch.logits, upstream)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("pref_mode", [None, "div", "add"])
def test_gradcheck(form, normalize, lam, pref_mode):
    tokens = torch.tensor([[1, 2, 0, 0], [1, 3, 2, 0], [4, 0, 5, 5]])
    logits = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rewards = None if pref_mode is None else torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    trie = SMALL.trie()

    def loss(x):
        return flowkern.subtb_loss(x, trie, rewards, tokens=tokens, lam=lam, form=form, normalize=normalize,
                                   pref_mode=pref_mode or "div", reduction="none")

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(),))


@settings(max_examples=60, deadline=None)
@given(catalogues())
def test_logits_equal_to_log_process_rewards_give_zero_loss_and_reward_proportional_items(catalogue):
    """Process form, trie policy: if the logits on the children of every state are the log
    process rewards, the loss vanishes and each item's probability is its reward share."""
    trie = catalogue.trie()
    items = catalogue.sequences
    steps = trie.depth
    tokens = torch.tensor([s + [catalogue.eos] * (steps - len(s)) for s in items])
    walk = trie.walk(tokens)
    vocab = trie.max_token + 1
    logits = torch.randn(len(items), steps, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for b in range(len(items)):
        for t in range(int(walk.length[b]) + 1):
            state = int(walk.nodes[b, t])
            edges = range(int(trie.offsets[state]), int(trie.offsets[state + 1]))
            for e in edges:
                logits[b, t, int(trie.tokens[e])] = trie.log_flow[e + 1] - trie.log_flow[state]

    for lam in (1.0, 0.9):
        assert flowkern.subtb_loss(logits, trie, tokens=tokens, lam=lam, reduction="sum") < 1e-20

    log_item = flowkern.sequence_log_probs(logits, trie, tokens=tokens)
    leaf_reward = {}
    for item, sequence in enumerate(items):
        leaf_reward[tuple(sequence)] = leaf_reward.get(tuple(sequence), 0.0) + catalogue.rewards[item]
    share = torch.tensor([leaf_reward[tuple(s)] for s in items], dtype=torch.float64) / sum(catalogue.rewards)
    torch.testing.assert_close(log_item.exp(), share, rtol=1e-12, atol=1e-12)

    # Raise the root logit of the first row's first token by ε: at the root, δ_0 moves by
    # Δ = ε·[x_0 = x] − log(1 − p + p·e^ε) (p = that token's reward share) and every pair
    # (0, n), n = 1 .. L + 1, by the same Δ, so with λ = 1 the loss becomes Σ_b (L_b + 1) Δ_b².
    epsilon, first = 0.1, int(tokens[0, 0])
    perturbed = logits.clone()
    perturbed[:, 0, first] += epsilon
    p = math.exp(float(trie.log_flow[1 + int((trie.tokens[: trie.offsets[1]] == first).nonzero())]))
    shift = -math.log(1 - p + p * math.exp(epsilon))
    change = torch.full((len(items),), shift, dtype=torch.float64) + epsilon * (tokens[:, 0] == first).double()
    want = ((walk.length + 1) * change**2).sum()
    got = flowkern.subtb_loss(perturbed, trie, tokens=tokens, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


def test_hand_computed_loss():
    """Items "1" (reward 1) and "2" (reward 3), termination token 0, trajectory "1 0"."""
    trie = flowkern.Trie.build([[1], [2]], [1.0, 3.0], eos_token_id=0)
    logits = torch.tensor([[[0.0, 0.5, 1.5], [0.2, -1.0, 0.3]]], dtype=torch.float64)
    tokens = torch.tensor([[1, 0]])
    log_r = [math.log(1 / 4), 0.0]
    # trie policy: at the root the children are 1 and 2; at node "1" only the termination token
    delta = [0.5 - math.log(math.exp(0.5) + math.exp(1.5)) - log_r[0], 0.0 - log_r[1]]
    d = [0.0, delta[0], delta[0] + delta[1]]
    for lam in (1.0, 0.5):
        pairs = [(0, 1), (1, 2), (0, 2)]
        loss = sum(lam ** (n - m - 1) * (d[n] - d[m]) ** 2 for m, n in pairs)
        weight = sum(lam ** (n - m - 1) for m, n in pairs)
        got = flowkern.subtb_loss(logits, trie, tokens=tokens, lam=lam)
        assert got.item() == pytest.approx(loss / weight, rel=1e-12)

    # Flower form: states 0 and 1, log_r = [−15, log r_0 + log r_1]
    lp = [torch.log_softmax(logits[0, k], 0) for k in range(2)]
    delta = (-15 + lp[0][1] + lp[1][0]) - (log_r[0] + log_r[1]) - lp[0][0]
    got = flowkern.subtb_loss(logits, trie, tokens=tokens, form="flower")
    assert got.item() == pytest.approx(delta.item() ** 2, rel=1e-12)


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_non_contiguous_logits_are_read_in_place(form, normalize):
    catalogue = movie_catalogue()
    trie = catalogue.trie()
    sequences = [catalogue.sequences[i] for i in (0, 5, 17, 1000)]
    steps = max(map(len, sequences)) + 1
    tokens = torch.tensor([s + [198] * (steps - len(s)) for s in sequences])
    vocab = 151_936  # Qwen2.5's padded logits width (tokenizer: 151,665)
    prompt = 3
    out_logits = torch.randn(steps + prompt, len(sequences), vocab, generator=torch.Generator().manual_seed(0))
    view = out_logits.transpose(0, 1)[:, prompt - 1:-1]  # (B, T, V) view of a (S, B, V) buffer
    assert not view.is_contiguous()
    options = dict(tokens=tokens, form=form, normalize=normalize)
    loss_view, grad_view = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), view)
    loss_copy, grad_copy = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), view.contiguous())
    assert torch.equal(loss_view, loss_copy) and torch.equal(grad_view, grad_copy)
    want = loss_and_grad(lambda x: ref.subtb_loss(x, catalogue.dict_trie(), tokens, form=form, normalize=normalize),
                         view.double())
    torch.testing.assert_close(loss_view.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_view.double(), want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_low_precision_logits_are_computed_in_float32(dtype, form, normalize):
    """The inputs are what they are; the loss over them is exact to float32 rounding and the
    gradient to the logits' dtype."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4], seed=3, extra_steps=1, extra_vocab=2, dtype=dtype)
    trie, oracle = batch.catalogue.trie(), batch.catalogue.dict_trie()
    options = dict(form=form, normalize=normalize)
    loss, grad = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=batch.tokens, **options), batch.logits)
    want_loss, want_grad = loss_and_grad(lambda x: ref.subtb_loss(x, oracle, batch.tokens, **options),
                                         batch.logits.double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad.to(dtype))


def test_positions_after_termination_are_never_read():
    catalogue = Catalogue([[1, 2], [3]], [1.0, 2.0], eos=0)
    trie = catalogue.trie()
    clean_tokens = torch.tensor([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]])
    junk_tokens = torch.tensor([[1, 2, 0, -100, 10**9], [3, 0, 7, 0, -1]])
    logits = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    junk_logits = logits.clone()
    junk_logits[0, 3:] = float("nan")
    junk_logits[1, 2:] = float("inf")
    for form, normalize in VARIANTS:
        options = dict(form=form, normalize=normalize)
        clean = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=clean_tokens, **options), logits)
        junk = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=junk_tokens, **options), junk_logits)
        assert torch.equal(clean[0], junk[0]) and torch.equal(clean[1], junk[1])
        assert (junk[1][0, 3:] == 0).all() and (junk[1][1, 2:] == 0).all()


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_ignore_drops_invalid_trajectories(form, normalize):
    trie = flowkern.Trie.build([[1, 2], [3]], [1.0, 2.0], eos_token_id=0)
    tokens = torch.tensor([[1, 2, 0], [1, 3, 0], [3, 0, 0], [1, 2, 2], [-5, 0, 0]])
    logits = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept = [0, 2]
    options = dict(form=form, normalize=normalize)
    for reduction in ("mean", "sum"):
        got = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens, on_invalid="ignore",
                                                          reduction=reduction, **options), logits)
        want = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens[kept], reduction=reduction,
                                                           **options), logits[kept])
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1][kept], want[1], rtol=1e-12, atol=1e-12)
        assert (got[1][[1, 3, 4]] == 0).all()
    per_row = flowkern.subtb_loss(logits, trie, tokens=tokens, on_invalid="ignore", reduction="none", **options)
    assert per_row.shape == (5,) and (per_row[[1, 3, 4]] == 0).all() and (per_row[kept] > 0).all()


def test_nothing_left_to_average_gives_zero():
    trie = flowkern.Trie.build([[1, 2], [3]], eos_token_id=0)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = flowkern.subtb_loss(logits, trie, tokens=torch.tensor([[2, 0, 0], [1, 1, 0]]), on_invalid="ignore")
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
    empty = flowkern.subtb_loss(torch.zeros(0, 3, 4), trie, tokens=torch.zeros(0, 3, dtype=torch.long))
    assert empty.item() == 0.0


def test_mean_divides_by_the_total_subtrajectory_weight():
    trie = flowkern.Trie.build([[1, 2], [3]], eos_token_id=0)
    tokens = torch.tensor([[1, 2, 0], [3, 0, 0]])
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    total = flowkern.subtb_loss(logits, trie, tokens=tokens, reduction="sum")
    for lam in (1.0, 0.9):
        # process form: 4 and 3 states; λ^(n−m−1) summed over their pairs
        weight = sum(lam ** (n - m - 1) for states in (4, 3) for n in range(states) for m in range(n))
        mean = flowkern.subtb_loss(logits, trie, tokens=tokens, reduction="mean", lam=lam)
        summed = flowkern.subtb_loss(logits, trie, tokens=tokens, reduction="sum", lam=lam)
        assert mean.item() == pytest.approx(summed.item() / weight, rel=1e-12)
    assert total.item() == pytest.approx(flowkern.subtb_loss(logits, trie, tokens=tokens, reduction="none").sum().item())


def test_preferences():
    """p = 1 changes nothing; a (B, num_items) matrix is read at each row's item (the smallest
    id among items with the same title); "div" scales every log r by 1 / p."""
    trie = flowkern.Trie.build([[1, 2], [3], [1, 2]], [1.0, 2.0, 4.0], eos_token_id=0)
    tokens = torch.tensor([[1, 2, 0], [3, 0, 0]])
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = flowkern.subtb_loss(logits, trie, tokens=tokens, reduction="none")
    for mode in ("div", "add"):
        ones = flowkern.subtb_loss(logits, trie, torch.ones(2, dtype=torch.float64), tokens=tokens,
                                   pref_mode=mode, reduction="none")
        torch.testing.assert_close(ones, plain, rtol=1e-12, atol=1e-12)
        matrix = torch.tensor([[0.5, 9.0, 7.0], [8.0, 2.0, 6.0]], dtype=torch.float64)
        by_item = flowkern.subtb_loss(logits, trie, matrix, tokens=tokens, pref_mode=mode, reduction="none")
        by_row = flowkern.subtb_loss(logits, trie, torch.tensor([0.5, 2.0], dtype=torch.float64), tokens=tokens,
                                     pref_mode=mode, reduction="none")
        torch.testing.assert_close(by_item, by_row, rtol=1e-12, atol=1e-12)
    walk = trie.walk(tokens)
    assert walk.item.tolist() == [0, 1]


@settings(max_examples=40, deadline=None)
@given(batch=batches(), lam=st.sampled_from([1.0, 0.9]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_modified_subtb_loss_matches_reference(batch, lam, reduction):
    generator = torch.Generator().manual_seed(0)
    rows, steps = batch.tokens.shape
    pieces = [torch.randn(rows, steps, generator=generator, dtype=torch.float64) for _ in range(3)]
    lengths = torch.tensor([len(batch.catalogue.sequences[i]) for i in batch.items])
    for piece in pieces:
        piece[torch.arange(steps) > lengths[:, None]] = float("nan")  # never read
    got = flowkern.modified_subtb_loss(*pieces, lengths, lam, reduction=reduction)
    want = ref.modified_subtb_loss(*pieces, lengths, lam, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_flower_form_is_modified_subtb_of_its_pieces():
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=5, extra_steps=2, extra_vocab=1)
    trie = batch.catalogue.trie()
    walk = trie.walk(batch.tokens)
    log_probs = torch.log_softmax(torch.nan_to_num(batch.logits), -1)
    log_pf = log_probs.gather(2, batch.tokens.clamp(0, batch.logits.shape[-1] - 1)[..., None])[..., 0]
    log_pterm = log_probs[..., batch.catalogue.eos]
    steps = batch.tokens.shape[1]
    cumulative = walk.log_reward.cumsum(1)
    log_r = torch.where(torch.arange(steps) == walk.length[:, None], cumulative,
                        cumulative - walk.log_reward + flowkern.NONTERMINAL_LOG_REWARD)
    want = flowkern.modified_subtb_loss(log_pf, log_pterm, log_r, walk.length)
    got = flowkern.subtb_loss(batch.logits, trie, tokens=batch.tokens, form="flower")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_trie_normalisation_reads_only_the_children():
    batch = make_batch(SMALL, [0, 1, 2, 4], seed=2, extra_vocab=3)
    trie = batch.catalogue.trie()
    walk = trie.walk(batch.tokens)
    masked = torch.full_like(batch.logits, float("nan"))
    for b in range(batch.tokens.shape[0]):
        for t in range(int(walk.length[b]) + 1):
            state = int(walk.nodes[b, t])
            children = trie.tokens[trie.offsets[state]:trie.offsets[state + 1]].long()
            masked[b, t, children] = batch.logits[b, t, children]
    clean = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=batch.tokens), batch.logits)
    got = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=batch.tokens), masked)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    assert (got[1][masked.isnan()] == 0).all()


@settings(max_examples=40, deadline=None)
@given(batch=batches(), normalize=st.sampled_from(["trie", "full"]))
def test_sequence_log_probs_matches_reference(batch, normalize):
    trie, oracle = batch.catalogue.trie(), batch.catalogue.dict_trie()
    got = loss_and_grad(lambda x: flowkern.sequence_log_probs(x, trie, tokens=batch.tokens, normalize=normalize),
                        batch.logits, torch.ones(batch.tokens.shape[0], dtype=torch.float64))
    want = loss_and_grad(lambda x: ref.sequence_log_probs(x, oracle, batch.tokens, normalize), batch.logits,
                         torch.ones(batch.tokens.shape[0], dtype=torch.float64))
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(batch=batches(), lam=st.sampled_from([1.0, 0.9]))
def test_flower_form_matches_the_published_style_code(batch, lam):
    """reference/published.py (dict look-ups, a loop over subtrajectory lengths) computes the
    same mean as subtb_loss(form="flower"); it reads every position, so the junk after each
    termination token is replaced by valid values for it."""
    catalogue = batch.catalogue
    table = published.build_process_rewards(catalogue.sequences, catalogue.rewards, catalogue.eos)
    ended = torch.arange(batch.tokens.shape[1]) > torch.tensor([len(catalogue.sequences[i]) for i in batch.items])[:, None]
    tokens = torch.where(ended, catalogue.eos, batch.tokens)
    want = published.subtb_loss(torch.nan_to_num(batch.logits), tokens, table, catalogue.eos, lam)
    got = flowkern.subtb_loss(batch.logits, catalogue.trie(), tokens=batch.tokens, form="flower", lam=lam)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
