"""What the kernels compile to for sm_90 (benchmarks/ptx_report.py, Triton's bundled ptxas, no
GPU needed), and the bfloat16 rounding of the gradient they write.

The compiled code: no kernel spills; both backward kernels of the logits policy (trie and
full) zero or write the row in 16-byte stores, the full forward reads it in 16-byte loads
with one exp per column, the trie forward's warps follow its children, not V, and bfloat16
gradients are rounded by the native conversion.  The restricted head (head.py, tiles of rows
at one node, products by tl.dot) writes dh in 16-byte stores in bfloat16."""

import importlib.util

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton")
kernels = pytest.importorskip("flowkern.kernels", reason="needs triton")
import triton.language as tl  # noqa: E402

from benchmarks import ptx_report  # noqa: E402
from flowkern import eager  # noqa: E402
from flowkern.kernels import policy  # noqa: E402
from tests.strategies import Catalogue, make_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_PTXAS = importlib.util.find_spec("triton.backends.nvidia") is not None
SMALL = Catalogue([[1, 2], [1, 3, 2], [4], [1, 2], [1]], [1.0, 2.0, 0.5, 3.0, 0.7], eos=0)  # as test_kernels.py


@pytest.fixture(scope="module")
def compiled():
    """The report's rows, keyed by (kernel, variant, logits dtype)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(90).path
    except Exception as error:  # no bundled ptxas: nothing to compile with
        pytest.skip(f"no ptxas for sm_90: {error}")
    return {(row["kernel"], row["variant"], row["logits"]): row for row in ptx_report.collect()}


needs_ptxas = pytest.mark.skipif(not HAS_PTXAS, reason="needs triton's CUDA backend")


@needs_ptxas
def test_no_kernel_spills(compiled):
    spilling = {key: row["spills (st/ld B)"] for key, row in compiled.items() if row["spills (st/ld B)"] != "0/0"}
    assert spilling == {}, f"spills (bytes stored/loaded): {spilling}"


@needs_ptxas
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_policy_kernels_move_the_row_in_16_byte_accesses(compiled, dtype):
    for variant in ("trie", "full", "full, flower"):
        assert compiled["policy backward", variant, dtype]["widest store (B)"] == 16, variant
    for variant in ("full", "full, flower"):
        row = compiled["policy forward", variant, dtype]
        assert row["widest load (B)"] == 16, variant
        block = min(policy.MAX_BLOCK, triton.next_power_of_2(ptx_report.VOCAB))
        assert row["ex2"] <= block // (32 * row["warps"]) + 1, "one exp per column a thread holds, one per block"


@needs_ptxas
def test_head_backward_writes_dh_in_16_byte_stores(compiled):
    for variant in ("trie, frozen W", "trie, dW"):
        assert compiled["head backward", variant, "bf16"]["widest store (B)"] == 16, variant


@needs_ptxas
def test_trie_forward_warps_follow_the_children(compiled):
    assert compiled["policy forward", "trie", "bf16"]["warps"] < compiled["policy forward", "full", "bf16"]["warps"]


@needs_ptxas
def test_bfloat16_gradient_is_rounded_by_the_native_conversion(compiled):
    for variant in ("trie", "full", "full, flower"):
        assert compiled["policy backward", variant, "bf16"]["cvt.rn.bf16"] > 0, variant


# ---- the rounding itself: interpreted on CPU, the compiled conversion on a GPU --------------

@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, policy._rounded(tl.load(x_ptr + i, mask=i < n), tl.bfloat16), mask=i < n)


def bits_to_float(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan():
    """policy._rounded(x, bfloat16) against torch's float32 → bfloat16 (round to nearest even):
    the same bits for every finite x and ±inf (ties both ways, overflow to inf, subnormals), and
    NaN for every NaN, NVIDIA's canonical 0x7FFFFFFF and signalling ones included."""
    special = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001,
               0x00008000, 0x00018000, 0x807FFFFF, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000]
    nan = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF]
    random = torch.randint(0, 1 << 32, (1 << 16,), generator=torch.Generator().manual_seed(0)).tolist()
    x = bits_to_float(special + nan + random).to(DEVICE)
    got = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(got.isnan(), x.isnan())
    finite = ~x.isnan()
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))


@pytest.mark.parametrize("normalize, flower", [("trie", False), ("full", False), ("full", True)])
def test_nan_in_the_logits_stays_nan_in_the_bfloat16_gradient(normalize, flower):
    """kernels.logits_grad on bfloat16 logits with NaN at some columns: NaN exactly where the
    PyTorch path has it (the trie policy reads only the children), the rest as close."""
    batch = make_batch(SMALL, [0, 1, 2, 3, 4, 1], seed=3, extra_steps=1, extra_vocab=3000, dtype=torch.bfloat16)
    trie = SMALL.trie().to(DEVICE)
    tokens, logits = batch.tokens.to(DEVICE), batch.logits.to(DEVICE)
    walk = trie.walk(tokens)
    lse = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    coefficient = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits[:, :, [1, 3, 7, 2000]] = float("nan")  # children of the root (1) and of node 1 (3); no trie token
    inputs = (tokens, walk.nodes, walk.length, trie, lse, coefficient, normalize, flower)
    got, want = torch.full_like(logits, 5.0), torch.full_like(logits, 5.0)
    kernels.logits_grad(logits, *inputs, got)
    eager.logits_grad(logits, *inputs, want)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=2 ** -7, atol=1e-6)
