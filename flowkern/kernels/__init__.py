"""Triton kernels behind flowkern.subtb_loss (backend="triton"): the four stages of
flowkern/eager.py, each kernel family in its own file with its launch wrapper beside it.

  walk.py     trie walk + personalised process rewards, one program per trajectory
  policy.py   log π forward (online log-sum-exp over V, or over the children only) and the
              one-pass gradient over the logits, one program per (b, t) row
  subtb.py    SubTB pair sum and its gradient by two O(T) scans, one program per trajectory
  head.py     the restricted head (flowkern.linear_subtb_loss): log π and its gradient under the
              trie policy from hidden states and the children's rows of W, one program per
              tile of rows at one trie node (matrix products by tl.dot)

Imported on first use, so CPU users need no triton.  Kernels decorated while
TRITON_INTERPRET=1 run in the Triton interpreter, on CPU tensors too (INTERPRETED).
"""

from triton.runtime.interpreter import InterpretedFunction

from flowkern.kernels import head
from flowkern.kernels.policy import log_probs, logits_grad
from flowkern.kernels.subtb import pair_sum
from flowkern.kernels.walk import _walk_kernel, walk_rewards

INTERPRETED = isinstance(_walk_kernel, InterpretedFunction)

__all__ = ["walk_rewards", "log_probs", "pair_sum", "logits_grad", "head", "INTERPRETED"]
