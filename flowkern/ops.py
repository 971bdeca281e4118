"""Flower's Subtrajectory Balance loss over an item trie (arXiv 2503.07377, Sec. 3.3).

A trajectory is a row of `tokens`: title tokens x_0 .. x_{L−1}, then the termination token
at position L.  States: s_0 = root, s_{t+1} = child(s_t, x_t); s_{L+1} is the item's leaf.
`logits[b, t]` is the model's next-token distribution at s_t.  Per trajectory:

  log π_t  log-probability of x_t at s_t (flowkern.policy: trie or full normalisation)
  log r_t  = log F(s_{t+1}) − log F(s_t), the process reward (Eq. 10); with a preference
           score p > 0 (Sec. 3.3.3): log r_t / p ("div") or log r_t + w·log p ("add")

Process form (Eq. 11), over the L + 2 states s_0 .. s_{L+1}:
  δ_t = log π_t − log r_t,  D_k = Σ_{t<k} δ_t,  loss = Σ_{0≤m<n≤L+1} λ^(n−m−1) (D_n − D_m)²

Flower form (the published code's "modified SubTB", Hu et al. 2024), over s_0 .. s_L, every
state able to terminate:  log_pf[k] = log π(x_k),  log_pterm[k] = log π(termination) at s_k
(full softmax), log_r[k] = Σ_{t<k} log r_t + c_k with c_k = −15 for k < L, c_L = log r_L;
  δ_k = log_r[k] + log_pf[k] + log_pterm[k+1] − log_r[k+1] − log_pterm[k]  (k < L)
and the same pair sum over states 0 .. L.

reduction="mean" divides Σ_b loss_b by Σ_b Σ_{m<n} λ^(n−m−1), the published normalisation.

Granularity n (the published train_sft-gfn_logp_n.py, paper Fig. 5): the states are those at
positions 0, n, 2n, … before the last state, and the last state; m < n then range over these,
λ's exponent counts the states between them, and the δ of a coarse step is the sum of its
tokens' δ.  n = 1 is the loss above; "item" keeps only the first and last states: trajectory
balance, (D_K − D_0)² with the trie's log Z built into the process rewards.

Numbers: every result is finite or the call raises a ValueError naming the argument.  λ must
keep a full row's pair weight Σ_{0≤m<n≤T} λ^(n−m−1) finite in the compute dtype (float64
for float64 inputs, else float32), checked before anything runs; the personalised log r_t
must be finite in that dtype (else the preference score, or pref_weight, is named); and a
loss that still overflows names the largest of its factors: λ's pair weight, |log π| (the
logits) or |log r| (the preferences).  Both backends run the same checks.

subtb_loss runs four stages (walk, log π, pair sum, logits gradient) on a backend:
flowkern/eager.py (vectorised PyTorch) or flowkern/kernels (Triton), behind the registered
operator flowkern::subtb_loss.  linear_subtb_loss runs the same walk and pair sum, with log π
and its gradient read from hidden states and the output layer instead of logits
(flowkern/head.py, flowkern/kernels/head.py), behind flowkern::linear_subtb_loss.
"""

import math
import os
from typing import Callable, NamedTuple, Optional

import torch

from flowkern import eager, head
from flowkern._checks import check_choice, check_number, check_token_tensor, describe
from flowkern.eager import NONTERMINAL_LOG_REWARD
from flowkern.policy import compute_dtype
from flowkern.trie import _ARRAYS, Trie

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "FLOWKERN_BACKEND"


def subtb_loss(logits, trie, rewards=None, *, tokens, lam=1.0, normalize=None, form="process",
               pref_mode="div", pref_weight=1.0, reduction="mean", on_invalid="error", backend="auto",
               inplace_grad=False, granularity=1):
    """Flower's SubTB loss of the trajectories `tokens` (B, T) under `logits` (B, T, V).

    logits:     float16/bfloat16/float32/float64, any strides; logits[b, t] is the
                distribution at state s_t.  Positions after a row's termination token are
                never read, in logits or in tokens.
    trie:       the item `Trie`, on the logits' device.
    rewards:    None (the trie's item rewards), or preference scores p_b > 0 as a (B,)
                tensor, or a (B, num_items) tensor read at each trajectory's item (the
                leaf's smallest item id when items share a title).
    lam:        λ > 0, the subtrajectory weight decay.
    granularity: n >= 1, states every n tokens (paper Fig. 5; 1 is every token), or "item":
                only the first and last states, i.e. trajectory balance.
    normalize:  "trie" (default for form="process") or "full"; form="flower" needs "full".
    form:       "process" (Eq. 11) or "flower" (parity with the published code).
    pref_mode:  "div" (log r / p) or "add" (log r + pref_weight·log p).
    reduction:  "mean" (published normalisation), "sum", or "none" (per-trajectory losses).
    on_invalid: "error", or "ignore" to drop trajectories that leave the trie or never
                terminate (they add nothing to the loss or to the normaliser; a batch with
                none left gives 0).
    backend:    "auto" (the FLOWKERN_BACKEND environment variable if set, else Triton
                kernels for CUDA tensors and vectorised PyTorch otherwise), "torch" or
                "triton" (on CPU tensors only under the Triton interpreter, TRITON_INTERPRET=1).
    inplace_grad: compute the gradient during the forward pass into the storage of
                `logits`, which the caller then must not read again: training then holds
                one B×T×V buffer, not two.  Acts only when a gradient is needed; runs
                outside torch.compile graphs.
    Returns a float32 loss (float64 for float64 logits), differentiable w.r.t. logits.
    """
    normalize = _check_options(lam, normalize, form, pref_mode, pref_weight, reduction, on_invalid)
    check_choice("backend", backend, BACKENDS)
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {describe(inplace_grad)}")
    _check_inputs(logits, tokens, trie)
    period = _period(granularity, tokens)
    _check_lam(lam, tokens.shape[1], compute_dtype(logits.dtype))
    _check_rewards(rewards, tokens.shape[0], trie.num_items, _logits_source(logits))
    options = (float(lam), period, form, normalize, pref_mode, float(pref_weight), on_invalid, backend)
    if inplace_grad and logits.requires_grad and torch.is_grad_enabled():
        return _subtb_loss_inplace_grad(logits, tokens, trie, rewards, options, reduction)
    arrays, ints, log_z = _pack(trie)
    loss, weight, *_ = torch.ops.flowkern.subtb_loss(logits, tokens, arrays, ints, log_z, rewards, *options)
    return _reduce(loss, weight, reduction)


def linear_subtb_loss(hidden, weight, trie, rewards=None, *, tokens, bias=None, lam=1.0, normalize=None,
                      form="process", pref_mode="div", pref_weight=1.0, reduction="mean", on_invalid="error",
                      backend="auto", granularity=1):
    """subtb_loss of the logits hidden @ weight.T + bias, computed without forming them.

    hidden:  (B, T, H) float16/bfloat16/float32/float64, any strides: hidden[b, t] is the
             model's last hidden state at s_t (what its output layer reads).
    weight:  (V, H) output layer (lm_head.weight; the input embeddings when they are tied),
             bias: None or (V,); both of hidden's dtype and device.
    With normalize="trie" only the rows of weight (and bias) at the children of each state are
    read; with "full" (and form="flower") weight is read in chunks of rows and re-read in
    backward, so no (B, T, V) tensor exists either way.  Differentiable w.r.t. hidden, and
    w.r.t. weight and bias when they require grad (a frozen head gets no dW at all).
    The other arguments, the result and the errors are subtb_loss's (no inplace_grad: there
    are no logits to overwrite); backend="triton" runs the trie policy's head as Triton
    kernels, the full softmax's chunks as matrix products on either backend.
    """
    normalize = _check_options(lam, normalize, form, pref_mode, pref_weight, reduction, on_invalid)
    check_choice("backend", backend, BACKENDS)
    source = _check_head_inputs(hidden, weight, bias, tokens, trie)
    period = _period(granularity, tokens)
    _check_lam(lam, tokens.shape[1], compute_dtype(hidden.dtype))
    _check_rewards(rewards, tokens.shape[0], trie.num_items, source)
    options = (float(lam), period, form, normalize, pref_mode, float(pref_weight), on_invalid, backend)
    arrays, ints, log_z = _pack(trie)
    loss, loss_weight, *_ = torch.ops.flowkern.linear_subtb_loss(hidden, weight, bias, tokens, arrays, ints, log_z,
                                                                 rewards, *options)
    return _reduce(loss, loss_weight, reduction)


def sequence_log_probs(logits, trie, *, tokens, normalize="trie"):
    """log P(x) = Σ_{t ≤ L} log π_t of each trajectory in `tokens` (B, T) under `logits`
    (B, T, V): the item's log-probability under the trie-constrained policy (normalize=
    "trie") or under the unconstrained model ("full").  Shape (B,), differentiable.
    Arguments and errors as subtb_loss; every trajectory must be an item of the trie."""
    check_choice("normalize", normalize, ("trie", "full"))
    _check_inputs(logits, tokens, trie)
    source = _logits_source(logits)
    return _total(position_log_probs(source, tokens, trie, normalize, "auto", logits)[0], source)


def linear_sequence_log_probs(hidden, weight, trie, *, tokens, bias=None, normalize="trie"):
    """sequence_log_probs of the logits hidden @ weight.T + bias, computed without forming
    them (see linear_subtb_loss): (B,), differentiable w.r.t. hidden, weight and bias.  The
    trie policy's log-likelihood of the items (normalize="trie") is what a trie-constrained
    decoder samples from; "full" is the ordinary token cross-entropy (negated)."""
    check_choice("normalize", normalize, ("trie", "full"))
    source = _check_head_inputs(hidden, weight, bias, tokens, trie)
    return _total(position_log_probs(source, tokens, trie, normalize, "auto", hidden, weight, bias)[0], source)


def position_log_probs(source, tokens, trie, normalize, backend, *inputs):
    """((B, T) log π_t of every trajectory, 0 after its termination token; (B,) the position
    L_b of that token), log π differentiable w.r.t. `inputs` (the logits, or the head's
    hidden, weight, bias), walked and read on `backend`; every trajectory must be an item of
    the trie and every log π_t finite."""
    stages = _backend(backend, tokens.device)
    walk = stages.walk_rewards(tokens, trie, None, "div", 1.0)[0]
    _check_trajectories(walk, tokens, source, trie.eos_token_id, "error")
    return _LogProbs.apply(tokens, walk, trie, normalize, stages, source, *inputs), walk.length


def _total(log_pi, source):
    total = log_pi.sum(1)
    if not bool(torch.isfinite(total).all()):
        row = int((~torch.isfinite(total)).nonzero()[0])
        raise ValueError(f"{source.at.format(row, ':')} give log-probabilities whose sum overflows {total.dtype}")
    return total


class _LogProbs(torch.autograd.Function):
    """log π_t per position, read from `inputs`: (logits,) or the head's (hidden, weight,
    bias).  Backward is the stages' gradient with coefficient ∂/∂log π_t = the upstream
    gradient at (b, t)."""

    @staticmethod
    def forward(ctx, tokens, walk, trie, normalize, stages, source, *inputs):
        from_head = len(inputs) == 3
        stages = _head_stages(stages, normalize) if from_head else stages
        # A frozen output layer under the full softmax: the forward's pass over W also gives
        # what dh needs, and backward reads no chunk of W (flowkern/head.py).
        ctx.product = from_head and normalize == "full" and ctx.needs_input_grad[6] \
            and not any(ctx.needs_input_grad[7:9])
        pieces = stages.log_probs(*inputs, tokens, walk.nodes, walk.length, trie, normalize, False,
                                  **({"softmax_product": True} if ctx.product else {}))
        log_pi, _, lse = pieces[:3]
        b, t = eager.used_rows(walk.length, tokens.shape[1])
        _check_finite_log_probs(log_pi[b, t, None], b, t, tokens[b, t], source)
        ctx.save_for_backward(tokens, walk.nodes, walk.length, lse, *pieces[3:], *inputs)
        ctx.trie, ctx.normalize, ctx.stages = trie, normalize, stages
        return log_pi

    @staticmethod
    def backward(ctx, grad_out):
        tokens, nodes, length, lse, *inputs = ctx.saved_tensors
        product = {"softmax_product": inputs.pop(0)} if ctx.product else {}
        coefficient = grad_out.to(lse.dtype).contiguous()
        stage_args = (tokens, nodes, length, ctx.trie, lse, coefficient, ctx.normalize, False)
        if len(inputs) == 3:
            grads = ctx.stages.grad(*inputs, *stage_args, *ctx.needs_input_grad[7:9], **product)
        else:
            logits = inputs[0]
            grads = (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device),)
            ctx.stages.logits_grad(logits, *stage_args, grads[0])
        return (None,) * 6 + tuple(grads)


def modified_subtb_loss(log_pf, log_pterm, log_r, lengths, lam=1.0, *, reduction="mean", granularity=1):
    """The Flower form's loss from its per-state pieces, each (B, T): row b uses states
    0 .. lengths[b] (lengths[b] ≤ T − 1 is the position of its termination token) and
    ignores the rest; granularity as in subtb_loss.  See the module docstring for δ and the
    pair sum."""
    _check_options(lam, "full", "flower", "div", 1.0, reduction, "error")
    pieces = {"log_pf": log_pf, "log_pterm": log_pterm, "log_r": log_r}
    for name, value in pieces.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point (B, T) tensor, got {describe(value)}")
        if value.shape != log_pf.shape or value.device != log_pf.device:
            raise ValueError(f"{name} has shape {tuple(value.shape)} on {value.device} but log_pf has "
                             f"{tuple(log_pf.shape)} on {log_pf.device}: they must match")
    batch, steps = log_pf.shape
    period = _period(granularity, log_pf)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be a ({batch},) integer tensor, got {describe(lengths)}")
    lengths = lengths.to(log_pf.device, torch.long)
    if bool(((lengths < 0) | (lengths >= steps)).any()):
        raise ValueError(f"lengths must lie in [0, T - 1] = [0, {steps - 1}], got {lengths.tolist()}")
    used = torch.arange(steps, device=log_pf.device) <= lengths[:, None]
    for name, value in pieces.items():
        if not bool(torch.isfinite(value[used]).all()):
            raise ValueError(f"{name} holds NaN or inf at a state the loss uses")
    _check_lam(lam, steps, log_pf.dtype)
    loss, weight = _PairSum.apply(eager.modified_deltas(log_pf, log_pterm, log_r), lengths + 1, lam, period)
    if not bool(torch.isfinite(loss).all()):
        b = int((~torch.isfinite(loss)).nonzero()[0])
        largest = max(float(value[b][used[b]].abs().max()) for value in pieces.values())
        raise ValueError(f"the loss of row {b} overflows {log_pf.dtype}: log_pf, log_pterm and log_r reach "
                         f"{largest:.3g} in magnitude there, too large for their squared differences")
    return _reduce(loss, weight, reduction)


class _PairSum(torch.autograd.Function):
    """(loss_b, weight_b) of eager.subtrajectory_balance, differentiable w.r.t. δ."""

    @staticmethod
    def forward(ctx, delta, num_states, lam, period):
        loss, weight, grad = eager.subtrajectory_balance(delta, num_states, lam, period)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(weight)
        return loss, weight

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None], None, None, None


def _reduce(loss, weight, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weight.sum().clamp(min=1.0)  # any trajectory weighs >= 1


# ---- the loss as a torch.library operator -------------------------------------------------
# flowkern::subtb_loss takes the trie as its arrays and scalars and returns per trajectory
# (loss_b, weight_b) plus what backward needs; the reduction happens outside, in plain torch.
# Its checks that read data (trajectories, preferences, finite log π) run inside, so
# torch.compile(fullgraph=True) sees one opaque call with a fake (meta) implementation.

def _pack(trie):
    arrays = [getattr(trie, name) for name in _ARRAYS]
    return arrays, [trie.eos_token_id, trie.max_token, trie.max_degree, trie.min_depth], trie.log_z


def _unpack(arrays, ints, log_z):
    eos_token_id, max_token, max_degree, min_depth = ints
    return Trie._unchecked(**dict(zip(_ARRAYS, arrays)), eos_token_id=eos_token_id, log_z=log_z,
                           max_token=max_token, max_degree=max_degree, min_depth=min_depth)


@torch.library.custom_op("flowkern::subtb_loss", mutates_args=())
def _subtb_loss_op(logits: torch.Tensor, tokens: torch.Tensor, trie_arrays: list[torch.Tensor],
                   trie_ints: list[int], log_z: float, rewards: Optional[torch.Tensor], lam: float, period: int,
                   form: str, normalize: str, pref_mode: str, pref_weight: float, on_invalid: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """(loss_b, weight_b, nodes, length, lse, g): see _forward."""
    trie = _unpack(trie_arrays, trie_ints, log_z)
    return _forward(_logits_source(logits), tokens, trie, rewards,
                    (lam, period, form, normalize, pref_mode, pref_weight, on_invalid, backend))


@_subtb_loss_op.register_fake
def _(logits, tokens, trie_arrays, trie_ints, log_z, rewards, lam, period, form, normalize, pref_mode, pref_weight,
      on_invalid, backend):
    return _fake_forward(logits, tokens)


def _fake_forward(source, tokens):
    """Empty tensors shaped like the op's results, `source` the logits or hidden states."""
    batch, steps = tokens.shape
    dtype = compute_dtype(source.dtype)
    per_row = source.new_empty((batch,), dtype=dtype)
    return (per_row, torch.empty_like(per_row), tokens.new_empty((batch, steps + 1), dtype=torch.long),
            tokens.new_empty((batch,), dtype=torch.long), source.new_empty((batch, steps), dtype=dtype),
            source.new_empty((batch, steps), dtype=dtype))


@torch.library.custom_op("flowkern::subtb_loss_backward", mutates_args=())
def _subtb_loss_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                            trie_arrays: list[torch.Tensor], trie_ints: list[int], log_z: float,
                            nodes: torch.Tensor, length: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                            form: str, normalize: str, backend: str) -> torch.Tensor:
    """∂(Σ_b grad_loss_b · loss_b)/∂logits, a new (B, T, V) tensor of the logits' dtype."""
    trie = _unpack(trie_arrays, trie_ints, log_z)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backend(backend, logits.device).logits_grad(logits, tokens, nodes, length, trie, lse,
                                                 g * grad_loss.to(g.dtype)[:, None], normalize,
                                                 form == "flower", out)
    return out


@_subtb_loss_backward_op.register_fake
def _(grad_loss, logits, tokens, trie_arrays, trie_ints, log_z, nodes, length, lse, g, form, normalize, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, tokens, trie_arrays, trie_ints, log_z, _, _, _, form, normalize, _, _, _, backend = inputs
    _, weight, nodes, length, lse, g = output
    ctx.mark_non_differentiable(weight, lse, g)
    ctx.save_for_backward(logits, tokens, nodes, length, lse, g, *trie_arrays)
    ctx.options = (trie_ints, log_z, form, normalize, backend)


def _backward(ctx, grad_loss, *_):
    logits, tokens, nodes, length, lse, g, *trie_arrays = ctx.saved_tensors
    trie_ints, log_z, form, normalize, backend = ctx.options
    grad = torch.ops.flowkern.subtb_loss_backward(grad_loss, logits, tokens, trie_arrays, trie_ints, log_z, nodes,
                                                  length, lse, g, form, normalize, backend)
    return (grad, None, [None] * len(trie_arrays)) + (None,) * 11


torch.library.register_autograd("flowkern::subtb_loss", _backward, setup_context=_setup_context)


# flowkern::linear_subtb_loss: the same with (hidden, weight, bias) in place of the logits.  Its
# backward op returns dh, dW and db, the last two empty when not asked for (a frozen head).

@torch.library.custom_op("flowkern::linear_subtb_loss", mutates_args=())
def _linear_subtb_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          tokens: torch.Tensor, trie_arrays: list[torch.Tensor], trie_ints: list[int], log_z: float,
                          rewards: Optional[torch.Tensor], lam: float, period: int, form: str, normalize: str,
                          pref_mode: str,
                          pref_weight: float, on_invalid: str,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(loss_b, weight_b, nodes, length, lse, g): see _forward."""
    trie = _unpack(trie_arrays, trie_ints, log_z)
    return _forward(_head_source(hidden, weight, bias), tokens, trie, rewards,
                    (lam, period, form, normalize, pref_mode, pref_weight, on_invalid, backend))


@_linear_subtb_loss_op.register_fake
def _(hidden, weight, bias, tokens, trie_arrays, trie_ints, log_z, rewards, lam, period, form, normalize, pref_mode,
      pref_weight, on_invalid, backend):
    return _fake_forward(hidden, tokens)


@torch.library.custom_op("flowkern::linear_subtb_loss_backward", mutates_args=())
def _linear_subtb_loss_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                   bias: Optional[torch.Tensor], tokens: torch.Tensor,
                                   trie_arrays: list[torch.Tensor], trie_ints: list[int], log_z: float,
                                   nodes: torch.Tensor, length: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                                   form: str, normalize: str, backend: str, weight_grad: bool,
                                   bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) of Σ_b grad_loss_b · loss_b; dW and db are empty unless asked for."""
    trie = _unpack(trie_arrays, trie_ints, log_z)
    stages = _head_stages(_backend(backend, hidden.device), normalize)
    dh, dw, db = stages.grad(hidden, weight, bias, tokens, nodes, length, trie, lse, g * grad_loss.to(g.dtype)[:, None],
                             normalize, form == "flower", weight_grad, bias_grad)
    return dh, weight.new_empty(0) if dw is None else dw, hidden.new_empty(0) if db is None else db


@_linear_subtb_loss_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, tokens, trie_arrays, trie_ints, log_z, nodes, length, lse, g, form,
      normalize, backend, weight_grad, bias_grad):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape if weight_grad else 0),
            hidden.new_empty(bias.shape if bias_grad else 0))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, trie_arrays, trie_ints, log_z, _, _, _, form, normalize, _, _, _, backend = inputs
    _, loss_weight, nodes, length, lse, g = output
    ctx.mark_non_differentiable(loss_weight, lse, g)
    ctx.save_for_backward(hidden, weight, bias, tokens, nodes, length, lse, g, *trie_arrays)
    ctx.options = (trie_ints, log_z, form, normalize, backend)


def _linear_backward(ctx, grad_loss, *_):
    hidden, weight, bias, tokens, nodes, length, lse, g, *trie_arrays = ctx.saved_tensors
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    needs_bias = needs_bias and bias is not None
    dh, dw, db = torch.ops.flowkern.linear_subtb_loss_backward(grad_loss, hidden, weight, bias, tokens, trie_arrays,
                                                               *ctx.options[:2], nodes, length, lse, g,
                                                               *ctx.options[2:], needs_weight, needs_bias)
    grads = (dh if needs_hidden else None, dw if needs_weight else None, db if needs_bias else None)
    return grads + (None, [None] * len(trie_arrays)) + (None,) * 11


torch.library.register_autograd("flowkern::linear_subtb_loss", _linear_backward, setup_context=_linear_setup_context)


def _subtb_loss_inplace_grad(logits, tokens, trie, rewards, options, reduction):
    """Eager only: under torch.compile a graph break (an error with fullgraph=True)."""
    return torch.compiler.disable(_InplaceGrad.apply)(logits, tokens, trie, rewards, options, reduction)


class _InplaceGrad(torch.autograd.Function):
    """inplace_grad=True: forward writes the gradient of the reduced loss into the storage
    of logits (after reading it); backward scales it by the upstream gradient unless that
    is 1."""

    @staticmethod
    def forward(ctx, logits, tokens, trie, rewards, options, reduction):
        loss, weight, nodes, length, lse, g = _forward(_logits_source(logits), tokens, trie, rewards, options)
        reduced = _reduce(loss, weight, reduction)
        scale = 1.0 / weight.sum().clamp(min=1.0) if reduction == "mean" else 1.0
        normalize, backend = options[3], options[7]
        _backend(backend, logits.device).logits_grad(logits, tokens, nodes, length, trie, lse, g * scale,
                                                     normalize, options[2] == "flower", logits)
        torch.autograd.graph.increment_version(logits)
        ctx.grad, ctx.per_row = logits, reduction == "none"
        return reduced

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad
        if not bool((grad_loss == 1).all()):
            grad.mul_(grad_loss[:, None, None] if ctx.per_row else grad_loss)
        return grad, None, None, None, None, None


def _forward(source, tokens, trie, rewards, options):
    """Run the stages on the chosen backend, log π read from `source`, and check what they
    read: returns (loss_b, weight_b, nodes, length, lse, g) with g = ∂loss_b/∂δ_t."""
    lam, period, form, normalize, pref_mode, pref_weight, on_invalid, backend = options
    stages = _backend(backend, source.tensor.device)
    walk, preference = stages.walk_rewards(tokens, trie, rewards, pref_mode, pref_weight)
    flower = form == "flower"
    log_pf, log_pterm, lse = source.log_probs(stages, tokens, walk.nodes, walk.length, trie, normalize, flower)
    loss, weight, g = stages.pair_sum(log_pf, log_pterm, walk.log_reward, walk.length, lam, period)
    _check_read_values(walk, tokens, source, trie, on_invalid, rewards, preference, log_pf, log_pterm,
                       (loss, weight, g), (lam, pref_mode, pref_weight))
    return loss, weight, walk.nodes, walk.length, lse, g


class _Source(NamedTuple):
    """What log π is read from, logits (B, T, V) or hidden states (B, T, H) with an output
    layer, and the words its errors use."""

    tensor: torch.Tensor  # the logits or the hidden states: the batch's shape and device
    vocab: int
    log_probs: Callable  # (stages, tokens, nodes, length, trie, normalize, flower) -> stages.log_probs' result
    name: str  # "logits" / "hidden", and its verb
    are: str
    table: str  # what holds the vocabulary, its verb and its unit
    have: str
    unit: str
    at: str  # where row (b, t) is read, a format string
    holds: str


def _logits_source(logits):
    return _Source(logits, logits.shape[-1], lambda stages, *args: stages.log_probs(logits, *args), "logits", "are",
                   "logits", "have", "columns", "logits[{}, {}]", "the logits hold")


def _head_source(hidden, weight, bias):
    def log_probs(stages, tokens, nodes, length, trie, normalize, flower):
        return _head_stages(stages, normalize).log_probs(hidden, weight, bias, tokens, nodes, length, trie, normalize,
                                                         flower)

    return _Source(hidden, weight.shape[0], log_probs, "hidden", "is", "weight", "has", "rows",
                   "hidden[{}, {}] @ weight.T", "hidden, weight or bias hold")


def _head_stages(stages, normalize):
    """The head's stages: Triton kernels for the trie policy on the Triton backend, else the
    PyTorch ones (the full softmax's chunks are matrix products on any device)."""
    return stages.head if stages is not eager and normalize == "trie" else head


def _backend(name, device):
    """The module of stages for backend `name` ("auto" resolved) on `device`."""
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto")
        if name not in BACKENDS:
            raise ValueError(f"the environment variable {BACKEND_ENV} must be one of {', '.join(BACKENDS)}; "
                             f"got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and _kernels(required=False) is not None else "torch"
    if name == "torch":
        return eager
    kernels = _kernels(required=True)
    if device.type == "cpu" and not kernels.INTERPRETED:
        raise ValueError("backend='triton' on CPU tensors runs only under the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before flowkern's kernels are first used, or use backend='torch'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU ones under the Triton interpreter), "
                         f"not on {device.type}")
    return kernels


def _kernels(required):
    """flowkern.kernels, imported on first use; None (or, if required, an error) without triton."""
    try:
        from flowkern import kernels
    except ImportError as error:
        if required:
            raise ImportError(f"backend='triton' needs the triton package (pip install triton): {error}") from error
        return None
    return kernels


def _check_options(lam, normalize, form, pref_mode, pref_weight, reduction, on_invalid):
    """Validate the scalar options; returns the normalisation to use."""
    check_choice("form", form, ("process", "flower"))
    if normalize is None:
        normalize = "trie" if form == "process" else "full"
    check_choice("normalize", normalize, ("trie", "full"))
    if form == "flower" and normalize != "full":
        raise ValueError("form='flower' needs normalize='full': it uses the full-softmax probability of "
                         "the termination token at every state, which the trie policy sets to 0 off the leaves")
    check_choice("pref_mode", pref_mode, ("div", "add"))
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_choice("on_invalid", on_invalid, ("error", "ignore"))
    check_number("lam", lam, positive=True)
    check_number("pref_weight", pref_weight, positive=False)
    return normalize


def _period(granularity, tokens):
    """The state spacing `granularity` asks for: n, or for "item" more than the T positions
    of `tokens` (only the first and last states are multiples of T + 1 or the last)."""
    if granularity == "item":
        return tokens.shape[1] + 1
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be an int >= 1 or 'item', got {granularity!r}")
    return granularity


def _check_inputs(logits, tokens, trie):
    _check_float_tensor("logits", logits, "(B, T, V)", 3)
    _check_batch(_logits_source(logits), tokens, trie)


def _check_head_inputs(hidden, weight, bias, tokens, trie):
    """Check what linear_subtb_loss and linear_sequence_log_probs read; returns their source."""
    _check_float_tensor("hidden", hidden, "(B, T, H)", 3)
    expected = f"(V, H) = (V, {hidden.shape[-1]})"
    _check_float_tensor("weight", weight, expected, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be a {expected} tensor (H from hidden), got {describe(weight)}")
    if bias is not None:
        expected = f"(V,) = ({weight.shape[0]},)"
        _check_float_tensor("bias", bias, expected, 1)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be a {expected} tensor (V from weight), got {describe(bias)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{name} is {value.dtype} but hidden is {hidden.dtype}: they must share a dtype")
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}: they must share a device")
    source = _head_source(hidden, weight, bias)
    _check_batch(source, tokens, trie)
    return source


def _check_float_tensor(name, value, shape, dims):
    """`value` must be a floating-point tensor of `dims` dimensions, `shape` in words."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a {shape} tensor, got {describe(value)}")
    if value.dim() != dims:
        raise ValueError(f"{name} must be a {shape} tensor, got {describe(value)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def _check_batch(source, tokens, trie):
    """tokens and trie against the logits or hidden states they go with."""
    check_token_tensor("tokens", tokens)
    shape = tuple(source.tensor.shape)
    if tokens.shape != shape[:2]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but {source.name} has shape {shape}: "
                         f"tokens must be (B, T) = {shape[:2]}")
    if not isinstance(trie, Trie):
        raise TypeError(f"trie must be a flowkern.Trie, got {type(trie).__name__}")
    for name, device in (("tokens", tokens.device), ("trie", trie.device)):
        if device != source.tensor.device:
            raise ValueError(f"{name} is on {device} but {source.name} {source.are} on {source.tensor.device}: "
                             f"move it with {name}.to({source.name}.device)")
    if trie.max_token >= source.vocab:
        raise ValueError(f"{source.table} {source.have} V = {source.vocab} {source.unit} but the trie holds token id "
                         f"{trie.max_token}: the vocabulary must cover every trie token")
    if tokens.shape[1] < trie.min_depth:
        raise ValueError(f"T = {tokens.shape[1]} positions is too short: the shortest item in the trie "
                         f"takes {trie.min_depth} (its tokens and the termination token)")


def _check_trajectories(walk, tokens, source, eos, on_invalid):
    """Raise on the first trajectory that does not reach a leaf, unless on_invalid="ignore"."""
    invalid = walk.length < 0
    if on_invalid == "error" and bool(invalid.any()):
        b = int(invalid.nonzero()[0])
        position = int(walk.left_at[b])
        if position < 0:
            raise ValueError(f"tokens[{b}] has no termination token (eos_token_id = {eos}) in its "
                             f"T = {tokens.shape[1]} positions: every trajectory must end with it")
        token = int(tokens[b, position])
        if not 0 <= token < source.vocab:
            raise ValueError(f"tokens[{b}, {position}] = {token} is not a token id of {source.table} with "
                             f"V = {source.vocab} {source.unit}")
        raise ValueError(f"tokens[{b}, {position}] = {token} leaves the trie: it is not a child of the state "
                         f"reached by tokens[{b}, :{position}] (on_invalid='ignore' drops such trajectories)")


def _check_finite_log_probs(log_probs, b, t, taken, source):
    """log_probs: (R, K), row i read at (b_i, t_i) of the source for token taken_i."""
    bad = ~torch.isfinite(log_probs).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{source.at.format(int(b[i]), int(t[i]))} give log-probabilities {log_probs[i].tolist()} "
                         f"(token {int(taken[i])}): {source.holds} NaN/inf there or give the taken token "
                         f"zero probability")


def _check_rewards(rewards, batch, num_items, source):
    """Type, device and shape of the preference scores; their values are checked in the op."""
    if rewards is None:
        return
    if not isinstance(rewards, torch.Tensor) or rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise TypeError(f"rewards must be None or a real tensor of preference scores, got {describe(rewards)}")
    if rewards.device != source.tensor.device:
        raise ValueError(f"rewards are on {rewards.device} but {source.name} {source.are} on {source.tensor.device}")
    if rewards.shape != (batch,) and rewards.shape != (batch, num_items):
        raise ValueError(f"rewards must have shape (B,) = ({batch},) or (B, num_items) = ({batch}, {num_items}), "
                         f"got {tuple(rewards.shape)}")


def _check_lam(lam, steps, dtype):
    """λ must keep the pair weight of a row of T positions, W = Σ_{g=1}^{T} (T + 1 − g)·λ^(g−1),
    finite in the compute dtype (log-sum-exp in float64, so no overflow here)."""
    terms = [math.log(steps + 1 - g) + (g - 1) * math.log(lam) for g in range(1, steps + 1)]
    top = max(terms)
    log_weight = top + math.log(sum(math.exp(term - top) for term in terms))
    if log_weight >= math.log(torch.finfo(dtype).max):
        raise ValueError(f"lam = {lam!r} is too large for T = {steps} positions: the pair weights Σ λ^(n−m−1) "
                         f"reach e^{log_weight:.1f} and overflow {dtype}")


def _check_read_values(walk, tokens, source, trie, on_invalid, rewards, preference, log_pf, log_pterm, results,
                       options):
    """One device sync for every data-dependent check; on failure the first problem, in the
    order trajectories, preferences, log-probabilities, personalised log-rewards, loss, is raised."""
    invalid = walk.length < 0 if on_invalid == "error" else torch.zeros_like(walk.length, dtype=torch.bool)
    bad_preference = ~(torch.isfinite(preference) & (preference > 0))
    log_probs = torch.stack([log_pf] + ([log_pterm] if log_pterm is not None else []), -1)
    used = torch.arange(tokens.shape[1], device=tokens.device) <= walk.length[:, None]
    not_finite = used & ~torch.isfinite(log_probs).all(-1)
    bad_log_reward = used & ~torch.isfinite(walk.log_reward.to(log_pf.dtype))
    loss, weight, g = results
    bad_loss = ~(torch.isfinite(loss) & torch.isfinite(weight) & torch.isfinite(g).all(1))
    flags = [invalid, bad_preference, not_finite, bad_log_reward, bad_loss]
    if not bool(torch.stack([flag.any() for flag in flags]).any()):
        return
    _check_trajectories(walk, tokens, source, trie.eos_token_id, on_invalid)
    if bool(bad_preference.any() | bad_log_reward.any()):
        b = int((bad_preference | bad_log_reward.any(1)).nonzero()[0])
        where = _preference_name(b, walk, rewards)
        if bool(bad_preference[b]):
            raise ValueError(f"{where} = {float(preference[b])}: preference scores must be finite and > 0")
        lam, pref_mode, pref_weight = options
        if pref_mode == "div":
            raise ValueError(f"{where} = {float(preference[b])!r} is too small: the process log-rewards log r_t / p "
                             f"overflow {log_pf.dtype}")
        raise ValueError(f"pref_weight = {pref_weight!r} is too large: pref_weight·log p with {where} = "
                         f"{float(preference[b])!r} overflows {log_pf.dtype}")
    b, t = used.nonzero(as_tuple=True)
    _check_finite_log_probs(log_probs[b, t], b, t, tokens[b, t], source)
    b = int(bad_loss.nonzero()[0])
    _raise_loss_overflow(b, float(weight[b]), log_probs, walk, used, source, options, rewards, log_pf.dtype)


def _preference_name(b, walk, rewards):
    return f"rewards[{b}, {int(walk.item[b])}] (trajectory {b}'s item)" if rewards.dim() == 2 else f"rewards[{b}]"


def _raise_loss_overflow(b, weight, log_probs, walk, used, source, options, rewards, dtype):
    """Trajectory b's loss Σ λ^(n−m−1) (D_n − D_m)² overflowed: name its largest factor, the
    pair weight W_b (λ), max |log π|² (the logits) or max |log r|² (the preferences)."""
    lam, pref_mode, pref_weight = options
    log_pi = float(log_probs[b][used[b]].abs().max())
    log_r = float(walk.log_reward[b][used[b]].abs().max())
    overflow = f"the loss of trajectory {b} overflows {dtype}: "
    factors = {math.log(max(weight, 1.0)): f"lam = {lam!r} is too large (its pair weights sum to {weight:.3g})",
               2 * math.log(max(log_pi, 1e-300)): f"{source.at.format(b, ':')} give log-probabilities down to "
                                                  f"{-log_pi:.3g}: {source.name} must be smaller in magnitude"}
    if rewards is not None:
        preference = (f"{_preference_name(b, walk, rewards)} too small for pref_mode='div'" if pref_mode == "div"
                      else f"pref_weight = {pref_weight!r} too large")
        factors[2 * math.log(max(log_r, 1e-300))] = f"its process log-rewards reach {log_r:.3g}, from {preference}"
    raise ValueError(overflow + factors[max(factors)])
