"""Constrained decoding the way the published code does it: one dict walk and one
`torch.isin` over the whole vocabulary per row.  The oracle for flowkern.mask_logits and
the baseline its speed is measured against.  And D3's ensemble by brute force, the oracle
for flowkern.recommend(..., item_scores, alpha)."""

import math

import torch


def isin_mask(logits, prefixes, trie):
    """`logits` (B, V) with every token outside the children of each row's prefix set to −inf.
    `prefixes[b]` is the list of tokens generated so far; `trie` is a reference DictTrie."""
    out = logits.clone()
    vocabulary = torch.arange(logits.shape[1], device=logits.device)
    for b, prefix in enumerate(prefixes):
        node = trie.root
        for token in prefix:
            node = node.children[token]
        allowed = torch.tensor(sorted(node.children), device=logits.device)
        out[b, ~torch.isin(vocabulary, allowed)] = float("-inf")
    return out


def d3_top_k(model, prompt, trie, item_scores, alpha, k, temperature=1.0):
    """The k best titles for one prompt (a list of token ids) by D3's ensemble, every item of
    the reference DictTrie `trie` scored token by token: a full forward pass of the model on
    prompt + prefix at each prefix, log π = the children's tempered log-softmax, mass = the
    summed `item_scores` (one per item) below a node.  Returns [(canonical item, score)], best
    first, without items of score −inf."""
    def mixed(log_pi, log_share):  # (1 − α) log π + α log share, a term of weight 0 left out as flowkern does
        return sum(weight * value for weight, value in ((1 - alpha, log_pi), (alpha, log_share)) if weight > 0)

    scored = []
    for leaf, sequence in _titles(trie.root, []):
        node, score = trie.root, 0.0
        for t, token in enumerate(sequence):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + sequence[:t]])).logits[0, -1].double() / temperature
            children = sorted(node.children)
            log_pi = float(logits[token] - torch.logsumexp(logits[children], 0))
            child = node.children[token]
            child_mass = mass(child, item_scores)  # > 0 only where the node's is
            log_share = math.log(child_mass / mass(node, item_scores)) if child_mass > 0 else float("-inf")
            score += mixed(log_pi, log_share)
            node = child
        if score > float("-inf"):
            scored.append((min(leaf.items), score))
    return sorted(scored, key=lambda pair: -pair[1])[:k]


def mass(node, item_scores):
    """Σ of `item_scores` (one per item) over the items below a DictTrie node."""
    return sum(item_scores[i] for i in node.items) + sum(mass(child, item_scores) for child in node.children.values())


def _titles(node, prefix):
    """(leaf, its tokens with the termination token) of every leaf below `node`."""
    if node.items:
        yield node, prefix
    for token, child in node.children.items():
        yield from _titles(child, prefix + [token])
