"""Recommendation tasks for the trainer: items, prompts, rewards, popularity groups, and
the auxiliary recommender's preference scores (`load_preferences`, `normalise_preferences`).

Two modes, as in the Flower paper (arXiv 2503.07377, Sec. 4):
  with history   a directory in the BIGRec/D3/Flower layout: items.tsv (item_id<TAB>title)
                 and train/valid/test.csv (history_item_id, item_id, history_item_title,
                 item_title; histories as Python-literal lists, oldest first).  One row is
                 one prediction: the user's history, then the next item.
  history-free   a JSON of title -> interaction count (RQ1, distribution fitting): one
                 prompt with no history; the target distribution is the counts.

The outcome reward of an item (the leaf reward of the trie, Eq. 9) is its number of
occurrences in the training histories plus one (with history; the +1 keeps unseen items
reachable), or its count (history-free).  A title's termination token is "\\n".
"""

import ast
import hashlib
import csv
import io
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from flowkern.trie import Trie

TERMINATION = "\n"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EMBEDDED = os.path.join(ASSETS, "select_100_Movies.json")
BUILTIN = {"movies": os.path.join(ASSETS, "Movies_and_TV"), "movies-100": EMBEDDED}  # --data names shipped
NUM_GROUPS = 8

# The prompt's words for a domain: what an item is called and what users do with one.
# Amazon's category names; a data set's category comes from its meta.json ("category", or the
# words themselves), else from a keyword in its file or directory name, else the generic words.
DOMAINS = {
    "Movies_and_TV": dict(item="movie", items="movies", done="watched", do="watch"),
    "Video_Games": dict(item="video game", items="video games", done="played", do="play"),
    "CDs_and_Vinyl": dict(item="album", items="albums", done="listened to", do="listen to"),
    "Books": dict(item="book", items="books", done="read", do="read"),
}
KEYWORDS = {"movie": "Movies_and_TV", "game": "Video_Games", "cd": "CDs_and_Vinyl", "vinyl": "CDs_and_Vinyl",
            "music": "CDs_and_Vinyl", "book": "Books"}
GENERIC = dict(item="item", items="items", done="interacted with", do="interact with")
HISTORY_PROMPT = ("### Instruction:\nThe user has {done} the {items} below, oldest first. "
                  "Recommend the next {item} the user will {do}.\n\n### Input:\n{history}\n\n### Response:\n")
HISTORY_FREE_PROMPT = "### Instruction:\nRecommend {a_item}.\n\n### Response:\n"


class DataError(ValueError):
    """A data file is missing or ill-formed; the message names the file and line."""


@dataclass
class Example:
    prompt: list          # prompt token ids
    target: int = -1      # the next item's id (−1: none, history-free)
    history: tuple = ()   # the history's item ids, oldest first (with history)


@dataclass
class Task:
    mode: str             # "history" or "history_free"
    source: str
    titles: list          # by item id
    item_tokens: list     # each title's token ids, termination token excluded
    rewards: np.ndarray   # outcome reward per item, > 0
    train_counts: np.ndarray  # per item: occurrences in training histories (history-free: the counts)
    eos_token_id: int
    train: list           # Examples; history-free: one Example, the prompt
    valid: list
    test: list

    def trie(self) -> Trie:
        return Trie.build(self.item_tokens, self.rewards, eos_token_id=self.eos_token_id)

    def fingerprint(self) -> str:
        """A short hash of the items, rewards and training rows (what a resume checks)."""
        digest = hashlib.sha256("\x00".join(self.titles).encode())
        digest.update(np.asarray(self.rewards, dtype=np.float64).tobytes())
        for example in self.train:
            digest.update(np.asarray(example.prompt + [-1, example.target], dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def target_distribution(self) -> np.ndarray:
        """History-free: each item's share of the counts."""
        return self.train_counts / self.train_counts.sum()

    def popularity_groups(self) -> tuple:
        return popularity_groups(self.titles, self.train_counts)


def popularity_groups(titles, train_counts) -> tuple:
    """(group of each item, p_train per group): titles sorted by their training-history
    count (descending, ties by first appearance), cut into 8 equal-size groups; titles
    never seen in training histories join the least popular group.  p_train(g) is the
    share of training-history interactions in group g."""
    title_count = {}
    for title, count in zip(titles, train_counts):
        title_count[title] = title_count.get(title, 0) + int(count)
    seen = sorted((t for t in title_count if title_count[t] > 0), key=lambda t: -title_count[t])
    group_of_title = {t: NUM_GROUPS - 1 for t in title_count}
    for g, chunk in enumerate(np.array_split(np.arange(len(seen)), NUM_GROUPS)):
        for i in chunk:
            group_of_title[seen[i]] = g
    share = np.zeros(NUM_GROUPS)
    for title, count in title_count.items():
        share[group_of_title[title]] += count
    return np.array([group_of_title[t] for t in titles]), share / share.sum()


def ifair_weights(task) -> np.ndarray:
    """IFairLRS's per-item SFT weights (Jiang et al. 2024, item-side fairness; the Flower
    repository's item_side_reweight.py): an example whose target is in popularity group g
    weighs w(g) = p_train(g) / q(g), p_train(g) the group's share of the training histories'
    interactions (Task.popularity_groups) and q(g) its share of the training targets.  Groups
    over-represented among targets relative to the histories are weighed down; the weights
    average 1 over the training targets.  A group no training target is in gets 1 (unused)."""
    groups, p_train = task.popularity_groups()
    q = np.bincount(groups[[example.target for example in task.train]], minlength=len(p_train)) / len(task.train)
    per_group = np.divide(p_train, q, out=np.ones_like(p_train), where=q > 0)
    return per_group[groups]


def load_task(path, tokenizer, *, item_noun=None, prompt_template=None, max_history=None,
              chat_template=False, item_texts=None) -> Task:
    """A directory (with history), a .json of title -> count (history-free), or a shipped
    name (BUILTIN); None: the embedded 100-movie history-free set.

    item_noun:        what an item is called in the prompt (default: from the data, see DOMAINS)
    prompt_template:  a text file replacing the prompt; it may use {history} (with history:
                      required), {item}, {items}, {a_item}, {done} and {do}
    max_history:      keep each history's N most recent items (the oldest are dropped)
    chat_template:    wrap the prompt as a user message in the tokenizer's chat template
    item_texts:       with history: each item's text in the histories and as the generated
                      target, by item id (default: its title), e.g. semantic-ID codes
                      (flowkern.semantic_ids); titles stay the items' names in the metrics"""
    path = resolve(path)
    if max_history is not None and max_history < 1:
        raise DataError(f"max_history must be >= 1, got {max_history}")
    if os.path.isdir(path):
        mode = "history"
    elif path.endswith(".json"):
        mode = "history_free"
    else:
        raise DataError(f"--data {path!r}: expected a directory (items.tsv, train/valid/test.csv), a .json file "
                        f"of title -> count, or one of {sorted(BUILTIN)}")
    words = _domain_words(path, item_noun)
    template = _read_template(prompt_template, mode) if prompt_template else (
        HISTORY_PROMPT if mode == "history" else HISTORY_FREE_PROMPT)

    def encode(history=None):
        text = template.format(**words, **({} if history is None else {"history": history}))
        return tokenizer.encode(_chat(tokenizer, text) if chat_template else text)

    eos = _termination_id(tokenizer)
    if mode == "history":
        return _load_history(path, tokenizer, eos, encode, max_history, item_texts)
    if item_texts is not None:
        raise DataError(f"--data {path}: item texts other than the titles (semantic IDs) need a data set with history")
    return _load_history_free(path, tokenizer, eos, encode)


def resolve(path) -> str:
    """The file or directory `--data path` names: a path that exists, else a shipped set
    (BUILTIN); None is the embedded history-free file."""
    if path is None:
        return EMBEDDED
    path = os.fspath(path)
    return path if os.path.exists(path) else BUILTIN.get(path, path)


def _domain_words(path, item_noun) -> dict:
    """The prompt's words (DOMAINS) for the data at `path`: its meta.json, else a keyword of
    its name; `item_noun` overrides the noun."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    meta_path = os.path.join(folder, "meta.json")
    meta = {}
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{meta_path}: not valid JSON ({error})") from None
        unknown = set(meta) - {"category", *GENERIC} if isinstance(meta, dict) else None
        if unknown is None or unknown or not all(isinstance(v, str) and v.strip() for v in meta.values()):
            raise DataError(f"{meta_path}: expected an object of non-empty strings with keys among "
                            f"{['category', *GENERIC]}, got {meta!r}")
    category = meta.get("category") or next(
        (c for word, c in KEYWORDS.items() if word in os.path.basename(os.path.normpath(path)).lower()), None)
    words = {**GENERIC, **DOMAINS.get(category, {}), **{k: v for k, v in meta.items() if k in GENERIC}}
    if item_noun:
        words.update(item=item_noun, items=item_noun + "s")
    words["a_item"] = ("an " if words["item"][0].lower() in "aeiou" else "a ") + words["item"]
    return words


def _read_template(path, mode) -> str:
    """A prompt template file, its placeholders checked."""
    import string

    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--prompt-template {path}: cannot read it ({error})") from None
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise DataError(f"--prompt-template {path}: {error} (write literal braces as {{{{ and }}}})") from None
    allowed = {"history", "a_item", *GENERIC} if mode == "history" else {"a_item", *GENERIC}
    if fields - allowed or (mode == "history" and "history" not in fields):
        raise DataError(f"--prompt-template {path}: placeholders must be among {sorted(allowed)}"
                        f"{' and include {history}' if mode == 'history' else ''}, got {sorted(fields)}")
    return template


def _chat(tokenizer, text) -> str:
    inner = getattr(tokenizer, "tokenizer", None)
    if getattr(inner, "chat_template", None) is None:
        raise DataError(f"--chat-template: the tokenizer ({tokenizer.name}) has no chat template")
    return inner.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _load_history_free(path, tokenizer, eos, encode) -> Task:
    """A title appearing twice and counts that are not finite, or whose sum is not, are errors."""
    text = _read_text(path, "")
    try:
        counts = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply for a title -> count object") from None
    if not isinstance(counts, dict) or not counts:
        raise DataError(f"{path}: expected a non-empty JSON object of title -> count")
    for title, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not 0 < count <= sys.float_info.max:
            raise DataError(f"{path}: the count of {title!r} must be a finite number > 0, got {count!r}")
    titles = list(counts)
    weights = np.array([float(counts[t]) for t in titles])
    with np.errstate(over="ignore"):
        total = weights.sum()
    if not np.isfinite(total):
        raise DataError(f"{path}: the counts sum to more than a float64 holds")
    return Task("history_free", path, titles, _tokenise_titles(titles, tokenizer, eos, path), weights, weights,
                eos, [Example(encode())], [], [])


def read_history_data(directory) -> tuple:
    """(titles, {"train"|"valid"|"test": [(history item ids, next item id)]}) of a data
    directory with history, checked as load_task checks it; no tokenizer needed."""
    titles = _read_items(os.path.join(directory, "items.tsv"))
    return titles, {name: _read_rows(os.path.join(directory, f"{name}.csv"), len(titles))
                    for name in ("train", "valid", "test")}


def history_counts(num_items, train_rows) -> np.ndarray:
    """Each item's occurrences in the training histories."""
    counts = np.zeros(num_items)
    for history, _ in train_rows:
        np.add.at(counts, history, 1)
    return counts


def _load_history(directory, tokenizer, eos, encode, max_history, item_texts) -> Task:
    titles, splits = read_history_data(directory)
    counts = history_counts(len(titles), splits["train"])
    if item_texts is not None and len(item_texts) != len(titles):
        raise DataError(f"{directory}: {len(item_texts)} item texts for the {len(titles)} items of items.tsv")
    texts = titles if item_texts is None else list(item_texts)
    quoted = [f'"{t}"' for t in texts]

    def examples(rows):
        return [Example(encode(", ".join(quoted[i] for i in history[-max_history if max_history else 0:])), target,
                        tuple(history)) for history, target in rows]

    return Task("history", directory, titles, _tokenise_titles(texts, tokenizer, eos, "items.tsv"), counts + 1.0,
                counts, eos, examples(splits["train"]), examples(splits["valid"]), examples(splits["test"]))


def _unique_keys(path, pairs) -> dict:
    keys = [key for key, _ in pairs]
    repeated = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
    if repeated is not None:
        raise DataError(f"{path}: the title {repeated!r} appears twice")
    return dict(pairs)


def _read_text(path, expected) -> str:
    """The file as UTF-8 text; a missing file, a directory or bytes that are not UTF-8 are
    DataErrors naming the file (and the line of the first bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file{expected}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file{expected}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x})") from None


def _item_id(text):
    """An item id written in ASCII digits, nothing around them; None otherwise."""
    return int(text) if isinstance(text, str) and text.isascii() and text.isdigit() else None


def _read_items(path) -> list:
    """items.tsv: the header, then `i<TAB>title` for i = 0, 1, ... in ASCII digits."""
    titles = []
    lines = _read_text(path, " (expected item_id<TAB>title lines)").splitlines()
    if not lines or lines[0].split("\t") != ["item_id", "title"]:
        raise DataError(f"{path}, line 1: expected the header 'item_id<TAB>title'")
    for number, line in enumerate(lines[1:], start=2):
        item, tab, title = line.partition("\t")
        if not tab or _item_id(item) != len(titles) or not title.strip():
            raise DataError(f"{path}, line {number}: expected '{len(titles)}<TAB>title', got {line!r}")
        titles.append(title)
    if not titles:
        raise DataError(f"{path}: no items")
    return titles


def _read_rows(path, num_items) -> list:
    """[(history item ids, next item id)] of one split; ids are ints (not bools), item_id in
    ASCII digits."""
    rows = []
    reader = csv.DictReader(io.StringIO(_read_text(path, ""), newline=""))
    missing = {"history_item_id", "item_id"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path}, line 1: missing columns {sorted(missing)}")
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        target = _item_id(row["item_id"])
        if target is None:
            raise DataError(f"{where}: item_id must be an item id in ASCII digits, got {row['item_id']!r}")
        try:
            history = ast.literal_eval(row["history_item_id"] or "")
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{where}: history_item_id must be a list of item ids") from None
        if not isinstance(history, list) or not all(type(i) is int for i in history):
            raise DataError(f"{where}: history_item_id must be a list of item ids")
        if not all(0 <= i < num_items for i in history + [target]):
            raise DataError(f"{where}: item ids must lie in [0, {num_items - 1}] (items.tsv)")
        rows.append((history, target))
    if not rows:
        raise DataError(f"{path}: the split is empty")
    return rows


def _termination_id(tokenizer) -> int:
    ids = tokenizer.encode(TERMINATION)
    if len(ids) != 1:
        raise DataError(f"the tokenizer encodes the termination token '\\n' as {ids}; flowkern needs one token")
    return ids[0]


def _tokenise_titles(titles, tokenizer, eos, source) -> list:
    tokens = []
    for item, title in enumerate(titles):
        ids = tokenizer.encode(title)
        if not ids or eos in ids:
            raise DataError(f"{source}: the title of item {item} ({title!r}) cannot be tokenised as an item: "
                            f"it gives {ids}, which must be non-empty and free of the termination token")
        if tokenizer.special_ids.intersection(ids):
            raise DataError(f"{source}: the title of item {item} ({title!r}) holds a special token of the tokenizer "
                            f"({sorted(tokenizer.special_ids.intersection(ids))}): a title must be plain text")
        tokens.append(ids)
    return tokens


def load_preferences(path, mode, task):
    """The .npy (train rows, items) of an auxiliary recommender's scores, normalised per row
    (normalise_preferences)."""
    scores = np.load(path)
    expected = (len(task.train), len(task.titles))
    if scores.shape != expected:
        raise DataError(f"--pref-scores {path}: expected shape (train rows, items) = {expected}, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise DataError(f"--pref-scores {path}: holds NaN or inf")
    return normalise_preferences(torch.from_numpy(scores if np.issubdtype(scores.dtype, np.floating)
                                                  else scores.astype(np.float64)), mode)


def normalise_preferences(scores, mode):
    """Preference scores p > 0 from each row of an auxiliary recommender's scores s (Sec. 3.3.3,
    as published): div: (s − mean)/(max − min) + 1, add: (s − min)/(max − min) + 0.5; rows
    with max = min become all 1; clamped at 1e-3."""
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    spread = torch.where(high > low, high - low, torch.ones_like(high))
    if mode == "div":
        normalised = (scores - scores.mean(1, keepdim=True)) / spread + 1.0
    else:
        normalised = (scores - low) / spread + 0.5
    return torch.where(high > low, normalised, torch.ones_like(normalised)).clamp(min=1e-3)
