"""flowkern.balance_loss (GFlowGR's TB and DB with per-trajectory rewards and learned flows):
against the loop reference on random tries, both backends, the restricted head, gradcheck,
SubTB's two extremes, and every bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from reference import balance as ref
from tests.strategies import batches, make_batch
from tests.test_subtb import SMALL

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN lanes


def flows_for(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    rows, steps = batch.tokens.shape
    return dict(log_rewards=torch.randn(rows, generator=generator, dtype=torch.float64) * 2,
                log_z=torch.randn(rows, generator=generator, dtype=torch.float64),
                log_flows=torch.randn(rows, steps, generator=generator, dtype=torch.float64))


def call(fn, form, flows, **options):
    """fn(log_rewards, log_z= or log_flows=) for the form."""
    extra = {"log_z": flows["log_z"]} if form == "tb" else {"log_flows": flows["log_flows"]}
    return fn(flows["log_rewards"], form=form, **extra, **options)


def loss_and_grads(fn, batch, flows, form):
    """The loss and its gradients w.r.t. logits, log_rewards and the flows (log_z or log_flows)."""
    logits = batch.logits.detach().clone().requires_grad_()
    inputs = {k: v.detach().clone().requires_grad_() for k, v in flows.items()}
    loss = call(lambda *a, **k: fn(logits, *a, **k), form, inputs)
    flow = inputs["log_z" if form == "tb" else "log_flows"]
    grads = torch.autograd.grad(loss.sum(), [logits, inputs["log_rewards"], flow])
    return [loss.detach()] + [torch.nan_to_num(g) for g in grads]


@settings(max_examples=40, deadline=None)
@given(batch=batches(), form=st.sampled_from(["tb", "db"]), normalize=st.sampled_from(["trie", "full"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 1000))
def test_matches_the_reference(batch, form, normalize, reduction, seed):
    trie, flows = batch.catalogue.trie(), flows_for(batch, seed)
    options = dict(normalize=normalize, reduction=reduction)
    got = loss_and_grads(lambda x, *a, **k: flowkern.balance_loss(x, trie, *a, tokens=batch.tokens, **k, **options),
                         batch, flows, form)
    want = loss_and_grads(lambda x, *a, **k: ref.balance_loss(x, batch.catalogue.dict_trie(), batch.tokens, *a, **k,
                                                              **options), batch, flows, form)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(batch=batches(max_batch=3), form=st.sampled_from(["tb", "db"]), normalize=st.sampled_from(["trie", "full"]))
def test_triton_matches_torch(batch, form, normalize):
    pytest.importorskip("flowkern.kernels", reason="needs triton")
    trie, flows = batch.catalogue.trie(), flows_for(batch, 0)
    got, want = (loss_and_grads(lambda x, *a, **k: flowkern.balance_loss(
        x, trie, *a, tokens=batch.tokens, normalize=normalize, backend=backend, **k), batch, flows, form)
        for backend in ("triton", "torch"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["tb", "db"])
@pytest.mark.parametrize("normalize", ["trie", "full"])
def test_the_restricted_head_equals_the_logits_path(form, normalize):
    batch = make_batch(SMALL, [1, 0, 4, 2, 3], seed=5)
    trie, flows = batch.catalogue.trie(), flows_for(batch, 5)
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(*batch.tokens.shape, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(batch.logits.shape[-1], 3, generator=generator, dtype=torch.float64, requires_grad=True)
    head = call(lambda *a, **k: flowkern.linear_balance_loss(hidden, weight, trie, *a, tokens=batch.tokens,
                                                             normalize=normalize, **k), form, flows)
    logits = call(lambda *a, **k: flowkern.balance_loss(hidden @ weight.T, trie, *a, tokens=batch.tokens,
                                                        normalize=normalize, **k), form, flows)
    torch.testing.assert_close(head, logits, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(head, [hidden, weight]), torch.autograd.grad(logits, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["tb", "db"])
@pytest.mark.parametrize("linear", [False, True])
def test_gradcheck(form, linear):
    batch = make_batch(SMALL, [1, 2, 0], seed=7)
    trie, flows = batch.catalogue.trie(), flows_for(batch, 7)
    flow_name = "log_z" if form == "tb" else "log_flows"
    generator = torch.Generator().manual_seed(8)
    if linear:
        hidden = torch.randn(*batch.tokens.shape, 3, generator=generator, dtype=torch.float64)
        weight = torch.randn(batch.logits.shape[-1], 3, generator=generator, dtype=torch.float64)
        inputs = (hidden, weight)
        fn = lambda h, w, r, f: flowkern.linear_balance_loss(h, w, trie, r, tokens=batch.tokens, form=form,
                                                             **{flow_name: f})
    else:
        inputs = (torch.nan_to_num(batch.logits),)
        fn = lambda x, r, f: flowkern.balance_loss(x, trie, r, tokens=batch.tokens, form=form, normalize="full",
                                                   **{flow_name: f})
    inputs = tuple(x.clone().requires_grad_() for x in inputs + (flows["log_rewards"], flows[flow_name]))
    assert torch.autograd.gradcheck(fn, inputs)


def test_trajectory_balance_is_subtb_with_item_granularity():
    """With log R = the item's reward and log Z = the trie's, TB is SubTB over the first and last states."""
    batch = make_batch(SMALL, [1, 0, 4, 2, 3], seed=9)
    trie = batch.catalogue.trie()
    leaf_rewards = {0: 4.0, 1: 2.0, 2: 0.5, 3: 4.0, 4: 0.7}  # items 0 and 3 share the title [1, 2]
    log_rewards = torch.tensor([leaf_rewards[i] for i in batch.items], dtype=torch.float64).log()
    log_z = torch.full((5,), trie.log_z, dtype=torch.float64)
    got = flowkern.balance_loss(batch.logits, trie, log_rewards, tokens=batch.tokens, log_z=log_z, reduction="none")
    want = flowkern.subtb_loss(batch.logits, trie, tokens=batch.tokens, granularity="item", reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_detailed_balance_is_subtb_as_lam_goes_to_zero():
    """With the trie's flows as log F and its leaf flows as log R, DB is SubTB's adjacent pairs."""
    batch = make_batch(SMALL, [1, 0, 4, 2, 3], seed=10)
    trie = batch.catalogue.trie()
    walk = trie.walk(batch.tokens)
    used = torch.arange(batch.tokens.shape[1]) <= walk.length[:, None]
    log_r = torch.where(used, walk.log_reward, 0.0)
    log_flows = trie.log_z + torch.nn.functional.pad(log_r.cumsum(1), (1, 0))[:, :-1]
    log_rewards = trie.log_z + log_r.sum(1)
    got = flowkern.balance_loss(batch.logits, trie, log_rewards, tokens=batch.tokens, form="db", log_flows=log_flows,
                                reduction="sum")
    want = flowkern.subtb_loss(batch.logits, trie, tokens=batch.tokens, lam=1e-12, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_bfloat16_logits_give_a_float32_loss_near_float64():
    batch = make_batch(SMALL, [1, 0, 4], seed=11)
    trie, flows = batch.catalogue.trie(), flows_for(batch, 11)
    low = call(lambda *a, **k: flowkern.balance_loss(batch.logits.bfloat16(), trie, *a, tokens=batch.tokens, **k),
               "db", flows)
    high = call(lambda *a, **k: flowkern.balance_loss(batch.logits.bfloat16().double(), trie, *a,
                                                      tokens=batch.tokens, **k), "db", flows)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), high, rtol=1e-5, atol=1e-5)


def bad_inputs():
    batch = make_batch(SMALL, [1, 0], seed=12)
    rows, steps = batch.tokens.shape
    good = dict(log_rewards=torch.zeros(rows, dtype=torch.float64), log_z=torch.zeros(rows, dtype=torch.float64))
    db = dict(log_rewards=good["log_rewards"], form="db", log_flows=torch.zeros(rows, steps, dtype=torch.float64))
    nan_at_used = db["log_flows"].clone()
    nan_at_used[1, 1] = float("nan")
    nan_after_end = db["log_flows"].clone()
    nan_after_end[1, 2:] = float("nan")  # row 1 is item 0, [1, 2] + eos: position 2 is its last state
    nan_after_end[1, 2] = 0.0
    return batch, [
        ("log_z of the wrong shape", {**good, "log_z": torch.zeros(rows + 1)}, r"log_z must be .* shape \(2,\)"),
        ("log_z missing", {**good, "log_z": None}, r"log_z must be a floating-point tensor"),
        ("integer log_rewards", {**good, "log_rewards": torch.zeros(rows, dtype=torch.long)}, r"log_rewards must be"),
        ("NaN log_rewards", {**good, "log_rewards": torch.tensor([0.0, float("nan")])}, r"log_rewards\[1\] = nan"),
        ("inf log_z", {**good, "log_z": torch.tensor([float("inf"), 0.0])}, r"log_z\[0\] = inf"),
        ("log_flows with tb", {**good, "log_flows": db["log_flows"]}, r"log_flows is for form='db'"),
        ("log_z with db", {**db, "log_z": good["log_z"]}, r"log_z is for form='tb'"),
        ("log_flows of the wrong shape", {**db, "log_flows": torch.zeros(rows, steps + 1)}, r"log_flows must be"),
        ("NaN log_flows where read", {**db, "log_flows": nan_at_used}, r"log_flows\[1, 1\] = nan"),
        ("an unknown form", {**good, "form": "subtb"}, r"form must be one of"),
    ], nan_after_end


@pytest.mark.parametrize("case", range(10))
def test_bad_inputs_name_the_argument(case):
    batch, cases, _ = bad_inputs()
    name, kwargs, message = cases[case]
    with pytest.raises(ValueError, match=message):
        flowkern.balance_loss(batch.logits, batch.catalogue.trie(), tokens=batch.tokens, **kwargs)


def test_what_is_never_read_may_be_anything():
    batch, _, nan_after_end = bad_inputs()
    loss = flowkern.balance_loss(batch.logits, batch.catalogue.trie(), torch.zeros(2, dtype=torch.float64),
                                 tokens=batch.tokens, form="db", log_flows=nan_after_end)
    assert torch.isfinite(loss)


def test_a_trajectory_that_leaves_the_trie_is_named():
    batch = make_batch(SMALL, [1, 0], seed=13)
    tokens = batch.tokens.clone()
    tokens[0, 0] = 3  # no item starts with 3
    with pytest.raises(ValueError, match=r"tokens\[0, 0\] = 3 leaves the trie"):
        flowkern.balance_loss(batch.logits, batch.catalogue.trie(), torch.zeros(2, dtype=torch.float64),
                              tokens=tokens, log_z=torch.zeros(2, dtype=torch.float64))


def test_the_module_is_the_function():
    batch = make_batch(SMALL, [1, 0, 4], seed=14)
    trie, flows = batch.catalogue.trie(), flows_for(batch, 14)
    module = flowkern.BalanceLoss(trie, form="db", normalize="full")
    got = module(batch.logits, batch.tokens, flows["log_rewards"], log_flows=flows["log_flows"])
    want = flowkern.balance_loss(batch.logits, trie, flows["log_rewards"], tokens=batch.tokens, form="db",
                                 log_flows=flows["log_flows"], normalize="full")
    assert torch.equal(got, want) and "form='db'" in repr(module)
