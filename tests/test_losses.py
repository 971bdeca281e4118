"""flowkern.SubTBLoss and flowkern.LinearSubTBLoss: the functional ops as nn.Modules."""

import pytest
import torch

import flowkern


def catalogue():
    trie = flowkern.Trie.build([[3, 4], [3, 5], [6]], [5.0, 2.0, 1.0], eos_token_id=2)
    tokens = torch.tensor([[3, 4, 2], [6, 2, 0], [3, 5, 2]])
    return trie, tokens


@pytest.mark.parametrize("options", [{}, {"lam": 0.9, "normalize": "full"}, {"form": "flower", "reduction": "none"}])
def test_modules_equal_the_functional_ops(options):
    trie, tokens = catalogue()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 3, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64)
    module = flowkern.LinearSubTBLoss(trie, **options)
    got = module(hidden, weight, tokens, rewards)
    want = flowkern.linear_subtb_loss(hidden, weight, trie, rewards, tokens=tokens, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    logits = hidden @ weight.T
    torch.testing.assert_close(flowkern.SubTBLoss(trie, **options)(logits, tokens, rewards),
                               flowkern.subtb_loss(logits, trie, rewards, tokens=tokens, **options), rtol=0, atol=0)
    got.sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    assert "items=3" in repr(module) and isinstance(module, torch.nn.Module)


def test_modules_refuse_a_trie_that_is_not_one():
    with pytest.raises(TypeError, match="trie must be a flowkern.Trie, got list"):
        flowkern.SubTBLoss([[3, 4]])
