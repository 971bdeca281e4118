"""SubTB pair sum and its gradient (Flower Eq. 11), one program per trajectory, in float64.

With K states, δ_0 .. δ_{K−2} and D_k = Σ_{t<k} δ_t, the loss Σ_{m<n<K} λ^(n−m−1) (D_n − D_m)²
is carried by moments about the current state, M_j(n) = Σ_{m<n} λ^(n−m−1) (D_n − D_m)^j:
  M_0' = λ M_0 + 1,  M_1' = λ (M_1 + δ M_0) + δ,  M_2' = λ (M_2 + 2δ M_1 + δ² M_0) + δ²
when moving from state n to n + 1 over δ = δ_n.  Each step is an affine map with one
diagonal λ, so all prefixes come from one associative scan over T lanes; lane t then holds
the moments at state t + 1, the loss is Σ_n M_2(n) and the pair weight Σ_n M_0(n).  No
(D_n − D_m)² is expanded, so nothing cancels.  The gradient
  g_t = ∂loss/∂δ_t = 2 Σ_{m≤t<n} λ^(n−m−1) (D_n − D_m) = 2 (P_t U_t + Q_t R_t)
pairs those left moments (P_t = M_0(t+1), Q_t = M_1(t+1)) with right ones from a reversed scan
of the same form: R_t = Σ_{n>t} λ^(n−t−1), U'_t = Σ_{n>t} λ^(n−t−1) (D_n − D_t), U_t = U'_t − δ_t R_t.
O(T) work per row for any λ > 0, no power of λ formed.

Granularity (states every n tokens, paper Fig. 5): only the coarse states (multiples of n
and the last state) enter the sum, with λ's exponent counted in coarse steps.  The moments
about the current position then move with λ, and gain a new left end, only from a coarse
state; elsewhere a lane just shifts them by δ (λ → 1, the "+1, +δ, +δ²" dropped).  The right
scan does the same with the lanes that end at a coarse state, and the loss sums M_2 there.

δ_t is log π_t − log r_t (process form, K = L + 2) or, for the Flower form (K = L + 1),
log π(x_t) + log π_term(s_{t+1}) − log π_term(s_t) − log r_t, minus (log r_L − c) at t = L − 1
(the state log rewards of flowkern.ops telescoped, c = −15).
"""

import torch
import triton
import triton.language as tl

from flowkern.eager import NONTERMINAL_LOG_REWARD
from flowkern.kernels.walk import float64_scalar


@triton.jit
def _compose_first_moment(a1, c1, p1, q1, a2, c2, p2, q2):
    """(M_0, M_1) ↦ (a M_0 + p, a M_1 + c M_0 + q): map 1, then map 2."""
    return a1 * a2, a2 * c1 + c2 * a1, a2 * p1 + p2, a2 * q1 + c2 * p1 + q2


@triton.jit
def _compose_second_moment(a1, c1, d1, e1, p1, q1, s1, a2, c2, d2, e2, p2, q2, s2):
    """As _compose_first_moment, with M_2 ↦ a M_2 + d M_1 + e M_0 + s."""
    a, c, p, q = _compose_first_moment(a1, c1, p1, q1, a2, c2, p2, q2)
    return a, c, a2 * d1 + d2 * a1, a2 * e1 + d2 * c1 + e2 * a1, p, q, a2 * s1 + d2 * q1 + e2 * p1 + s2


@triton.jit
def _pair_sum_kernel(log_pf_ptr, log_pterm_ptr, log_r_ptr, length_ptr, loss_ptr, weight_ptr, grad_ptr, steps, lam_ptr,
                     nonterminal, period, FLOWER: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(length_ptr + b)
    t = tl.arange(0, BLOCK_T)
    row = b * steps + t
    if FLOWER:
        last = length
        last_log_r = tl.load(log_r_ptr + b * steps + length, mask=length >= 0, other=0.0)
        delta = tl.load(log_pf_ptr + row, mask=t < last, other=0.0).to(tl.float64) \
            + tl.load(log_pterm_ptr + row + 1, mask=t < last, other=0.0).to(tl.float64) \
            - tl.load(log_pterm_ptr + row, mask=t < last, other=0.0).to(tl.float64) \
            - tl.load(log_r_ptr + row, mask=t < last, other=0.0) \
            - tl.where(t == length - 1, last_log_r - nonterminal, 0.0)
    else:
        last = length + 1
        delta = tl.load(log_pf_ptr + row, mask=t < last, other=0.0).to(tl.float64) \
            - tl.load(log_r_ptr + row, mask=t < last, other=0.0)
    live = t < last  # lane t moves from state t to t + 1
    delta = tl.where(live, delta, 0.0)
    # Coarse states (granularity): lane t starts at one if t is a multiple of the period, and
    # ends at one if t + 1 is, or is the last state.  Only a coarse start decays the moments
    # and counts as a new left end; only coarse ends add to the loss.
    starts = live & (t % period == 0)
    ends = live & (((t + 1) % period == 0) | (t + 1 == last))
    lam = tl.load(lam_ptr)
    one = tl.where(live, 1.0, 0.0).to(tl.float64)
    decay = tl.where(starts, lam, 1.0)  # lanes past the end are the identity map
    new = tl.where(starts, one, 0.0)
    step = decay * delta
    _, _, _, _, m0, m1, m2 = tl.associative_scan((decay, step, 2 * step, step * delta, new, new * delta,
                                                  new * delta * delta), 0, _compose_second_moment)
    right_decay = tl.where(ends, lam, 1.0)
    right_new = tl.where(ends, one, 0.0)
    _, _, right, right_moment = tl.associative_scan((right_decay, right_decay * delta, right_new, right_new * delta),
                                                    0, _compose_first_moment, reverse=True)
    grad = 2 * (m0 * (right_moment - delta * right) + m1 * right)
    tl.store(grad_ptr + row, tl.where(live, grad, 0.0).to(grad_ptr.dtype.element_ty), mask=t < steps)
    tl.store(loss_ptr + b, tl.sum(tl.where(ends, m2, 0.0), 0).to(loss_ptr.dtype.element_ty))
    tl.store(weight_ptr + b, tl.sum(tl.where(ends, m0, 0.0), 0).to(weight_ptr.dtype.element_ty))


def pair_sum(log_pf, log_pterm, log_r, length, lam, period=1):
    """As flowkern.eager.pair_sum: (loss_b, weight_b, g (B, T)) in log_pf's dtype.  A program
    holds its row in BLOCK_T = T rounded up to a power of two lanes, so the kernel compiles
    once per power of two that T reaches (a handful for titles), not once per T."""
    batch, steps = log_pf.shape
    loss, weight = (torch.empty(batch, dtype=log_pf.dtype, device=log_pf.device) for _ in range(2))
    grad = torch.empty_like(log_pf)
    _pair_sum_kernel[(batch,)](log_pf, log_pf if log_pterm is None else log_pterm, log_r, length, loss, weight, grad,
                               steps, float64_scalar(lam, log_pf.device), NONTERMINAL_LOG_REWARD, period,
                               FLOWER=log_pterm is not None, BLOCK_T=triton.next_power_of_2(steps))
    return loss, weight, grad
