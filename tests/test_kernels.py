"""The Triton path of subtb_loss (backend="triton") against the PyTorch path and reference/.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported).  With CUDA the same small cases run the compiled kernels on the GPU, and the tests
marked `gpu` add full-size ones (V = 151,936, Qwen2.5's padded logits width).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from reference import subtb as ref
from tests.strategies import Catalogue, batches, make_batch, movie_catalogue
from tests.test_errors import CASES, call
from tests.test_head import HEAD_CASES, assert_rounded_once, assert_same, both_paths, head_inputs, values_and_grads
from tests.test_head import call as head_call
from tests.test_subtb import VARIANTS, loss_and_grad, preference_for

from flowkern import eager

kernels = pytest.importorskip("flowkern.kernels", reason="needs triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


def both_backends(logits, trie, tokens, rewards=None, upstream=None, **options):
    """(loss, grad) of the Triton path and of the PyTorch path on the same inputs."""
    return [loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, rewards, tokens=tokens, backend=backend, **options),
                          logits, upstream) for backend in ("triton", "torch")]


def to_device(batch):
    return batch.catalogue.trie().to(DEVICE), batch.tokens.to(DEVICE), batch.logits.to(DEVICE)


@settings(max_examples=25, deadline=None)
@given(batch=batches(max_batch=3), variant=st.sampled_from(VARIANTS), lam=st.sampled_from([1.0, 0.9]),
       pref=st.sampled_from(["none", "per_row", "per_item"]), pref_mode=st.sampled_from(["div", "add"]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_matches_torch_path_and_reference_in_float64(batch, variant, lam, pref, pref_mode, reduction):
    form, normalize = variant
    generator = torch.Generator().manual_seed(0)
    rewards = preference_for(batch, pref, generator)
    upstream = torch.randn(batch.tokens.shape[0], generator=generator, dtype=torch.float64) \
        if reduction == "none" else None
    options = dict(lam=lam, normalize=normalize, form=form, pref_mode=pref_mode, pref_weight=0.5,
                   reduction=reduction)
    trie, tokens, logits = to_device(batch)
    on_device = [None if x is None else x.to(DEVICE) for x in (rewards, upstream)]
    (loss, grad), (torch_loss, torch_grad) = both_backends(logits, trie, tokens, *on_device, **options)
    want_loss, want_grad = loss_and_grad(
        lambda x: ref.subtb_loss(x, batch.catalogue.dict_trie(), batch.tokens, rewards, **options), batch.logits,
        upstream)
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-9, atol=1e-9)


@settings(max_examples=8, deadline=None)
@given(batch=batches(max_batch=3), pref_mode=st.sampled_from(["div", "add"]))
def test_walk_kernel_matches_trie_walk(batch, pref_mode):
    """Valid rows and rows that leave the trie or never terminate (the junk after a row's end
    is rewritten into a second copy of each row that runs on without a termination token)."""
    trie = batch.catalogue.trie().to(DEVICE)
    tokens = torch.cat([batch.tokens, torch.where(batch.tokens == batch.catalogue.eos, 1, batch.tokens)]).to(DEVICE)
    rewards = torch.rand(tokens.shape[0], len(batch.catalogue.sequences), dtype=torch.float64).to(DEVICE) + 0.5
    got, got_preference = kernels.walk_rewards(tokens, trie, rewards, pref_mode, 0.7)
    want, want_preference = eager.walk_rewards(tokens, trie, rewards, pref_mode, 0.7)
    for name in ("nodes", "length", "item", "left_at"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.log_reward, want.log_reward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_preference, want_preference, rtol=0, atol=0)


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.3, 1e-3, 1.7])
@pytest.mark.parametrize("flower", [False, True])
def test_pair_sum_kernel_matches_the_pair_loop_up_to_256_steps(lam, flower):
    """The O(T) scans against the O(T²) pair sum of the PyTorch path, any λ > 0, T = 256."""
    generator = torch.Generator().manual_seed(int(lam * 1000))
    rows, steps = 6, 256
    pieces = [torch.randn(rows, steps, generator=generator, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    length = torch.tensor([255, 254, 100, 1, 0, -1] if not flower else [255, 200, 2, 1, 0, -1], device=DEVICE)
    log_pterm = pieces[1] if flower else None
    got = kernels.pair_sum(pieces[0], log_pterm, pieces[2], length, lam)
    want = eager.pair_sum(pieces[0], log_pterm, pieces[2], length, lam)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-9)


SMALL = Catalogue([[1, 2], [1, 3, 2], [4], [1, 2], [1]], [1.0, 2.0, 0.5, 3.0, 0.7], eos=0)


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_float32_logits_to_1e_5(form, normalize):
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=4, extra_steps=1, extra_vocab=4000, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)
    options = dict(form=form, normalize=normalize, lam=0.9)
    loss, grad = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens, backend="triton", **options),
                               logits)
    want_loss, want_grad = loss_and_grad(lambda x: ref.subtb_loss(x, SMALL.dict_trie(), batch.tokens, **options),
                                         batch.logits.double())
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_low_precision_logits_are_no_worse_than_eager_pytorch(dtype, form, normalize, lam):
    """|kernel − float64 truth| ≤ |PyTorch path in the same dtype − truth| + a small
    tolerance, for the loss and every gradient entry; the gradient has the logits' dtype."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 0, 2], seed=5, extra_steps=1, extra_vocab=3000, dtype=dtype)
    trie, tokens, logits = to_device(batch)
    options = dict(form=form, normalize=normalize, lam=lam)
    (loss, grad), (torch_loss, torch_grad) = both_backends(logits, trie, tokens, **options)
    truth = loss_and_grad(lambda x: ref.subtb_loss(x, SMALL.dict_trie(), batch.tokens, **options),
                          batch.logits.double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    for got, eager_value, want in ((loss, torch_loss, truth[0]), (grad, torch_grad, truth[1])):
        kernel_error = (got.double().cpu() - want).abs()
        eager_error = (eager_value.double().cpu() - want).abs()
        assert (kernel_error <= eager_error + 1e-6 + 1e-6 * want.abs()).all()


@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_non_contiguous_logits_are_read_in_place(form, normalize):
    """A (B, T, V) view of a (S, B, V) buffer, as `out.logits.transpose(0, 1)[:, p-1:-1]`."""
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=6, extra_steps=1, extra_vocab=2000, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)
    prompt = 3
    buffer = torch.randn(tokens.shape[1] + prompt, tokens.shape[0], logits.shape[-1], device=DEVICE)
    view = buffer.transpose(0, 1)[:, prompt - 1:-1]
    view.copy_(logits)
    assert not view.is_contiguous()
    options = dict(tokens=tokens, form=form, normalize=normalize, backend="triton")
    got = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), view)
    want = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), view.contiguous())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_trie_normalisation_reads_only_the_children():
    batch = make_batch(SMALL, [0, 1, 2, 4], seed=2, extra_vocab=600)
    trie, tokens, logits = to_device(batch)
    walk = trie.walk(tokens)
    masked = torch.full_like(logits, float("nan"))
    b, t = eager.used_rows(walk.length, tokens.shape[1])
    for i in range(b.numel()):
        state = int(walk.nodes[b[i], t[i]])
        children = trie.tokens[trie.offsets[state]:trie.offsets[state + 1]].long()
        masked[b[i], t[i], children] = logits[b[i], t[i], children]
    clean = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens, backend="triton"), logits)
    got = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens, backend="triton"), masked)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    assert (got[1][masked.isnan()] == 0).all()


def test_dropped_trajectories_match_the_torch_path():
    catalogue = Catalogue([[1, 2], [3]], [1.0, 2.0], eos=0)
    trie = catalogue.trie().to(DEVICE)
    tokens = torch.tensor([[1, 2, 0, 5], [3, 3, 0, 0], [1, 2, 2, 2], [3, 0, 9, 9]], device=DEVICE)
    logits = torch.randn(4, 4, 12, dtype=torch.float64, device=DEVICE)
    for reduction in ("mean", "none"):
        (loss, grad), (torch_loss, torch_grad) = both_backends(logits, trie, tokens, on_invalid="ignore",
                                                               reduction=reduction)
        torch.testing.assert_close(loss, torch_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, torch_grad, rtol=1e-12, atol=1e-12)
    assert (grad[1:3] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("form, normalize", VARIANTS)
@pytest.mark.parametrize("reduction, scale", [("mean", 1.0), ("sum", 2.5), ("none", None)])
def test_inplace_grad_writes_the_gradient_over_the_logits(backend, form, normalize, reduction, scale):
    """inplace_grad=True: the same gradient, held in the logits' own storage (a view of a
    larger buffer here, whose other entries stay as they were), for any upstream gradient."""
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=7, extra_steps=1, extra_vocab=300, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)
    upstream = torch.randn(tokens.shape[0], device=DEVICE) if scale is None else torch.tensor(scale, device=DEVICE)
    options = dict(tokens=tokens, form=form, normalize=normalize, reduction=reduction, backend=backend)
    want = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, **options), logits, upstream)
    buffer = torch.randn(tokens.shape[1] + 2, tokens.shape[0], logits.shape[-1], device=DEVICE)
    before = buffer.clone()
    leaf = buffer.transpose(0, 1)[:, 1:-1].detach()
    leaf.copy_(logits)
    leaf.requires_grad_()
    loss = flowkern.subtb_loss(leaf, trie, inplace_grad=True, **options)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert torch.equal(loss.detach(), want[0])
    torch.testing.assert_close(grad, want[1], rtol=1e-6, atol=1e-7)
    assert grad.data_ptr() == leaf.data_ptr()
    assert torch.equal(buffer[[0, -1]], before[[0, -1]])


def test_inplace_grad_leaves_logits_alone_without_a_gradient():
    batch = make_batch(SMALL, [1, 0], seed=8, extra_vocab=10, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)
    kept = logits.clone()
    loss = flowkern.subtb_loss(logits, trie, tokens=tokens, inplace_grad=True, backend="triton")
    assert torch.equal(logits.nan_to_num(), kept.nan_to_num()) and torch.isfinite(loss)


@pytest.mark.skipif(CUDA, reason="the cases are CPU tensors, for the interpreter")
@pytest.mark.parametrize("changes, error, message", CASES.values(), ids=CASES.keys())
def test_bad_input_gives_the_same_errors(changes, error, message):
    with pytest.raises(error, match=message):
        call(**{"backend": "triton", **changes})


def test_auto_backend_follows_the_environment_variable(monkeypatch):
    batch = make_batch(SMALL, [0], seed=9)
    trie, tokens, logits = to_device(batch)
    monkeypatch.setenv("FLOWKERN_BACKEND", "triton")
    calls = []
    monkeypatch.setattr(kernels, "pair_sum", lambda *args: calls.append(1) or eager.pair_sum(*args))
    flowkern.subtb_loss(logits, trie, tokens=tokens)
    assert calls
    monkeypatch.setenv("FLOWKERN_BACKEND", "torch")
    flowkern.subtb_loss(logits, trie, tokens=tokens)
    assert len(calls) == 1
    flowkern.subtb_loss(logits, trie, tokens=tokens, backend="triton")
    assert len(calls) == 2
    monkeypatch.setenv("FLOWKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="the environment variable FLOWKERN_BACKEND must be one of auto, torch, "
                                         "triton; got 'cuda'"):
        flowkern.subtb_loss(logits, trie, tokens=tokens)


def test_forcing_triton_without_triton_installed_is_an_import_error(monkeypatch):
    for name in [name for name in sys.modules if name.startswith("flowkern.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(flowkern, "kernels")
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match=r"backend='triton' needs the triton package \(pip install triton\)"):
        call(backend="triton")
    assert torch.isfinite(call(backend="auto"))  # CPU tensors: the PyTorch path, no triton needed


@pytest.mark.skipif(CUDA, reason="on a GPU machine the CPU tensors of this case are not the point")
def test_forcing_triton_on_cpu_without_the_interpreter_is_a_value_error():
    script = textwrap.dedent("""
        import torch, flowkern
        trie = flowkern.Trie.build([[1]], eos_token_id=0)
        try:
            flowkern.subtb_loss(torch.zeros(1, 2, 3), trie, tokens=torch.tensor([[1, 0]]), backend="triton")
        except ValueError as error:
            print(error)
    """)
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1" \
        in out.stdout, out.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_with_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the registered op without graph breaks, and the
    compiled loss and gradient equal the eager ones; bad data still raises inside the op."""
    torch._dynamo.reset()
    batch = make_batch(SMALL, [1, 0, 4, 2], seed=10, extra_vocab=20, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)

    def step(x, tokens):
        return flowkern.subtb_loss(x * 2.0, trie, tokens=tokens, lam=0.9, backend=backend) + x.sum() * 0.0

    compiled = torch.compile(step, fullgraph=True)
    got = loss_and_grad(lambda x: compiled(x, tokens), logits.nan_to_num())
    want = loss_and_grad(lambda x: step(x, tokens), logits.nan_to_num())
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    bad = tokens.clone()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match=r"tokens\[0, 0\] = 3 leaves the trie"):
        compiled(logits.nan_to_num(), bad)


def test_inplace_grad_under_compile_is_a_graph_break():
    torch._dynamo.reset()
    batch = make_batch(SMALL, [1, 0, 4], seed=11, extra_vocab=20, dtype=torch.float32)
    trie, tokens, logits = to_device(batch)
    logits = logits.nan_to_num()

    def step(x):
        return flowkern.subtb_loss(x * 2.0, trie, tokens=tokens, backend="triton", inplace_grad=True)

    got = loss_and_grad(torch.compile(step), logits)
    want = loss_and_grad(step, logits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch._dynamo.reset()  # else the graph-broken frames above are reused
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(step, fullgraph=True)(logits.clone().requires_grad_())


# ---- the restricted head (flowkern.linear_subtb_loss), trie policy ---------------------------

def head_on_both_backends(inputs, trie, tokens, upstream=None, **options):
    """(loss, grads) of linear_subtb_loss on the Triton path and on the PyTorch path."""
    return [values_and_grads(lambda h, w, b: flowkern.linear_subtb_loss(h, w, trie, tokens=tokens, bias=b,
                                                                        backend=backend, **options),
                             inputs, upstream) for backend in ("triton", "torch")]


@settings(max_examples=15, deadline=None)
@given(batch=batches(max_batch=3), lam=st.sampled_from([1.0, 0.9]), reduction=st.sampled_from(["mean", "none"]),
       hidden_size=st.integers(1, 5), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_head_kernels_match_the_torch_path_in_float64(batch, lam, reduction, hidden_size, with_bias, seed):
    inputs = [None if x is None else x.to(DEVICE) for x in head_inputs(batch, hidden_size, with_bias, seed)]
    upstream = torch.randn(batch.tokens.shape[0], dtype=torch.float64).to(DEVICE) if reduction == "none" else None
    trie, tokens = batch.catalogue.trie().to(DEVICE), batch.tokens.to(DEVICE)
    got, want = head_on_both_backends(inputs, trie, tokens, upstream, lam=lam, reduction=reduction)
    assert_same(got, want, rtol=1e-9, atol=1e-9)


WIDE = Catalogue([[token, 1 + token % 3] for token in range(4, 154)] + [[4], [5, 2, 9]], None, eos=0)


@pytest.mark.parametrize("frozen", [False, True])
def test_head_kernels_over_many_children_and_a_wide_hidden_state_in_float32(frozen):
    """150 children at the root (several blocks of children) and H = 200 (several blocks of
    H); a frozen head (no dW) too."""
    batch = make_batch(WIDE, [0, 7, 149, 150, 151, 3], seed=12, extra_steps=1, extra_vocab=30)
    inputs = [x.to(DEVICE) for x in head_inputs(batch, 200, True, seed=12, dtype=torch.float32)]
    trie, tokens = WIDE.trie().to(DEVICE), batch.tokens.to(DEVICE)
    if frozen:
        inputs[0].requires_grad_()
        losses = [flowkern.linear_subtb_loss(inputs[0], *inputs[1:2], trie, tokens=tokens, bias=inputs[2],
                                             backend=backend) for backend in ("triton", "torch")]
        grads = [torch.autograd.grad(loss, inputs[0])[0] for loss in losses]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
        return
    got, want = head_on_both_backends(inputs, trie, tokens, lam=0.9)
    assert_same(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_kernels_in_low_precision_round_once(dtype):
    """As the PyTorch path: float32 arithmetic, each gradient rounded once to the dtype."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 0, 2], seed=13, extra_steps=1, extra_vocab=200)
    inputs = [x.to(DEVICE) for x in head_inputs(batch, 32, True, seed=13, dtype=dtype)]
    trie, tokens = SMALL.trie().to(DEVICE), batch.tokens.to(DEVICE)
    got, _ = head_on_both_backends(inputs, trie, tokens, lam=0.9)
    assert_rounded_once(got, both_paths(*(x.double() for x in inputs), trie, tokens, lam=0.9)[1], dtype)


def test_head_kernels_read_only_the_childrens_rows_of_weight():
    batch = make_batch(SMALL, [0, 1, 2, 4], seed=14, extra_vocab=20)
    hidden, weight, bias = (x.to(DEVICE) for x in head_inputs(batch, 6, True, seed=14))
    trie, tokens = SMALL.trie().to(DEVICE), batch.tokens.to(DEVICE)
    junk_weight, junk_bias = weight.clone(), bias.clone()
    junk_weight[5:], junk_bias[5:] = float("nan"), float("inf")  # the trie's tokens are 0 .. 4
    clean, junk = (head_on_both_backends(inputs, trie, tokens)[0] for inputs in ([hidden, weight, bias],
                                                                                 [hidden, junk_weight, junk_bias]))
    assert torch.equal(clean[0], junk[0]) and all(torch.equal(c, j) for c, j in zip(clean[1], junk[1]))
    assert (junk[1][1][5:] == 0).all() and (junk[1][2][5:] == 0).all()


TILED = [151] * 20 + list(range(0, 150, 8))  # WIDE's items: 20 × [5, 2, 9] and 19 at the root's other children


def test_head_kernels_over_tiles_of_one_node_and_blocks_of_children():
    """39 trajectories: the root's 39 rows fill 3 tiles and the 20 rows at each inner node of
    [5, 2, 9] 2 tiles each, while the root's 150 children take 3 blocks of CHILD_BLOCK and
    H = 40 several blocks of H; loss and gradients (W and b trained) as the PyTorch path's."""
    batch = make_batch(WIDE, TILED, seed=15, extra_steps=1, extra_vocab=10)
    inputs = [x.to(DEVICE) for x in head_inputs(batch, 40, True, seed=15)]
    trie, tokens = WIDE.trie().to(DEVICE), batch.tokens.to(DEVICE)
    walk = trie.walk(tokens)
    tile_nodes = kernels.head._tiles(walk.nodes, walk.length, trie.num_nodes, kernels.head.BLOCK_R)[1]
    tiles = torch.bincount(tile_nodes[tile_nodes >= 0].long())
    assert tiles[0] == 3 and (tiles == 2).sum() == 3 and tiles.sum() == 3 + 3 * 2 + 19 * 2
    options = kernels.head._launch_options(*inputs[:1], trie, inputs[2])
    assert options["CHILD_BLOCK"] * 2 < trie.max_degree and options["BLOCK_H"] * 2 < 40
    got, want = head_on_both_backends(inputs, trie, tokens, lam=0.9)
    assert_same(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(batch=batches(max_batch=6), block_rows=st.sampled_from([1, 2, 3, 16]))
def test_head_tiles_hold_each_row_once_at_its_node(batch, block_rows):
    """_tiles: every row t ≤ L_b in exactly one tile, each tile's rows at its node (at most
    block_rows of them, from the first slot on), each node's rows in ⌈n / block_rows⌉ tiles;
    −1 everywhere else."""
    trie = batch.catalogue.trie()
    walk = trie.walk(batch.tokens)
    rows, tile_nodes = kernels.head._tiles(walk.nodes, walk.length, trie.num_nodes, block_rows)
    steps = batch.tokens.shape[1]
    b, t = eager.used_rows(walk.length, steps)
    full = tile_nodes >= 0
    members = (rows >= 0).sum(1)
    assert torch.equal(full, members > 0) and torch.equal(rows >= 0, torch.arange(block_rows) < members[:, None])
    row = rows[rows >= 0].long()
    assert sorted(row.tolist()) == sorted((b * steps + t).tolist())
    assert torch.equal(walk.nodes[row // steps, row % steps], tile_nodes[full].repeat_interleave(members[full]))
    node, count = torch.unique(walk.nodes[b, t], return_counts=True)
    tiles = torch.bincount(tile_nodes[full].long(), minlength=trie.num_nodes)
    assert torch.equal(tiles[node], (count + block_rows - 1) // block_rows) and tiles.sum() == full.sum()


def test_head_launchers_never_wait_on_the_device(monkeypatch):
    """Tiling the rows and finding dW's rows take no host sync (.item(), .tolist(), bool(),
    nonzero, unique, boolean-mask indexing, repeat_interleave by a tensor, copies to the
    host): the launchers run on meta tensors, which hold no data, so any of those would raise,
    as the PyTorch path's used_rows (nonzero) does.  The kernels, which cannot run there, are
    stood in for."""
    launches = []

    class Launch:  # kernel[grid](*args, **kwargs), recorded
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    for name in ("_head_log_probs_kernel", "_head_grad_kernel"):
        monkeypatch.setattr(kernels.head, name, Launch())
    batch, steps, hidden_size, vocab = len(TILED), 5, 40, 170
    hidden, weight, bias, lse = (torch.empty(*shape, device="meta") for shape in (
        (batch, steps, hidden_size), (vocab, hidden_size), (vocab,), (batch, steps)))
    tokens, nodes, length = (torch.empty(*shape, dtype=torch.long, device="meta")
                             for shape in ((batch, steps), (batch, steps + 1), (batch,)))
    trie = WIDE.trie().to("meta")
    with pytest.raises(NotImplementedError):
        eager.used_rows(length, steps)
    log_pf, _, _ = kernels.head.log_probs(hidden, weight, bias, tokens, nodes, length, trie, "trie", False)
    grads = kernels.head.grad(hidden, weight, bias, tokens, nodes, length, trie, lse, lse, "trie", False, True, True)
    assert launches == [(batch * steps // kernels.head.BLOCK_R + batch * steps,)] * 2
    assert log_pf.shape == lse.shape and [g.shape for g in grads] == [hidden.shape, weight.shape, bias.shape]


@pytest.mark.skipif(not CUDA, reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_head_launchers_make_no_host_sync_on_cuda():
    batch = make_batch(WIDE, TILED, seed=16, extra_steps=1, extra_vocab=10)
    hidden, weight, bias = (x.cuda() for x in head_inputs(batch, 40, True, seed=16, dtype=torch.float32))
    trie, tokens = WIDE.trie().to("cuda"), batch.tokens.cuda()
    walk = trie.walk(tokens)
    inputs = (hidden, weight, bias, tokens, walk.nodes, walk.length, trie)

    def run():
        lse = kernels.head.log_probs(*inputs, "trie", False)[2]
        return kernels.head.grad(*inputs, lse, torch.ones_like(lse), "trie", False, True, True)

    want = run()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(CUDA, reason="the cases are CPU tensors, for the interpreter")
@pytest.mark.parametrize("changes, error, message", HEAD_CASES.values(), ids=HEAD_CASES.keys())
def test_head_bad_input_gives_the_same_errors(changes, error, message):
    with pytest.raises(error, match=message):
        head_call(**{"backend": "triton", **changes})


COMPILE_FOR_SM90 = """
import inspect, types, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flowkern.kernels import head, policy, subtb, walk

def pointer_type(name, logits, acc):
    table = {"logits": logits, "out": logits, "edge_tokens": "i32", "leaf_nodes": "i32", "leaf_items": "i32",
             "rewards": "fp32", "log_flow": "fp64", "log_r": "fp64", "preference": "fp64", "pref_weight": "fp64",
             "lam": "fp64", "hidden": logits, "weight": logits, "bias": logits, "rows": "i32", "tile_nodes": "i32",
             "slot": "i32"}
    return "*" + table.get(name[:-4], "i64" if name[:-4] in ("tokens", "offsets", "leaf_item_offsets", "nodes",
                                                              "length", "item", "left_at") else acc)

def compile(kernel, logits, constants, **options):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constants else pointer_type(name, logits, "fp64" if logits == "fp64"
                 else "fp32") if name.endswith("_ptr") else "fp32" if name == "nonterminal" else "i64"
                 for name in names}
    triton.compile(ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()}),
                   target=GPUTarget("cuda", 90, 32), options=options)

for kind in (0, 1, 2):
    compile(walk._walk_kernel, "fp32", {"PREFERENCE": kind, "DIV": kind != 2})
for logits in ("bf16", "fp32", "fp64"):
    for trie, flower in ((True, False), (False, False), (False, True)):
        constants = dict(TRIE=trie, FLOWER=flower, BLOCK=4096, CHILD_BLOCK=256)
        compile(policy._log_probs_kernel, logits, constants, num_warps=8)
        compile(policy._logits_grad_kernel, logits, constants, num_warps=8)
    for flower in (False, True):
        compile(subtb._pair_sum_kernel, logits, dict(FLOWER=flower, BLOCK_T=256))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[logits]
    hidden = torch.empty(1, 1, 1536, dtype=dtype)
    for has_bias in (False, True):  # the launchers' constexprs at H = 1536 and a max degree of 835
        blocks = head._launch_options(hidden, types.SimpleNamespace(max_degree=835), hidden[0, 0] if has_bias else None)
        compile(head._head_log_probs_kernel, logits, blocks, num_warps=4)
        for weight_grad in (False, True):
            compile(head._head_grad_kernel, logits, dict(blocks, WEIGHT_GRAD=weight_grad, BIAS_GRAD=has_bias),
                    num_warps=4)
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="with a GPU the kernels run compiled in the other tests")
def test_kernels_compile_for_a_cuda_target():
    """The interpreter does not type-check like the compiler: compile every kernel variant
    for sm_90 (Triton's bundled ptxas, no GPU needed) in a process without the interpreter."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=environment,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "compiled", out.stderr[-3000:]


# ---- full size, real kernels -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form, normalize", VARIANTS)
def test_full_size_on_gpu_matches_torch_path(dtype, form, normalize):
    catalogue = movie_catalogue()
    trie = catalogue.trie().to("cuda")
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(len(catalogue.sequences), (32,), generator=generator).tolist()
    steps = max(len(catalogue.sequences[i]) for i in rows) + 1
    tokens = torch.tensor([catalogue.sequences[i] + [198] * (steps - len(catalogue.sequences[i])) for i in rows])
    logits = (torch.randn(32, steps, 151_936, generator=generator) * 3).to("cuda", dtype)
    options = dict(form=form, normalize=normalize, lam=0.9)
    (loss, grad), (torch_loss, torch_grad) = both_backends(logits, trie, tokens.cuda(), **options)
    truth = loss_and_grad(lambda x: flowkern.subtb_loss(x, trie, tokens=tokens.cuda(), backend="torch", **options),
                          logits.double())
    for got, eager_value, want in ((loss, torch_loss, truth[0]), (grad, torch_grad, truth[1])):
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        kernel_error = (got.double() - want).abs()
        assert (kernel_error <= (eager_value.double() - want).abs() + 1e-6 + 1e-6 * want.abs()).all()
    inplace = logits.clone().requires_grad_()
    flowkern.subtb_loss(inplace, trie, tokens=tokens.cuda(), inplace_grad=True, **options).backward()
    torch.testing.assert_close(inplace.grad, grad)


def test_sequence_log_probs_walk_with_the_backends_stages(monkeypatch):
    """On the Triton backend (CUDA's default) the trie walk of sequence_log_probs is the walk
    kernel, one program per row, with the same result as the C++ walk."""
    batch = make_batch(SMALL, [0, 1, 4], seed=3)
    trie, tokens, logits = to_device(batch)
    want = flowkern.sequence_log_probs(logits, trie, tokens=tokens)
    monkeypatch.setenv("FLOWKERN_BACKEND", "triton")
    calls, original = [], kernels.walk_rewards
    monkeypatch.setattr(kernels, "walk_rewards", lambda *args: calls.append(1) or original(*args))
    torch.testing.assert_close(flowkern.sequence_log_probs(logits, trie, tokens=tokens), want, rtol=1e-12, atol=1e-12)
    assert calls
