"""Semantic IDs: each item as a short tuple of codes the LLM generates token by token
(TIGER, arXiv 2305.05065; LETTER, arXiv 2405.07314; GFlowGR), instead of its title.

Residual k-means (RQ-KMeans) quantises the item embeddings x_i level by level:

    r_i^0 = x_i,    c_i^l = argmin_k |r_i^l - C^l_k|,    r_i^(l+1) = r_i^l - C^l_(c_i^l)

with C^l the k-means centroids of the level-l residuals (k-means++ seeding and Lloyd
iterations from a seeded `torch.Generator`; a cluster left empty is re-seeded at the point
farthest from its centroid).  A last level tells apart the items whose codes still collide:
the j-th item (in id order) sharing a prefix gets code j.  Item i becomes the text
"<a_12><b_3><c_40><d_0>", one new token per code: `add_code_tokens` appends the
vocabulary of (levels + 1) × codebook_size tokens to the LLM (rows drawn on the scale of the
old ones), so the trie of items is the trie of these texts.  A few thousand items × 64 dimensions is small: plain torch in float64
on the CPU, no faiss or scikit-learn.

The embeddings come from the collaborative model (`sasrec_item_embeddings`) or from the
LLM itself (`title_embeddings`: its last hidden state, mean-pooled over each title's tokens).
"""

import hashlib
import json
import os
import re
from itertools import groupby

import torch

from flowkern._checks import describe
from flowkern.data import DataError

FILE = "semantic_ids.json"
VERSION = 1
CODE_PATTERN = re.compile(r"<[a-z]_\d+>")


def rq_kmeans(embeddings, *, levels: int = 3, codebook_size: int = 64, seed: int = 0,
              iterations: int = 25) -> torch.Tensor:
    """(N, levels + 1) int64 codes, unique per item, each in [0, codebook_size)."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point() \
            or 0 in embeddings.shape:
        raise ValueError(f"embeddings must be a non-empty (items, dims) float tensor, got {describe(embeddings)}")
    bad = (~torch.isfinite(embeddings)).any(1).nonzero()
    if len(bad):
        raise ValueError(f"embeddings holds NaN or inf at item {bad[0, 0].item()}")
    _check_int("levels", levels, 1)
    _check_int("codebook_size", codebook_size, 2)
    _check_int("iterations", iterations, 1)
    generator = torch.Generator().manual_seed(seed)
    residual = embeddings.detach().to("cpu", torch.float64)
    codes = []
    for _ in range(levels):
        centroids, assignment = _kmeans(residual, codebook_size, iterations, generator)
        codes.append(assignment)
        residual = residual - centroids[assignment]
    codes = torch.stack(codes, 1)
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)  # items of one prefix together, in id order
    sizes = torch.bincount(group)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group)) - (sizes.cumsum(0) - sizes)[group[order]]
    if sizes.max() > codebook_size:
        crowded = (group == sizes.argmax()).nonzero()[0, 0]
        raise ValueError(f"codebook_size={codebook_size} with levels={levels} cannot give unique codes: "
                         f"{sizes.max().item()} items share the codes {tuple(codes[crowded].tolist())}; "
                         f"raise codebook_size or levels")
    return torch.cat([codes, rank[:, None]], 1)


def _check_int(name, value, least) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _kmeans(x, k, iterations, generator):
    """Centroids (k', D) and each row's cluster, k' = min(k, distinct rows)."""
    k = min(k, len(torch.unique(x, dim=0)))
    centroids, assignment = _kmeans_plus_plus(x, k, generator), None
    for _ in range(iterations):
        new = torch.cdist(x, centroids).argmin(1)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sizes = torch.bincount(assignment, minlength=k)
        centroids = torch.zeros_like(centroids).index_add_(0, assignment, x) / sizes.clamp(min=1)[:, None]
        empty = (sizes == 0).nonzero().flatten()
        if len(empty):
            distance = (x - centroids[assignment]).pow(2).sum(1)
            centroids[empty] = x[torch.argsort(distance, descending=True, stable=True)[:len(empty)]]
    return centroids, assignment


def _kmeans_plus_plus(x, k, generator):
    """k distinct rows of x: the first uniformly, each next with probability ∝ its squared
    distance to the nearest row chosen so far (Arthur & Vassilvitskii, 2007)."""
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    nearest = (x - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):
        chosen = x[torch.multinomial(nearest, 1, generator=generator)]
        centroids = torch.cat([centroids, chosen])
        nearest = torch.minimum(nearest, (x - chosen).pow(2).sum(1))
    return centroids


class SemanticIDs:
    """The codes of N items: `codes` (N, levels + 1) int64, unique rows, in [0, codebook_size)."""

    def __init__(self, codes, codebook_size: int, saved_first_id=None):
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.dtype != torch.int64 or not len(codes) or not 2 <= codes.shape[1] <= 26:
            raise ValueError(f"codes must be a non-empty (items, levels + 1) int64 tensor with 2 to 26 columns "
                             f"(levels a to z), got {describe(codes)}")
        _check_int("codebook_size", codebook_size, 2)
        bad = ((codes < 0) | (codes >= codebook_size)).any(1).nonzero()
        if len(bad):
            raise ValueError(f"codes of item {bad[0, 0].item()} are {codes[bad[0, 0]].tolist()}, "
                             f"outside [0, {codebook_size - 1}] (codebook_size)")
        self.codes, self.codebook_size, self.saved_first_id = codes, codebook_size, saved_first_id
        self._texts = ["".join(self.token(level, code) for level, code in enumerate(row)) for row in codes.tolist()]
        self._items = {}
        for item, text in enumerate(self._texts):
            if text in self._items:
                raise ValueError(f"codes: items {self._items[text]} and {item} share the code {text}")
            self._items[text] = item

    @classmethod
    def fit(cls, embeddings, *, levels: int = 3, codebook_size: int = 64, seed: int = 0) -> "SemanticIDs":
        return cls(rq_kmeans(embeddings, levels=levels, codebook_size=codebook_size, seed=seed), codebook_size)

    def token(self, level: int, code: int) -> str:
        if not 0 <= level < self.codes.shape[1] or not 0 <= code < self.codebook_size:
            raise ValueError(f"level {level}, code {code}: expected level in [0, {self.codes.shape[1] - 1}] "
                             f"and code in [0, {self.codebook_size - 1}]")
        return f"<{chr(ord('a') + level)}_{code}>"

    def vocabulary(self) -> list:
        """Every level's every token, level by level: ids that do not depend on the codes used."""
        return [self.token(level, code) for level in range(self.codes.shape[1]) for code in range(self.codebook_size)]

    def text(self, item: int) -> str:
        return self._texts[item]

    def texts(self) -> list:
        return list(self._texts)

    def item_of(self, text: str) -> int:
        if text not in self._items:
            raise ValueError(f"text {text!r} is the semantic ID of no item")
        return self._items[text]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.codes.tolist()).encode()).hexdigest()

    def save(self, directory: str, first_id=None) -> None:
        """Write `directory`/semantic_ids.json (with the first code token's id, if given)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, FILE), "w") as f:
            json.dump(dict(version=VERSION, codebook_size=self.codebook_size, first_id=first_id,
                           fingerprint=self.fingerprint(), codes=self.codes.tolist()), f)

    @classmethod
    def load(cls, directory: str) -> "SemanticIDs":
        path = os.path.join(directory, FILE)
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except OSError as error:
            raise DataError(f"{path}: cannot read it ({error.strerror})") from None
        except ValueError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        keys = {"version", "codebook_size", "first_id", "fingerprint", "codes"}
        if not isinstance(saved, dict) or set(saved) != keys:
            raise DataError(f"{path}: expected a JSON object with the keys {sorted(keys)}")
        if saved["version"] != VERSION:
            raise DataError(f"{path}: format version {saved['version']!r}, this flowkern reads version {VERSION}")
        try:
            if saved["first_id"] is not None:
                _check_int("first_id", saved["first_id"], 0)
            ids = cls(torch.tensor(saved["codes"]), saved["codebook_size"], saved["first_id"])
        except (ValueError, TypeError, RuntimeError) as error:
            raise DataError(f"{path}: {error}") from None
        if ids.fingerprint() != saved["fingerprint"]:
            raise DataError(f"{path}: the codes do not match their fingerprint (the file was edited or damaged)")
        return ids


def sasrec_item_embeddings(model) -> torch.Tensor:
    """(num_items, hidden): a `flowkern.sasrec.SASRec`'s item embeddings (its padding row left out)."""
    return model.items.weight[:model.num_items].detach().float().clone()


@torch.no_grad()
def title_embeddings(model, tokenizer, titles, batch_size: int = 64) -> torch.Tensor:
    """(N, hidden): the causal LM's last hidden state, mean-pooled over each title's tokens."""
    _check_int("batch_size", batch_size, 1)
    tokens = [tokenizer.encode(title) for title in titles]
    if not tokens:
        raise ValueError("titles is empty")
    if not all(tokens):
        empty = [len(ids) for ids in tokens].index(0)
        raise ValueError(f"titles: item {empty} ({titles[empty]!r}) encodes to no tokens")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.base_model  # the transformer under the LM head
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    pooled = []
    try:
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([t + [0] * (width - len(t)) for t in batch], device=device)
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in batch], device=device)
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            pooled.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(pooled)


class CodeTokenizer:
    """A flowkern tokenizer plus the code tokens: token j of `semantic_ids.vocabulary()` is id
    first_id + j; text between code tokens goes through the base tokenizer."""

    def __init__(self, base, semantic_ids: SemanticIDs, first_id: int):
        _check_int("first_id", first_id, 0)
        self.base, self.semantic_ids, self.first_id = base, semantic_ids, first_id
        self.tokens = semantic_ids.vocabulary()
        self.vocab_size = first_id + len(self.tokens)
        self._ids = {token: first_id + j for j, token in enumerate(self.tokens)}
        self.name = f"{base.name} + semantic IDs"
        self.special_ids = base.special_ids
        self.tokenizer = getattr(base, "tokenizer", None)  # a Hugging Face tokenizer's chat template

    @classmethod
    def from_pretrained(cls, base, directory: str) -> "CodeTokenizer":
        ids = SemanticIDs.load(directory)
        if ids.saved_first_id is None:
            raise DataError(f"{os.path.join(directory, FILE)}: no first_id (write it with "
                            f"CodeTokenizer.save_pretrained, or SemanticIDs.save(directory, first_id))")
        return cls(base, ids, ids.saved_first_id)

    def encode(self, text: str) -> list:
        ids, start = [], 0
        for match in CODE_PATTERN.finditer(text):
            if match.group() in self._ids:
                ids += self.base.encode(text[start:match.start()]) + [self._ids[match.group()]]
                start = match.end()
        return ids + self.base.encode(text[start:])

    def decode(self, ids) -> str:
        runs = groupby(map(int, ids), lambda i: self.first_id <= i < self.vocab_size)
        return "".join("".join(self.tokens[i - self.first_id] for i in run) if code else self.base.decode(list(run))
                       for code, run in runs)

    def save_pretrained(self, directory: str) -> None:
        self.base.save_pretrained(directory)
        self.semantic_ids.save(directory, first_id=self.first_id)


def add_code_tokens(model, tokenizer, semantic_ids: SemanticIDs, seed: int = 0) -> CodeTokenizer:
    """Append the code tokens after every id the model or the tokenizer already has.  Each new
    embedding row (and output row, if the head is not tied) is drawn from N(mean, std²) of the
    old rows, per dimension, from a generator seeded with `seed`: on the old rows' scale, and
    distinct, so that the model tells the codes apart from its first step (transformers'
    mean_resizing starts them all at the mean, up to 1e-9)."""
    known = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else len(tokenizer.tokenizer)
    first_id = max(model.get_input_embeddings().num_embeddings, known)
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(first_id + len(semantic_ids.vocabulary()), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    tables = {id(table.weight): table.weight for table in (model.get_input_embeddings(), model.get_output_embeddings())
              if table is not None}
    with torch.no_grad():
        for weight in tables.values():
            old = weight[:rows].double()
            noise = torch.randn(len(weight) - rows, weight.shape[1], generator=generator, dtype=torch.float64)
            weight[rows:] = (old.mean(0) + old.std(0) * noise).to(weight)
    return CodeTokenizer(tokenizer, semantic_ids, first_id)
