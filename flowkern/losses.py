"""The SubTB and GFlowGR losses as torch.nn.Modules, for code that composes losses as modules.

    loss_fn = flowkern.SubTBLoss(trie, lam=0.9)
    loss = loss_fn(logits, tokens)                       # = flowkern.subtb_loss(logits, trie, tokens=tokens, lam=0.9)
    loss_fn = flowkern.LinearSubTBLoss(trie)
    loss = loss_fn(hidden, lm_head.weight, tokens)        # no (B, T, V) logits formed
    loss_fn = flowkern.BalanceLoss(trie, form="tb")
    loss = loss_fn(logits, tokens, log_rewards, log_z=log_z)   # = flowkern.balance_loss(...)

The options are fixed at construction (those of flowkern.subtb_loss); the trie follows the
inputs' device (moved once, then kept).
"""

import torch

from flowkern.balance import balance_loss
from flowkern.ops import linear_subtb_loss, subtb_loss
from flowkern.trie import Trie


class _TrieLoss(torch.nn.Module):
    def __init__(self, trie: Trie, **options):
        super().__init__()
        if not isinstance(trie, Trie):
            raise TypeError(f"trie must be a flowkern.Trie, got {type(trie).__name__}")
        self.trie, self.options = trie, options

    def _trie_on(self, device) -> Trie:
        if self.trie.device != device:
            self.trie = self.trie.to(device)
        return self.trie

    def extra_repr(self) -> str:
        return f"items={self.trie.num_items}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SubTBLoss(_TrieLoss):
    """forward(logits (B, T, V), tokens (B, T), rewards=None) -> flowkern.subtb_loss."""

    def forward(self, logits, tokens, rewards=None):
        return subtb_loss(logits, self._trie_on(logits.device), rewards, tokens=tokens, **self.options)


class LinearSubTBLoss(_TrieLoss):
    """forward(hidden (B, T, H), weight (V, H), tokens (B, T), rewards=None, bias=None) ->
    flowkern.linear_subtb_loss: the loss of hidden @ weight.T + bias without forming it."""

    def forward(self, hidden, weight, tokens, rewards=None, bias=None):
        return linear_subtb_loss(hidden, weight, self._trie_on(hidden.device), rewards, tokens=tokens, bias=bias,
                                 **self.options)


class BalanceLoss(_TrieLoss):
    """forward(logits (B, T, V), tokens (B, T), log_rewards (B,), log_z=None, log_flows=None) ->
    flowkern.balance_loss: GFlowGR's TB (log_z) or DB (log_flows), the form fixed at construction."""

    def forward(self, logits, tokens, log_rewards, log_z=None, log_flows=None):
        return balance_loss(logits, self._trie_on(logits.device), log_rewards, tokens=tokens, log_z=log_z,
                            log_flows=log_flows, **self.options)
