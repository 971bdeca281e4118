"""flowkern.linear_subtb_loss and linear_sequence_log_probs (the restricted head, PyTorch path)
against the materialised path: subtb_loss / sequence_log_probs of hidden @ weight.T + bias,
which tests/test_subtb.py checks against the loop-level reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import flowkern
from flowkern import head, ops
from tests.strategies import Catalogue, batches, make_batch
from tests.test_errors import CASES
from tests.test_subtb import SMALL, VARIANTS, preference_for


def values_and_grads(fn, inputs, upstream=None):
    """(fn(*inputs), its gradients w.r.t. the inputs that are not None), on fresh leaves."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, [x for x in leaves if x is not None],
                                upstream if upstream is not None else torch.ones_like(value))
    return value.detach(), grads


def materialised(hidden, weight, bias):
    return hidden @ weight.T + (0 if bias is None else bias)


def head_inputs(batch, hidden_size, with_bias, seed, dtype=torch.float64):
    """(hidden (B, T, H), weight (V, H), bias (V,) or None) for a batch, V = its logits' width,
    giving logits of standard deviation about 3 (as make_batch's); hidden is NaN after each
    row's termination token, where nothing may be read."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, steps, vocab = batch.logits.shape
    hidden = torch.randn(batch_size, steps, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * 3 / hidden_size**0.5
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64) if with_bias else None
    hidden[batch.logits[..., 0].isnan()] = float("nan")
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def both_paths(hidden, weight, bias, trie, tokens, rewards=None, upstream=None, **options):
    """(value, grads) of linear_subtb_loss and of subtb_loss on the materialised logits (which
    gets the hidden states without the NaN junk, as its matrix product would spread it)."""
    fused = values_and_grads(
        lambda h, w, b: flowkern.linear_subtb_loss(h, w, trie, rewards, tokens=tokens, bias=b, **options),
        [hidden, weight, bias], upstream)
    want = values_and_grads(
        lambda h, w, b: flowkern.subtb_loss(materialised(h, w, b), trie, rewards, tokens=tokens, **options),
        [hidden.nan_to_num(), weight, bias], upstream)
    return fused, want


def assert_same(got, want, rtol, atol):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for g, w in zip(got[1], want[1]):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None)
@given(batch=batches(), variant=st.sampled_from(VARIANTS), lam=st.sampled_from([1.0, 0.9]),
       pref=st.sampled_from(["none", "per_row", "per_item"]), pref_mode=st.sampled_from(["div", "add"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), hidden_size=st.integers(1, 5), with_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_the_materialised_path_in_float64(batch, variant, lam, pref, pref_mode, reduction, hidden_size,
                                                  with_bias, seed):
    form, normalize = variant
    generator = torch.Generator().manual_seed(seed)
    rewards = preference_for(batch, pref, generator)
    upstream = torch.randn(batch.tokens.shape[0], generator=generator, dtype=torch.float64) \
        if reduction == "none" else None
    hidden, weight, bias = head_inputs(batch, hidden_size, with_bias, seed)
    got, want = both_paths(hidden, weight, bias, batch.catalogue.trie(), batch.tokens, rewards, upstream, lam=lam,
                           form=form, normalize=normalize, pref_mode=pref_mode, pref_weight=0.5, reduction=reduction)
    assert_same(got, want, rtol=1e-9, atol=1e-9)
    assert (got[1][0][hidden.isnan()] == 0).all()  # the junk rows get no gradient


@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck(form, normalize, with_bias):
    tokens = torch.tensor([[1, 2, 0, 0], [1, 3, 2, 0], [4, 0, 5, 5]])
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    trie = SMALL.trie()

    def loss(h, w, b=None):
        return flowkern.linear_subtb_loss(h, w, trie, tokens=tokens, bias=b, lam=0.9, form=form, normalize=normalize,
                                          reduction="none")

    assert torch.autograd.gradcheck(loss, (hidden, weight) + ((bias,) if with_bias else ()))


@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_to_1e_5(form, normalize, with_bias):
    """float32 input: loss and every gradient equal the materialised path's in float32 to
    1e-5, and lie within 1e-5 of the float64 truth on the same values (relative to the
    loss, and to each gradient's largest entry: float32 error does not shrink with an entry)."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=4, extra_steps=1, extra_vocab=300)
    inputs = head_inputs(batch, 16, with_bias, seed=4, dtype=torch.float32)
    trie = SMALL.trie()
    options = dict(form=form, normalize=normalize, lam=0.9)
    got, want = both_paths(*inputs, trie, batch.tokens, **options)
    truth = both_paths(*(None if x is None else x.double() for x in inputs), trie, batch.tokens, **options)[1]
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    assert_same(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].double(), truth[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], truth[1]):
        assert ((g.double() - w).abs() <= 1e-5 * w.abs().max()).all()


ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff: the most rounding to nearest
# moves a value, relatively (in the normal range)


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_bfloat16_gradients_are_float32_results_rounded_once(form, normalize):
    """bfloat16 hidden, weight and bias: the head computes in float32 and rounds each gradient
    once, so every entry lies within bfloat16's unit roundoff of the float64 truth on the
    same values (plus float32 accumulation error, at most 1e-5 of the tensor's largest
    entry), and the loss within 1e-5.  The materialised path rounds the logits and their
    gradient to bfloat16 on the way, so the restricted head is also no less accurate than it
    (in norm, per gradient)."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 0, 2], seed=5, extra_steps=1, extra_vocab=200)
    inputs = head_inputs(batch, 32, True, seed=5, dtype=torch.bfloat16)
    trie = SMALL.trie()
    options = dict(form=form, normalize=normalize, lam=0.9)
    got, materialised_bf16 = (values_and_grads(fn, inputs) for fn in (
        lambda h, w, b: flowkern.linear_subtb_loss(h, w, trie, tokens=batch.tokens, bias=b, **options),
        lambda h, w, b: flowkern.subtb_loss(materialised(h.nan_to_num(), w, b), trie, tokens=batch.tokens,
                                            **options)))
    truth = both_paths(*(x.double() for x in inputs), trie, batch.tokens, **options)[1]
    assert_rounded_once(got, truth, torch.bfloat16)
    for g, m, w in zip(got[1], materialised_bf16[1], truth[1]):
        assert (g.double() - w).norm() <= (m.double() - w).norm()


def assert_rounded_once(got, truth, dtype):
    """Half-precision input: a float32 loss within 1e-5 of the truth, and gradients of `dtype`
    within its unit roundoff of the truth plus 1e-5 of each gradient's largest entry."""
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])
    torch.testing.assert_close(got[0].double(), truth[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], truth[1]):
        assert ((g.double() - w).abs() <= ROUNDOFF[dtype] * w.abs() + 1e-5 * w.abs().max()).all()


@pytest.mark.parametrize("normalize", ["trie", "full"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sequence_log_probs_match_the_materialised_path(normalize, with_bias):
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=6, extra_steps=2, extra_vocab=5)
    inputs = head_inputs(batch, 4, with_bias, seed=6)
    trie = SMALL.trie()
    upstream = torch.randn(batch.tokens.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    got = values_and_grads(lambda h, w, b: flowkern.linear_sequence_log_probs(h, w, trie, tokens=batch.tokens, bias=b,
                                                                              normalize=normalize), inputs, upstream)
    want = values_and_grads(lambda h, w, b: flowkern.sequence_log_probs(materialised(h, w, b), trie,
                                                                        tokens=batch.tokens, normalize=normalize),
                            [inputs[0].nan_to_num(), *inputs[1:]], upstream)
    assert_same(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["process", "flower", "sequence_log_probs"])
def test_full_softmax_over_several_chunks_of_the_vocabulary(form, monkeypatch):
    """Chunks of 3 columns (the last one shorter): the online log-sum-exp over all of them,
    the taken columns from whichever chunk holds them, and the gradient chunk by chunk give
    the materialised full softmax's values and gradients."""
    monkeypatch.setattr(head, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(head, "_MIN_CHUNK_COLUMNS", 3)
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=7, extra_steps=1, extra_vocab=5)
    vocab = batch.logits.shape[-1]
    assert vocab % 3 and len(list(head._column_chunks(vocab, 12))) >= 4
    inputs = head_inputs(batch, 4, True, seed=7)
    trie = SMALL.trie()
    if form == "sequence_log_probs":
        upstream = torch.randn(batch.tokens.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        got = values_and_grads(lambda h, w, b: flowkern.linear_sequence_log_probs(
            h, w, trie, tokens=batch.tokens, bias=b, normalize="full"), inputs, upstream)
        want = values_and_grads(lambda h, w, b: flowkern.sequence_log_probs(
            materialised(h, w, b), trie, tokens=batch.tokens, normalize="full"), [inputs[0].nan_to_num(), *inputs[1:]],
            upstream)
    else:
        got, want = both_paths(*inputs, trie, batch.tokens, form=form, normalize="full")
    assert_same(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_full_softmax_gets_dh_from_the_forward_pass(with_bias, monkeypatch):
    """W and b frozen, chunks of 3 columns: linear_sequence_log_probs carries Σ_v p_v W_v
    through the forward's online log-sum-exp, so backward reads no chunk of W, and the value
    and dh are the materialised full softmax's."""
    monkeypatch.setattr(head, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(head, "_MIN_CHUNK_COLUMNS", 3)
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=8, extra_steps=1, extra_vocab=5)
    hidden, weight, bias = head_inputs(batch, 4, with_bias, seed=8)
    trie = SMALL.trie()
    upstream = torch.randn(batch.tokens.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    leaf = hidden.detach().clone().requires_grad_()
    value = flowkern.linear_sequence_log_probs(leaf, weight, trie, tokens=batch.tokens, bias=bias, normalize="full")
    chunks = []
    original = head._chunk_logits
    monkeypatch.setattr(head, "_chunk_logits", lambda *args: chunks.append(1) or original(*args))
    (grad,) = torch.autograd.grad(value, leaf, upstream)
    assert not chunks
    want = values_and_grads(lambda h: flowkern.sequence_log_probs(materialised(h, weight, bias), trie,
                                                                  tokens=batch.tokens, normalize="full"),
                            [hidden.nan_to_num()], upstream)
    torch.testing.assert_close(value.detach(), want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, want[1][0], rtol=1e-9, atol=1e-9)


def test_trie_normalisation_reads_only_the_childrens_rows_of_weight():
    """Every row of weight and bias that is no child of a state the batch visits is NaN; the
    trie policy's loss and gradients are untouched and those rows' gradients are 0."""
    batch = make_batch(SMALL, [0, 1, 2, 4], seed=7, extra_vocab=20)
    hidden, weight, bias = head_inputs(batch, 6, True, seed=7)
    trie = SMALL.trie()
    walk = trie.walk(batch.tokens)
    b, t = (torch.arange(batch.tokens.shape[1]) <= walk.length[:, None]).nonzero(as_tuple=True)
    read = head.touched_tokens(walk.nodes[b, t], trie)
    unread = torch.ones(weight.shape[0], dtype=torch.bool)
    unread[read] = False
    junk_weight, junk_bias = weight.clone(), bias.clone()
    junk_weight[unread], junk_bias[unread] = float("nan"), float("inf")

    def loss(h, w, b_):
        return flowkern.linear_subtb_loss(h, w, trie, tokens=batch.tokens, bias=b_)

    clean = values_and_grads(loss, [hidden, weight, bias])
    junk = values_and_grads(loss, [hidden, junk_weight, junk_bias])
    assert unread.sum() == 20  # of V = 25
    assert torch.equal(clean[0], junk[0]) and all(torch.equal(c, j) for c, j in zip(clean[1], junk[1]))
    assert (junk[1][1][unread] == 0).all() and (junk[1][2][unread] == 0).all()


# ---- how Hugging Face models use it: tied embeddings, frozen heads ---------------------------------

def tiny_lm(tied, with_bias=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(config).double()
    if with_bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    return model


LM_CATALOGUE = Catalogue([[5, 6], [5], [7, 8, 9], [5, 6, 10], [11]], [1.0, 2.0, 3.0, 4.0, 6.0], eos=1)
LM_TOKENS = torch.tensor([[5, 6, 1, 1], [7, 8, 9, 1], [11, 1, 1, 1], [5, 6, 10, 1]])


def model_gradients(model, restricted, **options):
    """Gradients of every trainable parameter of `model` through the loss of LM_TOKENS after
    a 2-token prompt, the loss read from the body's hidden states or from the logits."""
    model.zero_grad(set_to_none=True)
    input_ids = torch.cat([torch.tensor([[3, 4]] * 4), LM_TOKENS], 1)
    trie = LM_CATALOGUE.trie()
    if restricted:
        hidden = model.model(input_ids=input_ids).last_hidden_state[:, 1:-1]
        loss = flowkern.linear_subtb_loss(hidden, model.lm_head.weight, trie, tokens=LM_TOKENS,
                                          bias=model.lm_head.bias, **options)
    else:
        logits = model(input_ids=input_ids).logits[:, 1:-1]
        loss = flowkern.subtb_loss(logits, trie, tokens=LM_TOKENS, **options)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("tied, with_bias", [(True, False), (False, False), (False, True)])
def test_tied_and_untied_heads_get_the_materialised_gradients(form, normalize, tied, with_bias):
    """With tied embeddings the output layer's gradient adds to the embedding lookup's on the
    one shared matrix; untied, lm_head gets its own (and its bias, if any)."""
    model = tiny_lm(tied, with_bias)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    options = dict(form=form, normalize=normalize, lam=0.9)
    got_loss, got = model_gradients(model, True, **options)
    want_loss, want = model_gradients(model, False, **options)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-9, atol=1e-9)
    assert got.keys() == want.keys() and ("lm_head.bias" in got) == with_bias
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("normalize", ["trie", "full"])
def test_a_frozen_head_gets_no_weight_gradient(normalize, monkeypatch):
    """lm_head frozen (as under LoRA): no dW is computed at all, and the rest is unchanged."""
    model = tiny_lm(tied=False, with_bias=True)
    model.lm_head.requires_grad_(False)
    asked = []
    grad = head.grad
    monkeypatch.setattr(head, "grad", lambda *args: asked.append(args[-2:]) or grad(*args))
    got_loss, got = model_gradients(model, True, normalize=normalize)
    want_loss, want = model_gradients(model, False, normalize=normalize)
    assert asked == [(False, False)]
    assert model.lm_head.weight.grad is None and model.lm_head.bias.grad is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-9, atol=1e-9)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=name)


# ---- memory: no (B, T, V) tensor -----------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_no_tensor_grows_with_rows_times_vocabulary(form, normalize, monkeypatch):
    """V = 30,000, 24 trajectories: the op's forward stages and its backward never create a
    tensor larger than a chunk of 16,384 logits, the batch's hidden states or dW (V × H),
    while the materialised logits would hold B × T × V."""
    monkeypatch.setattr(head, "_CHUNK_ELEMENTS", 16_384)
    monkeypatch.setattr(head, "_MIN_CHUNK_COLUMNS", 1)
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(1, 30_000, (40,), generator=generator).tolist()
    sequences = [[first[i % 40]] + torch.randint(1, 30_000, (i % 4,), generator=generator).tolist() for i in range(400)]
    trie = flowkern.Trie.build(sequences, eos_token_id=0)
    rows = [sequences[i] + [0] * (5 - len(sequences[i])) for i in range(0, 240, 10)]
    tokens = torch.tensor(rows)
    hidden = torch.randn(len(rows), 5, 8, generator=generator)
    weight = torch.randn(30_000, 8, generator=generator)
    options = (1.0, 1, form, normalize, "div", 1.0, "error", "torch")
    with LargestTensor() as mode:
        _, _, nodes, length, lse, g = ops._forward(ops._head_source(hidden, weight, None), tokens, trie, None, options)
        head.grad(hidden, weight, None, tokens, nodes, length, trie, lse, g, normalize, form == "flower", True, False)
    assert mode.largest <= max(weight.numel(), hidden.numel(), 16_384)
    assert tokens.numel() * 30_000 > 10 * mode.largest


# ---- bad input ---------------------------------------------------------------------------------

TRIE = flowkern.Trie.build([[1, 2], [3], [1, 2, 4]], [1.0, 2.0, 3.0], eos_token_id=0)
TOKENS = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
HIDDEN = torch.randn(2, 4, 8)
WEIGHT = torch.randn(6, 8)


def call(function=flowkern.linear_subtb_loss, **changes):
    arguments = dict(hidden=HIDDEN, weight=WEIGHT, trie=TRIE, tokens=TOKENS, bias=None)
    arguments.update(changes)
    return function(arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("trie"), **arguments)


def with_nan(tensor, index):
    tensor = tensor.clone()
    tensor[index] = float("nan")
    return tensor


HEAD_CASES = {
    "hidden not a tensor": (dict(hidden=[[0.0]]), TypeError, r"hidden must be a \(B, T, H\) tensor, got a list"),
    "hidden 2-d": (dict(hidden=torch.zeros(2, 4)), ValueError,
                   r"hidden must be a \(B, T, H\) tensor, got a torch.float32 tensor of shape \(2, 4\)"),
    "integer hidden": (dict(hidden=torch.zeros(2, 4, 8, dtype=torch.long)), TypeError,
                       "hidden must be float16, bfloat16, float32 or float64, got torch.int64"),
    "weight not a tensor": (dict(weight="lm_head"), TypeError,
                            r"weight must be a \(V, H\) = \(V, 8\) tensor, got a str"),
    "weight 3-d": (dict(weight=torch.zeros(1, 6, 8)), ValueError, r"weight must be a \(V, H\) = \(V, 8\) tensor, got"),
    "weight of another width": (dict(weight=torch.zeros(6, 7)), ValueError,
                                r"weight must be a \(V, H\) = \(V, 8\) tensor \(H from hidden\), got a torch.float32 "
                                r"tensor of shape \(6, 7\)"),
    "weight of another dtype": (dict(weight=WEIGHT.double()), TypeError,
                                "weight is torch.float64 but hidden is torch.float32: they must share a dtype"),
    "weight on another device": (dict(weight=WEIGHT.to("meta")), ValueError,
                                 "weight is on meta but hidden is on cpu: they must share a device"),
    "bias not a tensor": (dict(bias=[0.0] * 6), TypeError, r"bias must be a \(V,\) = \(6,\) tensor, got a list"),
    "bias of another length": (dict(bias=torch.zeros(5)), ValueError,
                               r"bias must be a \(V,\) = \(6,\) tensor \(V from weight\), got a torch.float32 tensor "
                               r"of shape \(5,\)"),
    "bias 2-d": (dict(bias=torch.zeros(6, 1)), ValueError, r"bias must be a \(V,\) = \(6,\) tensor, got"),
    "bias of another dtype": (dict(bias=torch.zeros(6, dtype=torch.bfloat16)), TypeError,
                              "bias is torch.bfloat16 but hidden is torch.float32: they must share a dtype"),
    "bias on another device": (dict(bias=torch.zeros(6, device="meta")), ValueError,
                               "bias is on meta but hidden is on cpu: they must share a device"),
    "tokens of another batch": (dict(tokens=TOKENS[:1]), ValueError,
                                r"tokens has shape \(1, 4\) but hidden has shape \(2, 4, 8\): tokens must be \(B, T\) "
                                r"= \(2, 4\)"),
    "tokens on another device": (dict(tokens=TOKENS.to("meta")), ValueError,
                                 r"tokens is on meta but hidden is on cpu: move it with tokens.to\(hidden.device\)"),
    "trie on another device": (dict(trie=TRIE.to("meta")), ValueError,
                               r"trie is on meta but hidden is on cpu: move it with trie.to\(hidden.device\)"),
    "vocabulary smaller than the trie": (dict(weight=WEIGHT[:4]), ValueError,
                                         "weight has V = 4 rows but the trie holds token id 4: the vocabulary must "
                                         "cover every trie token"),
    "token id >= V": (dict(tokens=torch.tensor([[1, 9, 0, 0], [3, 0, 0, 0]])), ValueError,
                      r"tokens\[0, 1\] = 9 is not a token id of weight with V = 6 rows"),
    "nan hidden where the loss reads": (dict(hidden=with_nan(HIDDEN, (0, 1, 3))), ValueError,
                                        r"hidden\[0, 1\] @ weight.T give log-probabilities \[nan\] \(token 2\): "
                                        r"hidden, weight or bias hold NaN/inf there"),
    "nan weight row of a child": (dict(weight=with_nan(WEIGHT, (3, 0))), ValueError,
                                  r"hidden\[0, 0\] @ weight.T give log-probabilities \[nan\] \(token 1\)"),
    "inf bias of a child in the flower form": (dict(bias=torch.zeros(6).index_fill(0, torch.tensor([5]), float("inf")),
                                                    form="flower"), ValueError,
                                               r"hidden\[0, 0\] @ weight.T give log-probabilities \[-inf, -inf\]"),
    "rewards on another device": (dict(rewards=torch.ones(2, device="meta")), ValueError,
                                  "rewards are on meta but hidden is on cpu"),
}
SHARED_CASES = {name: case for name, case in CASES.items()  # the options and trajectories, as for subtb_loss
                if not {"logits", "inplace_grad"} & set(case[0]) and "logits" not in case[2]}


@pytest.mark.parametrize("changes, error, message", [*HEAD_CASES.values(), *SHARED_CASES.values()],
                         ids=[*HEAD_CASES, *SHARED_CASES])
def test_linear_subtb_loss_rejects(changes, error, message):
    with pytest.raises(error, match=message):
        call(**changes)


def test_the_rejected_cases_pass_once_mended():
    assert len(SHARED_CASES) > 20
    assert torch.isfinite(call()) and torch.isfinite(call(bias=torch.zeros(6), form="flower"))
    assert torch.isfinite(call(flowkern.linear_sequence_log_probs)).all()


@pytest.mark.parametrize("name", ["weight of another width", "bias of another length", "token id >= V",
                                  "nan hidden where the loss reads", "vocabulary smaller than the trie"])
def test_linear_sequence_log_probs_rejects(name):
    changes, error, message = HEAD_CASES[name]
    with pytest.raises(error, match=message):
        call(flowkern.linear_sequence_log_probs, **changes)
    with pytest.raises(ValueError, match="normalize must be one of 'trie', 'full'; got 'vocab'"):
        call(flowkern.linear_sequence_log_probs, normalize="vocab")


# ---- the grouping of rows by trie node -----------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(batch=batches(max_batch=6))
def test_node_blocks_cover_every_row_once_with_its_nodes_children(batch):
    trie = batch.catalogue.trie()
    walk = trie.walk(batch.tokens)
    b, t = (torch.arange(batch.tokens.shape[1]) <= walk.length[:, None]).nonzero(as_tuple=True)
    state = walk.nodes[b, t]
    seen = []
    for rows, edges in head._node_blocks(state, trie, hidden_size=4):
        for node_rows, node_edges in zip(rows, edges):
            members = node_rows[node_rows >= 0]
            children = node_edges[node_edges >= 0]
            node = int(state[members[0]])
            assert (state[members] == node).all() and members.numel() * 2 > node_rows.numel()
            assert children.tolist() == list(range(int(trie.offsets[node]), int(trie.offsets[node + 1])))
            assert children.numel() * 2 > node_edges.numel()
            seen += members.tolist()
    assert sorted(seen) == list(range(state.numel()))


def test_children_logits_from_hidden_states():
    trie = SMALL.trie()
    nodes = torch.tensor([0, 1, 0, 2, 6, 3])  # the root twice, inner nodes, a leaf
    generator = torch.Generator().manual_seed(8)
    hidden, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((6, 5), (7, 5), (7,)))
    want = flowkern.children_logits(hidden @ weight.T + bias, nodes, trie)
    got = head.children_logits(hidden, weight, bias, nodes, trie, want.logits.shape[1])
    torch.testing.assert_close(got, want.logits, rtol=1e-6, atol=1e-6)
    assert (got[4] == float("-inf")).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_with_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the registered op without graph breaks."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=10, extra_vocab=20, dtype=torch.float32)
    hidden, weight, bias = head_inputs(batch, 8, True, seed=10, dtype=torch.float32)
    hidden = hidden.nan_to_num()
    trie = SMALL.trie()

    def step(h, w, b):
        return flowkern.linear_subtb_loss(h * 2.0, w, trie, tokens=batch.tokens, bias=b, lam=0.9, backend=backend)

    got = values_and_grads(torch.compile(step, fullgraph=True), [hidden, weight, bias])
    want = values_and_grads(step, [hidden, weight, bias])
    assert_same(got, want, rtol=1e-6, atol=1e-6)
