"""flowkern: fast Flower (flow-guided fine-tuning) losses for LLM recommenders.

    trie = flowkern.Trie.build(item_token_ids, item_rewards, eos_token_id=198)
    loss = flowkern.subtb_loss(logits, trie, tokens=trajectories)
    loss = flowkern.linear_subtb_loss(hidden, lm_head.weight, trie, tokens=trajectories)  # no logits formed
    loss = flowkern.balance_loss(logits, trie, log_rewards, tokens=trajectories, log_z=log_z)  # GFlowGR's TB
    trainer = flowkern.FlowerTrainer(model, flowkern.FlowerConfig(...), flowkern.load_task(...))
    tokenizer = flowkern.add_code_tokens(model, tokenizer, flowkern.SemanticIDs.fit(item_embeddings))  # items as codes
"""

from flowkern.balance import balance_loss, linear_balance_loss
from flowkern.generation import (Children, D3LogitsProcessor, Recommendations, Samples, TrieLogitsProcessor,
                                 children_logits, mask_logits, node_log_masses, recommend, sample)
from flowkern.ops import (NONTERMINAL_LOG_REWARD, linear_sequence_log_probs, linear_subtb_loss, modified_subtb_loss,
                          sequence_log_probs, subtb_loss)
from flowkern.head import LinearHead, linear_head
from flowkern.losses import BalanceLoss, LinearSubTBLoss, SubTBLoss
from flowkern.semantic_ids import CodeTokenizer, SemanticIDs, add_code_tokens, rq_kmeans
from flowkern.trie import Trie, TrieWalk

__version__ = "0.1.0"
__all__ = ["Trie", "TrieWalk", "subtb_loss", "modified_subtb_loss", "sequence_log_probs", "NONTERMINAL_LOG_REWARD",
           "linear_subtb_loss", "linear_sequence_log_probs", "balance_loss", "linear_balance_loss",
           "sample", "Samples", "recommend", "Recommendations", "mask_logits", "children_logits", "Children",
           "TrieLogitsProcessor", "node_log_masses", "D3LogitsProcessor", "SubTBLoss", "LinearSubTBLoss",
           "BalanceLoss", "linear_head", "LinearHead", "SemanticIDs", "rq_kmeans", "CodeTokenizer", "add_code_tokens",
           "FlowerTrainer", "FlowerConfig", "load_task"]


def __getattr__(name):
    """The trainer's names, imported on first use (they need transformers, the [train] extra)."""
    if name in ("FlowerTrainer", "FlowerConfig"):
        from flowkern import trainer

        return getattr(trainer, name)
    if name == "load_task":
        from flowkern.data import load_task

        return load_task
    raise AttributeError(f"module 'flowkern' has no attribute {name!r}")
