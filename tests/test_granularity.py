"""subtb_loss(granularity=n): SubTB over the states every n tokens (paper Fig. 5), on both
backends against the loop reference (the PyTorch path's hypothesis test is test_subtb's);
n = 1 is the default loss bit for bit and "item" is trajectory balance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from flowkern import eager
from reference import subtb as ref
from tests.strategies import batches, make_batch
from tests.test_subtb import SMALL, VARIANTS, loss_and_grad

GRANULARITIES = [1, 2, 3, 5, "item"]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN lanes


@settings(max_examples=20, deadline=None)
@given(batch=batches(max_batch=3), variant=st.sampled_from(VARIANTS), lam=st.sampled_from([1.0, 0.9]),
       granularity=st.sampled_from(GRANULARITIES))
def test_triton_matches_torch(batch, variant, lam, granularity):
    pytest.importorskip("flowkern.kernels", reason="needs triton")
    form, normalize = variant
    trie = batch.catalogue.trie()
    options = dict(lam=lam, normalize=normalize, form=form, granularity=granularity, tokens=batch.tokens)
    got, want = (loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, backend=backend, **options), batch.logits)
                 for backend in ("triton", "torch"))
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("period", [1, 2, 7, 300])
@pytest.mark.parametrize("lam", [1.0, 0.9, 1e-3])
@pytest.mark.parametrize("flower", [False, True])
def test_pair_sum_kernel_matches_the_pair_loop(period, lam, flower):
    """The scans with coarse states against the O(T²) pair sum, T = 256."""
    kernels = pytest.importorskip("flowkern.kernels", reason="needs triton")
    generator = torch.Generator().manual_seed(period)
    rows, steps = 6, 256
    pieces = [torch.randn(rows, steps, generator=generator, dtype=torch.float64) for _ in range(3)]
    length = torch.tensor([255, 254, 100, 1, 0, -1] if not flower else [255, 200, 2, 1, 0, -1])
    log_pterm = pieces[1] if flower else None
    got = kernels.pair_sum(pieces[0], log_pterm, pieces[2], length, lam, period)
    want = eager.pair_sum(pieces[0], log_pterm, pieces[2], length, lam, period)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_granularity_one_is_the_default_loss_bit_for_bit(backend, form, normalize):
    if backend == "triton":
        pytest.importorskip("flowkern.kernels", reason="needs triton")
    batch = make_batch(SMALL, [1, 0, 4, 2, 1], seed=3, extra_steps=2)
    trie = batch.catalogue.trie()
    options = dict(tokens=batch.tokens, form=form, normalize=normalize, lam=0.9, backend=backend)
    default = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), batch.logits)
    one = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, granularity=1, **options), batch.logits)
    assert torch.equal(default[0], one[0]) and torch.equal(default[1], one[1])


def test_item_level_is_trajectory_balance_by_hand():
    """Process form, "item": one pair per trajectory, (Σ_t log π_t − log R(x)/Z)²."""
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=4)
    trie = batch.catalogue.trie()
    log_p = flowkern.sequence_log_probs(batch.logits, trie, tokens=batch.tokens)
    rewards = torch.tensor(SMALL.rewards, dtype=torch.float64)
    same_title = {0: [0, 3], 1: [1], 2: [2], 3: [0, 3], 4: [4]}  # items 0 and 3 share the title [1, 2]
    log_r = torch.tensor([float(rewards[same_title[i]].sum().log() - rewards.sum().log()) for i in [1, 0, 4, 2]],
                         dtype=torch.float64)
    got = flowkern.subtb_loss(batch.logits, trie, tokens=batch.tokens, granularity="item", reduction="none")
    torch.testing.assert_close(got, (log_p - log_r) ** 2, rtol=1e-12, atol=1e-12)
    assert float(flowkern.subtb_loss(batch.logits, trie, tokens=batch.tokens, granularity="item")) == \
        pytest.approx(float(got.mean()), rel=1e-12)  # each trajectory weighs 1


@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("granularity", [2, "item"])
def test_gradcheck(form, normalize, granularity):
    tokens = torch.tensor([[1, 3, 2, 0, 0], [1, 2, 0, 0, 0], [4, 0, 5, 5, 5]])
    logits = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trie = SMALL.trie()

    def loss(x):
        return flowkern.subtb_loss(x, trie, tokens=tokens, lam=0.9, form=form, normalize=normalize,
                                   granularity=granularity, reduction="none")

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(),))


@settings(max_examples=30, deadline=None)
@given(batch=batches(), lam=st.sampled_from([1.0, 0.9]), granularity=st.sampled_from(GRANULARITIES))
def test_modified_subtb_loss_matches_reference(batch, lam, granularity):
    generator = torch.Generator().manual_seed(0)
    rows, steps = batch.tokens.shape
    pieces = [torch.randn(rows, steps, generator=generator, dtype=torch.float64) for _ in range(3)]
    lengths = torch.tensor([len(batch.catalogue.sequences[i]) for i in batch.items])
    got = flowkern.modified_subtb_loss(*pieces, lengths, lam, reduction="none", granularity=granularity)
    want = ref.modified_subtb_loss(*pieces, lengths, lam, reduction="none", granularity=granularity)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_linear_head_takes_the_granularity_too():
    generator = torch.Generator().manual_seed(2)
    batch = make_batch(SMALL, [1, 0, 4], seed=2)
    hidden = torch.randn(*batch.tokens.shape, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(batch.logits.shape[-1], 4, dtype=torch.float64, generator=generator)
    trie = batch.catalogue.trie()
    got = flowkern.linear_subtb_loss(hidden, weight, trie, tokens=batch.tokens, granularity=2)
    want = flowkern.subtb_loss(hidden @ weight.T, trie, tokens=batch.tokens, granularity=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("granularity", [0, -2, 1.5, True, "items", None])
def test_bad_granularity_is_a_value_error(granularity):
    batch = make_batch(SMALL, [1], seed=0)
    with pytest.raises(ValueError, match=r"granularity must be an int >= 1 or 'item', got "):
        flowkern.subtb_loss(batch.logits, SMALL.trie(), tokens=batch.tokens, granularity=granularity)
    with pytest.raises(ValueError, match=r"granularity must be an int >= 1 or 'item', got "):
        flowkern.modified_subtb_loss(*[batch.logits[..., 0]] * 3, torch.tensor([2]), granularity=granularity)
