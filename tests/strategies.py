"""Hypothesis strategies and data builders shared by the tests: random tries (duplicate titles,
titles that are prefixes of others, single items, deep and wide tries) and batches of
trajectories through them."""

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

import flowkern
from flowkern.data import BUILTIN, _read_items
from reference.trie import DictTrie

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
MOVIES = BUILTIN["movies"]  # shipped in the package
TITLES = ["Alien", "Aliens", "Heat", "Up", "Jaws", "Big"]


@dataclass
class Catalogue:
    sequences: list
    rewards: list
    eos: int

    def trie(self):
        return flowkern.Trie.build(self.sequences, self.rewards, eos_token_id=self.eos)

    def dict_trie(self):
        return DictTrie(self.sequences, self.rewards, self.eos)


@st.composite
def catalogues(draw, max_items=12, max_len=6, max_token=12):
    """Items over a small alphabet, so that shared prefixes and duplicates are common."""
    alphabet = draw(st.integers(1, max_token))
    eos = draw(st.integers(0, alphabet))
    tokens = st.integers(0, alphabet).filter(lambda x: x != eos)
    shape = draw(st.sampled_from(["mixed", "deep", "wide"]))
    lengths = {"mixed": (1, max_len), "deep": (max_len, 3 * max_len), "wide": (1, 2)}[shape]
    count = draw(st.integers(1, 3 if shape == "deep" else max_items))
    sequences = draw(st.lists(st.lists(tokens, min_size=lengths[0], max_size=lengths[1]),
                              min_size=count, max_size=count))
    if count > 1 and draw(st.booleans()):  # force a duplicate title and a prefix title
        sequences[-1] = list(sequences[0])
        sequences[-2] = list(sequences[0][: max(1, len(sequences[0]) - 1)])
    rewards = draw(st.lists(st.floats(0.01, 100.0), min_size=count, max_size=count))
    return Catalogue(sequences, rewards, eos)


@dataclass
class Batch:
    catalogue: Catalogue
    tokens: torch.Tensor
    logits: torch.Tensor
    items: list  # item index drawn for each row


def make_batch(catalogue, items, seed=0, extra_steps=0, extra_vocab=0, dtype=torch.float64):
    """Rows are the given items plus the termination token, then junk that the loss must
    never read: token ids outside the vocabulary, NaN logits."""
    generator = torch.Generator().manual_seed(seed)
    vocab = max(max(map(max, catalogue.sequences)), catalogue.eos) + 1 + extra_vocab
    steps = max(len(catalogue.sequences[i]) for i in items) + 1 + extra_steps
    junk = torch.tensor([-100, vocab, 10**9, 0, catalogue.eos])
    tokens = junk[torch.randint(len(junk), (len(items), steps), generator=generator)]
    logits = torch.randn(len(items), steps, vocab, generator=generator, dtype=torch.float64) * 3
    for b, i in enumerate(items):
        row = catalogue.sequences[i] + [catalogue.eos]
        tokens[b, : len(row)] = torch.tensor(row)
        logits[b, len(row):] = float("nan")
    return Batch(catalogue, tokens, logits.to(dtype), items)


@st.composite
def batches(draw, catalogue_strategy=None, max_batch=4):
    catalogue = draw(catalogue_strategy or catalogues())
    rows = draw(st.integers(1, max_batch))
    items = draw(st.lists(st.integers(0, len(catalogue.sequences) - 1), min_size=rows, max_size=rows))
    return make_batch(catalogue, items, seed=draw(st.integers(0, 2**31 - 1)),
                      extra_steps=draw(st.integers(0, 2)), extra_vocab=draw(st.integers(0, 3)))


def load_title_ids():
    with open(os.path.join(DATA, "qwen2.5_title_ids.json")) as f:
        return json.load(f)


def movie_catalogue():
    """All Movies_and_TV items with real Qwen2.5 ids; reward = 1 + training count of the title."""
    ids = load_title_ids()
    titles = _read_items(os.path.join(MOVIES, "items.tsv"))
    with open(os.path.join(MOVIES, "item_counts.json")) as f:
        counts = json.load(f)
    return Catalogue([ids[t] for t in titles], [1.0 + counts.get(t, 0) for t in titles], 198)


def history_free_catalogue(name):
    """A history-free target (title -> interaction count) with real Qwen2.5 ids."""
    ids = load_title_ids()
    with open(os.path.join(DATA, "history_free", name)) as f:
        counts = json.load(f)
    return Catalogue([ids[t] for t in counts], [float(c) for c in counts.values()], 198)


def tiny_qwen2(vocab, seed=0):
    """A freshly initialised two-layer Qwen2 causal LM (no download), in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


def write_dataset(directory, rows=12):
    """A tiny dataset in the Movies_and_TV layout."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "items.tsv"), "w") as f:
        f.write("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TITLES)))
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        with open(os.path.join(directory, f"{split}.csv"), "w") as f:
            f.write("history_item_id,item_id,history_item_title,item_title\n")
            for _ in range(rows):
                history = rng.choice(len(TITLES), size=3, replace=False).tolist()
                target = int(rng.integers(len(TITLES)))
                names = [TITLES[i] for i in history]
                f.write(f"\"{history}\",{target},\"{names}\",{TITLES[target]}\n")
    return directory
