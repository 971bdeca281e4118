"""Recommendation tasks for the trainer: items, prompts, rewards, popularity groups.

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
import csv
import json
import os
from dataclasses import dataclass

import numpy as np

from flowkern.trie import Trie

TERMINATION = "\n"
EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "select_100_Movies.json")
NUM_GROUPS = 8
HISTORY_PROMPT = ("### Instruction:\nThe user has watched the movies below, oldest first. "
                  "Recommend the next movie the user will watch.\n\n### Input:\n{history}\n\n### Response:\n")
HISTORY_FREE_PROMPT = "### Instruction:\nRecommend a movie.\n\n### Response:\n"


class DataError(ValueError):
    """A data file is missing or ill-formed; the message names the file and line."""


@dataclass
class Example:
    prompt: list          # prompt token ids
    target: int = -1      # the next item's id (−1: none, history-free)


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

    def target_distribution(self) -> np.ndarray:
        """History-free: each item's share of the counts."""
        return self.train_counts / self.train_counts.sum()

    def popularity_groups(self) -> tuple:
        """(group of each item, p_train per group): titles sorted by their training-history
        count (descending, ties by first appearance), cut into 8 equal-size groups; titles
        never seen in training histories join the least popular group.  p_train(g) is the
        share of training-history interactions in group g."""
        title_count = {}
        for title, count in zip(self.titles, self.train_counts):
            title_count[title] = title_count.get(title, 0) + int(count)
        seen = sorted((t for t in title_count if title_count[t] > 0), key=lambda t: -title_count[t])
        group_of_title = {t: NUM_GROUPS - 1 for t in title_count}
        for g, chunk in enumerate(np.array_split(np.arange(len(seen)), NUM_GROUPS)):
            for i in chunk:
                group_of_title[seen[i]] = g
        share = np.zeros(NUM_GROUPS)
        for title, count in title_count.items():
            share[group_of_title[title]] += count
        return np.array([group_of_title[t] for t in self.titles]), share / share.sum()


def load_task(path, tokenizer) -> Task:
    """A directory (with history) or a .json of title -> count (history-free); None: the
    embedded 100-movie history-free set."""
    path = EMBEDDED if path is None else os.fspath(path)
    eos = _termination_id(tokenizer)
    if os.path.isdir(path):
        return _load_history(path, tokenizer, eos)
    if path.endswith(".json"):
        return _load_history_free(path, tokenizer, eos)
    raise DataError(f"--data {path!r}: expected a directory (items.tsv, train/valid/test.csv) or a .json file "
                    f"of title -> count")


def _load_history_free(path, tokenizer, eos) -> Task:
    try:
        with open(path, encoding="utf-8") as f:
            counts = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(counts, dict) or not counts:
        raise DataError(f"{path}: expected a non-empty JSON object of title -> count")
    for title, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
            raise DataError(f"{path}: the count of {title!r} must be a number > 0, got {count!r}")
    titles = list(counts)
    weights = np.array([float(counts[t]) for t in titles])
    prompt = Example(tokenizer.encode(HISTORY_FREE_PROMPT))
    return Task("history_free", path, titles, _tokenise_titles(titles, tokenizer, eos, path), weights, weights,
                eos, [prompt], [], [])


def _load_history(directory, tokenizer, eos) -> Task:
    titles = _read_items(os.path.join(directory, "items.tsv"))
    splits = {name: _read_rows(os.path.join(directory, f"{name}.csv"), len(titles))
              for name in ("train", "valid", "test")}
    counts = np.zeros(len(titles))
    for history, _ in splits["train"]:
        np.add.at(counts, history, 1)
    quoted = [f'"{t}"' for t in titles]

    def examples(rows):
        return [Example(tokenizer.encode(HISTORY_PROMPT.format(history=", ".join(quoted[i] for i in history))),
                        target) for history, target in rows]

    return Task("history", directory, titles, _tokenise_titles(titles, tokenizer, eos, "items.tsv"), counts + 1.0,
                counts, eos, examples(splits["train"]), examples(splits["valid"]), examples(splits["test"]))


def _read_items(path) -> list:
    titles = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected item_id<TAB>title lines)") from None
    if not lines or lines[0].split("\t") != ["item_id", "title"]:
        raise DataError(f"{path}, line 1: expected the header 'item_id<TAB>title'")
    for number, line in enumerate(lines[1:], start=2):
        item, tab, title = line.partition("\t")
        if not tab or not item.isdigit() or int(item) != len(titles) or not title.strip():
            raise DataError(f"{path}, line {number}: expected '{len(titles)}<TAB>title', got {line!r}")
        titles.append(title)
    if not titles:
        raise DataError(f"{path}: no items")
    return titles


def _read_rows(path, num_items) -> list:
    """[(history item ids, next item id)] of one split."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"history_item_id", "item_id"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}, line 1: missing columns {sorted(missing)}")
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                try:
                    history, target = ast.literal_eval(row["history_item_id"]), int(row["item_id"])
                except (ValueError, SyntaxError):
                    raise DataError(f"{where}: history_item_id must be a list of item ids and item_id an "
                                    f"item id") from None
                if not isinstance(history, list) or not all(isinstance(i, int) for i in history):
                    raise DataError(f"{where}: history_item_id must be a list of item ids")
                if not all(0 <= i < num_items for i in history + [target]):
                    raise DataError(f"{where}: item ids must lie in [0, {num_items - 1}] (items.tsv)")
                rows.append((history, target))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
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
        tokens.append(ids)
    return tokens
