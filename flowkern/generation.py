"""Trie-constrained decoding: every sampled or recommended sequence is an item.

At a trie node s the model may only emit a child token of s; the constrained policy is
π(c | s) = softmax over the children of the logits (flowkern's `normalize="trie"`).

  mask_logits        logits with every non-child set to −inf (one vectorised CSR scatter)
  children_logits    only the children's logits, tokens and nodes, padded to the widest row
  sample             ancestral sampling of rollouts with a KV cache, per-row temperature
  recommend          beam search for the top-K items by sequence log-probability
  TrieLogitsProcessor  the same constraint for Hugging Face `model.generate`
  node_log_masses    log M_p(n), the collaborative mass of every trie node for each prompt
  D3LogitsProcessor  recommend's D3 ensemble (below) for `model.generate`

`sample` and `recommend` take restricted_head=True to run only the model's body and compute
the children's logits from its last hidden state and the output layer's rows at the
children's tokens (flowkern/head.py): the same policy without the (B, V) logits of a step.

D3's text-free ensemble ("Decoding Matters", Bao et al. 2024; the Flower paper's D3
baseline).  A collaborative model scores every item i for prompt p, s_p(i) ≥ 0; the mass of
node n is M_p(n) = Σ_{items i under n} s_p(i), and at node n the decoder scores child c by

    (1 − α) · log π(c | n) + α · log(M_p(c) / M_p(n)),   α ∈ [0, 1],

π the trie policy.  α = 0 is the trie policy alone; along an item the second terms add up
to log(s_p(i) / Σ_j s_p(j)), so α = 1 ranks by the collaborative model alone.  A child of
zero mass scores −inf when α > 0; a term of weight 0 is left out (0 · −inf is no NaN).
"""

import numbers
from typing import NamedTuple, Optional

import torch

from flowkern import head
from flowkern._checks import check_count, check_number, describe
from flowkern.models import forward_parameters
from flowkern.policy import trie_children
from flowkern.trie import Trie

try:
    from transformers import LogitsProcessor
except ImportError:  # generation works without transformers; only TrieLogitsProcessor needs it
    LogitsProcessor = object


class Children(NamedTuple):
    """The children of one node per row, padded to the widest row (B, D)."""

    logits: torch.Tensor  # the rows' logits at the children, −inf in padding
    tokens: torch.Tensor  # child token ids, the termination token in padding
    nodes: torch.Tensor   # child node ids, 0 in padding


def children_logits(logits: torch.Tensor, nodes: torch.Tensor, trie: Trie) -> Children:
    """Gather the logits of the children of `nodes[b]` from `logits[b]` (B, V); children
    are in ascending token order.  Reads Σ_b deg(nodes[b]) logits, nothing else.  A leaf
    (no children) gives a row of −inf."""
    _check_step(logits, nodes, trie)
    return _children(nodes, trie, _gathered(logits))


def _gathered(logits):
    """values(tokens, present) for _children: the logits at the children's tokens."""
    return lambda tokens, present: logits.gather(1, tokens).masked_fill(~present, float("-inf"))


def _children(nodes, trie, values):
    """Children of the padded layout, their logits from values(tokens (B, D), present (B, D))."""
    start = trie.offsets[nodes]
    degree = trie.offsets[nodes + 1] - start
    width = max(int(degree.max()), 1) if nodes.numel() else 1
    slot = torch.arange(width, device=nodes.device)
    present = slot < degree[:, None]
    edges = torch.where(present, start[:, None] + slot, 0)
    tokens = torch.where(present, trie.tokens[edges].long(), trie.eos_token_id)
    return Children(values(tokens, present), tokens, torch.where(present, edges + 1, 0))


def mask_logits(logits: torch.Tensor, nodes: torch.Tensor, trie: Trie, *, inplace: bool = False) -> torch.Tensor:
    """`logits` (B, V) with every token that is not a child of `nodes[b]` set to −inf, padded
    vocabulary columns included.  `inplace=True` writes into `logits` and returns it."""
    _check_step(logits, nodes, trie)
    row, edges, _ = trie_children(nodes, trie)
    columns = trie.tokens[edges].long()
    kept = logits[row, columns]
    out = logits.fill_(float("-inf")) if inplace else torch.full_like(logits, float("-inf"))
    out[row, columns] = kept
    return out


class Samples(NamedTuple):
    """Rollouts from `sample`, one row per (prompt, sample), prompt-major."""

    tokens: torch.Tensor     # (R, T) int64: the item's tokens and the termination token, then termination tokens
    lengths: torch.Tensor    # (R,) tokens per row, termination token included
    items: torch.Tensor      # (R,) item id of the leaf reached (the smallest id if items share a title)
    log_probs: Optional[torch.Tensor]  # (R, T) log-probability of each sampled token under the
    #                                    distribution it was drawn from (tempered, trie-masked); 0 after the end


@torch.no_grad()
def sample(model, prompt_ids, trie: Trie, num_samples: int = 1, temperature=1.0, max_len: Optional[int] = None, *,
           generator: Optional[torch.Generator] = None, return_log_probs: bool = False,
           restricted_head=False) -> Samples:
    """Draw `num_samples` items per prompt from the trie-constrained policy of `model`, token
    by token with the model's KV cache, each row stopping at its termination token.

    model:       a Hugging Face causal LM (any module with the same call signature); it runs as
                 it is, so call `model.eval()` first to sample without dropout.
    prompt_ids:  a list of token-id sequences (ragged; left-padded here) or a (P, S) tensor.
    temperature: a number or a (P · num_samples,) tensor, one per row: the children's logits
                 are divided by it before the softmax.
    max_len:     the most tokens a row may take, termination included; default and minimum:
                 `trie.depth`, so that every item fits.
    restricted_head: run only the model's body and take the children's logits from its last
                 hidden state and the output layer (which must be a plain torch.nn.Linear,
                 under a peft wrapper or not): the same distribution, without V logits a step.
                 True checks the model's split with flowkern.head.linear_head on every call;
                 pass that function's result instead to check it once.
    """
    decoder = _Decoder(model, prompt_ids, trie, restricted_head)
    check_count("num_samples", num_samples)
    rows = decoder.batch * num_samples
    temperature = _row_values("temperature", temperature, rows, decoder.device)
    max_len = trie.depth if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < trie.depth:
        raise ValueError(f"max_len must be an int >= {trie.depth} (the deepest item with its termination token), "
                         f"got {max_len!r}")
    decoder.repeat(num_samples)
    eos = trie.eos_token_id
    tokens = torch.full((rows, max_len), eos, dtype=torch.long, device=decoder.device)
    log_probs = torch.zeros(rows, max_len, device=decoder.device)
    node = torch.zeros(rows, dtype=torch.long, device=decoder.device)
    done = torch.zeros(rows, dtype=torch.bool, device=decoder.device)
    steps = 0
    for t in range(max_len):
        children = decoder.children(node)
        policy = torch.log_softmax(children.logits.float() / temperature[:, None], dim=-1)
        pick = torch.multinomial(policy.exp(), 1, generator=generator)
        token = torch.where(done, eos, children.tokens.gather(1, pick)[:, 0])
        tokens[:, t] = token
        log_probs[:, t] = torch.where(done, 0.0, policy.gather(1, pick)[:, 0])
        done |= token == eos
        node = torch.where(done, 0, children.nodes.gather(1, pick)[:, 0])
        steps = t + 1
        if bool(done.all()):
            break
        decoder.step(token)
    tokens, log_probs = tokens[:, :steps], log_probs[:, :steps]
    walk = trie.walk(tokens)
    return Samples(tokens, walk.length + 1, walk.item, log_probs if return_log_probs else None)


class Recommendations(NamedTuple):
    """Top-K items per prompt from `recommend`, best first."""

    items: torch.Tensor    # (P, K) item ids (the smallest id if items share a title), −1 where fewer exist
    scores: torch.Tensor   # (P, K) sequence log-probabilities under the trie policy (with item_scores: the
    #                        sums of D3's mixed scores), −inf where fewer exist
    titles: Optional[list]  # titles[p][j] of items[p, j] when `titles` was given


@torch.no_grad()
def recommend(model, prompt_ids, trie: Trie, k: int = 10, *, num_beams: Optional[int] = None, titles=None,
              length_normalize: bool = False, temperature: float = 1.0, restricted_head=False,
              batch_size: Optional[int] = None, item_scores: Optional[torch.Tensor] = None,
              alpha: float = 0.0) -> Recommendations:
    """The K best distinct items for each prompt by beam search under the trie-constrained
    policy, ranked by sequence log-probability Σ_t log π_t (termination token included).

    num_beams:        partial titles kept per prompt and step (default k).  Every completed
                      item is kept, and a prompt's search stops once none of its partial titles
                      can beat its K-th completed one (log π ≤ 0: a title only loses score as it
                      grows), so with num_beams ≥ the number of items the result is the exact top-K.
    length_normalize: rank by log-probability per token instead (D3 found this hurts
                      recommendation, so it is off by default); scores stay unnormalised.
    titles:           a sequence of item titles indexed by item id, to return them too.
    temperature:      the children's logits are divided by it (the "Temp" baseline); scores are
                      then log-probabilities of that tempered policy.
    restricted_head:  as for `sample`.
    batch_size:       prompts searched together, their beams one batch of the model (default:
                      all).  The prompts are sorted by length first, so that a batch pads little;
                      the results come back in the order of `prompt_ids`.
    item_scores, alpha: D3's ensemble (module docstring): a collaborative model's (P, num_items)
                      scores, finite, ≥ 0, each row summing to > 0 (a softmax over SASRec's
                      logits, say), and the weight α ∈ [0, 1] of their log shares.  Each step
                      then scores a child (1 − α) log π + α log(M_p(c) / M_p(n)), and the
                      returned scores are these sums.  Each term is ≤ 0, so the early stop
                      above still holds.  α = 0 (the default) is the trie policy alone; a
                      batch's P × num_nodes masses (node_log_masses) are held while it searches.
    """
    _device(model, trie)
    check_count("k", k)
    check_number("temperature", temperature, positive=True)
    if k > trie.num_items:
        raise ValueError(f"k = {k} exceeds the number of items ({trie.num_items})")
    beams = k if num_beams is None else num_beams
    check_count("num_beams", beams)
    if titles is not None and len(titles) != trie.num_items:
        raise ValueError(f"titles must hold one title per item ({trie.num_items}), got {len(titles)}")
    if batch_size is not None:
        check_count("batch_size", batch_size)
    alpha = _check_alpha(alpha)
    prompts = _prompt_rows(prompt_ids)
    if item_scores is not None:
        _check_item_scores(item_scores, trie, len(prompts))
    elif alpha > 0:
        raise ValueError(f"alpha = {alpha} weighs item_scores, but item_scores is None")
    mixing = item_scores is not None and alpha > 0
    batches = _length_batches(prompts, batch_size)
    restricted_head = _linear_head(model, restricted_head)
    found = [_beam_search(_Decoder(model, [prompts[i] for i in batch], trie, restricted_head), k, beams,
                          length_normalize, temperature, alpha=alpha,
                          log_mass=node_log_masses(item_scores[batch], trie) if mixing else None)
             for batch in batches]
    inverse = torch.tensor([i for batch in batches for i in batch]).argsort().to(found[0][0].device)
    key, score, leaf = (torch.cat(parts)[inverse] for parts in zip(*found))
    items = torch.where(key > float("-inf"), trie.leaf_item(leaf), -1)
    names = None if titles is None else [[titles[i] for i in row if i >= 0] for row in items.tolist()]
    return Recommendations(items, torch.where(key > float("-inf"), score, float("-inf")), names)


def _length_batches(prompts, batch_size):
    """Indices of the prompts, longest first, in batches of `batch_size` (one batch if None)."""
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].numel())
    size = len(prompts) if batch_size is None else batch_size
    return [order[start:start + size] for start in range(0, len(order), size)]


def _beam_search(decoder, k, beams, length_normalize, temperature, log_mass=None, alpha=0.0):
    """(key, score, leaf), each (P, K): the K best completed items of each of the decoder's
    prompts by ranking key, their log-probabilities and leaf nodes (key −inf where fewer).
    With `log_mass` (P, num_nodes), the decoder's prompts' node_log_masses, each step's
    log-probabilities are D3's mixed scores with weight `alpha` instead.

    Each prompt starts as one beam (its prefilled state) and keeps at most `beams`; a prompt
    leaves the model's batch once its search is over, a beam with no candidate left waits at a
    leaf (no children, so it widens no row of children)."""
    trie, device, eos = decoder.trie, decoder.device, decoder.trie.eos_token_id
    prompts = decoder.batch
    parked = trie.leaf_nodes[0].long().to(device)
    best_key = torch.full((prompts, k), float("-inf"), device=device)
    best_score = best_key.clone()
    best_leaf = torch.zeros(prompts, k, dtype=torch.long, device=device)
    active = torch.arange(prompts, device=device)  # the prompts still searching, in the decoder's order
    score = torch.zeros(prompts, 1, device=device)  # (active, beams so far)
    node = torch.zeros(prompts, dtype=torch.long, device=device)
    for t in range(trie.depth):
        children = decoder.children(node)
        width = children.tokens.shape[1]
        live, held = score.shape
        policy = torch.log_softmax(children.logits.float() / temperature, -1)  # NaN in a parked beam's row
        if log_mass is not None:  # decoder.prompt: the prompt of each beam (row), as beams move
            shares = _log_shares(log_mass, decoder.prompt[:, None], node[:, None], children.nodes)
            policy = _mixed(policy, torch.where(children.nodes > 0, shares, float("-inf")), alpha)
        candidate = torch.where(score.view(-1, 1) > float("-inf"), score.view(-1, 1) + policy, float("-inf"))
        candidate = candidate.view(live, -1)
        ends = (children.tokens == eos).view(live, -1)
        completed = torch.where(ends, candidate, float("-inf"))
        key = completed / (t + 1) if length_normalize else completed
        top_key, order = torch.cat([best_key[active], key], 1).topk(k, dim=1)
        best_score[active] = torch.cat([best_score[active], completed], 1).gather(1, order)
        best_leaf[active] = torch.cat([best_leaf[active], children.nodes.view(live, -1)], 1).gather(1, order)
        best_key[active] = top_key

        score, pick = torch.where(ends, float("-inf"), candidate).topk(min(beams, candidate.shape[1]), dim=1)
        # no partial title can gain score (each step's term is ≤ 0, a log π or D3's mix of two)
        searching = score[:, 0] > (float("-inf") if length_normalize else top_key[:, -1])
        if not bool(searching.any()):
            break
        kept = searching.nonzero()[:, 0]
        active, score, pick = active[kept], score[kept], pick[kept]
        source = (kept[:, None] * held + pick // width).view(-1)
        flat = source * width + (pick % width).view(-1)
        node = torch.where(score.view(-1) > float("-inf"), children.nodes.view(-1)[flat], parked)
        decoder.select(source)
        decoder.step(children.tokens.view(-1)[flat])
    return best_key, best_score, best_leaf


def node_log_masses(item_scores: torch.Tensor, trie: Trie) -> torch.Tensor:
    """log M_p(n) = log Σ_{items i under n} s_p(i) for each row p of `item_scores` (P,
    num_items; finite, ≥ 0, each row summing to > 0) and every trie node n: a (P, num_nodes)
    float64 tensor on the trie's device, −inf where no item below n scores > 0.  Items that
    share a title each count.  Bottom up: the scores are added onto their leaves, then each
    depth's masses into their parents, one vectorised index_add a depth.  Holds P × num_nodes
    float64 values (8 bytes each) and a float64 copy of the scores."""
    _check_trie(trie)
    _check_item_scores(item_scores, trie, None)
    mass = torch.zeros(item_scores.shape[0], trie.num_nodes, dtype=torch.float64, device=trie.device)
    mass.index_add_(1, trie.item_leaf.long(), item_scores.to(trie.device, torch.float64))
    nodes = torch.arange(1, trie.num_nodes, device=trie.device)
    parent = torch.searchsorted(trie.offsets, nodes - 1, right=True) - 1  # node n's edge n − 1 is its parent's
    levels = trie.level_offsets.tolist()
    for above, begin, end in reversed(list(zip(levels, levels[1:-1], levels[2:]))):
        mass[:, above:begin].index_add_(1, parent[begin - 1:end - 1] - above, mass[:, begin:end])
    return mass.log()


def _log_shares(log_mass, prompt, node, child):
    """log(M_p(c) / M_p(n)) of rows p = prompt of `log_mass`, nodes n and their children c
    (indices that broadcast together), float32; −inf where M_p(c) = 0 (never NaN)."""
    child_mass = log_mass[prompt, child]
    return torch.where(child_mass > float("-inf"), child_mass - log_mass[prompt, node], float("-inf")).float()


def _mixed(log_policy, log_shares, alpha):
    """(1 − α) · log π + α · log share, a term of weight 0 left out."""
    if alpha == 0:
        return log_policy
    if alpha == 1:
        return log_shares
    return (1 - alpha) * log_policy + alpha * log_shares


class TrieLogitsProcessor(LogitsProcessor):
    """Constrain Hugging Face `model.generate` to the items of a trie.

        processor = TrieLogitsProcessor(trie, prompt_length=input_ids.shape[1])
        model.generate(input_ids, logits_processor=[processor], ...)

    Each call walks the tokens generated after `prompt_length` (the padded prompt width) to
    their trie node and returns the scores renormalised over that node's children, −inf
    elsewhere: log π of the trie policy.  With sampling this equals `sample`; with beam
    search and `length_penalty=0` the beams are ranked as in `recommend`.  Rows that have
    finished an item may only repeat the termination token (or `pad_token_id`).  NaN or +inf
    scores at a row's children are refused; a row whose children all score −inf stays −inf."""

    def __init__(self, trie: Trie, prompt_length: int, pad_token_id: Optional[int] = None):
        _check_trie(trie)
        check_count("prompt_length", prompt_length)
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                         or pad_token_id < 0):
            raise ValueError(f"pad_token_id must be None or a token id >= 0, got {pad_token_id!r}")
        self.trie, self.prompt_length, self.pad_token_id = trie, prompt_length, pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is not None and self.pad_token_id >= scores.shape[-1]:
            raise ValueError(f"pad_token_id = {self.pad_token_id} is not a token id of scores with "
                             f"V = {scores.shape[-1]} columns")
        generated = input_ids[:, self.prompt_length:]
        walk = self.trie.walk(generated)
        node = walk.nodes[:, -1]
        finished = (walk.length >= 0) | (node < 0)  # ended an item, or left the trie
        node = torch.where(finished, 0, node)
        masked = mask_logits(scores, node, self.trie)
        _check_children_scores("scores", masked.masked_fill(finished[:, None], 0.0), allow_all_minus_inf=True)
        lse = torch.logsumexp(masked, dim=-1, keepdim=True)
        allowed = torch.where(lse > float("-inf"), masked - lse, float("-inf"))
        ended = torch.full_like(scores, float("-inf"))
        for token in {self.trie.eos_token_id, self.pad_token_id} - {None}:
            ended[:, token] = 0.0
        return torch.where(finished[:, None], ended, self._next_token_scores(allowed, node))

    def _next_token_scores(self, log_policy, node):
        """The scores of the rows still in an item, at trie nodes `node`: the trie policy's."""
        return log_policy


class D3LogitsProcessor(TrieLogitsProcessor):
    """`recommend(..., item_scores, alpha)` for Hugging Face `model.generate`: as
    TrieLogitsProcessor (the same walk, termination and checks), but a child c of a row's
    node n scores D3's (1 − α) log π(c | n) + α log(M_p(c) / M_p(n)) (module docstring).

        processor = D3LogitsProcessor(trie, input_ids.shape[1], item_scores, alpha, num_beams=4)
        model.generate(input_ids, logits_processor=[processor], num_beams=4, length_penalty=0.0, ...)

    item_scores is (P, num_items), a row per prompt of input_ids (finite, ≥ 0, each row
    summing to > 0); `generate` runs num_beams rows per prompt, prompt-major, so row r is
    prompt r // num_beams (when sampling, pass num_return_sequences as num_beams).  Its
    node_log_masses, P × num_nodes float64, are computed here and held."""

    def __init__(self, trie: Trie, prompt_length: int, item_scores: torch.Tensor, alpha: float,
                 pad_token_id: Optional[int] = None, num_beams: int = 1):
        super().__init__(trie, prompt_length, pad_token_id)
        check_count("num_beams", num_beams)
        self.alpha, self.num_beams = _check_alpha(alpha), num_beams
        self.log_mass = node_log_masses(item_scores, trie)

    def _next_token_scores(self, log_policy, node):
        prompts = self.log_mass.shape[0]
        if node.shape[0] != prompts * self.num_beams:
            raise ValueError(f"input_ids has {node.shape[0]} rows, but item_scores' {prompts} prompts × num_beams = "
                             f"{self.num_beams} make {prompts * self.num_beams}")
        row, edges, _ = trie_children(node, self.trie)
        shares = torch.full_like(log_policy, float("-inf"))
        shares[row, self.trie.tokens[edges].long()] = _log_shares(
            self.log_mass, row // self.num_beams, node[row], edges + 1).to(shares.dtype)
        return _mixed(log_policy, shares, self.alpha)


class _Decoder:
    """A batch of prompts decoded in step with a KV cache: `state` holds each row's next-token
    logits (B, V), or with the restricted head its last hidden state (B, H); `children` gives
    the children's logits at each row's node and `step` appends one token per row."""

    def __init__(self, model, prompt_ids, trie, restricted_head):
        self.trie = trie
        self.device = _device(model, trie)
        self.head = _linear_head(model, restricted_head)
        self.runner = model if self.head is None else self.head.body
        input_ids, self.attention_mask = _left_pad(prompt_ids, self.device)
        self.batch = input_ids.shape[0]
        parameters = forward_parameters(self.runner)
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache = _new_cache()
        self.prompt = torch.arange(input_ids.shape[0], device=self.device)  # each row's prompt
        self.prompt_width = input_ids.shape[1]
        self.positions = self.attention_mask.sum(1)
        self.state = self._run(input_ids, (self.attention_mask.cumsum(1) - 1).clamp(min=0))
        vocab = self.state.shape[-1] if self.head is None else self.head.weight.shape[0]
        if trie.max_token >= vocab:
            raise ValueError(f"the model's logits have V = {vocab} columns but the trie holds token id "
                             f"{trie.max_token}")

    def children(self, nodes: torch.Tensor) -> Children:
        if self.head is None:
            children = _children(nodes, self.trie, _gathered(self.state))
        else:
            weight, bias = self.head.weight, self.head.bias
            children = _children(nodes, self.trie, lambda tokens, present: head.children_logits(
                self.state, weight, bias, nodes, self.trie, tokens.shape[1]))
        leaf = self.trie.offsets[nodes + 1] == self.trie.offsets[nodes]  # a parked beam: no child to take
        _check_children_scores("the model's logits", children.logits, allow_all_minus_inf=leaf)
        return children

    def repeat(self, times: int) -> None:
        """Every row `times` times in a row (prompt-major)."""
        self.select(torch.arange(self.state.shape[0], device=self.device).repeat_interleave(times))

    def select(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i].  Where every row keeps its prompt (a beam search step), the
        cache's prompt columns, alike in the rows of a prompt, stay and only the generated ones
        move (in place; transformers ≥ 4.56 keeps a cache layer's keys and values in tensors)."""
        prompt = self.prompt[rows]
        layers = getattr(self.cache, "layers", None)
        if layers is not None and torch.equal(prompt, self.prompt):
            for cached in (tensor for layer in layers for tensor in (layer.keys, layer.values)):
                cached[:, :, self.prompt_width:] = cached[rows, :, self.prompt_width:]
        else:
            self.cache.reorder_cache(rows)
        self.prompt = prompt
        self.attention_mask, self.positions, self.state = (
            self.attention_mask[rows], self.positions[rows], self.state[rows])

    def step(self, tokens: torch.Tensor) -> None:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)], 1)
        self.state = self._run(tokens[:, None], self.positions[:, None])
        self.positions = self.positions + 1

    def _run(self, input_ids, position_ids):
        out = self.runner(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                          use_cache=True, **{self.cache_keyword: self.cache}, **self.keep_last)
        return (out.logits if self.head is None else out.last_hidden_state)[:, -1]


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _linear_head(model, restricted_head) -> Optional[head.LinearHead]:
    """restricted_head as given if it is a LinearHead, the model's own if True, else None."""
    if isinstance(restricted_head, head.LinearHead):
        return restricted_head
    return head.linear_head(model) if restricted_head else None


def _device(model, trie) -> torch.device:
    """The model's device, which must be the trie's."""
    _check_trie(trie)
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if trie.device != device:
        raise ValueError(f"trie is on {trie.device} but the model is on {device}: use trie.to({device!r})")
    return device


def _left_pad(prompt_ids, device):
    """(input_ids, attention_mask), both (P, S), prompts aligned to the right."""
    rows = _prompt_rows(prompt_ids)
    width = max(row.numel() for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - row.numel():] = row
        attention_mask[i, width - row.numel():] = 1
    return input_ids.to(device), attention_mask.to(device)


def _prompt_rows(prompt_ids):
    """The prompts, a list of token-id sequences or a (P, S) tensor, as P int64 vectors."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2 or prompt_ids.dtype.is_floating_point or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be a (P, S) integer tensor with S >= 1 or a list of token-id "
                             f"sequences, got {describe(prompt_ids)}")
        return list(prompt_ids.long().cpu())
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__") or len(prompt_ids) == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of token-id sequences or a (P, S) tensor, "
                         f"got {describe(prompt_ids)}")
    rows = [torch.as_tensor(p, dtype=torch.long).view(-1) for p in prompt_ids]
    if any(row.numel() == 0 for row in rows):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    return rows


def _row_values(name, value, rows, device):
    """A number or a (rows,) tensor of finite positive values, as a float32 (rows,) tensor."""
    if isinstance(value, torch.Tensor):
        if value.shape != (rows,):
            raise ValueError(f"{name} must be a number or a ({rows},) tensor (one per row), got shape "
                             f"{tuple(value.shape)}")
        if not bool((torch.isfinite(value) & (value > 0)).all()):
            raise ValueError(f"{name} must be finite and > 0, got {value.tolist()}")
        return value.to(device, torch.float32)
    check_number(name, value, positive=True)
    return torch.full((rows,), float(value), device=device)


def _check_children_scores(name, values, allow_all_minus_inf):
    """`values` (B, ·): the children's logits of each row, −inf elsewhere; NaN or +inf is
    refused, and so is a row of −inf only unless allowed (a bool, or a (B,) bool tensor)."""
    bad = torch.isnan(values) | torch.isposinf(values)
    allowed = torch.as_tensor(allow_all_minus_inf, device=values.device)
    empty = (values == float("-inf")).all(1) & ~allowed
    if not bool((bad.any(1) | empty).any()):
        return
    b = int((bad.any(1) | empty).nonzero()[0])
    if bool(empty[b]):
        raise ValueError(f"{name} give every child of row {b}'s trie node −inf: the trie policy has no item to take")
    raise ValueError(f"{name} hold NaN or +inf at the trie children of row {b}: "
                     f"{values[b][bad[b]].tolist()[:4]}; the trie policy needs finite logits there")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_item_scores(item_scores, trie, prompts):
    """item_scores must be a (prompts, num_items) float tensor (any rows if prompts is None),
    finite, ≥ 0, each row with a sum > 0 and finite."""
    rows = "P" if prompts is None else prompts
    if not isinstance(item_scores, torch.Tensor) or not item_scores.dtype.is_floating_point \
            or item_scores.dim() != 2 or item_scores.shape[1] != trie.num_items \
            or (prompts is not None and item_scores.shape[0] != prompts):
        raise ValueError(f"item_scores must be a ({rows}, {trie.num_items}) float tensor, a score per prompt and "
                         f"item, got {describe(item_scores)}")
    bad = ~torch.isfinite(item_scores) | (item_scores < 0)
    if bool(bad.any()):
        p = int(bad.any(1).nonzero()[0])
        raise ValueError(f"item_scores must be finite and >= 0, got {item_scores[p][bad[p]].tolist()[:4]} in row {p}")
    total = item_scores.double().sum(1)
    wrong = ~(torch.isfinite(total) & (total > 0))
    if bool(wrong.any()):
        p = int(wrong.nonzero()[0])
        raise ValueError(f"item_scores must have a finite sum > 0 in every row, got {float(total[p])} in row {p}")


def _check_trie(trie):
    if not isinstance(trie, Trie):
        raise TypeError(f"trie must be a flowkern.Trie, got {type(trie).__name__}")


def _check_step(logits, nodes, trie):
    _check_trie(trie)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (B, V) tensor, got {describe(logits)}")
    if not isinstance(nodes, torch.Tensor) or nodes.shape != logits.shape[:1] or nodes.dtype != torch.long:
        raise ValueError(f"nodes must be a ({logits.shape[0]},) int64 tensor of trie node ids, got {describe(nodes)}")
    if logits.device != trie.device or nodes.device != trie.device:
        raise ValueError(f"logits ({logits.device}), nodes ({nodes.device}) and trie ({trie.device}) must share a "
                         f"device")
    if trie.max_token >= logits.shape[1]:
        raise ValueError(f"logits have V = {logits.shape[1]} columns but the trie holds token id {trie.max_token}")
    if nodes.numel() and not (0 <= int(nodes.min()) and int(nodes.max()) < trie.num_nodes):
        raise ValueError(f"nodes must be trie node ids in [0, {trie.num_nodes - 1}], got values in "
                         f"[{int(nodes.min())}, {int(nodes.max())}]")
